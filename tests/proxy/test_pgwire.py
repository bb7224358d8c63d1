"""The wire protocol pieces: start-up packets, framing, errors, and message boundaries."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.proxy import pgwire


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _startup(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", len(body) + 8, code) + body


async def test_a_startup_message_carries_its_parameters() -> None:
    body = b"user\x00agent\x00database\x00orders-replica\x00\x00"
    startup = await pgwire.read_startup(_reader(_startup(pgwire.PROTOCOL_3, body)))
    assert startup.parameters == {"user": "agent", "database": "orders-replica"}


@pytest.mark.parametrize("code", [pgwire.SSL_REQUEST, pgwire.GSSENC_REQUEST])
async def test_tls_and_gss_requests(code: int) -> None:
    assert (await pgwire.read_startup(_reader(_startup(code)))).code == code


async def test_a_cancel_request_carries_its_key() -> None:
    packet = _startup(pgwire.CANCEL_REQUEST, struct.pack("!ii", 42, 7))
    assert (await pgwire.read_startup(_reader(packet))).cancel == (42, 7)


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!i", 4),  # too short
        struct.pack("!ii", 100_000, pgwire.PROTOCOL_3),  # too long
        _startup(0x00020000),  # protocol 2
        _startup(pgwire.PROTOCOL_3, b"user\x00agent\x00"),  # not terminated
        _startup(pgwire.PROTOCOL_3, b"user\x00\x00"),  # a name with no value
        _startup(pgwire.PROTOCOL_3, b"user\x00a\x00user\x00b\x00\x00"),  # repeated
        _startup(pgwire.PROTOCOL_3, b"us\xffer\x00a\x00\x00"),  # not UTF-8
        _startup(pgwire.SSL_REQUEST, b"xxxx"),  # a TLS request with a body
    ],
)
async def test_malformed_startups_are_protocol_errors(packet: bytes) -> None:
    with pytest.raises(pgwire.ProtocolError):
        await pgwire.read_startup(_reader(packet))


async def test_a_message_above_its_limit_is_refused_before_reading_it() -> None:
    reader = _reader(b"p" + struct.pack("!i", 100_004))
    with pytest.raises(pgwire.ProtocolError):
        await pgwire.read_message(reader, 1000)


def test_an_error_response_has_severity_code_and_message() -> None:
    data = pgwire.error_response("28P01", "bad grant")
    assert data[:1] == b"E"
    assert struct.unpack("!i", data[1:5])[0] == len(data) - 1
    assert data[5:] == b"SFATAL\x00VFATAL\x00C28P01\x00Mbad grant\x00\x00"


@pytest.mark.parametrize("body", [b"tok", b"a\x00b\x00", b"t\xffk\x00"])
def test_a_password_is_one_ascii_string(body: bytes) -> None:
    with pytest.raises(pgwire.ProtocolError):
        pgwire.password(body)


@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=40), min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 30), max_size=40),
)
def test_boundaries_are_found_however_the_stream_is_cut(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pgwire.message(b"D", body) for body in bodies)
    ends = set()
    position = 0
    for body in bodies:
        position += 5 + len(body)
        ends.add(position)
    tracker = pgwire.Boundaries()
    seen = 0
    pieces = iter(cuts)
    while seen < len(stream):
        step = next(pieces, len(stream))
        chunk = stream[seen : seen + step]
        tracker.feed(chunk)
        seen += len(chunk)
        assert tracker.at_boundary is (seen in ends)


def test_a_length_below_four_cannot_stall_the_walk() -> None:
    # A malformed length (0, or negative) must not move the walk backwards or
    # leave it in place: each such header is stepped over as an empty message.
    tracker = pgwire.Boundaries()
    tracker.feed(b"D\x00\x00\x00\x00" + b"D\xff\xff\xff\xf0" + b"Z\x00\x00")
    assert not tracker.at_boundary
    tracker.feed(b"\x00\x05I")
    assert tracker.at_boundary
