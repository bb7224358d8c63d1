"""The API server's WebSocket frames, re-cut as they arrive, so an ended grant can always say why.

The proxy relays an upgraded exec, attach or port-forward stream. To end one
with a reason instead of a bare cut, it must write whole frames of its own,
which it may do only between frames. A server frame can be megabytes long and
arrive over seconds, so waiting for its end would let bytes through after a
revocation. Instead Reframer sends each read's share of a frame at once as a
fragment of its own (RFC 6455 §5.4: an intermediary may change a message's
fragmentation when no extension is in use; the proxy strips the agent's
Sec-WebSocket-Extensions). What the agent has then always ends at a frame
boundary: a close frame can follow at any moment (control frames may come
between fragments), and a binary message cut short can be finished with an
empty final fragment, so the exec Status can follow too.
"""

from __future__ import annotations

import struct

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
_FIN = 0x80
_RSV = 0x70
_MASKED = 0x80
POLICY_VIOLATION = 1008
"""RFC 6455 §7.4.1: the endpoint ends the connection because a policy says so."""
PROTOCOL_ERROR = 1002
"""RFC 6455 §7.4.1: the endpoint ends the connection because of a protocol error."""
ERROR_CHANNEL = 3
"""The exec/attach stream channel carrying the final Status (Kubernetes' channel protocol)."""
_MAX_CONTROL = 125
"""A control frame's payload, at most (RFC 6455 §5.5)."""
_MAX_REASON = _MAX_CONTROL - 2  # after the close code


class FrameError(ValueError):
    """The server's stream breaks RFC 6455 in a way the proxy cannot relay."""


class Reframer:
    """Re-cuts a server-to-client WebSocket byte stream so what is sent ends at a frame boundary."""

    def __init__(self) -> None:
        self._held = bytearray()
        """An incomplete frame head, or an incomplete control frame (at most 135 bytes)."""
        self._left = 0
        """Payload bytes of the current data frame not yet arrived."""
        self._first = 0
        """The current data frame's first byte: FIN, RSV bits, opcode."""
        self._mask: bytes | None = None
        self._sent = 0
        """Payload bytes of the current data frame already sent on."""
        self._opcode = BINARY
        """The opcode of the message being relayed (a continuation names none)."""
        self._channel_pending = False
        """The message's first payload byte (its channel, for Kubernetes) is still to come."""
        self.in_message = False
        """What was sent ends inside a data message: its final fragment is still to come."""
        self.closed = False
        """A close frame was sent (the server's): nothing may follow it (RFC 6455 §5.5.1)."""
        self.error_channel_used = False
        """A binary message on channel 3 was sent: the exec Status channel holds the server's."""
        self.broken = ""
        """Why the server's stream broke RFC 6455; what came before it was sent, nothing after."""

    def feed(self, data: bytes) -> bytes:
        """The bytes to send the agent for data from the server: whole frames only."""
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        try:
            while view and not self.broken:
                if self._left:
                    piece = view[: self._left]
                    view = view[len(piece) :]
                    self._left -= len(piece)
                    out.append(self._fragment(piece))
                elif not self._held and (whole := self._whole(view)):
                    out.append(view[:whole])  # whole frames, as they came: most frames are
                    view = view[whole:]
                else:
                    view = self._take_head(view, out)
        except FrameError as exc:
            self.broken = str(exc)
        return b"".join(out)

    def _whole(self, view: memoryview) -> int:
        """The length of the whole unmasked frames view starts with, each checked; 0 if none.

        A frame that breaks RFC 6455 ends the run: the frames before it are
        still sent.
        """
        at, end = 0, len(view)
        while end - at >= 2:
            first, size = view[at], view[at + 1]
            if size & _MASKED:
                break
            head = 2
            if size == 126:
                head, size = 4, int.from_bytes(view[at + 2 : at + 4], "big")
            elif size == 127:
                head, size = 10, int.from_bytes(view[at + 2 : at + 10], "big")
            if end - at < head + size:
                break
            if first == _FIN | BINARY and not self.in_message:
                # The common case, a whole binary message in one frame, inline.
                if size and view[at + head] == ERROR_CHANNEL:
                    self.error_channel_used = True
            else:
                try:
                    self._check(first, size)
                except FrameError:
                    break  # the frames before it go on; _take_head meets it and says why
                self._note(first)
                if self._channel_pending and size and not first & 0x08:
                    self._channel(view[at + head])
            at += head + size
        return at

    def _check(self, first: int, size: int) -> None:
        """Refuse what RFC 6455 forbids, changing nothing; else note a message that begins."""
        opcode = first & 0x0F
        if opcode & 0x08:  # a control frame: never fragmented, at most 125 bytes (§5.5)
            if size > _MAX_CONTROL or not first & _FIN:
                raise FrameError(f"a control frame of {size} bytes, or fragmented")
        elif opcode != CONTINUATION:
            if self.in_message:
                raise FrameError("a new message began before the last one ended")
            self._opcode, self._channel_pending = opcode, True
        elif not self.in_message:
            raise FrameError("a continuation frame outside any message")

    def _note(self, first: int) -> None:
        """Note what a frame sent whole changes: a close, or a message's end."""
        if first & 0x08:
            self.closed = self.closed or first & 0x0F == CLOSE
        else:
            self.in_message = not first & _FIN

    def _channel(self, channel: int) -> None:
        """Note a message's first payload byte: in Kubernetes' channel protocols, its channel."""
        self._channel_pending = False
        if self._opcode == BINARY and channel == ERROR_CHANNEL:
            self.error_channel_used = True

    def _take_head(self, view: memoryview, out: list[bytes | memoryview]) -> memoryview:
        """Hold head bytes until a frame head (or a whole control frame) is in; send what is due."""
        needed = _head_length(self._held)
        while needed is None or len(self._held) < needed:
            if not view:
                return view
            take = 1 if needed is None else needed - len(self._held)
            self._held += view[:take]
            view = view[take:]
            needed = _head_length(self._held)
        head = bytes(self._held)
        first, size = head[0], _payload_length(head)
        self._check(first, size)
        if first & 0x08:  # a control frame is held whole, then sent as it came
            rest = size - (len(self._held) - needed)
            self._held += view[:rest]
            view = view[rest:]
            if len(self._held) == needed + size:
                out.append(bytes(self._held))
                self._held.clear()
                self._note(first)
            return view
        self._held.clear()
        self._first, self._left, self._sent = first, size, 0
        self._mask = head[needed - 4 : needed] if head[1] & _MASKED else None
        if size == 0:
            out.append(self._fragment(memoryview(b"")))
        return view

    def _fragment(self, payload: memoryview) -> bytes:
        """This much of the current frame's payload as a frame of its own."""
        first_piece, last_piece = self._sent == 0, self._left == 0
        opcode = self._first & 0x0F if first_piece else CONTINUATION
        fin = self._first & _FIN if last_piece else 0
        rsv = self._first & _RSV if first_piece else 0
        mask = None
        if self._mask is not None:
            # A server must not mask (RFC 6455 §5.1); if one does, the key is
            # turned so each piece unmasks as the whole frame would have.
            turn = self._sent % 4
            mask = self._mask[turn:] + self._mask[:turn]
        if self._channel_pending and payload:
            first_byte = payload[0] ^ mask[0] if mask is not None else payload[0]
            self._channel(first_byte)
        self._sent += len(payload)
        self.in_message = not fin
        return _head(fin | rsv | opcode, len(payload), mask) + payload

    def end_message(self) -> bytes | None:
        """A final empty fragment ending a binary message cut short (b"" if none is open).

        None for a text message: ending one mid-way could leave a partial
        UTF-8 sequence or base64 quantum, which the agent must refuse.
        """
        if not self.in_message:
            return b""
        if self._opcode != BINARY:
            return None
        self.in_message = False
        return _head(_FIN | CONTINUATION, 0, None)


def _head_length(head: bytearray | memoryview) -> int | None:
    """The frame head's full length once its first two bytes are known (RFC 6455 §5.2)."""
    if len(head) < 2:
        return None
    size = head[1] & 0x7F
    extra = 2 if size == 126 else 8 if size == 127 else 0
    mask = 4 if head[1] & _MASKED else 0
    return 2 + extra + mask


def _payload_length(head: bytes | memoryview) -> int:
    """The payload length a complete frame head announces."""
    size = head[1] & 0x7F
    if size == 126:
        return int(struct.unpack("!H", head[2:4])[0])
    if size == 127:
        return int(struct.unpack("!Q", head[2:10])[0])
    return size


def _head(first: int, size: int, mask: bytes | None) -> bytes:
    """A frame head: first byte, the length in its shortest form (RFC 6455 §5.2), the mask key."""
    bit = _MASKED if mask is not None else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    return head + (mask or b"")


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame, as a server sends it (RFC 6455 §5.1)."""
    return _head(_FIN | opcode, len(payload), None) + payload


def close(reason: str, code: int = POLICY_VIOLATION) -> bytes:
    """A close frame with a code and a reason (RFC 6455 §5.5.1)."""
    text = reason.encode()[:_MAX_REASON]
    return frame(CLOSE, struct.pack("!H", code) + text)
