"""What an agent's session channel sends while its upstream channel is still opening."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest

from jitgate.proxy.session import Relay
from jitgate.proxy.sshrelay import MAX_HELD_SIGNALS, AgentSide


class Peer(asyncssh.SSHClientChannel[bytes]):
    """The host's channel: notes what the relay does with it (never connected)."""

    def __init__(self) -> None:  # no connection: only the calls below are made
        self.calls: list[tuple[str, Any]] = []

    def change_terminal_size(
        self, width: int, height: int, pixwidth: int = 0, pixheight: int = 0
    ) -> None:
        self.calls.append(("size", (width, height, pixwidth, pixheight)))

    def send_signal(self, signal: str) -> None:
        self.calls.append(("signal", signal))

    def write(self, data: bytes, datatype: asyncssh.DataType = None) -> None:
        self.calls.append(("data", data))

    def write_eof(self) -> None:
        self.calls.append(("eof", None))

    def abort(self) -> None:
        self.calls.append(("abort", None))


class AgentChannel(asyncssh.SSHServerChannel[bytes]):
    """The agent's channel, as far as the relay uses it before and at the open."""

    def __init__(self) -> None:
        self._init_recv_window = 64 * 1024
        self.paused = False

    def get_environment_bytes(self) -> dict[bytes, bytes]:
        return {}

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Upstream:
    """An upstream connection whose session opens when the test says so."""

    def __init__(self) -> None:
        self.peer = Peer()
        self.opened = asyncio.Event()
        self.asked: dict[str, Any] = {}

    async def create_session(self, factory: Any, **asked: Any) -> tuple[Peer, Any]:
        self.asked = asked
        await self.opened.wait()
        return self.peer, factory()


async def _opening(upstream: Upstream, pty: bool) -> tuple[AgentSide, AgentChannel]:
    """An agent channel that asked for a shell and whose upstream channel is opening."""
    side = AgentSide(
        upstream=upstream,  # type: ignore[arg-type]  # only create_session is used
        stats=Relay(opened_at=0.0),
        label="test",
        on_close=lambda _: None,
    )
    chan = AgentChannel()
    side.connection_made(chan)
    if pty:
        side.pty_requested("xterm", (80, 24, 0, 0), {})
    side.shell_requested()
    side.session_started()
    await asyncio.sleep(0)  # the open has started and waits for the host
    return side, chan


async def test_a_window_change_while_opening_reaches_the_host() -> None:
    upstream = Upstream()
    side, chan = await _opening(upstream, pty=True)
    assert upstream.asked["term_size"] == (80, 24, 0, 0)
    side.terminal_size_changed(132, 43, 0, 0)
    side.data_received(b"ls\n", None)
    upstream.opened.set()
    await asyncio.sleep(0.05)
    # The host's pty was made 80x24; the size the agent has now follows first.
    assert upstream.peer.calls == [("size", (132, 43, 0, 0)), ("data", b"ls\n")]
    assert not chan.paused


async def test_an_unchanged_terminal_is_not_resized() -> None:
    upstream = Upstream()
    await _opening(upstream, pty=True)
    upstream.opened.set()
    await asyncio.sleep(0.05)
    assert upstream.peer.calls == []


async def test_input_eof_and_signals_while_opening_keep_their_order() -> None:
    upstream = Upstream()
    side, chan = await _opening(upstream, pty=False)
    side.data_received(b"first\n", None)
    assert chan.paused  # no more than one window is held here
    side.signal_received("INT")
    side.eof_received()
    upstream.opened.set()
    await asyncio.sleep(0.05)
    assert upstream.peer.calls == [("data", b"first\n"), ("signal", "INT"), ("eof", None)]


@pytest.mark.parametrize("sent", [MAX_HELD_SIGNALS, MAX_HELD_SIGNALS + 5])
async def test_signals_held_are_capped(sent: int) -> None:
    upstream = Upstream()
    side, _ = await _opening(upstream, pty=False)
    for _ in range(sent):
        side.signal_received("HUP")
    upstream.opened.set()
    await asyncio.sleep(0.05)
    assert upstream.peer.calls == [("signal", "HUP")] * MAX_HELD_SIGNALS
