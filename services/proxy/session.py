"""One agent session: TLS, the grant as password, redemption, a relay until the grant ends."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from opentelemetry import trace

from jitgate.common import telemetry
from jitgate.common.errors import (
    JitgateError,
)
from jitgate.proxy import pgwire
from jitgate.proxy.caps import peer_address
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.refusals import refused

log = logging.getLogger(__name__)

LIVE = telemetry.meter().create_up_down_counter(
    "jitgate.proxy.sessions.live", unit="{session}", description="Sessions being relayed"
)
SESSIONS = telemetry.meter().create_counter(
    "jitgate.proxy.sessions", unit="{session}", description="Relayed sessions ended, by reason"
)
BYTES = telemetry.meter().create_counter(
    "jitgate.proxy.bytes", unit="By", description="Bytes relayed, by direction"
)

HANDSHAKE_TIMEOUT = 10.0
"""From accept to a redeemed grant; a client that stalls longer is dropped."""
CLOSE_GRACE = 1.0
"""Seconds an ended session's client gets to take its last bytes before the socket is cut."""

# SQLSTATEs (PostgreSQL docs, appendix "PostgreSQL Error Codes").
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"  # noqa: S105  # a SQLSTATE, not a secret
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT = "08006"
PROTOCOL_VIOLATION = "08P01"
TOO_MANY = "53300"
_SQLSTATES = {
    "rejected": INVALID_PASSWORD,
    "refused": INVALID_AUTHORIZATION,
    "unavailable": CANNOT_CONNECT,
    "failed": CANNOT_CONNECT,
}
"""The SQLSTATE for each outcome of refusals.refusal."""


@dataclass(frozen=True, kw_only=True)
class Redeemed:
    """A grant the core zone redeemed for this session."""

    grant_id: str
    subject: str
    connection: str
    expires_at: float


@dataclass(kw_only=True)
class Relay:
    """What the relay saw: bytes each way, and why it ended."""

    opened_at: float
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    reason: str = "client_closed"


def record_end(stats: Relay, kind: str) -> None:
    """Count an ended session in the metrics and on its span: one live fewer, why, bytes."""
    LIVE.add(-1)
    SESSIONS.add(1, {"jitgate.end_reason": stats.reason, "jitgate.kind": kind})
    BYTES.add(stats.bytes_from_client, {"jitgate.direction": "from_client"})
    BYTES.add(stats.bytes_to_client, {"jitgate.direction": "to_client"})
    telemetry.annotate(
        end_reason=stats.reason,
        bytes_from_client=stats.bytes_from_client,
        bytes_to_client=stats.bytes_to_client,
    )


class UpstreamSession(Protocol):
    """What an upstream connection gives the session (see jitgate.proxy.upstream)."""

    @property
    def reader(self) -> asyncio.StreamReader:
        """The server's side of the stream."""
        ...

    @property
    def writer(self) -> asyncio.StreamWriter:
        """Our side of the stream."""
        ...

    @property
    def parameters(self) -> dict[str, str]:
        """ParameterStatus values the server sent at start-up, in order."""
        ...

    @property
    def transaction_status(self) -> bytes:
        """The status byte of the server's first ReadyForQuery."""
        ...

    @property
    def backend_key(self) -> tuple[int, int] | None:
        """The server's cancel key for this session, if it sent one."""
        ...


@dataclass(kw_only=True)
class Hooks:
    """The session's collaborators, so tests can run it against fakes or real servers."""

    check: Callable[[str, str, str], Awaitable[Claims]]
    """(token, connection, kind): the proxy's own check of a grant token."""
    redeem: Callable[[str, str, str, str], Awaitable[Redeemed]]
    open_upstream: Callable[[str, str], Awaitable[UpstreamSession]]
    report: Callable[[Redeemed, str, Relay], Awaitable[None]]
    known: Callable[[str], bool]
    tls: ssl.SSLContext
    registry: Registry
    cancel: Callable[[str, tuple[int, int]], Awaitable[None]] | None = None
    """Cancel the running query of an upstream session: (connection, its backend key)."""
    clock: Callable[[], float] = time.time


class Endable(Protocol):
    """A live session of any kind, as the registry sees it."""

    @property
    def expires_at(self) -> float:
        """When the session's grant ends (epoch seconds)."""
        ...

    def end(self, reason: str) -> None:
        """Stop the session: "expired" or "revoked"."""
        ...


class Registry:
    """Live sessions of every kind by grant id, so a revocation can end every one of them.

    It also maps the cancel keys the proxy hands its clients to the upstream
    sessions' own keys: a client's cancel request never reaches a server
    directly, and a guessed key cancels nothing of anyone else's.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, set[Endable]] = {}
        self._cancels: dict[tuple[int, int], tuple[str, tuple[int, int]]] = {}

    def cancel_key(self, connection: str, upstream: tuple[int, int] | None) -> tuple[int, int]:
        """Return a fresh client-facing cancel key for an upstream session's key."""
        key = (secrets.randbits(31), secrets.randbits(31))
        if upstream is not None:
            self._cancels[key] = (connection, upstream)
        return key

    def forget_cancel_key(self, key: tuple[int, int]) -> None:
        """The session ended: its key cancels nothing any more."""
        self._cancels.pop(key, None)

    def upstream_of(self, key: tuple[int, int]) -> tuple[str, tuple[int, int]] | None:
        """Return (connection, upstream key) for a client's cancel key, if live."""
        return self._cancels.get(key)

    def add(self, grant_id: str, session: Endable) -> None:
        """Track session under grant_id."""
        self._sessions.setdefault(grant_id, set()).add(session)

    def remove(self, grant_id: str, session: Endable) -> None:
        """Stop tracking session."""
        live = self._sessions.get(grant_id)
        if live is not None:
            live.discard(session)
            if not live:
                del self._sessions[grant_id]

    def revoke(self, grant_id: str) -> int:
        """End every session of grant_id; return how many there were."""
        live = list(self._sessions.get(grant_id, ()))
        for session in live:
            session.end("revoked")
        return len(live)

    def grants(self) -> dict[str, float]:
        """The grants with live sessions, each with its expiry (epoch seconds)."""
        return {
            grant_id: min(session.expires_at for session in live)
            for grant_id, live in self._sessions.items()
            if live
        }

    def sessions(self) -> list[Endable]:
        """Every live session."""
        return [session for live in self._sessions.values() for session in live]

    def __len__(self) -> int:
        return sum(len(s) for s in self._sessions.values())


@dataclass(eq=False, kw_only=True)
class Session:
    """One client connection from accept to close."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hooks: Hooks
    session_id: str = field(default_factory=lambda: secrets.token_hex(8))
    _ending: asyncio.Event = field(default_factory=asyncio.Event)
    _reason: str = ""
    _cancel_key: tuple[int, int] = (0, 0)
    expires_at: float = 0.0
    """When the session's grant ends (set once it is redeemed)."""

    def end(self, reason: str) -> None:
        """Ask the relay to stop: "expired" or "revoked"."""
        if not self._reason:
            self._reason = reason
        self._ending.set()

    async def run(self) -> None:
        """Serve the client until it leaves or its grant ends; never raises."""
        # One span per agent connection; the redemption's RPC is its child.
        with telemetry.tracer().start_as_current_span(
            "proxy session",
            kind=trace.SpanKind.SERVER,
            attributes={"db.system": "postgresql", "jitgate.session_id": self.session_id},
        ):
            await self._run()

    async def _run(self) -> None:
        _, client = peer_address(self.writer.get_extra_info("peername"))
        try:
            started = await asyncio.wait_for(self._handshake(client), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            log.info("session %s from %s: handshake timed out", self.session_id, client)
            await self._close()
            return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("session %s from %s: left during handshake: %s", self.session_id, client, exc)
            await self._close()
            return
        if started is None:
            await self._close()
            return
        redeemed, upstream = started
        await self._relay(redeemed, upstream)

    async def _forward_cancel(self, startup: pgwire.Startup) -> None:
        # Protocol: a cancel request gets no answer; the connection just closes.
        found = self.hooks.registry.upstream_of(startup.cancel or (0, 0))
        if found is None or self.hooks.cancel is None:
            log.info("session %s: cancel request for no live session", self.session_id)
            return
        connection, upstream_key = found
        try:
            await self.hooks.cancel(connection, upstream_key)
        except JitgateError as exc:
            log.warning("session %s: cancel on %s failed: %s", self.session_id, connection, exc)

    async def _refuse(self, sqlstate: str, text: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.writer.write(pgwire.error_response(sqlstate, text))
            await self.writer.drain()

    async def _handshake(self, client: str) -> tuple[Redeemed, UpstreamSession] | None:
        startup = await pgwire.read_startup(self.reader)
        if startup.code == pgwire.GSSENC_REQUEST:
            self.writer.write(b"N")  # no GSS encryption; the client may ask for TLS next
            await self.writer.drain()
            startup = await pgwire.read_startup(self.reader)
        if startup.code == pgwire.CANCEL_REQUEST:
            await self._forward_cancel(startup)
            return None
        if startup.code != pgwire.SSL_REQUEST:
            # Before any password is asked for: a token must never cross in clear.
            await self._refuse(
                INVALID_AUTHORIZATION, "jitgate requires TLS: connect with sslmode=require"
            )
            log.info("session %s from %s: refused, no TLS", self.session_id, client)
            return None
        self.writer.write(b"S")
        await self.writer.drain()
        await self.writer.start_tls(self.hooks.tls)
        startup = await pgwire.read_startup(self.reader)
        if startup.code == pgwire.CANCEL_REQUEST:  # newer clients cancel over TLS too
            await self._forward_cancel(startup)
            return None
        if startup.code != pgwire.PROTOCOL_3:
            await self._refuse(PROTOCOL_VIOLATION, "expected a start-up message")
            return None
        connection = startup.parameters.get("database", "")
        if not self.hooks.known(connection):
            await self._refuse(INVALID_AUTHORIZATION, f"no connection named {connection[:63]!r}")
            return None
        self.writer.write(pgwire.authentication(pgwire.AUTH_CLEARTEXT))
        await self.writer.drain()
        kind, body = await pgwire.read_message(self.reader, pgwire.MAX_PASSWORD_BYTES)
        if kind != b"p":
            await self._refuse(PROTOCOL_VIOLATION, "expected the grant token as the password")
            return None
        token = pgwire.password(body)
        marks = [time.perf_counter()]  # the handshake's phases, for the session's log line
        try:
            await self.hooks.check(token, connection, "postgres")
            marks.append(time.perf_counter())
            redeemed = await self.hooks.redeem(token, connection, self.session_id, client)
            marks.append(time.perf_counter())
        except JitgateError as exc:
            denied = refused(exc, log, f"session {self.session_id} from {client}")
            await self._refuse(_SQLSTATES[denied.outcome], f"jitgate: {denied.message}")
            return None
        try:
            upstream = await self.hooks.open_upstream(connection, redeemed.subject)
            marks.append(time.perf_counter())
        except JitgateError as exc:
            await self._refuse(CANNOT_CONNECT, f"cannot reach {connection}")
            log.warning("session %s: upstream %s failed: %s", self.session_id, connection, exc)
            failed = Relay(opened_at=self.hooks.clock(), reason="error")
            await self.hooks.report(redeemed, self.session_id, failed)
            return None
        telemetry.annotate(grant_id=redeemed.grant_id, connection=connection)
        # The client sees the server's parameters and our own cancel key.
        hello = [pgwire.authentication(pgwire.AUTH_OK)]
        for name, value in upstream.parameters.items():
            hello.append(pgwire.message(b"S", name.encode() + b"\x00" + value.encode() + b"\x00"))
        self._cancel_key = self.hooks.registry.cancel_key(connection, upstream.backend_key)
        hello.append(pgwire.message(b"K", struct.pack("!ii", *self._cancel_key)))
        hello.append(pgwire.message(b"Z", upstream.transaction_status))
        try:
            self.writer.write(b"".join(hello))
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError) as exc:
            # Redeemed but gone: the redemption is on the record, so its end must be too.
            log.info("session %s: client left after redemption: %s", self.session_id, exc)
            upstream.writer.transport.abort()
            self.hooks.registry.forget_cancel_key(self._cancel_key)
            gone = Relay(opened_at=self.hooks.clock(), reason="client_closed")
            with contextlib.suppress(Exception):
                await self.hooks.report(redeemed, self.session_id, gone)
            return None
        check_ms, redeem_ms, upstream_ms = ((b - a) * 1000 for a, b in itertools.pairwise(marks))
        log.info(
            "session %s: %s on %s until %s (grant %s; check %.1f ms, redeem %.1f ms,"
            " upstream %.1f ms)",
            self.session_id,
            redeemed.subject,
            connection,
            time.strftime("%H:%M:%S", time.gmtime(redeemed.expires_at)),
            redeemed.grant_id,
            check_ms,
            redeem_ms,
            upstream_ms,
        )
        return redeemed, upstream

    async def _relay(self, redeemed: Redeemed, upstream: UpstreamSession) -> None:
        registry, loop = self.hooks.registry, asyncio.get_running_loop()
        stats = Relay(opened_at=self.hooks.clock())
        self.expires_at = redeemed.expires_at
        registry.add(redeemed.grant_id, self)
        LIVE.add(1)
        left = max(0.0, redeemed.expires_at - self.hooks.clock())
        timer = loop.call_later(left, self.end, "expired")
        boundaries = pgwire.Boundaries()
        client = cast(asyncio.Transport, self.writer.transport)
        server = cast(asyncio.Transport, upstream.writer.transport)
        closed: asyncio.Future[str] = loop.create_future()

        def to_server(data: bytes) -> None:
            stats.bytes_from_client += len(data)
            server.write(data)

        def to_client(data: bytes) -> None:
            boundaries.feed(data)
            stats.bytes_to_client += len(data)
            client.write(data)

        # From here each chunk goes straight from one transport to the other in
        # the event loop's callback: no stream buffer, future or task switch per
        # message (bench/proxy.py measured the streams version at ~25% fewer TPS).
        # Bytes the streams already buffered go first.
        for data, forward in (
            (_buffered(self.reader), to_server),
            (_buffered(upstream.reader), to_client),
        ):
            if data:
                forward(data)
        client.set_protocol(_Pipe(forward=to_server, peer=server, closed=closed, side="client"))
        server.set_protocol(_Pipe(forward=to_client, peer=client, closed=closed, side="server"))
        for side, transport, reader, peer in (
            ("client", client, self.reader, server),
            ("server", server, upstream.reader, client),
        ):
            if reader.at_eof() or reader.exception() is not None or transport.is_closing():
                # The end came before the swap, to the stream: the pipe never hears of it.
                if not closed.done():
                    closed.set_result(side)
            elif not transport.is_reading():  # a stream paused it when its buffer filled
                transport.resume_reading()
            if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
                # Its pause went to the stream before the swap: pause the peer here.
                peer.pause_reading()
        ending = asyncio.ensure_future(self._ending.wait())
        waiters: set[asyncio.Future[Any]] = {closed, ending}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if ending.done():
                stats.reason = self._reason
            else:
                stats.reason = "server_closed" if closed.result() == "server" else "client_closed"
            if stats.reason in ("expired", "revoked") and boundaries.at_boundary:
                # Tell the agent why, between two messages, then close both sides.
                with contextlib.suppress(Exception):
                    client.write(
                        pgwire.error_response(ADMIN_SHUTDOWN, f"jitgate: grant {stats.reason}")
                    )
        finally:
            record_end(stats, "postgres")
            ending.cancel()
            timer.cancel()
            registry.remove(redeemed.grant_id, self)
            registry.forget_cancel_key(self._cancel_key)
            with contextlib.suppress(Exception):
                # Abort, not close: close() waits to send what is buffered, and a
                # server blocked writing its output never reads it, so the session
                # (and its backend) would outlive the grant. Nothing the agent
                # sent after the end may reach the server anyway.
                server.abort()
            with contextlib.suppress(Exception):
                client.close()  # flushes the ErrorResponse; a client that never reads
                loop.call_later(CLOSE_GRACE, client.abort)  # does not hold the socket
            log.info(
                "session %s ended (%s): %d bytes in, %d out",
                self.session_id,
                stats.reason,
                stats.bytes_from_client,
                stats.bytes_to_client,
            )
            with contextlib.suppress(Exception):
                await self.hooks.report(redeemed, self.session_id, stats)

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


def _buffered(reader: asyncio.StreamReader) -> bytes:
    """Take what a stream read from its transport but nobody has consumed yet.

    StreamReader has no public way to drain its buffer without waiting; the
    relay hands the transport to a plain protocol, and these bytes (a pipelined
    query, a notice that followed ReadyForQuery) must not be lost on the way.
    """
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    data = bytes(buffer)
    buffer.clear()
    return data


class _Pipe(asyncio.Protocol):
    """One side of a relay: what its transport receives goes to the other side.

    Flow control is the usual pairing: when this side's transport cannot take
    more (its buffer is over the high-water mark), the peer stops reading, so a
    slow agent slows the server down instead of filling the proxy's memory.
    """

    def __init__(
        self,
        *,
        forward: Callable[[bytes], None],
        peer: asyncio.Transport,
        closed: asyncio.Future[str],
        side: str,
    ) -> None:
        self._forward = forward
        self._peer = peer
        self._closed = closed
        self._side = side

    def data_received(self, data: bytes) -> None:
        """Relay data to the peer."""
        try:
            self._forward(data)
        except Exception:  # a write to a closing peer: end the relay
            self._finish()

    def eof_received(self) -> bool:
        """The side closed its half: the session is over."""
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The side is gone: the session is over."""
        self._finish()

    def pause_writing(self) -> None:
        """This side is backed up: stop reading from the peer."""
        with contextlib.suppress(Exception):
            self._peer.pause_reading()

    def resume_writing(self) -> None:
        """This side drained: read from the peer again."""
        with contextlib.suppress(Exception):
            self._peer.resume_reading()

    def _finish(self) -> None:
        if not self._closed.done():
            self._closed.set_result(self._side)
