"""wsframes: frame boundaries followed however the bytes are split, and frames built right."""

from __future__ import annotations

import struct

import pytest

from jitgate.proxy import wsframes

SIZES = (0, 1, 125, 126, 127, 65535, 65536, 70000)


def stream() -> tuple[bytes, list[int]]:
    """Frames of every length class back to back, and the offsets where each ends."""
    data, ends = b"", []
    for size in SIZES:
        data += wsframes.frame(wsframes.BINARY, bytes([size % 251]) * size)
        ends.append(len(data))
    # A masked frame too (as a client sends): 4 mask bytes after the length.
    data += bytes([0x82, 0x80 | 3]) + b"mask" + b"abc"
    ends.append(len(data))
    return data, ends


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096, 1 << 20])
def test_boundaries_are_found_however_the_stream_is_split(chunk: int) -> None:
    data, ends = stream()
    frames = wsframes.Frames()
    for offset in range(0, len(data), chunk):
        piece = data[offset : offset + chunk]
        frames.feed(piece)
        at_end = offset + len(piece)
        # Only offsets that are some frame's end are boundaries.
        assert frames.at_boundary == (at_end in ends), at_end


def test_a_frame_head_alone_is_not_a_boundary() -> None:
    frames = wsframes.Frames()
    frames.feed(wsframes.frame(wsframes.BINARY, b"x" * 300)[:4])
    assert not frames.at_boundary


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
