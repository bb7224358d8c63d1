"""The Kubernetes front end: an HTTPS endpoint that is the agent's API server for one namespace.

An agent's kubeconfig points at https://proxy/connections/<name> with its
grant token as the bearer token. Each request is checked (kubepolicy), then
forwarded to the real API server with the ServiceAccount token the proxy
holds for that connection. HTTP/1.1 on both sides (h11), bodies streamed,
and for exec, attach and port-forward the upgraded connection relayed byte
for byte.

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
from urllib.parse import parse_qs, urlsplit

import h11
from opentelemetry import trace

from jitgate.common import telemetry
from jitgate.proxy import kubehttp, kubepolicy, wsframes
from jitgate.proxy.caps import Tally, Throttle
from jitgate.proxy.config import KubeTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.kubegrants import Grants, Held, Refused, ended

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:6443"
PREFIX = "/connections/"
CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
"""Seconds from accept to a finished TLS handshake."""
HEADER_TIMEOUT = 10.0
"""Seconds for a request's whole head: from its first byte, or from the handshake for the first."""
IDLE_TIMEOUT = 90.0
"""Seconds a keep-alive connection may wait for its next request (Go's idle default)."""
BODY_TIMEOUT = 60.0
"""Seconds to read the whole body of a forwarded request (never a watch or an upgraded stream)."""
UPSTREAM_TIMEOUT = 10.0
"""Connecting to the API server, and waiting for its response headers."""
CLOSE_GRACE = 1.0
"""Seconds a cut watch's agent gets to read the event saying why, before its socket is cut."""
MAX_CONNECTIONS = 512
"""Agent connections open at once (counted from the TLS handshake); more get a 503 and close."""
MAX_CONNECTIONS_PER_IP = 64
"""Agent connections open at once from one client address."""
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
    max_in_flight: int = MAX_IN_FLIGHT


class _Agent:
    """One agent connection: requests in, one at a time (HTTP/1.1 has no multiplexing)."""

    def __init__(
        self, front: KubeFrontend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.front = front
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.SERVER)
        peer = writer.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")

    async def _receive(self, conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        """The next h11 event of conn (or PAUSED), reading from reader as needed."""
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(CHUNK))

    async def _send(self, event: h11.Event) -> None:
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
            return await self._receive(self.http, self.reader)

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
                await self._status(400, "malformed HTTP/1.1 request", close=True)
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

    async def _status(self, code: int, message: str, *, close: bool = False) -> None:
        """Answer with a Status of ours; with close, the connection ends after it."""
        body = kubehttp.status(code, message)
        headers = kubehttp.status_headers(code, body)
        if close:
            headers.append((b"connection", b"close"))
        with contextlib.suppress(Exception):
            await self._send(h11.Response(status_code=code, headers=headers))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())

    async def refuse(self, refused: Refused) -> bool:
        """Answer a request with our Status at once, and close: the connection cannot go on."""
        # RFC 9112 §9.6: with "Connection: close" the answer need not wait for
        # a body the client may still be sending (RFC 9110 §10.1.1: nor for
        # one it waits to send after 100 Continue). Reading it first would let
        # a client with no token hold the connection by trickling a body in.
        await self._status(refused.code, refused.message, close=True)
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
                _loggable(request.target),
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
                return await _Forward(self, target, held).run(request, rest, query, upgrade)
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


def _is_watch(query: str, headers: kubehttp.Headers) -> bool:
    """Whether a response is a JSON watch stream (newline-separated events)."""
    watching = parse_qs(query).get("watch", [""])[-1] in ("1", "true")
    types = [v for n, v in headers if n == b"content-type"]
    return watching and bool(types) and types[0].startswith(b"application/json")


def _why(exc: BaseException) -> str:
    """An error for the log in one line: h11's by name only (its text may quote a header)."""
    if isinstance(exc, h11.ProtocolError) or not str(exc):
        return type(exc).__name__
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _loggable(target: bytes) -> str:
    """The request target, shortened and printable, for the log."""
    # The path is the agent's; only printable ASCII goes to the log, and not too much.
    text = target.decode("ascii", "replace")[:200]
    return "".join(c if c.isprintable() else "?" for c in text)


class _Forward:
    """One request on its way to the API server and its response on the way back."""

    def __init__(self, agent: _Agent, target: KubeTarget, held: Held) -> None:
        self.agent = agent
        self.target = target
        self.held = held
        self.upstream: asyncio.StreamWriter | None = None
        self.cut = False
        self.watch = False
        """The response is a JSON watch stream: one event per line."""
        self.boundary = False
        """What the agent got so far ends between two watch events."""
        self.answered = False
        """The agent has the response's head (or the 101): no Status of ours can follow."""
        self.frames: wsframes.Frames | None = None
        """For a WebSocket stream: where the API server's frames end."""
        self.status_channel = False
        """The stream is exec or attach, whose channel 3 carries the final Status."""

    def _abort(self, reason: str) -> None:
        """Cut the agent and the API server off now: the grant has ended."""
        self.cut = True
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream.transport.abort()
        agent = self.agent.writer.transport
        if self.frames is not None and self.frames.at_boundary and not agent.is_closing():
            # Between two WebSocket frames the stream can end with frames of
            # our own: for exec and attach the Status on channel 3, which
            # kubectl prints, then a close frame with the reason (RFC 6455
            # §5.5.1) for any client.
            message = f"jitgate: the grant has {ended(reason)}"
            last = b""
            if self.status_channel:
                status = kubehttp.status(401, f"the grant has {ended(reason)}")
                last = wsframes.frame(wsframes.BINARY, bytes([wsframes.ERROR_CHANNEL]) + status)
            with contextlib.suppress(Exception):
                agent.write(last + wsframes.close(message))
                agent.close()
                asyncio.get_running_loop().call_later(CLOSE_GRACE, agent.abort)
                return
        if self.watch and self.boundary and not agent.is_closing():
            # Between two events, a watch can say why it ends: an ERROR event
            # carrying a Status, as the API server ends a watch itself.
            status = kubehttp.status(401, f"the grant has {ended(reason)}")
            event = b'{"type":"ERROR","object":' + status + b"}\n"
            with contextlib.suppress(Exception):
                http = self.agent.http
                agent.write(
                    (http.send(h11.Data(data=event)) or b"")
                    + (http.send(h11.EndOfMessage()) or b"")
                )
                agent.close()  # flushes the event; an agent that never reads is cut anyway
                asyncio.get_running_loop().call_later(CLOSE_GRACE, agent.abort)
                return
        with contextlib.suppress(Exception):
            agent.abort()

    async def run(self, request: h11.Request, rest: str, query: str, upgrade: bool) -> bool:
        """Forward, relay the answer; return whether the agent connection may go on."""
        try:
            up, head = self._request_head(request, rest, query, upgrade)
        except h11.LocalProtocolError:
            # h11's message quotes the header value it refuses, and one of ours
            # is the ServiceAccount token: a sentence only, never the exception.
            log.error(
                "session %s: the request to %s cannot be sent: a header value is not valid"
                " HTTP (RFC 9110 §5.5); check the connection's token (values not logged)",
                self.held.session_id,
                self.target.name,
            )
            return await self.agent.refuse(
                Refused(502, f"jitgate cannot forward requests to {self.target.name}")
            )
        self.held.streams.add(self._abort)
        try:
            return await self._run(request, up, head, query, upgrade)
        except (OSError, EOFError, h11.ProtocolError) as exc:
            # OSError: resets, TLS errors, timeouts (TimeoutError), either side;
            # h11's errors are logged by name, their text may quote headers.
            if not self.cut:
                self.held.failed += 1
                log.info(
                    "session %s: %s %s ended early: %s (%d so far in this session)",
                    self.held.session_id,
                    request.method.decode("ascii", "replace"),
                    _loggable(request.target),
                    _why(exc),
                    self.held.failed,
                )
                if not self.answered:
                    await self.agent._status(
                        502, f"the API server of {self.target.name} did not answer", close=True
                    )
            return False
        finally:
            self.held.streams.discard(self._abort)
            if self.upstream is not None:
                self.upstream.transport.abort()  # one upstream connection per request

    def _request_head(
        self, request: h11.Request, rest: str, query: str, upgrade: bool
    ) -> tuple[h11.Connection, bytes]:
        """The upstream connection's h11 state and the request head for it; LocalProtocolError."""
        url = urlsplit(self.target.server)
        up = h11.Connection(h11.CLIENT)
        # config.py checked the server URL: its path, if any, is a clean prefix.
        path = url.path.rstrip("/") + rest + (f"?{query}" if query else "")
        headers = kubehttp.upstream_request_headers(
            request.headers,
            host=url.netloc.rpartition("@")[2].encode(),  # never a userinfo part
            token=self.target.token,
            upgrade=upgrade,
        )
        head = up.send(h11.Request(method=request.method, target=path.encode(), headers=headers))
        return up, head or b""

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection to the connection's API server, or Refused(503)."""
        url = urlsplit(self.target.server)
        host, port = url.hostname or "", url.port or 443
        context = self.agent.front.upstream_tls(self.target)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=host),
                UPSTREAM_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.warning(
                "session %s: cannot reach the API server of %s: %s",
                self.held.session_id,
                self.target.name,
                exc,
            )
            raise Refused(503, f"cannot reach the API server of {self.target.name}") from None
        return reader, writer

    async def _run(
        self, request: h11.Request, up: h11.Connection, head: bytes, query: str, upgrade: bool
    ) -> bool:
        """Forward the request, then relay the response (or the switched protocol)."""
        agent, stats = self.agent, self.held.stats
        try:
            reader, self.upstream = await self._connect()
        except Refused as refused:
            self.answered = True
            return await agent.refuse(refused)
        if self.cut:
            return False
        self.upstream.write(head)
        # The request body, as it comes (a create or a patch; never large),
        # within one deadline for all of it: a grant holder trickling a body
        # must not hold a connection here and one upstream.
        if agent.http.they_are_waiting_for_100_continue:
            await agent._send(h11.InformationalResponse(status_code=100, headers=[]))
        deadline = asyncio.timeout(agent.front.limits.body_timeout)
        try:
            async with deadline:
                if not await self._body(up):
                    return False
        except TimeoutError:
            if not deadline.expired():
                raise  # a socket's own timeout, not our deadline
            limit = agent.front.limits.body_timeout
            log.info(
                "session %s: %s request body not received within %g s",
                self.held.session_id,
                _loggable(request.target),
                limit,
            )
            self.answered = True
            # RFC 9110 §15.5.9: 408, and the connection closes.
            message = f"the request body did not arrive within {limit:g} s"
            await agent._status(408, message, close=True)
            return False
        response = await self._response(up, reader)
        if response is None:
            self.answered = True
            await agent._status(
                502, f"the API server of {self.target.name} did not answer", close=True
            )
            return False
        self.answered = True
        if isinstance(response, h11.InformationalResponse):
            return await self._switch(up, reader, response, request.target)
        headers, dropped = kubehttp.agent_response_headers(
            response.headers, secret=self.target.token
        )
        if dropped:
            log.error(
                "session %s: dropped response header(s) %s carrying the upstream credential",
                self.held.session_id,
                b",".join(dropped).decode("latin-1"),
            )
        await agent._send(
            h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)
        )
        # What the agent did with its grant, for the operator (paths only: no token is in one).
        log.info(
            "session %s: %s %s -> %d",
            self.held.session_id,
            request.method.decode("ascii", "replace"),
            _loggable(request.target),
            response.status_code,
        )
        self.watch = response.status_code == 200 and _is_watch(query, headers)
        self.boundary = True
        # A watch or a log stream may carry nothing for minutes: an agent that
        # leaves must not keep its upstream stream open until the grant ends.
        gone = asyncio.create_task(self._agent_gone())
        try:
            while True:
                event = await self._receive_upstream(up, reader)
                if isinstance(event, h11.Data):
                    stats.bytes_to_client += len(event.data)
                    # Set before the write: _send writes at once, then waits to drain.
                    self.boundary = event.data.endswith(b"\n")
                    await agent._send(event)
                elif isinstance(event, h11.EndOfMessage):
                    await agent._send(h11.EndOfMessage())
                    return not gone.done()
                else:
                    # The API server closed mid-body: the agent must see a cut, not an end.
                    return False
        finally:
            gone.cancel()

    async def _body(self, up: h11.Connection) -> bool:
        """Copy the agent's request body upstream; False if the agent's request broke off."""
        agent, stats = self.agent, self.held.stats
        assert self.upstream is not None
        while agent.http.their_state is h11.SEND_BODY:
            event = await agent._receive(agent.http, agent.reader)
            if isinstance(event, h11.Data):
                stats.bytes_from_client += len(event.data)
                self.upstream.write(up.send(event) or b"")
                await self.upstream.drain()
            elif isinstance(event, h11.EndOfMessage):
                self.upstream.write(up.send(h11.EndOfMessage()) or b"")
            else:
                return False
        if up.our_state is h11.SEND_BODY:
            self.upstream.write(up.send(h11.EndOfMessage()) or b"")
        await self.upstream.drain()
        return True

    async def _agent_gone(self) -> None:
        """Abort the upstream stream once the agent closes its connection mid-response."""
        agent, kept = self.agent, 0
        with contextlib.suppress(OSError):
            # RFC 9112 §9.3.2: a client may pipeline its next request; h11 keeps
            # those bytes for the next cycle. Past CHUNK of them, stop looking.
            while kept <= CHUNK and (data := await agent.reader.read(CHUNK)):
                kept += len(data)
                agent.http.receive_data(data)
            if kept > CHUNK:
                return
        self.cut = True  # by the agent: nothing to log
        if self.upstream is not None:
            self.upstream.transport.abort()

    async def _receive_upstream(self, up: h11.Connection, reader: asyncio.StreamReader) -> object:
        """The next h11 event from the API server."""
        return await self.agent._receive(up, reader)

    async def _response(
        self, up: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Response | h11.InformationalResponse | None:
        """The API server's final response head (or its 101); None if it sent none in time."""
        try:
            while True:
                event = await asyncio.wait_for(self._receive_upstream(up, reader), UPSTREAM_TIMEOUT)
                if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                    continue  # 100 Continue and 103 Early Hints are this hop's
                if isinstance(event, (h11.Response, h11.InformationalResponse)):
                    return event
                return None
        except (TimeoutError, h11.RemoteProtocolError) as exc:
            log.warning(
                "session %s: the API server of %s: %s",
                self.held.session_id,
                self.target.name,
                _why(exc),
            )
            return None

    async def _switch(
        self,
        up: h11.Connection,
        reader: asyncio.StreamReader,
        response: h11.InformationalResponse,
        request_target: bytes,
    ) -> bool:
        """The API server switched protocols (RFC 9110 §15.2.2): relay raw bytes both ways."""
        agent, stats = self.agent, self.held.stats
        assert self.upstream is not None
        headers, _ = kubehttp.agent_response_headers(
            response.headers, secret=self.target.token, switching=True
        )
        self.answered = True
        await agent._send(h11.InformationalResponse(status_code=101, headers=headers))
        log.info(
            "session %s: %s upgraded to %s",
            self.held.session_id,
            _loggable(request_target),
            b",".join(v for n, v in headers if n == b"upgrade").decode("latin-1")[:40],
        )
        if kubehttp.upgrades_to_websocket(headers):
            self.frames = wsframes.Frames()
            self.status_channel = request_target.split(b"?", 1)[0].endswith((b"/exec", b"/attach"))
        from_agent, _ = agent.http.trailing_data
        from_server, _ = up.trailing_data

        def count_in(data: bytes) -> None:
            """Count bytes from the agent."""
            stats.bytes_from_client += len(data)

        def count_out(data: bytes) -> None:
            """Count bytes to the agent, and follow its WebSocket frames."""
            stats.bytes_to_client += len(data)
            if self.frames is not None:
                self.frames.feed(data)

        if from_agent:
            count_in(from_agent)
            self.upstream.write(from_agent)
        if from_server:
            count_out(from_server)
            agent.writer.write(from_server)

        pumps = [
            asyncio.create_task(_pump(agent.reader, self.upstream, count_in)),
            asyncio.create_task(_pump(reader, agent.writer, count_out)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        return False


async def _pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: Callable[[bytes], None]
) -> None:
    """Copy bytes until the source ends; drain keeps a slow reader from filling memory."""
    with contextlib.suppress(OSError):
        while data := await source.read(CHUNK):
            count(data)  # before the write, with no await between: frames stay in step
            sink.write(data)
            await sink.drain()


def upstream_context(target: KubeTarget) -> ssl.SSLContext:
    """TLS to an API server: its certificate checked against ca_file (or the system's CAs)."""
    context = ssl.create_default_context(cafile=target.ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


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
        self._tls = tls
        self._listen = listen
        self._contexts = {name: upstream_tls(t) for name, t in self.targets.items()}
        self._server: asyncio.Server | None = None
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
        assert self._server is not None
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    @property
    def connections(self) -> int:
        """Agent connections open now (past their TLS handshake)."""
        return self._open.total

    async def start(self) -> str:
        """Listen; return host:port."""
        host, _, port = self._listen.rpartition(":")
        self._server = await asyncio.start_server(
            self._accept,
            host.strip("[]"),
            int(port),
            ssl=self._tls,
            ssl_handshake_timeout=self.limits.handshake_timeout,
        )
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

    def _release(self, address: str) -> None:
        """Uncount a connection from address."""
        self._open.give_back(address)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new agent connection (TLS done): count it, or refuse it over a cap; serve it."""
        # A plain function, not a coroutine: the task below is ours, so a
        # cancelled one (stop) is no "Exception in callback" of asyncio's.
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
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
            self._release(address)
            with contextlib.suppress(Exception):
                writer.close()

        task.add_done_callback(done)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The agent's requests until the connection ends; raises only cancellation (stop)."""
        try:
            await _Agent(self, reader, writer).serve()
        except h11.ProtocolError as exc:
            # By name only: h11's text can quote a header, ours carry the token.
            log.warning("kubernetes agent connection failed: %s", type(exc).__name__)
        except Exception:
            log.exception("kubernetes agent connection failed")

    async def stop(self) -> None:
        """Stop listening, cut every request and end every hold."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.grants.stop()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
