"""The Kubernetes front end: an HTTPS endpoint that is the agent's API server for one namespace.

An agent's kubeconfig points at https://proxy/connections/<name> with its
grant token as the bearer token. Each request is checked (kubepolicy), then
forwarded to the real API server with the ServiceAccount token the proxy
holds for that connection (kubeforward). This module is the listener and the
agent's side of each connection: TLS, HTTP/1.1 (h11), routing, the grant,
the rules and the caps.

A grant is redeemed once and held until it ends (kubegrants); its end cuts
the requests of it still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import h11
from opentelemetry import trace

from jitgate.common import telemetry
from jitgate.proxy import kubehttp, kubepolicy
from jitgate.proxy.caps import Tally, Throttle, peer_address
from jitgate.proxy.config import KubeTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.kubeforward import CHUNK, Forward, loggable, receive, upstream_context
from jitgate.proxy.kubegrants import Grants, Held, Refused, ended
from jitgate.proxy.tlslisten import TlsListener

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:6443"
PREFIX = "/connections/"
HANDSHAKE_TIMEOUT = 10.0
"""Seconds from accept to a finished TLS handshake."""
HEADER_TIMEOUT = 10.0
"""Seconds for a request's whole head: from its first byte, or from the handshake for the first."""
IDLE_TIMEOUT = 90.0
"""Seconds a keep-alive connection may wait for its next request (Go's idle default)."""
BODY_TIMEOUT = 60.0
"""Seconds to read the whole body of a forwarded request (never a watch or an upgraded stream)."""
MAX_CONNECTIONS = 512
"""Agent connections open at once (counted from the TLS handshake); more get a 503 and close."""
MAX_CONNECTIONS_PER_IP = 64
"""Agent connections open at once from one client address."""
MAX_HANDSHAKES = 64
"""TLS handshakes in progress at once (as OpenSSH's MaxStartups); more are closed at accept."""
MAX_HANDSHAKES_PER_IP = 16
"""TLS handshakes in progress at once from one client address."""
MAX_IN_FLIGHT = 64
"""Requests of one grant in flight at once (watches and exec streams too); more get 429."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The front end's deadlines and caps: the module constants unless a test sets smaller ones."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    header_timeout: float = HEADER_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    max_handshakes: int = MAX_HANDSHAKES
    max_handshakes_per_ip: int = MAX_HANDSHAKES_PER_IP
    max_in_flight: int = MAX_IN_FLIGHT


class Agent:
    """One agent connection: requests in, one at a time (HTTP/1.1 has no multiplexing)."""

    def __init__(
        self, front: KubeFrontend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.front = front
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.SERVER)
        _, self.client = peer_address(writer.get_extra_info("peername"))

    async def send(self, event: h11.Event) -> None:
        """Send one h11 event to the agent and wait until it is taken."""
        data = self.http.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _next_request(self, idle: float | None) -> object:
        """The next request's head: idle s for its first byte (None: no wait), then its deadline."""
        event = self.http.next_event()
        if event is not h11.NEED_DATA:
            return event
        if idle is not None and not self.http.trailing_data[0]:
            # Between keep-alive requests the wait may be long; once a request
            # starts, its head must arrive within HEADER_TIMEOUT (a client
            # trickling a head byte by byte holds the connection no longer).
            async with asyncio.timeout(idle):
                self.http.receive_data(await self.reader.read(CHUNK))
        async with asyncio.timeout(self.front.limits.header_timeout):
            return await receive(self.http, self.reader)

    async def serve(self) -> None:
        """Answer requests until the agent leaves, idles out or breaks the protocol."""
        idle: float | None = None
        while True:
            try:
                event = await self._next_request(idle)
            except OSError:  # TimeoutError (a deadline), a reset, a TLS error: nothing to say
                return
            except h11.RemoteProtocolError as exc:
                # Not our message: h11's may quote the agent's bytes, token and all.
                log.info("kubernetes agent %s: bad HTTP (%s)", self.client, type(exc).__name__)
                await self.status(400, "malformed HTTP/1.1 request", close=True)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed, or the peer's half of a close
            keep = await self._request(event)
            if not keep or self.http.our_state is not h11.DONE:
                return
            if self.http.their_state is not h11.DONE:
                return
            self.http.start_next_cycle()
            idle = self.front.limits.idle_timeout

    async def status(self, code: int, message: str, *, close: bool = False) -> None:
        """Answer with a Status of ours; with close, the connection ends after it."""
        body = kubehttp.status(code, message)
        headers = kubehttp.status_headers(code, body)
        if close:
            headers.append((b"connection", b"close"))
        with contextlib.suppress(Exception):
            await self.send(h11.Response(status_code=code, headers=headers))
            await self.send(h11.Data(data=body))
            await self.send(h11.EndOfMessage())

    async def refuse(self, refused: Refused) -> bool:
        """Answer a request with our Status at once, and close: the connection cannot go on."""
        # RFC 9112 §9.6: with "Connection: close" the answer need not wait for
        # a body the client may still be sending (RFC 9110 §10.1.1: nor for
        # one it waits to send after 100 Continue). Reading it first would let
        # a client with no token hold the connection by trickling a body in.
        await self.status(refused.code, refused.message, close=True)
        return False

    async def _request(self, request: h11.Request) -> bool:
        """Serve one request; return whether the connection may carry another."""
        method = request.method.decode("ascii", "replace")
        try:
            target, rest, query, held, upgrade = await self._admit(request, method)
        except Refused as refused:
            log.info(
                "kubernetes %s %s from %s: %d %s",
                method,
                loggable(request.target),
                self.client,
                refused.code,
                refused.message,
            )
            return await self.refuse(refused)
        # No await since _admit checked the cap: the count cannot be overtaken.
        held.in_flight += 1
        try:
            with telemetry.tracer().start_as_current_span(
                "kubernetes request",
                kind=trace.SpanKind.SERVER,
                attributes={
                    "http.request.method": method,
                    "jitgate.connection": target.name,
                    "jitgate.grant_id": held.redeemed.grant_id,
                    "jitgate.session_id": held.session_id,
                },
            ):
                return await Forward(self, target, held).run(request, rest, query, upgrade)
        finally:
            held.in_flight -= 1

    async def _admit(
        self, request: h11.Request, method: str
    ) -> tuple[KubeTarget, str, str, Held, bool]:
        """Route, authenticate and check the request: (target, path, query, held, upgrade)."""
        raw = request.target.decode("latin-1")
        split = kubepolicy.split_target(raw)
        if split is None:
            raise Refused(403, "ambiguous or over-long request paths are refused")
        path, query = split
        if not path.startswith(PREFIX):
            raise Refused(404, "use the server URL jitgate gave: https://…/connections/<name>")
        name, slash, rest = path[len(PREFIX) :].partition("/")
        target = self.front.targets.get(name)
        if target is None:
            raise Refused(404, f"no kubernetes connection named {name[:63]!r}")
        if not slash or not rest:
            raise Refused(404, "no such path")
        token = kubehttp.bearer(request.headers)
        if token is None:
            raise Refused(401, "a grant token is required (Authorization: Bearer)")
        held = await self.front.grants.get(token, name, self.client)
        if held.lease.ended.is_set():
            raise Refused(401, f"this grant has {ended(held.lease.reason)}")
        scope = kubepolicy.Scope(
            namespace=target.namespace,
            allow_exec=target.allow_exec,
            allow_port_forward=target.allow_port_forward,
        )
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers]
        why = kubepolicy.refusal(method, "/" + rest, headers, scope)
        if why is not None:
            raise Refused(403, why)
        cap = self.front.limits.max_in_flight
        if held.in_flight >= cap:
            # RFC 6585 §4: client-go backs off and retries a 429 (Retry-After: 1).
            raise Refused(429, f"this grant already has {cap} requests in flight; retry")
        return target, "/" + rest, query, held, kubehttp.is_upgrade(request.headers)


class KubeFrontend:
    """The Kubernetes listener: one per proxy, serving every kubernetes connection."""

    def __init__(
        self,
        *,
        gate: Gate,
        targets: dict[str, KubeTarget],
        tls: ssl.SSLContext,
        listen: str,
        upstream_tls: Callable[[KubeTarget], ssl.SSLContext] = upstream_context,
        limits: Limits = Limits(),  # frozen: one shared default is safe
    ) -> None:
        self.targets = dict(targets)
        self.grants = Grants(gate)
        self.limits = limits
        self._listen = listen
        self._contexts = {name: upstream_tls(t) for name, t in self.targets.items()}
        self._listener = TlsListener(
            name="kubernetes",
            listen=listen,
            tls=tls,
            handshake_timeout=limits.handshake_timeout,
            handshakes=Tally(total=limits.max_handshakes, per_key=limits.max_handshakes_per_ip),
            connected=self._accept,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = Tally(
            total=self.limits.max_connections, per_key=self.limits.max_connections_per_ip
        )
        """Connections open by client address."""
        self._refusals = Throttle(log)

    def upstream_tls(self, target: KubeTarget) -> ssl.SSLContext:
        """The TLS context for target's API server, made once at start-up."""
        return self._contexts[target.name]

    @property
    def port(self) -> int:
        """The port listened on."""
        return self._listener.port

    @property
    def connections(self) -> int:
        """Agent connections open now (past their TLS handshake)."""
        return self._open.total

    async def start(self) -> str:
        """Listen; return host:port."""
        await self._listener.start()
        host, _, _ = self._listen.rpartition(":")
        return f"{host}:{self.port} (kubernetes: {', '.join(sorted(self.targets))})"

    def _admit(self, address: str) -> bool:
        """Count a new connection from address; False (and logged) if over a cap."""
        if self._open.take(address):
            return True
        refused = self._refusals.due()
        if refused is not None:
            log.warning(
                "kubernetes: refused %d new connection(s) over the cap, the last from %s"
                " (%d open, %d from it; caps %d and %d per address)",
                refused,
                address,
                self._open.total,
                self._open[address],
                self.limits.max_connections,
                self.limits.max_connections_per_ip,
            )
        return False

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new agent connection (TLS done): count it, or refuse it over a cap; serve it."""
        # A plain function, not a coroutine: the task below is ours, so a
        # cancelled one (stop) is no "Exception in callback" of asyncio's.
        address, _ = peer_address(writer.get_extra_info("peername"))
        if not self._admit(address):
            # Nothing of the request is read: a 503 Status ahead of it
            # (RFC 9110 §15.6.4), "Connection: close", and the socket closes.
            body = kubehttp.status(503, "too many connections to jitgate; retry")
            head = [*kubehttp.status_headers(503, body), (b"connection", b"close")]
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\n"
                + b"".join(name + b": " + value + b"\r\n" for name, value in head)
                + b"\r\n"
                + body
            )
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            """Close and uncount the connection, however its task ended (cancelled by stop too)."""
            self._tasks.discard(task)
            self._open.give_back(address)
            with contextlib.suppress(Exception):
                writer.close()

        task.add_done_callback(done)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The agent's requests until the connection ends; raises only cancellation (stop)."""
        try:
            await Agent(self, reader, writer).serve()
        except h11.ProtocolError as exc:
            # By name only: h11's text can quote a header, ours carry the token.
            log.warning("kubernetes agent connection failed: %s", type(exc).__name__)
        except Exception:
            log.exception("kubernetes agent connection failed")

    async def stop(self) -> None:
        """Stop listening, cut every request and end every hold."""
        await self._listener.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.grants.stop()
