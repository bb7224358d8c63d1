"""WebSocket frame boundaries in the API server's stream, so an ended grant can say why.

The proxy relays an upgraded exec, attach or port-forward stream as bytes. To
end one with a reason instead of a bare cut, it must write whole frames of its
own, which it may do only between the server's frames: Frames follows their
boundaries (RFC 6455 §5.2) without keeping any payload.
"""

from __future__ import annotations

import struct

CLOSE = 0x8
BINARY = 0x2
POLICY_VIOLATION = 1008
"""RFC 6455 §7.4.1: the endpoint ends the connection because a policy says so."""
ERROR_CHANNEL = 3
"""The exec/attach stream channel carrying the final Status (Kubernetes' channel protocol)."""
_MAX_REASON = 123  # a close frame's payload is at most 125 bytes (RFC 6455 §5.5)


class Frames:
    """Follows frame boundaries in a server-to-client WebSocket byte stream."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._payload_left = 0

    @property
    def at_boundary(self) -> bool:
        """Whether everything fed so far ends exactly at the end of a frame."""
        return not self._head and self._payload_left == 0

    def feed(self, data: bytes) -> None:
        """Account for bytes about to be sent to the client."""
        view = memoryview(data)
        while view:
            if self._payload_left:
                taken = min(self._payload_left, len(view))
                self._payload_left -= taken
                view = view[taken:]
                continue
            self._head += view[:1]
            view = view[1:]
            needed = _head_length(self._head)
            if needed is not None and len(self._head) >= needed:
                self._payload_left = _payload_length(bytes(self._head))
                self._head.clear()


def _head_length(head: bytearray) -> int | None:
    """The frame head's full length once its first two bytes are known (RFC 6455 §5.2)."""
    if len(head) < 2:
        return None
    size = head[1] & 0x7F
    extra = 2 if size == 126 else 8 if size == 127 else 0
    mask = 4 if head[1] & 0x80 else 0
    return 2 + extra + mask


def _payload_length(head: bytes) -> int:
    """The payload length a complete frame head announces."""
    size = head[1] & 0x7F
    if size == 126:
        return int(struct.unpack("!H", head[2:4])[0])
    if size == 127:
        return int(struct.unpack("!Q", head[2:10])[0])
    return size


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame, as a server sends it (RFC 6455 §5.1)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def close(reason: str, code: int = POLICY_VIOLATION) -> bytes:
    """A close frame with a code and a reason (RFC 6455 §5.5.1)."""
    text = reason.encode()[:_MAX_REASON]
    return frame(CLOSE, struct.pack("!H", code) + text)
