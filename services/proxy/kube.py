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
from urllib.parse import parse_qs, urlsplit

import h11
from opentelemetry import trace

from jitgate.common import telemetry
from jitgate.proxy import kubehttp, kubepolicy
from jitgate.proxy.config import KubeTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.kubegrants import Grants, Held, Refused, ended

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:6443"
PREFIX = "/connections/"
CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 90.0
"""Seconds a keep-alive connection may wait for its next request (Go's idle default)."""
UPSTREAM_TIMEOUT = 10.0
"""Connecting to the API server, and waiting for its response headers."""
CLOSE_GRACE = 1.0
"""Seconds a cut watch's agent gets to read the event saying why, before its socket is cut."""
MAX_DISCARD = 1 << 20
"""Bytes of a refused request's body read to keep the connection; more, and it is closed."""


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

    async def serve(self) -> None:
        """Answer requests until the agent leaves, idles out or breaks the protocol."""
        while True:
            try:
                event = await asyncio.wait_for(self._receive(self.http, self.reader), IDLE_TIMEOUT)
            except (TimeoutError, ConnectionError, ssl.SSLError):
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
        """Answer a request with our Status; return whether the connection may go on."""
        # RFC 9110 §10.1.1: a client waiting for 100 Continue is told no by
        # the final status; it will not send the body, so none is read.
        waiting = self.http.they_are_waiting_for_100_continue
        keep = not waiting and await self._discard_body()
        await self._status(refused.code, refused.message, close=not keep)
        return keep

    async def _discard_body(self) -> bool:
        """Read and drop a refused request's body; False if the connection cannot go on."""
        seen = 0
        while self.http.their_state is h11.SEND_BODY:
            try:
                event = await asyncio.wait_for(self._receive(self.http, self.reader), 10.0)
            except (TimeoutError, ConnectionError, ssl.SSLError, h11.RemoteProtocolError):
                return False
            if isinstance(event, h11.Data):
                seen += len(event.data)
                if seen > MAX_DISCARD:
                    return False
            elif not isinstance(event, h11.EndOfMessage):
                return False
        return self.http.their_state is h11.DONE

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
        return target, "/" + rest, query, held, kubehttp.is_upgrade(request.headers)


def _is_watch(query: str, headers: kubehttp.Headers) -> bool:
    """Whether a response is a JSON watch stream (newline-separated events)."""
    watching = parse_qs(query).get("watch", [""])[-1] in ("1", "true")
    types = [v for n, v in headers if n == b"content-type"]
    return watching and bool(types) and types[0].startswith(b"application/json")


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

    def _abort(self, reason: str) -> None:
        """Cut the agent and the API server off now: the grant has ended."""
        self.cut = True
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream.transport.abort()
        agent = self.agent.writer.transport
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
        self.held.streams.add(self._abort)
        try:
            return await self._run(request, rest, query, upgrade)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, h11.ProtocolError):
            if not self.cut:
                log.info(
                    "session %s: kubernetes stream ended early", self.held.session_id, exc_info=True
                )
            return False
        finally:
            self.held.streams.discard(self._abort)
            if self.upstream is not None:
                self.upstream.transport.abort()  # one upstream connection per request

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

    async def _run(self, request: h11.Request, rest: str, query: str, upgrade: bool) -> bool:
        """Forward the request, then relay the response (or the switched protocol)."""
        agent, stats = self.agent, self.held.stats
        url = urlsplit(self.target.server)
        try:
            reader, self.upstream = await self._connect()
        except Refused as refused:
            return await agent.refuse(refused)
        if self.cut:
            return False
        up = h11.Connection(h11.CLIENT)
        path = url.path.rstrip("/") + rest + (f"?{query}" if query else "")
        headers = kubehttp.upstream_request_headers(
            request.headers,
            host=url.netloc.rpartition("@")[2].encode(),  # never a userinfo part
            token=self.target.token,
            upgrade=upgrade,
        )
        self.upstream.write(
            up.send(h11.Request(method=request.method, target=path.encode(), headers=headers))
            or b""
        )
        # The request body, as it comes (a create or a patch; never large).
        if agent.http.they_are_waiting_for_100_continue:
            await agent._send(h11.InformationalResponse(status_code=100, headers=[]))
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
        response = await self._response(up, reader)
        if response is None:
            await agent._status(502, f"the API server of {self.target.name} did not answer")
            return False
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

    async def _agent_gone(self) -> None:
        """Abort the upstream stream once the agent closes its connection mid-response."""
        agent, kept = self.agent, 0
        with contextlib.suppress(ConnectionError, ssl.SSLError):
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
                "session %s: the API server of %s: %s", self.held.session_id, self.target.name, exc
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
        await agent._send(h11.InformationalResponse(status_code=101, headers=headers))
        log.info(
            "session %s: %s upgraded to %s",
            self.held.session_id,
            _loggable(request_target),
            b",".join(v for n, v in headers if n == b"upgrade").decode("latin-1")[:40],
        )
        from_agent, _ = agent.http.trailing_data
        from_server, _ = up.trailing_data
        if from_agent:
            stats.bytes_from_client += len(from_agent)
            self.upstream.write(from_agent)
        if from_server:
            stats.bytes_to_client += len(from_server)
            agent.writer.write(from_server)

        def count_in(n: int) -> None:
            """Count bytes from the agent."""
            stats.bytes_from_client += n

        def count_out(n: int) -> None:
            """Count bytes to the agent."""
            stats.bytes_to_client += n

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
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: Callable[[int], None]
) -> None:
    """Copy bytes until the source ends; drain keeps a slow reader from filling memory."""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await source.read(CHUNK):
            count(len(data))
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
    ) -> None:
        self.targets = dict(targets)
        self.grants = Grants(gate)
        self._tls = tls
        self._listen = listen
        self._contexts = {name: upstream_tls(t) for name, t in self.targets.items()}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def upstream_tls(self, target: KubeTarget) -> ssl.SSLContext:
        """The TLS context for target's API server, made once at start-up."""
        return self._contexts[target.name]

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def start(self) -> str:
        """Listen; return host:port."""
        host, _, port = self._listen.rpartition(":")
        self._server = await asyncio.start_server(
            self._accept,
            host.strip("[]"),
            int(port),
            ssl=self._tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        return f"{host}:{self.port} (kubernetes: {', '.join(sorted(self.targets))})"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one agent connection until it ends; never raises."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await _Agent(self, reader, writer).serve()
        except Exception:
            log.exception("kubernetes agent connection failed")
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._tasks.discard(task)

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
