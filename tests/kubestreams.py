"""A test API server for streams (not a real Kubernetes one): attach, port-forward, WebSocket.

It is tests/kubeapi.py's test API server, extended: everything that one
answers, plus

- a GET of a pod says it is Running with its container running (kubectl
  attach checks that before it attaches);
- `…/pods/<p>/attach` upgraded to WebSocket `v5.channel.k8s.io`: what
  arrives on stdin (channel 0) is echoed on stdout (channel 1); when the
  client closes stdin (v5's close signal: channel 255, then 0) it ends with
  a Success Status on the error channel (3), as a container that exits 0;
- `…/pods/<p>/portforward?ports=…` upgraded to WebSocket
  `v4.channel.k8s.io` (or `portforward.k8s.io`): the API server's WebSocket
  port-forward protocol, a data channel (2i) and an error channel (2i+1)
  per port, each opened with the port as 2 bytes little-endian; what
  arrives on a data channel is echoed back on it.

Data that begins with HALF (on stdin, or a port-forward data channel) is
echoed in a frame of which only the first half is ever sent: the stream
stays mid-frame, as when a long output is on its way, and nothing more is
sent on it.

It never runs a container or opens a port: it answers as one would, and
records the bytes that reached it, so a test can tell they crossed the
proxy. SPDY (kubectl's fallback, and its port-forward tunnel) is not spoken.

Also here: `PortForward`, a small WebSocket client of the port-forward
protocol for tests (kubectl port-forward tunnels SPDY over WebSocket, which
this server does not speak).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from tests.kubeapi import KubeApi, Seen, _Handler, status

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455 §1.3: appended to the client's key to prove the server read it."""
ATTACH = "v5.channel.k8s.io"
PORT_FORWARD = ("v4.channel.k8s.io", "portforward.k8s.io")
"""The port-forward subprotocols answered, in order of preference."""
HALF = b"half a frame:"
"""Data that the test API server echoes in a frame it never finishes."""
STDIN, STDOUT, ERROR, CLOSE = 0, 1, 3, 255
"""Channels of the v5 remote command protocol (CLOSE: v5's close signal)."""
CONTINUATION, TEXT, BINARY, CLOSE_FRAME, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
"""WebSocket opcodes (RFC 6455 §5.2)."""


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2 item 5.4)."""
    digest = hashlib.sha1((key + WS_GUID).encode()).digest()  # noqa: S324  # RFC 6455 fixes SHA-1
    return base64.b64encode(digest).decode()


def _nonce(key: str) -> bool:
    """Whether key is a Sec-WebSocket-Key: 16 bytes, base64-encoded (RFC 6455 §4.1 item 7)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final WebSocket frame (RFC 6455 §5.2); masked with mask if given (a client's)."""
    return build(0x80 | opcode, payload, mask)


def build(first: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """A frame with any first byte (FIN, RSV, opcode), masked if asked (RFC 6455 §5.2)."""
    size = len(payload)
    bit = 0x80 if mask is not None else 0
    if size < 126:
        head = bytes([first, bit | size])
    elif size < 1 << 16:
        head = bytes([first, bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", size)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def parse(data: bytes) -> list[tuple[int, int, bytes]]:
    """Whole frames only (first byte, payload length, unmasked payload); fails on a partial one."""
    frames, at = [], 0
    while at < len(data):
        assert len(data) - at >= 2, "a frame head cut short"
        first, second = data[at], data[at + 1]
        size, at = second & 0x7F, at + 2
        if size == 126:
            size, at = struct.unpack("!H", data[at : at + 2])[0], at + 2
        elif size == 127:
            size, at = struct.unpack("!Q", data[at : at + 8])[0], at + 8
        mask = data[at : at + 4] if second & 0x80 else None
        at += 4 if mask else 0
        payload = data[at : at + size]
        assert len(payload) == size, "a frame cut short: the agent could not be sent a frame now"
        at += size
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((first, size, payload))
    return frames


def messages(frames: list[tuple[int, int, bytes]]) -> list[tuple[int, bytes]]:
    """Data messages (fragments joined, RFC 6455 §5.4) and control frames, in order."""
    out: list[tuple[int, bytes]] = []
    opcode, payload = -1, b""
    for first, _, data in frames:
        kind = first & 0x0F
        if kind & 0x8:
            assert first & 0x80, "a control frame is never fragmented (RFC 6455 §5.5)"
            out.append((kind, data))
            continue
        assert (kind == CONTINUATION) == (opcode != -1), "fragments out of order"
        opcode = kind if opcode == -1 else opcode
        payload += data
        if first & 0x80:
            out.append((opcode, payload))
            opcode, payload = -1, b""
    assert opcode == -1, "a message left open"
    return out


class FrameError(Exception):
    """A frame that breaks RFC 6455; the connection is closed with the code carried."""

    def __init__(self, code: int) -> None:
        """Carry the close code (RFC 6455 §7.4.1)."""
        super().__init__(code)
        self.code = code


@dataclass
class KubeStreams(KubeApi):
    """The test API server with attach and port-forward streams; start(), then url and token."""

    arrived: list[tuple[str, bytes]] = field(default_factory=list)
    """Bytes that reached it on a stream: ("attach <pod>" or "portforward <pod>:<port>", data)."""
    streams_open: int = 0
    extension: str = ""
    """If set, a Sec-WebSocket-Extensions the 101 names though nobody asked (RFC 6455 §9.1)."""
    _streams: threading.Condition = field(default_factory=threading.Condition)
    _sockets: set[socket.socket] = field(default_factory=set)

    def start(self) -> KubeStreams:
        """Listen as the test API server does, each connection answered by the stream handler."""
        super().start()
        assert self._server is not None
        api = self

        class Handler(_StreamHandler):
            """The stream handler bound to this server."""

            server_api = api

        # Before the URL is known to anyone: no request can have used the old class.
        self._server.RequestHandlerClass = Handler
        return self

    def stop(self) -> None:
        """Stop serving; shut open streams down so their threads end."""
        with self._streams:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        super().stop()

    def wait_streams(self, count: int, timeout: float) -> bool:
        """Wait until exactly count streams are open; False if they are not by timeout."""
        with self._streams:
            return self._streams.wait_for(lambda: self.streams_open == count, timeout)

    def received(self, label: str) -> bytes:
        """Every byte that arrived on streams labelled label, in order."""
        with self._lock:
            return b"".join(data for name, data in self.arrived if name == label)

    def _arrive(self, label: str, data: bytes) -> None:
        """Record bytes that arrived on a stream."""
        with self._lock:
            self.arrived.append((label, data))

    def _opened(self, sock: socket.socket, delta: int) -> None:
        """Count a stream opened (1) or ended (-1)."""
        with self._streams:
            self.streams_open += delta
            if delta > 0:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)
            self._streams.notify_all()


class _StreamHandler(_Handler):
    """The test API server's handler, with attach and port-forward over WebSocket."""

    server_api: KubeStreams

    def _get(self, parts: list[str], query: dict[str, list[str]]) -> dict[str, Any] | str | None:
        """As the test API server's, a pod with its container running."""
        body = super()._get(parts, query)
        if isinstance(body, dict) and body.get("kind") == "Pod":
            # kubectl attach refuses a pod whose phase is not Running, and
            # looks for the container it attaches to among the statuses.
            body["status"]["containerStatuses"] = [
                {
                    "name": "app",
                    "ready": True,
                    "restartCount": 0,
                    "image": "example/app:1",
                    "imageID": "",
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                }
            ]
        return body

    def _answer(self) -> None:
        """Streams here; every other request as the test API server answers it."""
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        stream = (
            len(parts) == 7
            and parts[:3] == ["api", "v1", "namespaces"]
            and parts[4] == "pods"
            and parts[6] in ("attach", "portforward")
            and self.command == "GET"
            and self.headers.get("Upgrade", "").lower() == "websocket"
        )
        if not stream:
            super()._answer()
            return
        api = self.server_api
        query = parse_qs(url.query)
        headers = {k.lower(): v for k, v in self.headers.items()}
        api.record(Seen(self.command, url.path, query, headers, self._body()))
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            self._json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        namespace, name, kind = parts[3], parts[5], parts[6]
        if name not in api.pods.get(namespace, []):
            self._json(404, status(404, "NotFound", f'pods "{name}" not found'))
            return
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Sec-WebSocket-Version") != "13" or not _nonce(key):
            # RFC 6455 §4.2.1: version 13 and a base64 16-byte key, or no handshake.
            self._json(400, status(400, "BadRequest", "not a WebSocket handshake (RFC 6455)"))
            return
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        wanted = (ATTACH,) if kind == "attach" else PORT_FORWARD
        chosen = next((p for p in wanted if p in offered), None)
        if chosen is None:
            message = f"the test API server speaks {' or '.join(wanted)} for {kind}, not SPDY"
            self._json(400, status(400, "BadRequest", message))
            return
        ports: list[int] = []
        if kind == "portforward":
            try:
                ports = [int(p) for v in query.get("ports", []) for p in v.split(",")]
            except ValueError:
                ports = []
            if not ports or not all(0 < p < 1 << 16 for p in ports):
                self._json(400, status(400, "BadRequest", "ports=<port>[,<port>…] is required"))
                return
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept_key(key))
        self.send_header("Sec-WebSocket-Protocol", chosen)
        if api.extension:
            self.send_header("Sec-WebSocket-Extensions", api.extension)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        sock: socket.socket = self.connection
        api._opened(sock, 1)
        try:
            if kind == "attach":
                self._attach(f"attach {name}")
            else:
                self._port_forward(f"portforward {name}", ports)
        except FrameError as bad:
            with contextlib.suppress(OSError):
                self._send(CLOSE_FRAME, bad.code.to_bytes(2, "big"))
        finally:
            api._opened(sock, -1)

    def _read(self, size: int) -> bytes:
        """Exactly size bytes from the client; EOFError if the connection ends first."""
        data = self.rfile.read(size)
        if len(data) < size:
            raise EOFError
        return data

    def _message(self) -> tuple[int, bytes] | None:
        """The client's next message (opcode, payload), pings answered; None at its end."""
        opcode, message = -1, b""
        try:
            while True:
                first, second = self._read(2)
                size = second & 0x7F
                if size == 126:
                    size = int.from_bytes(self._read(2), "big")
                elif size == 127:
                    size = int.from_bytes(self._read(8), "big")
                if not second & 0x80:
                    raise FrameError(1002)  # RFC 6455 §5.1: a client's frames are masked
                mask = self._read(4)
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read(size)))
                kind = first & 0x0F
                if kind == PING:
                    self._send(PONG, payload)  # RFC 6455 §5.5.2
                    continue
                if kind == PONG:
                    continue
                if kind != CONTINUATION:
                    opcode = kind
                message += payload
                if first & 0x80:  # FIN: RFC 6455 §5.4, a message may come in fragments
                    return opcode, message
        except (EOFError, OSError, ssl.SSLError):
            return None

    stalled = False
    """A frame was left half sent: nothing more may be sent on this stream."""

    def _send(self, opcode: int, payload: bytes) -> None:
        """One unmasked frame from the server (RFC 6455 §5.1), flushed; half of it for HALF."""
        if self.stalled:
            return
        whole = frame(opcode, payload)
        if payload[1:].startswith(HALF):  # after the channel byte
            self.stalled = True
            # The head announces twice the payload; only the payload follows.
            whole = frame(opcode, payload + b"." * len(payload))[: -len(payload)]
        self.wfile.write(whole)
        self.wfile.flush()

    def _attach(self, label: str) -> None:
        """v5 attach: stdin echoed on stdout; stdin's close ends it with a Success Status."""
        while (message := self._message()) is not None:
            opcode, payload = message
            if opcode == CLOSE_FRAME:
                self._send(CLOSE_FRAME, payload[:2])  # RFC 6455 §5.5.1: the close is echoed
                return
            if opcode != BINARY or not payload:
                raise FrameError(1003)  # v5 is binary, each message led by its channel
            channel, data = payload[0], payload[1:]
            if channel == STDIN:
                self.server_api._arrive(label, data)
                self._send(BINARY, bytes([STDOUT]) + data)
            elif channel == CLOSE and data[:1] == bytes([STDIN]):
                # As a container whose stdin ended and that exited 0.
                result = {"metadata": {}, "status": "Success"}
                self._send(BINARY, bytes([ERROR]) + json.dumps(result).encode())
                self._send(CLOSE_FRAME, (1000).to_bytes(2, "big"))
                return

    def _port_forward(self, label: str, ports: list[int]) -> None:
        """WebSocket port-forward: each channel opened with its port; data channels echoed."""
        for index, port in enumerate(ports):
            for channel in (2 * index, 2 * index + 1):  # data, then error
                self._send(BINARY, bytes([channel]) + port.to_bytes(2, "little"))
        while (message := self._message()) is not None:
            opcode, payload = message
            if opcode == CLOSE_FRAME:
                self._send(CLOSE_FRAME, payload[:2])
                return
            if opcode != BINARY or not payload:
                raise FrameError(1003)
            channel, data = payload[0], payload[1:]
            if channel % 2 or channel >= 2 * len(ports):
                raise FrameError(1008)  # only data channels are written by the client
            self.server_api._arrive(f"{label}:{ports[channel // 2]}", data)
            self._send(BINARY, payload)


@dataclass
class PortForward:
    """A test client of the WebSocket port-forward protocol (v4.channel.k8s.io); not kubectl."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: str
    """The subprotocol the server chose."""
    ports: dict[int, int] = field(default_factory=dict)
    """Port by channel, as the server announced them."""
    pending: bytes = b""
    """Bytes read past the 101 with its head: the first frames."""

    @classmethod
    async def open(
        cls, host: str, port: int, path: str, token: str, cafile: str
    ) -> tuple[PortForward | None, h11.Response | None, bytes]:
        """Ask to upgrade path; (client, None, b"") if switched, else (None, response, body)."""
        context = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(["http/1.1"])
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        key = base64.b64encode(secrets.token_bytes(16)).decode()  # RFC 6455 §4.1 item 7
        http = h11.Connection(h11.CLIENT)
        writer.write(
            http.send(
                h11.Request(
                    method="GET",
                    target=path,
                    headers=[
                        ("host", f"{host}:{port}"),
                        ("authorization", f"Bearer {token}"),
                        ("connection", "Upgrade"),
                        ("upgrade", "websocket"),
                        ("sec-websocket-version", "13"),
                        ("sec-websocket-key", key),
                        ("sec-websocket-protocol", ",".join(PORT_FORWARD)),
                    ],
                )
            )
            or b""
        )
        writer.write(http.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        response: h11.Response | None = None
        body = b""
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await reader.read(65536))
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                headers = {n.decode(): v.decode() for n, v in event.headers}
                # RFC 6455 §4.1: the client fails the connection unless the
                # answer proves the server read this key, and names a
                # subprotocol it offered.
                assert headers["sec-websocket-accept"] == accept_key(key), headers
                assert headers["upgrade"].lower() == "websocket", headers
                assert headers["sec-websocket-protocol"] in PORT_FORWARD, headers
                client = cls(reader, writer, headers["sec-websocket-protocol"])
                client.pending = http.trailing_data[0]
                return client, None, b""
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            else:
                writer.close()
                return None, response, body

    async def _read(self, size: int) -> bytes:
        """Exactly size bytes from the server; IncompleteReadError at its end."""
        held, self.pending = self.pending[:size], self.pending[size:]
        if len(held) == size:
            return held
        return held + await self.reader.readexactly(size - len(held))

    async def frame(self) -> tuple[int, bool, bytes]:
        """The server's next frame (opcode, FIN, payload); IncompleteReadError at the end."""
        first, second = await self._read(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await self._read(2), "big")
        elif size == 127:
            size = int.from_bytes(await self._read(8), "big")
        assert not second & 0x80, "RFC 6455 §5.1: a server never masks its frames"
        return first & 0x0F, bool(first & 0x80), await self._read(size)

    async def message(self) -> tuple[int, bytes]:
        """The server's next message (opcode, payload), its fragments joined (RFC 6455 §5.4).

        A control frame between fragments is returned at once, as it comes,
        and the fragments read so far are dropped.
        """
        opcode, payload = -1, b""
        while True:
            kind, fin, data = await self.frame()
            if kind & 0x8:
                return kind, data
            assert (kind == CONTINUATION) == (opcode != -1), "RFC 6455 §5.4: fragments in order"
            opcode = kind if opcode == -1 else opcode
            payload += data
            if fin:
                return opcode, payload

    async def handshake(self, count: int) -> None:
        """Read the ports the server opens each of count ports' two channels with."""
        for _ in range(2 * count):
            opcode, payload = await self.message()
            assert (opcode, len(payload)) == (BINARY, 3), (opcode, payload)
            self.ports[payload[0]] = int.from_bytes(payload[1:], "little")

    def send(self, channel: int, data: bytes) -> None:
        """Data on a channel, in one masked binary frame (RFC 6455 §5.3)."""
        self.writer.write(frame(BINARY, bytes([channel]) + data, secrets.token_bytes(4)))

    async def ended(self) -> bool:
        """Whether the stream ends (EOF or a reset) before any further frame arrives."""
        try:
            await self.message()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return True
        return False

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()
