"""wsframes: server frames re-cut at every read, messages unchanged, frames built right."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.proxy import wsframes
from tests.kubestreams import PING, build, messages, parse

SIZES = (0, 1, 125, 126, 127, 65535, 65536, 70000)


def relay(data: bytes, cuts: list[int]) -> list[bytes]:
    """What the Reframer sends for data read in pieces ending at the cuts."""
    reframer = wsframes.Reframer()
    ends = [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    sent, start = [], 0
    for end in ends:
        sent.append(reframer.feed(data[start:end]))
        start = end
    return sent


def stream() -> bytes:
    """Messages of every length class, one fragmented by the server around a ping, one masked."""
    data = b"".join(wsframes.frame(wsframes.BINARY, bytes([s % 251]) * s) for s in SIZES)
    data += build(0x01, b"caf\xc3")  # a text message in two fragments (RFC 6455 §5.4)
    data += build(PING | 0x80, b"ping")  # a control frame between them (§5.5)
    data += build(0x80, b"\xa9!")
    data += build(0x82, b"masked payload", mask=b"\x01\x02\x03\x04")
    return data


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096, 1 << 20])
def test_every_read_is_sent_as_whole_frames_and_the_messages_are_unchanged(chunk: int) -> None:
    data = stream()
    sent = relay(data, list(range(chunk, len(data), chunk)))
    for piece in sent:
        parse(piece)  # each send ends at a frame boundary: a close frame could follow now
    assert messages(parse(b"".join(sent))) == messages(parse(data))


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 20_000), max_size=12),
    masked=st.booleans(),
)
def test_messages_survive_any_split_of_the_reads(
    sizes: list[int], cuts: list[int], masked: bool
) -> None:
    mask = b"\x9a\x0b\xc4\x17" if masked else None
    data = b"".join(build(0x82, bytes([n % 256]) * n, mask) for n in sizes)
    sent = relay(data, cuts)
    for piece in sent:
        parse(piece)
    assert messages(parse(b"".join(sent))) == messages(parse(data))


def test_frames_that_arrive_whole_go_on_byte_for_byte() -> None:
    data = b"".join(wsframes.frame(wsframes.BINARY, b"x" * s) for s in SIZES)
    assert wsframes.Reframer().feed(data) == data


def test_a_frame_head_alone_sends_nothing_yet() -> None:
    reframer = wsframes.Reframer()
    assert reframer.feed(wsframes.frame(wsframes.BINARY, b"x" * 300)[:3]) == b""
    assert not reframer.in_message
    assert reframer.end_message() == b""


def test_a_binary_message_cut_mid_frame_is_finished_with_an_empty_final_fragment() -> None:
    reframer = wsframes.Reframer()
    whole = wsframes.frame(wsframes.BINARY, b"\x01" + b"o" * 999)
    sent = reframer.feed(whole[:500])
    assert reframer.in_message
    tail = reframer.end_message()
    assert tail is not None
    # The agent gets the bytes that came, as one complete message, then ours.
    ours = wsframes.frame(wsframes.BINARY, b"\x03{}") + wsframes.close("bye")
    assert messages(parse(sent + tail + ours)) == [
        (wsframes.BINARY, whole[4:500]),
        (wsframes.BINARY, b"\x03{}"),
        (wsframes.CLOSE, struct.pack("!H", 1008) + b"bye"),
    ]
    assert not reframer.in_message


def test_a_text_message_cut_mid_frame_is_not_finished_but_a_close_may_follow() -> None:
    # Ending a text message early could leave a partial UTF-8 sequence.
    reframer = wsframes.Reframer()
    sent = reframer.feed(wsframes.frame(wsframes.TEXT, "é".encode() * 100)[:5])
    assert reframer.end_message() is None
    frames = parse(sent + wsframes.close("bye"))
    assert [first & 0x0F for first, _, _ in frames] == [wsframes.TEXT, wsframes.CLOSE]
    assert not frames[0][0] & 0x80  # the text fragment is not final


def test_a_control_frame_is_held_until_whole() -> None:
    reframer = wsframes.Reframer()
    ping = build(PING | 0x80, b"are you there")
    assert reframer.feed(ping[:5]) == b""
    assert reframer.feed(ping[5:]) == ping


@pytest.mark.parametrize(
    "bad",
    [
        build(PING | 0x80, b"x" * 126),  # a control frame over 125 bytes (RFC 6455 §5.5)
        build(PING, b"x"),  # a fragmented control frame
        build(0x80, b"x"),  # a continuation with no message to continue
        build(0x82, b"z") + build(0x02, b"x") + build(0x82, b"y"),  # a message in a message
    ],
)
@pytest.mark.parametrize("chunk", [1, 1 << 20])
def test_a_stream_that_breaks_rfc_6455_is_sent_up_to_the_break_and_no_further(
    bad: bytes, chunk: int
) -> None:
    data = wsframes.frame(wsframes.BINARY, b"before") + bad + wsframes.frame(wsframes.BINARY, b"!")
    reframer = wsframes.Reframer()
    sent = b"".join(reframer.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
    assert reframer.broken
    tail = reframer.end_message()
    assert tail is not None
    assert messages(parse(sent + tail))[0] == (wsframes.BINARY, b"before")
    assert b"!" not in sent
    assert reframer.feed(wsframes.frame(wsframes.BINARY, b"more")) == b""


@pytest.mark.parametrize("chunk", [1, 1 << 20])
def test_the_state_after_a_break_describes_what_was_sent(chunk: int) -> None:
    # The first fragment is sent; the new message inside it is refused. The
    # message that is open is the one sent, and it can be ended cleanly.
    data = build(0x02, b"x") + build(0x82, b"y")
    reframer = wsframes.Reframer()
    sent = b"".join(reframer.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
    assert reframer.broken
    assert reframer.in_message
    tail = reframer.end_message()
    assert tail is not None
    assert messages(parse(sent + tail)) == [(wsframes.BINARY, b"x")]


def test_a_close_frame_sent_on_is_noted() -> None:
    reframer = wsframes.Reframer()
    close = wsframes.close("bye", 1000)
    assert reframer.feed(close[:3]) == b""
    assert not reframer.closed
    assert reframer.feed(close[3:]) == close
    assert reframer.closed


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
@pytest.mark.parametrize(
    ("messages_sent", "used"),
    [
        ([b"\x01out", b"\x02err"], False),
        ([b"\x01out", b'\x03{"status":"Success"}'], True),
        ([b"", b"\x03"], True),  # an empty message carries no channel; the next one does
    ],
)
def test_a_message_on_the_error_channel_is_noted(
    messages_sent: list[bytes], used: bool, chunk: int
) -> None:
    # Kubernetes' channel protocols: a binary message's first byte is its channel,
    # and channel 3 carries exec's final Status, which must not get a second one.
    data = b"".join(wsframes.frame(wsframes.BINARY, m) for m in messages_sent)
    reframer = wsframes.Reframer()
    for i in range(0, len(data), chunk):
        reframer.feed(data[i : i + chunk])
    assert reframer.error_channel_used is used


def test_a_text_message_starting_with_3_is_no_channel() -> None:
    reframer = wsframes.Reframer()
    reframer.feed(wsframes.frame(wsframes.TEXT, b"\x03"))
    assert not reframer.error_channel_used


@pytest.mark.parametrize("size", SIZES)
def test_frame_lengths_follow_rfc_6455(size: int) -> None:
    built = wsframes.frame(wsframes.BINARY, b"\0" * size)
    assert built[0] == 0x82  # FIN, binary
    assert not built[1] & 0x80  # a server never masks (RFC 6455 §5.1)
    head = 2 if size < 126 else 4 if size < 65536 else 10
    assert len(built) == head + size


def test_a_close_frame_carries_its_code_and_a_bounded_reason() -> None:
    built = wsframes.close("x" * 500)
    assert built[0] == 0x88
    code = struct.unpack("!H", built[2:4])[0]
    assert code == wsframes.POLICY_VIOLATION
    assert len(built) - 2 <= 125  # a control frame's payload (RFC 6455 §5.5)
