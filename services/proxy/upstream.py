"""The proxy's upstream side: open a PostgreSQL session as a connection's role.

The proxy holds the role's password; agents never see it. This module opens
the socket, negotiates TLS, sends the start-up packet, authenticates with
SCRAM-SHA-256 and reads the server's start-up messages up to the first
ReadyForQuery. Message formats and the flow are from the PostgreSQL
documentation, chapter "Frontend/Backend Protocol": sections "Start-up"
(53.2.1), "SSL Session Encryption" (53.2.10), "Canceling Requests in
Progress" (53.2.9), "SASL Authentication" (53.3) and "Message Formats" (53.7).

Authentication methods: SCRAM-SHA-256 always (it never sends the password,
and the server proves it knows the verifier); a server that authenticates
with "trust" is accepted, as libpq does. MD5 is refused always: its hash is
replayable by anyone who reads it and weak against guessing. A cleartext
password is sent only over TLS with verify-full, where the peer has proven
it is the named server; otherwise a man in the middle, or a server that is
not the real one, would simply receive it.

Every failure is an UpstreamError with a SQLSTATE and a message that names
the server and the role but never the password; the whole exchange runs
under one timeout, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jitgate.proxy import scram

log = logging.getLogger(__name__)

PROTOCOL_3_0 = 196608
"""(3 << 16) | 0: protocol version 3.0."""
SSL_REQUEST_CODE = 80877103
CANCEL_REQUEST_CODE = 80877102
TLS_MODES = ("disable", "require", "verify-full")
NAMEDATALEN = 64
"""PostgreSQL truncates names, application_name among them, to NAMEDATALEN - 1 bytes."""
MAX_MESSAGE_BYTES = 256 * 1024
"""The largest start-up message accepted; real ones are well under a kilobyte."""
READ_ONLY_OPTIONS = "-c default_transaction_read_only=on"

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12
_AUTH_NAMES = {
    AUTH_KERBEROS_V5: "Kerberos V5",
    AUTH_GSS: "GSSAPI",
    AUTH_GSS_CONTINUE: "GSSAPI",
    AUTH_SSPI: "SSPI",
}


class UpstreamError(Exception):
    """Opening the upstream session failed; code is a SQLSTATE."""

    def __init__(self, code: str, message: str) -> None:
        """Keep the SQLSTATE and the message."""
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        """The message and its SQLSTATE."""
        return f"{self.message} (SQLSTATE {self.code})"


class ConnectFailed(UpstreamError):
    """The server could not be reached, or closed the connection."""

    def __init__(self, message: str, code: str = "08001") -> None:
        """08001: sqlclient_unable_to_establish_sqlconnection."""
        super().__init__(code, message)


class UpstreamTimeout(ConnectFailed):
    """The server did not finish the start-up within the timeout."""


class TlsFailed(ConnectFailed):
    """TLS was required but not offered, or the handshake or the verification failed."""


class AuthRefused(UpstreamError):
    """The proxy refused the authentication method the server asked for."""

    def __init__(self, message: str) -> None:
        """28000: invalid_authorization_specification."""
        super().__init__("28000", message)


class ScramFailed(UpstreamError):
    """The SCRAM exchange failed, mutual authentication included."""

    def __init__(self, message: str) -> None:
        """28000: invalid_authorization_specification."""
        super().__init__("28000", message)


class ProtocolViolation(UpstreamError):
    """The server sent something the protocol does not allow at that point."""

    def __init__(self, message: str) -> None:
        """08P01: protocol_violation."""
        super().__init__("08P01", message)


class ServerError(UpstreamError):
    """The server refused the session with an ErrorResponse."""

    def __init__(self, code: str, message: str, *, severity: str, detail: str = "") -> None:
        """Keep the server's SQLSTATE, message, severity and detail."""
        super().__init__(code, message)
        self.severity = severity
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where the server is and whom to log in as; the password never shows in a repr."""

    database: str
    user: str
    password: str = field(repr=False)
    host: str = ""
    port: int = 5432
    socket_dir: str = ""
    """A Unix socket directory instead of host: the socket is socket_dir/.s.PGSQL.port."""
    tls: str = "disable"
    ca_file: str | None = None
    """verify-full: the CAs to trust (else the system's); require: verify the chain if set."""

    def __post_init__(self) -> None:
        """Refuse targets that cannot be right."""
        if bool(self.host) == bool(self.socket_dir):
            raise ValueError("a target has exactly one of host and socket_dir")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not 1 to 65535")
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls {self.tls!r} is not one of {', '.join(TLS_MODES)}")
        if self.socket_dir and self.tls != "disable":
            # PostgreSQL never offers TLS on a Unix socket (section 53.2.10).
            raise ValueError("a Unix socket does not use TLS")
        for name, value in (("database", self.database), ("user", self.user)):
            if not value or "\x00" in value:
                raise ValueError(f"{name} must be a non-empty string without NUL")

    @property
    def address(self) -> str:
        """The server's address, for messages."""
        if self.socket_dir:
            return os.path.join(self.socket_dir, f".s.PGSQL.{self.port}")
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Notice:
    """A NoticeResponse the server sent during start-up."""

    severity: str
    code: str
    message: str


@dataclass(frozen=True, kw_only=True, eq=False)
class Upstream:
    """An authenticated session, ready for queries: the streams and what start-up said."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parameters: dict[str, str]
    """ParameterStatus values, in the order the server sent them."""
    backend_key: tuple[int, int] | None = field(repr=False)
    """BackendKeyData (process id, secret key) for cancel(); None if the server sent none."""
    transaction_status: bytes
    """The status byte of ReadyForQuery: b"I" idle, b"T" in a transaction, b"E" failed."""
    authentication: str
    """How the server let us in: "scram-sha-256", "cleartext" or "trust"."""
    tls: bool
    notices: tuple[Notice, ...] = ()

    async def close(self) -> None:
        """Send Terminate and close the connection."""
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.writer.write(message(b"X"))
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


def message(kind: bytes, body: bytes = b"") -> bytes:
    """Frame a typed frontend message: type byte, int32 length (itself included), body."""
    return kind + struct.pack("!i", len(body) + 4) + body


def clean_application_name(name: str) -> str:
    """Printable ASCII only and at most NAMEDATALEN - 1 bytes, as the server would keep it."""
    return "".join(c if " " <= c <= "~" else "?" for c in name)[: NAMEDATALEN - 1]


def startup_message(parameters: Mapping[str, str]) -> bytes:
    """A StartupMessage for protocol 3.0 (section 53.7) with parameters."""
    body = struct.pack("!i", PROTOCOL_3_0)
    for name, value in parameters.items():
        if "\x00" in name or "\x00" in value:
            raise ValueError(f"start-up parameter {name!r} contains NUL")
        body += name.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!i", len(body) + 4) + body


def ssl_request() -> bytes:
    """SSLRequest: int32 8, int32 80877103 (section 53.7)."""
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    """CancelRequest: int32 16, int32 80877102, process id, secret key (section 53.7)."""
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret)


def _tls_context(target: Target) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=target.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFailed(f"cannot load the CA file {target.ca_file}: {exc}") from exc
    if target.tls == "require":
        # libpq's sslmode=require: encrypt, and verify the chain only if CAs were given
        # (then it behaves like verify-ca); the host name is never checked.
        context.check_hostname = False
        if not target.ca_file:
            context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # PostgreSQL 17+ registers ALPN "postgresql"; older servers ignore it.
    context.set_alpn_protocols(["postgresql"])
    return context


async def _connected_socket(target: Target) -> socket.socket:
    loop = asyncio.get_running_loop()
    if target.socket_dir:
        candidates: list[tuple[int, int, int, str | tuple[Any, ...]]] = [
            (socket.AF_UNIX, socket.SOCK_STREAM, 0, target.address)
        ]
    else:
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectFailed(f"cannot resolve {target.host}: {exc.strerror}") from exc
        candidates = [(family, kind, proto, address) for family, kind, proto, _, address in infos]
    failure: OSError | None = None
    for family, kind, proto, address in candidates:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    reason = "no address" if failure is None else failure.strerror or str(failure)
    raise ConnectFailed(f"cannot connect to {target.address}: {reason}")


async def _open(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, and for tls != disable negotiate TLS (section 53.2.10)."""
    context = _tls_context(target) if target.tls != "disable" else None
    loop = asyncio.get_running_loop()
    sock = await _connected_socket(target)
    try:
        if context is None:
            return await asyncio.open_connection(sock=sock)
        await loop.sock_sendall(sock, ssl_request())
        # Exactly one byte: anything the server sent after it stays in the kernel and
        # reaches the TLS handshake, which fails on it. Bytes read here and then
        # treated as if they had come over TLS would be CVE-2021-23222.
        answer = await loop.sock_recv(sock, 1)
        if answer == b"N":
            raise TlsFailed(f"{target.address} does not offer TLS, and tls={target.tls} needs it")
        if answer == b"E":
            # Section 53.2.10: the error comes from an unauthenticated peer; not shown.
            raise TlsFailed(f"{target.address} answered the TLS request with an error")
        if answer == b"":
            raise ConnectFailed(f"{target.address} closed the connection at the TLS request")
        if answer != b"S":
            raise ProtocolViolation(f"{target.address} answered the TLS request with {answer!r}")
        return await asyncio.open_connection(
            sock=sock,
            ssl=context,
            # SNI, and the name verify-full checks.
            server_hostname=target.host,
            ssl_handshake_timeout=None,
        )
    except BaseException:
        sock.close()
        raise


async def _read(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    kind = header[:1]
    (length,) = struct.unpack("!i", header[1:])
    if not 4 <= length <= MAX_MESSAGE_BYTES:
        raise ProtocolViolation(f"the server sent a message {kind!r} of {length} bytes")
    return kind, await reader.readexactly(length - 4)


def _fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse (section 53.8), by code."""
    out: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def server_error(body: bytes) -> ServerError:
    """The ServerError an ErrorResponse body describes."""
    fields = _fields(body)
    return ServerError(
        fields.get("C", "XX000"),
        fields.get("M", "the server sent an error without a message"),
        severity=fields.get("V", fields.get("S", "ERROR")),
        detail=fields.get("D", ""),
    )


def _notice(body: bytes) -> Notice:
    fields = _fields(body)
    return Notice(
        severity=fields.get("V", fields.get("S", "NOTICE")),
        code=fields.get("C", ""),
        message=fields.get("M", ""),
    )


def _strings(body: bytes, count: int, what: str) -> list[str]:
    parts = body.split(b"\x00")
    if len(parts) != count + 1 or parts[-1]:
        raise ProtocolViolation(f"malformed {what}")
    try:
        return [part.decode("utf-8") for part in parts[:-1]]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(f"{what} is not UTF-8") from exc


def _mechanisms(payload: bytes) -> list[str]:
    # AuthenticationSASL: NUL-terminated mechanism names, then an empty one (section 53.7).
    if not payload.endswith(b"\x00\x00") and payload != b"\x00":
        raise ProtocolViolation("malformed AuthenticationSASL")
    return [name.decode("ascii", "replace") for name in payload[:-2].split(b"\x00") if name]


async def _authenticate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target
) -> tuple[str, list[Notice]]:
    """Answer the server's authentication requests up to AuthenticationOk (section 53.2.1)."""
    client: scram.ScramClient | None = None
    method = "trust"
    notices: list[Notice] = []
    while True:
        kind, body = await _read(reader)
        if kind == b"E":
            raise server_error(body)
        if kind == b"N":
            notices.append(_notice(body))
            continue
        if kind == b"v":
            # NegotiateProtocolVersion: 3.0 is every server's; nothing to change.
            continue
        if kind != b"R" or len(body) < 4:
            raise ProtocolViolation(f"expected an authentication request, got {kind!r}")
        (code,) = struct.unpack("!i", body[:4])
        payload = body[4:]
        if code == AUTH_OK:
            if client is not None and not client.done:
                raise ScramFailed(
                    f"{target.address} ended SCRAM without proving it knows the role's verifier"
                )
            return method, notices
        if code == AUTH_SASL and method == "trust":
            mechanisms = _mechanisms(payload)
            if scram.MECHANISM not in mechanisms:
                if scram.MECHANISM_PLUS in mechanisms:
                    raise AuthRefused(
                        f"{target.address} requires SCRAM with channel binding "
                        f"({scram.MECHANISM_PLUS}), which the proxy does not implement"
                    )
                raise AuthRefused(
                    f"{target.address} offers SASL mechanisms {', '.join(mechanisms) or 'none'}; "
                    f"the proxy speaks only {scram.MECHANISM}"
                )
            method = "scram-sha-256"
            try:
                client = scram.ScramClient(target.password)
            except scram.ScramError as exc:
                raise ScramFailed(str(exc)) from exc
            first = client.first_message()
            # SASLInitialResponse: mechanism, int32 length of the initial response, response.
            writer.write(
                message(
                    b"p",
                    scram.MECHANISM.encode() + b"\x00" + struct.pack("!i", len(first)) + first,
                )
            )
        elif code == AUTH_SASL_CONTINUE and client is not None:
            try:
                # PBKDF2 takes milliseconds to a second: not on the event loop.
                final = await asyncio.to_thread(client.final_message, payload)
            except scram.ScramError as exc:
                raise ScramFailed(f"SCRAM with {target.address} failed: {exc}") from exc
            writer.write(message(b"p", final))
        elif code == AUTH_SASL_FINAL and client is not None:
            try:
                client.verify(payload)
            except scram.ScramError as exc:
                raise ScramFailed(f"SCRAM with {target.address} failed: {exc}") from exc
        elif code == AUTH_CLEARTEXT and method == "trust":
            if target.tls != "verify-full":
                raise AuthRefused(
                    f"{target.address} asks for the password in cleartext; the proxy sends it "
                    "only over TLS with tls=verify-full (use scram-sha-256 in pg_hba.conf)"
                )
            if "\x00" in target.password:
                raise AuthRefused("the password contains NUL and cannot be sent in cleartext")
            method = "cleartext"
            writer.write(message(b"p", target.password.encode() + b"\x00"))
        elif code == AUTH_MD5:
            raise AuthRefused(
                f"{target.address} asks for an MD5 password hash, which the proxy never sends "
                "(use scram-sha-256 in pg_hba.conf and password_encryption)"
            )
        elif code in (AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL, AUTH_CLEARTEXT):
            raise ProtocolViolation(
                f"{target.address} sent authentication request {code} out of order"
            )
        else:
            name = _AUTH_NAMES.get(code, f"method {code}")
            raise AuthRefused(f"{target.address} asks for {name} authentication: not supported")
        await writer.drain()


async def _startup(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target, tls: bool
) -> Upstream:
    """Read start-up messages after AuthenticationOk until ReadyForQuery (section 53.2.1)."""
    method, notices = await _authenticate(reader, writer, target)
    parameters: dict[str, str] = {}
    backend_key: tuple[int, int] | None = None
    while True:
        kind, body = await _read(reader)
        if kind == b"S":
            name, value = _strings(body, 2, "ParameterStatus")
            parameters[name] = value
        elif kind == b"K":
            if len(body) != 8:
                raise ProtocolViolation("BackendKeyData of protocol 3.0 is 8 bytes")
            pid, secret = struct.unpack("!ii", body)
            backend_key = (pid, secret)
        elif kind == b"N":
            notices.append(_notice(body))
        elif kind == b"E":
            raise server_error(body)
        elif kind == b"Z":
            if body not in (b"I", b"T", b"E"):
                raise ProtocolViolation("malformed ReadyForQuery")
            for notice in notices:
                log.info(
                    "upstream %s: %s %s: %s",
                    target.address,
                    notice.severity,
                    notice.code,
                    notice.message,
                )
            return Upstream(
                reader=reader,
                writer=writer,
                parameters=parameters,
                backend_key=backend_key,
                transaction_status=body,
                authentication=method,
                tls=tls,
                notices=tuple(notices),
            )
        else:
            raise ProtocolViolation(f"unexpected message {kind!r} during start-up")


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()


async def connect(
    target: Target, *, read_only: bool, application_name: str, timeout: float
) -> Upstream:
    """Open a session on target as its role; UpstreamError on any failure, within timeout."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    parameters = {
        "user": target.user,
        "database": target.database,
        "application_name": clean_application_name(application_name),
    }
    if read_only:
        # Defence in depth: a session can still SET it off or BEGIN READ WRITE; the
        # guarantee is the role's privileges.
        parameters["options"] = READ_ONLY_OPTIONS
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(target)
            writer.write(startup_message(parameters))
            await writer.drain()
            upstream = await _startup(reader, writer, target, tls=target.tls != "disable")
    except UpstreamError:
        _abort(writer)
        raise
    except TimeoutError:
        _abort(writer)
        raise UpstreamTimeout(
            f"{target.address} did not complete the start-up within {timeout:g}s"
        ) from None
    except asyncio.IncompleteReadError:
        _abort(writer)
        raise ConnectFailed(
            f"{target.address} closed the connection during start-up", "08006"
        ) from None
    except ssl.SSLCertVerificationError as exc:
        _abort(writer)
        raise TlsFailed(
            f"the certificate of {target.address} was not accepted: {exc.verify_message}"
        ) from exc
    except ssl.SSLError as exc:
        _abort(writer)
        raise TlsFailed(f"TLS with {target.address} failed: {exc.reason or exc}") from exc
    except OSError as exc:
        _abort(writer)
        raise ConnectFailed(
            f"connection to {target.address} failed: {exc.strerror or exc}", "08006"
        ) from exc
    except BaseException:
        _abort(writer)
        raise
    log.debug(
        "upstream %s: logged in as %s with %s",
        target.address,
        target.user,
        upstream.authentication,
    )
    return upstream


async def cancel(target: Target, pid: int, secret: int, *, timeout: float = 5.0) -> None:
    """Ask the server to cancel the query of backend pid (section 53.2.9); no answer comes."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(target)
            writer.write(cancel_request(pid, secret))
            await writer.drain()
            # The server closes the connection once it has the request; like libpq,
            # wait for that so the cancel is on its way before we return. How it
            # closes (a TLS peer may skip close_notify) does not matter any more.
            with contextlib.suppress(OSError):
                while await reader.read(1024):
                    pass
    except UpstreamError:
        raise
    except TimeoutError:
        raise UpstreamTimeout(f"cancel request to {target.address} timed out") from None
    except ssl.SSLError as exc:
        raise TlsFailed(f"TLS with {target.address} failed: {exc.reason or exc}") from exc
    except OSError as exc:
        raise ConnectFailed(
            f"cancel request to {target.address} failed: {exc.strerror or exc}"
        ) from exc
    finally:
        _abort(writer)
