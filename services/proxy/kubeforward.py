"""One request forwarded to the API server, and its answer (or its upgraded stream) relayed back.

The agent side (kube.Agent) has routed, authenticated and checked the
request; Forward connects to the API server with the proxy's TLS context and
token, streams the body and the response, follows watch and WebSocket
boundaries so that a grant's end can say why, and relays an upgraded
connection byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import h11

from jitgate.common.validate import printable
from jitgate.proxy import kubehttp, wsframes
from jitgate.proxy.config import KubeTarget
from jitgate.proxy.kubegrants import Held, Refused, ended

if TYPE_CHECKING:
    from jitgate.proxy.kube import Agent

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
UPSTREAM_TIMEOUT = 10.0
"""Connecting to the API server, and waiting for its response headers."""
CLOSE_GRACE = 1.0
"""Seconds a cut watch's agent gets to read the event saying why, before its socket is cut."""
MAX_HELD_EVENT = 2 * 1024 * 1024
"""Bytes of a watch event held until its newline (above etcd's 1.5 MiB object limit)."""


def _is_watch(query: str, headers: kubehttp.Headers) -> bool:
    """Whether a response is a JSON watch stream (newline-separated events)."""
    watching = parse_qs(query).get("watch", [""])[-1] in ("1", "true")
    types = [v for n, v in headers if n == b"content-type"]
    return watching and bool(types) and types[0].startswith(b"application/json")


async def receive(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event of conn (or PAUSED), reading from reader as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(CHUNK))


def _last_words(agent: asyncio.WriteTransport, data: bytes) -> None:
    """Write data and close: the agent has CLOSE_GRACE to read it, then it is cut anyway."""
    with contextlib.suppress(Exception):
        agent.write(data)
        agent.close()  # flushes data; an agent that never reads is cut at the grace's end
        asyncio.get_running_loop().call_later(CLOSE_GRACE, agent.abort)


def _whole_lines(held: bytearray, data: bytes) -> bytes:
    """The whole lines of held + data, to send; held keeps the start of the next.

    Only data is searched, and held is copied only when a line ends: a
    large event in many small chunks costs time in proportion to its size.
    """
    end = data.rfind(b"\n") + 1
    if not end:
        held += data
        return b""
    lines = bytes(held) + data[:end]
    held[:] = data[end:]
    return lines


def _why(exc: BaseException) -> str:
    """An error for the log in one line: h11's by name only (its text may quote a header)."""
    if isinstance(exc, h11.ProtocolError) or not str(exc):
        return type(exc).__name__
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def loggable(target: bytes) -> str:
    """The request target, shortened and printable, for the log."""
    # The path is the agent's; only printable ASCII goes to the log, and not too much.
    return printable(target.decode("ascii", "replace"), 200)


class Forward:
    """One request on its way to the API server and its response on the way back."""

    def __init__(self, agent: Agent, target: KubeTarget, held: Held) -> None:
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
        self.frames: wsframes.Reframer | None = None
        """For a WebSocket stream: the API server's frames, re-cut as they arrive."""
        self.status_channel = False
        """The stream is exec or attach, whose channel 3 carries the final Status."""

    def _abort(self, reason: str) -> None:
        """Cut the agent and the API server off now: the grant has ended."""
        self.cut = True
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream.transport.abort()
        agent = self.agent.writer.transport
        frames = self.frames
        why = f"the grant has {ended(reason)}"
        if frames is not None and not frames.closed and not agent.is_closing():
            # What the agent has of a WebSocket stream ends at a frame
            # boundary (wsframes.Reframer), so it ends with frames of our own:
            # for exec and attach the Status on channel 3, which kubectl
            # prints (after finishing a message cut short; not if the server
            # sent its own, which client-go would read as one with ours), then
            # a close frame with the reason (RFC 6455 §5.5.1) for any client.
            # Once a close was sent, nothing may follow it: the cut is bare.
            tail = frames.end_message()
            last = tail or b""
            if self.status_channel and tail is not None and not frames.error_channel_used:
                status = bytes([wsframes.ERROR_CHANNEL]) + kubehttp.status(401, why)
                last += wsframes.frame(wsframes.BINARY, status)
            _last_words(agent, last + wsframes.close(f"jitgate: {why}"))
        elif self.watch and self.boundary and not agent.is_closing():
            # Between two events, a watch can say why it ends: an ERROR event
            # carrying a Status, as the API server ends a watch itself.
            event = b'{"type":"ERROR","object":' + kubehttp.status(401, why) + b"}\n"
            http = self.agent.http
            with contextlib.suppress(Exception):
                event = (http.send(h11.Data(data=event)) or b"") + (
                    http.send(h11.EndOfMessage()) or b""
                )
                _last_words(agent, event)
        with contextlib.suppress(Exception):
            if not agent.is_closing():
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
                    loggable(request.target),
                    _why(exc),
                    self.held.failed,
                )
                if not self.answered:
                    await self.agent.status(
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
            await agent.send(h11.InformationalResponse(status_code=100, headers=[]))
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
                loggable(request.target),
                limit,
            )
            self.answered = True
            # RFC 9110 §15.5.9: 408, and the connection closes.
            message = f"the request body did not arrive within {limit:g} s"
            await agent.status(408, message, close=True)
            return False
        response = await self._response(up, reader)
        if response is None:
            self.answered = True
            await agent.status(
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
        await agent.send(
            h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)
        )
        # What the agent did with its grant, for the operator (paths only: no token is in one).
        log.info(
            "session %s: %s %s -> %d",
            self.held.session_id,
            request.method.decode("ascii", "replace"),
            loggable(request.target),
            response.status_code,
        )
        self.watch = response.status_code == 200 and _is_watch(query, headers)
        self.boundary = True
        held = bytearray()  # a watch event's start, kept until its newline: none uses half
        # A watch or a log stream may carry nothing for minutes: an agent that
        # leaves must not keep its upstream stream open until the grant ends.
        gone = asyncio.create_task(self._agent_gone())
        try:
            while True:
                event = await self._receive_upstream(up, reader)
                if isinstance(event, h11.Data):
                    data = bytes(event.data)
                    if self.watch:
                        # Whole events only, so a cut can always add one saying why;
                        # one too large to hold goes on as it comes.
                        data = _whole_lines(held, data)
                        if len(held) > MAX_HELD_EVENT:
                            data += held
                            held.clear()
                        if not data:
                            continue
                    stats.bytes_to_client += len(data)
                    # Set before the write: _send writes at once, then waits to drain.
                    self.boundary = data.endswith(b"\n")
                    await agent.send(h11.Data(data=data))
                elif isinstance(event, h11.EndOfMessage):
                    if held:  # the API server ended mid-event: the agent gets all it sent
                        stats.bytes_to_client += len(held)
                        self.boundary = False  # no ERROR event may follow half an event
                        await agent.send(h11.Data(data=bytes(held)))
                    await agent.send(h11.EndOfMessage())
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
            event = await receive(agent.http, agent.reader)
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
        return await receive(up, reader)

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
        """The API server switched protocols (RFC 9110 §15.2.2): relay both ways.

        Bytes go on as they come, but a WebSocket stream's frames from the API
        server are re-cut at each read (wsframes.Reframer), so a cut can say why.
        """
        agent, stats = self.agent, self.held.stats
        assert self.upstream is not None
        headers, _ = kubehttp.agent_response_headers(
            response.headers, secret=self.target.token, switching=True
        )
        websocket = kubehttp.upgrades_to_websocket(headers)
        # The server's own headers: one its Connection header names is not
        # relayed, but would still be in use.
        extension = any(n.lower() == b"sec-websocket-extensions" for n, _ in response.headers)
        if websocket and extension:
            # None was asked for (kubehttp strips the agent's): RFC 6455 §9.1
            # has a client fail such a handshake, and frames could not be re-cut.
            log.warning(
                "session %s: %s: the API server chose a WebSocket extension nobody asked for",
                self.held.session_id,
                loggable(request_target),
            )
            message = f"the API server of {self.target.name} answered in a way jitgate cannot relay"
            await agent.status(502, message, close=True)
            return False
        self.answered = True
        await agent.send(h11.InformationalResponse(status_code=101, headers=headers))
        log.info(
            "session %s: %s upgraded to %s",
            self.held.session_id,
            loggable(request_target),
            b",".join(v for n, v in headers if n == b"upgrade").decode("latin-1")[:40],
        )
        if websocket:
            self.frames = wsframes.Reframer()
            self.status_channel = request_target.split(b"?", 1)[0].endswith((b"/exec", b"/attach"))
        from_agent, _ = agent.http.trailing_data
        from_server, _ = up.trailing_data

        def inbound(data: bytes) -> bytes:
            """Count bytes from the agent; they go on as they came."""
            stats.bytes_from_client += len(data)
            return data

        pumps = [
            asyncio.create_task(_pump(agent.reader, self.upstream, inbound, from_agent)),
            asyncio.create_task(_pump(reader, agent.writer, self.outbound, from_server)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        return False

    def outbound(self, data: bytes) -> bytes:
        """What the agent gets of the API server's bytes on a switched stream; counted.

        Nothing once the stream is cut. A WebSocket stream's frames are re-cut;
        one that breaks RFC 6455 gets what came before the break, then a close
        frame of ours (1002), and the API server's side is cut.
        """
        frames = self.frames
        if self.cut:
            return b""  # the grant ended: nothing of the server's after our last frames
        if frames is not None:
            data = frames.feed(data)
            if frames.broken:
                log.warning(
                    "session %s: the API server of %s broke RFC 6455, stream cut: %s",
                    self.held.session_id,
                    self.target.name,
                    frames.broken,
                )
                self.cut = True
                if not frames.closed:
                    frames.closed = True
                    data += wsframes.close(
                        "jitgate: the API server's stream broke the WebSocket protocol",
                        wsframes.PROTOCOL_ERROR,
                    )
                if self.upstream is not None:
                    self.upstream.transport.abort()
        self.held.stats.bytes_to_client += len(data)
        return data


async def _pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    relay: Callable[[bytes], bytes],
    first: bytes = b"",
) -> None:
    """Copy bytes (first, then the source's) until the source ends; drain bounds memory."""
    with contextlib.suppress(OSError):
        data = first or await source.read(CHUNK)
        while data:
            # relay and write with no await between: a cut sees frames in step.
            sink.write(relay(data))
            await sink.drain()
            data = await source.read(CHUNK)


def upstream_context(target: KubeTarget) -> ssl.SSLContext:
    """TLS to an API server: its certificate checked against ca_file (or the system's CAs)."""
    context = ssl.create_default_context(cafile=target.ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context
