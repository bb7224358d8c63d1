"""A test API server (not a real Kubernetes one): HTTPS on loopback, answers in Kubernetes' formats.

There is no real API server on the machines the tests run on. This one
speaks enough of the API for kubectl: /version, legacy discovery (/api,
/apis, /api/v1, /apis/apps/v1), pods in any namespace (list, get, watch),
nodes and namespaces, and a 404 Status for the rest. It requires one
ServiceAccount bearer token and records every request it receives (method,
path, query, headers), so tests can assert what the proxy forwarded and
what it never did.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jitgate.common.tls import TlsFiles

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
RESOURCES: dict[str, list[dict[str, Any]]] = {
    "v1": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": VERBS, "shortNames": ["po"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
         "verbs": ["get"]},
        {"name": "namespaces", "singularName": "namespace", "namespaced": False,
         "kind": "Namespace", "verbs": VERBS, "shortNames": ["ns"]},
        {"name": "nodes", "singularName": "node", "namespaced": False, "kind": "Node",
         "verbs": VERBS, "shortNames": ["no"]},
    ],
    "apps/v1": [
        {"name": "deployments", "singularName": "deployment", "namespaced": True,
         "kind": "Deployment", "verbs": VERBS, "shortNames": ["deploy"]},
    ],
}  # fmt: skip


@dataclass(frozen=True)
class Seen:
    """One request as the test API server received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""


def pod(name: str, namespace: str, rv: str = "1") -> dict[str, Any]:
    """A Pod object as the API server returns it."""
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "resourceVersion": rv,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
        "status": {"phase": "Running"},
    }


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A meta/v1 Status."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class KubeApi:
    """The test API server: start(), then point a connection at url with token."""

    files: TlsFiles
    token: str
    pods: dict[str, list[str]] = field(default_factory=lambda: {"payments": ["api-0", "api-1"]})
    seen: list[Seen] = field(default_factory=list)
    watches_open: int = 0
    half_event: bool = False
    """Watches send, with their first event, half of a second one (no newline): mid-event."""
    _watches: threading.Condition = field(default_factory=threading.Condition)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The https:// URL it serves."""
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KubeApi:
        """Listen on a free loopback port, serving in a thread."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.files.cert), str(self.files.key))
        context.set_alpn_protocols(["http/1.1"])
        api = self

        class Handler(_Handler):
            """The handler bound to this server."""

            server_api = api

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, name="kubeapi", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and end open watches."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def record(self, seen: Seen) -> None:
        """Remember one request."""
        with self._lock:
            self.seen.append(seen)

    def wait_watches(self, count: int, timeout: float) -> bool:
        """Wait until exactly count watches are open; False if they are not by timeout."""
        with self._watches:
            return self._watches.wait_for(lambda: self.watches_open == count, timeout)

    def paths(self) -> list[str]:
        """The paths received, in order."""
        with self._lock:
            return [s.path for s in self.seen]


class _Handler(BaseHTTPRequestHandler):
    """Answers one connection's requests, HTTP/1.1 with keep-alive."""

    protocol_version = "HTTP/1.1"
    server_api: KubeApi

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests assert on the record instead."""

    def _json(self, code: int, body: dict[str, Any]) -> None:
        """Send a JSON response."""
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self) -> None:
        """Record the request, check the token, answer it."""
        api = self.server_api
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        api.record(
            Seen(
                self.command,
                url.path,
                query,
                {k.lower(): v for k, v in self.headers.items()},
                self._body(),
            )
        )
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            self._json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        parts = url.path.strip("/").split("/")
        if self.command != "GET":
            self._json(405, status(405, "MethodNotAllowed", "the test API server only reads"))
            return
        if parts[-1:] == ["exec"] and self.headers.get("Upgrade", "").lower() == "websocket":
            self._exec(query)
            return
        body = self._get(parts, query)
        if body is None:
            self._json(404, status(404, "NotFound", f"the test API server has no {url.path}"))
        elif body == "watch":
            self._watch(parts[4])
        else:
            self._json(200, body)

    def _body(self) -> bytes:
        """The request body, sized or chunked (RFC 9112 §7.1; no trailers expected)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _get(self, parts: list[str], query: dict[str, list[str]]) -> dict[str, Any] | str | None:
        """The object for a GET of parts, "watch" for a watch, None if there is none."""
        api = self.server_api
        if parts == ["version"]:
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-jitgate-test-api",
                    "platform": "linux/amd64"}  # fmt: skip
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if parts == ["apis"]:
            version = {"groupVersion": "apps/v1", "version": "v1"}
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": "apps", "versions": [version], "preferredVersion": version}]}  # fmt: skip
        if parts in (["api", "v1"], ["apis", "apps", "v1"]):
            gv = "v1" if parts[0] == "api" else "apps/v1"
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                    "resources": RESOURCES[gv]}  # fmt: skip
        if parts == ["api", "v1", "nodes"]:
            return {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": []}
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 4:
            return {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": parts[3]}}
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5 and parts[4] == "pods":
            namespace, names = parts[3], api.pods.get(parts[3], [])
            if len(parts) == 5:
                if query.get("watch", [""])[0] in ("1", "true"):
                    return "watch"
                return {"kind": "PodList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": "10"},
                        "items": [pod(n, namespace) for n in names]}  # fmt: skip
            if len(parts) == 6 and parts[5] in names:
                return pod(parts[5], namespace)
        return None

    def _chunk(self, data: bytes) -> None:
        """Write one chunk of a chunked body (RFC 9112 §7.1)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, namespace: str) -> None:
        """A chunked stream of WatchEvents, open until the client goes or the server stops."""
        api = self.server_api
        with api._watches:  # counted before the client can see the event
            api.watches_open += 1
            api._watches.notify_all()
        sock: socket.socket = self.connection
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            added = {"type": "ADDED", "object": pod("watched-0", namespace, "11")}
            first = json.dumps(added).encode() + b"\n"
            if api.half_event:
                modified = {"type": "MODIFIED", "object": pod("watched-0", namespace, "12")}
                text = json.dumps(modified).encode()
                first += text[: len(text) // 2]
            self._chunk(first)
            while not api._stopping.is_set():
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable:
                    try:
                        if not sock.recv(1):
                            break  # the proxy closed its side
                    except (OSError, ssl.SSLError):
                        break  # or cut it
        finally:
            with api._watches:
                api.watches_open -= 1
                api._watches.notify_all()
            self.close_connection = True

    def _frame(self, opcode: int, payload: bytes) -> None:
        """One unmasked WebSocket frame from the server (RFC 6455 §5.2)."""
        if len(payload) < 126:
            head = bytes([0x80 | opcode, len(payload)])
        else:
            head = bytes([0x80 | opcode, 126]) + len(payload).to_bytes(2, "big")
        self.wfile.write(head + payload)

    def _exec(self, query: dict[str, list[str]]) -> None:
        """`exec` over WebSocket (v5.channel.k8s.io): runs `echo` only, by answering for it."""
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if "v5.channel.k8s.io" not in offered:
            self._json(400, status(400, "BadRequest", "the test API server speaks v5 only"))
            return
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()  # noqa: S324  # RFC 6455 §4.2.2
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("Sec-WebSocket-Protocol", "v5.channel.k8s.io")
        self.end_headers()
        command = query.get("command", [])
        if command[:1] == ["echo"]:
            self._frame(0x2, b"\x01" + " ".join(command[1:]).encode() + b"\n")
            result: dict[str, Any] = {"metadata": {}, "status": "Success"}
        else:
            self._frame(0x2, b"\x02" + b"the test API server runs echo only\n")
            result = status(500, "NonZeroExitCode", "command terminated with non-zero exit code")
            result["details"] = {"causes": [{"reason": "ExitCode", "message": "127"}]}
        self._frame(0x2, b"\x03" + json.dumps(result).encode())
        self._frame(0x8, (1000).to_bytes(2, "big"))
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:
        """Serve a GET."""
        with contextlib.suppress(OSError, ssl.SSLError):
            self._answer()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET
