"""The Kubernetes front end with a fake gate, in front of the test API server (tests/kubeapi.py).

The gate's redemption is a fake here (the real stack's is in
tests/e2e/test_proxy_kube.py); the proxy code, TLS, HTTP, the test API server
and, where used, kubectl are real.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest

from jitgate.common.config import Env
from jitgate.common.errors import PermissionDenied, Unauthenticated, Unavailable
from jitgate.devstack import pki
from jitgate.devstack.redis_server import free_port
from jitgate.proxy.config import KubeTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.kube import KubeFrontend
from jitgate.proxy.main import frontends
from jitgate.proxy.server import agent_tls
from jitgate.proxy.session import Redeemed, Registry, Relay
from tests.kubeapi import KubeApi

SA = "sa-unit-token-5b1e"
GRANT = "grant.token.ok"
GRANT_ID = "cd" * 16


@pytest.fixture(scope="module")
def kubeapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApi]:
    """The test API server, its certificate from a CA of its own."""
    root = tmp_path_factory.mktemp("kubeapi-pki")
    pki.init(root, names=())
    server = KubeApi(pki.issue(root, "kubeapi"), SA).start()
    yield server
    server.stop()


@dataclass
class Rig:
    """A running front end, what its fake gate was asked and what it reported."""

    front: KubeFrontend
    registry: Registry
    ca: Path
    redeemed: list[str] = field(default_factory=list)
    reports: list[Relay] = field(default_factory=list)
    ttl: float = 60.0
    unavailable: bool = False

    @property
    def port(self) -> int:
        """The front end's port."""
        return self.front.port


@pytest.fixture
async def rig(kubeapi: KubeApi, dev_pki: pki.DevPki) -> AsyncIterator[Rig]:
    """A KubeFrontend for three connections: plain, exec allowed, and an unreachable server."""
    ca = str(kubeapi.files.ca)
    targets = {
        "payments": KubeTarget(
            name="payments", server=kubeapi.url, namespace="payments", token=SA, ca_file=ca
        ),
        "payments-exec": KubeTarget(
            name="payments-exec",
            server=kubeapi.url,
            namespace="payments",
            token=SA,
            ca_file=ca,
            allow_exec=True,
        ),
        "untrusted": KubeTarget(
            name="untrusted",
            server=kubeapi.url,
            namespace="payments",
            token=SA,
            ca_file=str(dev_pki.ca),  # not the CA that signed the test API server's certificate
        ),
    }
    registry = Registry()
    tls = agent_tls(str(dev_pki.files("proxy").cert), str(dev_pki.files("proxy").key))
    tls.set_alpn_protocols(["http/1.1"])
    state = Rig(front=None, registry=registry, ca=dev_pki.ca)  # type: ignore[arg-type]

    async def check(token: str, connection: str, kind: str) -> Claims:
        assert kind == "kubernetes"
        if state.unavailable:
            raise Unavailable("redis", "down")
        if token == "other":
            raise PermissionDenied("WRONG_CONNECTION", "another connection")
        if token == "revoked":
            raise PermissionDenied("GRANT_REVOKED", "revoked")
        if token != GRANT:
            raise Unauthenticated("signature", "bad")
        return Claims(
            grant_id=GRANT_ID,
            subject="deploy-bot",
            connection=connection,
            kind=kind,
            expires_at=time.time() + state.ttl,
        )

    async def redeem(token: str, connection: str, session_id: str, client: str) -> Redeemed:
        await asyncio.sleep(0.05)  # an RPC: concurrent first requests overlap here
        state.redeemed.append(session_id)
        return Redeemed(
            grant_id=GRANT_ID,
            subject="deploy-bot",
            connection=connection,
            expires_at=time.time() + state.ttl,
        )

    async def report(redeemed: Redeemed, session_id: str, relay: Relay) -> None:
        state.reports.append(relay)

    gate = Gate(check=check, redeem=redeem, report=report, registry=registry)
    state.front = KubeFrontend(gate=gate, targets=targets, tls=tls, listen="127.0.0.1:0")
    await state.front.start()
    yield state
    await state.front.stop()


@dataclass
class Reply:
    """One response as the agent got it."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


async def send(rig: Rig, raw: bytes) -> Reply:
    """Send raw bytes as one request over TLS; parse the response."""
    context = ssl.create_default_context(cafile=str(rig.ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=context)
    try:
        writer.write(raw)
        await writer.drain()
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        reply = Reply(0, {}, b"")
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await asyncio.wait_for(reader.read(65536), 10))
            elif isinstance(event, h11.Response):
                reply.status, reply.headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                reply.body += event.data
            else:
                return reply
    finally:
        writer.close()


def get(path: str, token: str = GRANT, *extra: str) -> bytes:
    """A GET request for path, with a bearer token and extra header lines."""
    lines = [f"GET {path} HTTP/1.1", "Host: proxy", *extra]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_concurrent_first_requests_redeem_the_grant_once(rig: Rig, kubeapi: KubeApi) -> None:
    replies = await asyncio.gather(
        *(send(rig, get("/connections/payments/api/v1/namespaces/payments/pods")) for _ in range(5))
    )
    assert [r.status for r in replies] == [200] * 5
    assert replies[0].json()["kind"] == "PodList"
    assert len(rig.redeemed) == 1
    assert len(rig.front.grants) == 1
    assert len(rig.registry) == 1


async def test_a_revoked_grant_is_refused_from_then_on_and_its_end_reported(rig: Rig) -> None:
    assert (await send(rig, get("/connections/payments/version"))).status == 200
    assert rig.registry.revoke(GRANT_ID) == 1
    refused = await send(rig, get("/connections/payments/version"))
    assert refused.status == 401
    assert refused.json()["message"] == "jitgate: this grant has been revoked"
    for _ in range(100):  # the hold's end is reported as its task finishes
        if rig.reports:
            break
        await asyncio.sleep(0.01)
    assert [r.reason for r in rig.reports] == ["revoked"]
    assert rig.reports[0].bytes_to_client > 0
    assert len(rig.front.grants) == 0
    assert len(rig.redeemed) == 1  # the ended grant was not redeemed again


async def test_the_hold_ends_at_expiry_without_any_request(rig: Rig) -> None:
    rig.ttl = 0.3
    assert (await send(rig, get("/connections/payments/version"))).status == 200
    for _ in range(200):
        if rig.reports:
            break
        await asyncio.sleep(0.01)
    assert [r.reason for r in rig.reports] == ["expired"]
    rig.ttl = 60.0
    refused = await send(rig, get("/connections/payments/version"))
    assert (refused.status, refused.json()["message"]) == (401, "jitgate: this grant has expired")


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (get("/connections/payments/api/v1/namespaces/payments/pods", ""), 401, "required"),
        (get("/connections/payments/version", "garbage"), 401, "not valid"),
        (get("/connections/payments/version", "revoked"), 401, "revoked"),
        (get("/connections/payments/version", "other"), 403, "another connection"),
        (get("/connections/nope/version"), 404, "no kubernetes connection named 'nope'"),
        (get("/api/v1/namespaces/payments/pods"), 404, "/connections/<name>"),
        (get("/connections/payments"), 404, "no such path"),
        (get("/connections/payments/api/v1/nodes"), 403, "cluster-scoped"),
        (get("/connections/payments/api/v1/namespaces/payments%2F../pods"), 403, "ambiguous"),
        (
            get("/connections/payments/version", GRANT, "Impersonate-Group: system:masters"),
            403,
            "impersonation",
        ),
        (get("/connections/untrusted/version"), 503, "cannot reach the API server of untrusted"),
        (b"GET /connections/payments/version HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400, ""),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed"),
        (b"GET /x\xff\xfe HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed"),
        (b"GET /connections/payments/version\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400, ""),
    ],
)
async def test_refusals_are_status_objects(rig: Rig, raw: bytes, code: int, message: str) -> None:
    reply = await send(rig, raw)
    assert reply.status == code
    assert reply.headers[b"content-type"] == b"application/json"
    status = reply.json()
    assert status["kind"] == "Status"
    assert status["code"] == code
    assert message in str(status["message"])
    assert SA not in reply.body.decode()


async def test_an_unavailable_core_is_a_503(rig: Rig) -> None:
    rig.unavailable = True
    reply = await send(rig, get("/connections/payments/version"))
    assert (reply.status, reply.json()["reason"]) == (503, "ServiceUnavailable")
    assert "redis" not in reply.body.decode()  # nothing internal


async def test_the_api_server_gets_the_service_account_token_only(
    rig: Rig, kubeapi: KubeApi
) -> None:
    before = len(kubeapi.seen)
    reply = await send(
        rig,
        get(
            "/connections/payments/api/v1/namespaces/payments/pods/api-0?pretty=1",
            GRANT,
            "Proxy-Authorization: Basic eDp5",
            "X-Remote-User: admin",
            "Connection: keep-alive, X-Hop",
            "X-Hop: 1",
        ),
    )
    assert reply.status == 200
    assert reply.json()["metadata"]["name"] == "api-0"
    [seen] = kubeapi.seen[before:]
    assert seen.path == "/api/v1/namespaces/payments/pods/api-0"
    assert seen.query == {"pretty": ["1"]}
    assert seen.headers["authorization"] == f"Bearer {SA}"
    assert seen.headers["host"] == kubeapi.url.removeprefix("https://")
    for dropped in ("proxy-authorization", "x-remote-user", "x-hop"):
        assert dropped not in seen.headers
    assert GRANT not in json.dumps(seen.headers)


async def _kubectl(rig: Rig, home: Path, connection: str, *args: str) -> tuple[int, str, str]:
    config = home / "kubeconfig"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "j",
                        "cluster": {
                            "server": f"https://127.0.0.1:{rig.port}/connections/{connection}",
                            "certificate-authority": str(rig.ca),
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": GRANT}}],
                "contexts": [
                    {"name": "c", "context": {"cluster": "j", "user": "u", "namespace": "payments"}}
                ],
                "current-context": "c",
            }
        )
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "KUBECONFIG": str(config)}
    proc = await asyncio.create_subprocess_exec(
        "kubectl", "--request-timeout=10s", *args, env=env, stdout=-1, stderr=-1
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_kubectl_exec_is_relayed_over_websocket_when_allowed(
    rig: Rig, kubeapi: KubeApi, tmp_path: Path
) -> None:
    code, out, err = await _kubectl(
        rig, tmp_path, "payments-exec", "exec", "api-0", "--", "echo", "hello", "jitgate"
    )
    assert (code, out) == (0, "hello jitgate\n"), err
    upgraded = [s for s in kubeapi.seen if s.path.endswith("/exec")]
    assert upgraded[-1].headers["upgrade"].lower() == "websocket"
    assert upgraded[-1].headers["authorization"] == f"Bearer {SA}"
    await rig.front.stop()
    assert rig.reports[0].bytes_to_client > 0


async def test_kubectl_exec_is_refused_where_not_allowed(
    rig: Rig, kubeapi: KubeApi, tmp_path: Path
) -> None:
    before = len(kubeapi.seen)
    code, _, err = await _kubectl(rig, tmp_path, "payments", "exec", "api-0", "--", "echo", "x")
    assert code != 0
    assert "exec into pods is not allowed on this connection" in err
    assert not [s for s in kubeapi.seen[before:] if s.path.endswith("/exec")]


async def exchange(rig: Rig, raw: bytes, count: int) -> list[Reply]:
    """Send raw bytes (count pipelined requests) on one connection; parse count responses."""
    context = ssl.create_default_context(cafile=str(rig.ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port, ssl=context)
    replies: list[Reply] = []
    try:
        writer.write(raw)
        await writer.drain()
        client = h11.Connection(h11.CLIENT)
        for _ in range(count):
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
            reply = Reply(0, {}, b"")
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await asyncio.wait_for(reader.read(65536), 10))
                elif isinstance(event, h11.Response):
                    reply.status, reply.headers = event.status_code, dict(event.headers)
                elif isinstance(event, h11.Data):
                    reply.body += event.data
                else:
                    break
            replies.append(reply)
            client.start_next_cycle()
    finally:
        writer.close()
    return replies


def post(path: str, body: bytes, *, chunked: bool = False) -> bytes:
    """A POST with a body, sized or chunked."""
    head = f"POST {path} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {GRANT}\r\n"
    if chunked:
        framed = (
            b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:3], body[3:])) + b"0\r\n\r\n"
        )
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def test_bodies_cross_and_one_connection_carries_many_requests(
    rig: Rig, kubeapi: KubeApi
) -> None:
    pods = "/connections/payments/api/v1/namespaces/payments/pods"
    raw = (
        post(pods, b'{"kind":"Pod"}')
        + post("/connections/payments/api/v1/nodes", b'{"kind":"Node"}')  # refused, body dropped
        + post(pods, b'{"kind":"Pod","chunked":true}', chunked=True)
        + get("/connections/payments/version")
    )
    before = len(kubeapi.seen)
    replies = await exchange(rig, raw, 4)
    # The test API server only reads: its 405 Status comes back as it sent it.
    assert [r.status for r in replies] == [405, 403, 405, 200]
    assert replies[0].json()["reason"] == "MethodNotAllowed"
    assert replies[1].json()["message"].startswith("jitgate: cluster-scoped")
    assert replies[3].json()["gitVersion"].endswith("jitgate-test-api")
    seen = kubeapi.seen[before:]
    assert [(s.method, s.body) for s in seen] == [
        ("POST", b'{"kind":"Pod"}'),
        ("POST", b'{"kind":"Pod","chunked":true}'),
        ("GET", b""),
    ]
    assert seen[1].headers["transfer-encoding"] == "chunked"
    assert len(rig.redeemed) == 1


async def test_the_proxy_serves_kubernetes_when_configured_over_http_1_1(
    dev_pki: pki.DevPki, kubeapi: KubeApi
) -> None:
    files = dev_pki.files("proxy")
    port = free_port()
    env = Env(
        {
            "JITGATE_PROXY_TLS_CERT": str(files.cert),
            "JITGATE_PROXY_TLS_KEY": str(files.key),
            "JITGATE_PROXY_KUBE_LISTEN": f"127.0.0.1:{port}",
        }
    )
    gate = Gate(check=None, redeem=None, report=None, registry=Registry())  # type: ignore[arg-type]
    tls = agent_tls(str(files.cert), str(files.key))
    assert frontends(env, {}, gate, tls) == []
    target = KubeTarget(name="k", server=kubeapi.url, namespace="payments", token=SA)
    [front] = frontends(env, {"k": target}, gate, tls)
    assert isinstance(front, KubeFrontend)
    assert (await front.start()).startswith(f"127.0.0.1:{port}")
    try:
        context = ssl.create_default_context(cafile=str(dev_pki.ca))
        context.set_alpn_protocols(["h2", "http/1.1"])
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        # RFC 7301: offered h2 first, the client is told HTTP/1.1.
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()
    finally:
        await front.stop()
