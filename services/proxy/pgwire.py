"""The PostgreSQL v3 wire protocol, as much of it as the proxy speaks to agents.

Message formats from the PostgreSQL documentation, chapter "Frontend/Backend
Protocol", section "Message Formats". Lengths include themselves; strings are
NUL-terminated; every backend message after start-up is a type byte and an
int32 length.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

PROTOCOL_3 = 196608  # 3.0: (3 << 16) | 0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_BYTES = 10_000
"""libpq's own limit on a start-up packet; anything larger is not a client."""
MAX_PASSWORD_BYTES = 16 * 1024
"""A grant token is about 500 bytes; the cap bounds work before any check."""

AUTH_OK = 0
AUTH_CLEARTEXT = 3


class ProtocolError(Exception):
    """The peer sent something that is not the protocol."""


@dataclass(frozen=True, kw_only=True)
class Startup:
    """A start-up packet: a request code, or protocol 3.0 with its parameters."""

    code: int
    parameters: dict[str, str]
    cancel: tuple[int, int] | None = None


async def read_startup(reader: asyncio.StreamReader) -> Startup:
    """Read one start-up packet (no type byte): SSLRequest, GSSENCRequest, cancel or startup."""
    header = await reader.readexactly(4)
    (length,) = struct.unpack("!i", header)
    if not 8 <= length <= MAX_STARTUP_BYTES:
        raise ProtocolError(f"start-up packet of {length} bytes")
    body = await reader.readexactly(length - 4)
    (code,) = struct.unpack("!i", body[:4])
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if length != 8:
            raise ProtocolError("a TLS or GSS request carries nothing else")
        return Startup(code=code, parameters={})
    if code == CANCEL_REQUEST:
        if length != 16:
            raise ProtocolError("a cancel request is 16 bytes")
        pid, secret = struct.unpack("!ii", body[4:12])
        return Startup(code=code, parameters={}, cancel=(pid, secret))
    if code != PROTOCOL_3:
        raise ProtocolError(f"protocol {code >> 16}.{code & 0xFFFF} is not supported")
    return Startup(code=code, parameters=_parameters(body[4:]))


def _parameters(data: bytes) -> dict[str, str]:
    # name NUL value NUL ... then one more NUL ending the list
    if not data.endswith(b"\x00"):
        raise ProtocolError("start-up parameters are not terminated")
    data = data[:-1]
    if not data:
        return {}
    if not data.endswith(b"\x00"):
        raise ProtocolError("a start-up parameter is not terminated")
    fields = data[:-1].split(b"\x00")
    if len(fields) % 2:
        raise ProtocolError("a start-up parameter has no value")
    try:
        pairs = [(fields[i].decode(), fields[i + 1].decode()) for i in range(0, len(fields), 2)]
    except UnicodeDecodeError as exc:
        raise ProtocolError("start-up parameters are not UTF-8") from exc
    out: dict[str, str] = {}
    for name, value in pairs:
        if not name or name in out:
            raise ProtocolError(f"start-up parameter {name!r} is empty or repeated")
        out[name] = value
    return out


async def read_message(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes]:
    """Read one typed message; return (type byte, body). Refuses bodies above limit."""
    header = await reader.readexactly(5)
    kind = header[:1]
    (length,) = struct.unpack("!i", header[1:])
    if not 4 <= length <= limit + 4:
        raise ProtocolError(f"message {kind!r} of {length} bytes")
    return kind, await reader.readexactly(length - 4)


def message(kind: bytes, body: bytes = b"") -> bytes:
    """Frame a typed message."""
    return kind + struct.pack("!i", len(body) + 4) + body


def authentication(code: int) -> bytes:
    """AuthenticationOk (0) or AuthenticationCleartextPassword (3)."""
    return message(b"R", struct.pack("!i", code))


def error_response(sqlstate: str, text: str, *, severity: str = "FATAL") -> bytes:
    """An ErrorResponse: severity (localized and not), SQLSTATE, message."""
    fields = b"".join(
        code + value.encode("utf-8", "replace") + b"\x00"
        for code, value in ((b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", text))
    )
    return message(b"E", fields + b"\x00")


def password(body: bytes) -> str:
    """Return the password in a PasswordMessage body (NUL-terminated)."""
    if not body.endswith(b"\x00") or b"\x00" in body[:-1]:
        raise ProtocolError("a password message is one NUL-terminated string")
    try:
        return body[:-1].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("a grant token is ASCII") from exc


_LENGTH = struct.Struct("!i")


class Boundaries:
    """Tracks where backend messages end in a relayed byte stream.

    The proxy relays bytes without parsing them, but to tell an agent why its
    session ends it must put an ErrorResponse between two messages, never in
    the middle of one. This follows only the 5-byte headers, skipping each
    body by its length: one unpack per message, none per byte, in a loop kept
    tight because a large result is tens of thousands of messages.
    """

    def __init__(self) -> None:
        self._skip = 0  # where the next header starts, from the next chunk's first byte
        self._header = b""  # a header split across chunks

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a message's end."""
        return self._skip == 0 and not self._header

    def feed(self, chunk: bytes) -> None:
        """Account for chunk, the next bytes of the stream."""
        size, position = len(chunk), self._skip
        if self._header:
            had = len(self._header)
            self._header += chunk[: 5 - had]
            if len(self._header) < 5:
                return
            (length,) = _LENGTH.unpack_from(self._header, 1)
            self._header = b""
            # A length below 4 is malformed; stepping over 4 keeps the walk moving forward.
            position = 1 + (length if length >= 4 else 4) - had
        unpack = _LENGTH.unpack_from
        while position + 5 <= size:
            (length,) = unpack(chunk, position + 1)
            position += 1 + (length if length >= 4 else 4)
        if position < size:
            self._header, self._skip = chunk[position:], 0
        else:
            self._skip = position - size
