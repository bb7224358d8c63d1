"""kubeforward, piece by piece: the outbound relay, the cut's last frames, whole watch lines.

The whole forward runs in test_kube_frontend.py and test_kube_streams.py;
here its parts meet stand-ins for the agent's and the API server's sockets.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace
from typing import Any

from jitgate.proxy import kubeforward, wsframes
from jitgate.proxy.session import Relay
from tests.kubestreams import build, messages, parse


class Transport:
    """A socket's transport, recording what is written and how it ends."""

    def __init__(self) -> None:
        self.written = b""
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


def forward(*, status_channel: bool = False) -> tuple[kubeforward.Forward, Transport, Transport]:
    """A Forward on a switched WebSocket stream: (it, the agent's transport, the server's)."""
    agent, server = Transport(), Transport()
    held: Any = SimpleNamespace(stats=Relay(opened_at=0.0), session_id="s-1")
    target: Any = SimpleNamespace(name="payments")
    client: Any = SimpleNamespace(writer=SimpleNamespace(transport=agent))
    relay = kubeforward.Forward(client, target, held)
    relay.upstream = SimpleNamespace(transport=server)  # type: ignore[assignment]
    relay.frames = wsframes.Reframer()
    relay.status_channel = status_channel
    return relay, agent, server


def test_nothing_of_the_api_servers_reaches_the_agent_once_the_stream_is_cut() -> None:
    relay, _, _ = forward()
    out = wsframes.frame(wsframes.BINARY, b"\x01out")
    assert relay.outbound(out) == out
    relay.cut = True
    assert relay.outbound(out) == b""
    assert relay.held.stats.bytes_to_client == len(out)  # what was sent, and only that


def test_a_stream_that_breaks_rfc_6455_ends_with_a_1002_close_and_the_server_cut() -> None:
    relay, _, server = forward()
    good = wsframes.frame(wsframes.BINARY, b"\x01ok")
    sent = relay.outbound(good + build(0x89, b"x" * 200))  # a ping over 125 bytes
    reason = b"jitgate: the API server's stream broke the WebSocket protocol"
    assert messages(parse(sent)) == [
        (wsframes.BINARY, b"\x01ok"),
        (wsframes.CLOSE, struct.pack("!H", 1002) + reason),
    ]
    assert server.aborted
    assert relay.cut
    assert relay.outbound(good) == b""


async def test_a_cut_mid_message_finishes_it_then_sends_the_status_and_the_close() -> None:
    relay, agent, _ = forward(status_channel=True)
    whole = wsframes.frame(wsframes.BINARY, b"\x01" + b"o" * 99)
    sent = relay.outbound(whole[:50])
    relay._abort("revoked")
    got = messages(parse(sent + agent.written))
    assert got[0] == (wsframes.BINARY, whole[2:50])
    assert got[1][0] == wsframes.BINARY
    assert got[1][1][:1] == b"\x03"
    assert json.loads(got[1][1][1:])["message"] == "jitgate: the grant has been revoked"
    assert got[2] == (
        wsframes.CLOSE,
        struct.pack("!H", 1008) + b"jitgate: the grant has been revoked",
    )
    assert agent.closing


async def test_a_status_the_server_sent_gets_no_second_one() -> None:
    # client-go reads everything on channel 3 as one Status: ours after the
    # server's would be read as garbage, and the reason lost.
    relay, agent, _ = forward(status_channel=True)
    relay.outbound(wsframes.frame(wsframes.BINARY, b'\x03{"status":"Success"}'))
    relay._abort("revoked")
    assert messages(parse(agent.written)) == [
        (wsframes.CLOSE, struct.pack("!H", 1008) + b"jitgate: the grant has been revoked")
    ]


async def test_after_the_servers_close_frame_the_cut_is_bare() -> None:
    relay, agent, _ = forward(status_channel=True)
    relay.outbound(wsframes.close("done", 1000))
    relay._abort("revoked")
    assert agent.written == b""  # nothing may follow a close frame (RFC 6455 §5.5.1)
    assert agent.aborted


def test_whole_lines_go_on_and_the_start_of_the_next_is_held() -> None:
    held = bytearray()
    assert kubeforward._whole_lines(held, b'{"type":"ADDED"}\n{"ty') == b'{"type":"ADDED"}\n'
    assert kubeforward._whole_lines(held, b'pe":"MOD') == b""
    assert held == b'{"type":"MOD'
    assert kubeforward._whole_lines(held, b'IFIED"}\n') == b'{"type":"MODIFIED"}\n'
    assert held == b""
