"""The Kubernetes front end with a fake gate, in front of the test API server (tests/kubeapi.py).

The gate's redemption is a fake here (the real stack's is in
tests/e2e/test_proxy_kube.py); the proxy code, TLS, HTTP, the test API server
and, where used, kubectl are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest

from jitgate.common.config import Env
from jitgate.common.errors import PermissionDenied, Unauthenticated, Unavailable
from jitgate.devstack import pki
from jitgate.devstack.redis_server import free_port
from jitgate.proxy import kubeforward
from jitgate.proxy.config import KubeTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.kube import KubeFrontend, Limits
from jitgate.proxy.main import frontends
from jitgate.proxy.server import agent_tls
from jitgate.proxy.session import Redeemed, Registry, Relay
from tests.kubeapi import KubeApi
from tests.proxy import kube_rig

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
class Rig(kube_rig.Rig):
    """The rig, and what its fake gate was asked: redeemed sessions, its grant's ttl, Redis down."""

    redeemed: list[str] = field(default_factory=list)
    ttl: float = 60.0
    unavailable: bool = False


@pytest.fixture
async def rig(kubeapi: KubeApi, dev_pki: pki.DevPki, limits: Limits) -> AsyncIterator[Rig]:
    """A KubeFrontend for connections: plain, exec allowed, unreachable, bad token, prefixed."""
    targets = {
        "payments": kube_rig.target(kubeapi, "payments", SA),
        "payments-exec": kube_rig.target(kubeapi, "payments-exec", SA, allow_exec=True),
        # Its CA file is not the CA that signed the test API server's certificate.
        "untrusted": kube_rig.target(kubeapi, "untrusted", SA, ca_file=str(dev_pki.ca)),
        # Built here as config.py now refuses to: a token h11 will not put in a header.
        "badtoken": kube_rig.target(kubeapi, "badtoken", SA + " "),
        "prefixed": kube_rig.target(kubeapi, "prefixed", SA, server=kubeapi.url + "/prefix/k8s"),
    }
    registry = Registry()
    state = Rig(front=None, registry=registry, ca=dev_pki.ca)  # type: ignore[arg-type]

    async def check(token: str, connection: str, kind: str) -> Claims:
        assert kind == "kubernetes"
        if state.unavailable:
            raise Unavailable("redis", "down")
        if token == "other":
            raise PermissionDenied("WRONG_CONNECTION", "another connection")
        if token == "revoked":
            raise PermissionDenied("GRANT_REVOKED", "revoked")
        if token == "expired":
            raise Unauthenticated("expired", "exp 1 <= now 2 - leeway")
        if token == "not-live":
            raise PermissionDenied("GRANT_EXPIRED", "this grant is not live")
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
    async with kube_rig.serving(gate, targets, dev_pki, limits) as front:
        state.front = front
        yield state


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
    (reply,) = await exchange(rig, raw, 1)
    return reply


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
    await until(lambda: bool(rig.reports))  # the hold's end is reported as its task finishes
    assert [r.reason for r in rig.reports] == ["revoked"]
    assert rig.reports[0].bytes_to_client > 0
    assert len(rig.front.grants) == 0
    assert len(rig.redeemed) == 1  # the ended grant was not redeemed again


async def test_the_hold_ends_at_expiry_without_any_request(rig: Rig) -> None:
    rig.ttl = 0.3
    assert (await send(rig, get("/connections/payments/version"))).status == 200
    await until(lambda: bool(rig.reports))
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
        (
            get("/connections/payments-exec/api/v1/namespaces/payments/serviceaccounts/x/token"),
            403,
            "ServiceAccount tokens (serviceaccounts/<name>/token) are not minted through jitgate",
        ),
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
            if len(replies) < count:
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
        + post(pods, b'{"kind":"Pod","chunked":true}', chunked=True)
        + get("/connections/payments/version")
        + post("/connections/payments/api/v1/nodes", b'{"kind":"Node"}')  # refused: the last
    )
    before = len(kubeapi.seen)
    replies = await exchange(rig, raw, 4)
    # The test API server only reads: its 405 Status comes back as it sent it.
    assert [r.status for r in replies] == [405, 405, 200, 403]
    assert replies[0].json()["reason"] == "MethodNotAllowed"
    assert replies[2].json()["gitVersion"].endswith("jitgate-test-api")
    assert replies[3].json()["message"].startswith("jitgate: cluster-scoped")
    # A refusal ends the connection (RFC 9112 §9.6): its body is never waited for.
    assert replies[3].headers[b"connection"] == b"close"
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


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition of the front end's state that no event announces; fail at timeout."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not so within {timeout} s")


class Client:
    """One agent connection over TLS, its responses parsed by h11 as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, rig: Rig) -> Client:
        """Connect and finish the TLS handshake."""
        context = ssl.create_default_context(cafile=str(rig.ca))
        return cls(*await asyncio.open_connection("127.0.0.1", rig.port, ssl=context))

    def write(self, raw: bytes) -> None:
        """Send raw bytes; the h11 client expects one response per call."""
        if self.http.our_state is h11.DONE:
            self.http.start_next_cycle()
        self.http.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        self.http.send(h11.EndOfMessage())
        self.writer.write(raw)

    async def event(self) -> object:
        """The next event of the response."""
        while (event := self.http.next_event()) is h11.NEED_DATA:
            self.http.receive_data(await self.reader.read(65536))
        return event

    async def head(self) -> int:
        """The response's status code, its body still to come."""
        event = await asyncio.wait_for(self.event(), 10)
        assert isinstance(event, h11.Response)
        return event.status_code

    async def reply(self) -> Reply:
        """The whole response."""
        reply = Reply(0, {}, b"")
        while True:
            event = await self.event()
            if isinstance(event, h11.Response):
                reply.status, reply.headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                reply.body += event.data
            else:
                return reply

    async def closed(self) -> bool:
        """Whether the proxy closed the connection (read until its end)."""
        try:
            return await self.reader.read() == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        """Close our side."""
        self.writer.close()


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """No log record carries a traceback, and none is an error of asyncio's or ours."""
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_token_h11_refuses_gives_a_502_and_never_reaches_the_log(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = len(rig.front.grants)
    reply = await send(rig, get("/connections/badtoken/version"))
    assert (reply.status, reply.json()["reason"]) == (502, "InternalError")
    assert "jitgate cannot forward requests to badtoken" in reply.json()["message"]
    assert reply.headers[b"connection"] == b"close"
    assert SA not in caplog.text
    assert [r.exc_info for r in caplog.records if r.exc_info] == []
    [line] = [r.getMessage() for r in caplog.records if "cannot be sent" in r.getMessage()]
    assert "check the connection's token (values not logged)" in line
    assert len(rig.front.grants) == before + 1  # the grant itself was fine


async def test_expired_and_not_live_grants_are_told_so_and_the_log_says_why(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jitgate.proxy.kubegrants")
    for token in ("expired", "not-live"):
        reply = await send(rig, get("/connections/payments/version", token))
        assert (reply.status, reply.json()["message"]) == (
            401,
            "jitgate: this grant has expired or is not live",
        )
    for token, code, message in [
        ("garbage", 401, "this grant is not valid"),
        ("revoked", 401, "this grant was revoked"),
        ("other", 403, "this grant is for another connection"),
    ]:
        reply = await send(rig, get("/connections/payments/version", token))
        assert (reply.status, reply.json()["message"]) == (code, f"jitgate: {message}")
    text = caplog.text
    assert "grant token rejected: expired: exp 1 <= now 2" in text
    assert "grant token rejected: signature: bad" in text
    assert "grant refused: GRANT_EXPIRED: this grant is not live" in text
    assert "grant refused: GRANT_REVOKED" in text
    assert "grant refused: WRONG_CONNECTION: another connection" in text


async def test_a_refusal_is_answered_at_once_and_closes_without_reading_the_body(
    rig: Rig,
) -> None:
    client = await Client.open(rig)
    try:
        # No token, a body announced and never sent: the slow-loris of before authentication.
        client.write(
            b"POST /connections/payments/api/v1/namespaces/payments/pods HTTP/1.1\r\n"
            b"Host: p\r\nContent-Length: 1000000\r\n\r\n{"
        )
        reply = await asyncio.wait_for(client.reply(), 5)  # the old drain waited 10 s a read
        assert (reply.status, reply.json()["reason"]) == (401, "Unauthorized")
        assert reply.headers[b"connection"] == b"close"
        assert await asyncio.wait_for(client.closed(), 5)
    finally:
        client.close()
    await until(lambda: rig.front.connections == 0)


HEADS = Limits(header_timeout=0.5, idle_timeout=30.0)


@pytest.mark.parametrize("limits", [HEADS], indirect=True)
async def test_a_request_head_trickled_in_is_cut_at_the_header_deadline(rig: Rig) -> None:
    client = await Client.open(rig)

    async def trickle() -> None:
        """A head one byte every 50 ms: 2.5 s for 50 bytes, never finished."""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            for byte in b"GET /connections/payments/version HTTP/1.1\r\nHost: p\r\n":
                client.writer.write(bytes([byte]))
                await client.writer.drain()
                await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    try:
        # Deadline 0.5 s; the margin is for a busy machine. Before: IDLE_TIMEOUT, 90 s.
        assert await asyncio.wait_for(client.closed(), 5)
    finally:
        dripping.cancel()
        client.close()


@pytest.mark.parametrize("limits", [HEADS], indirect=True)
async def test_the_wait_between_keep_alive_requests_is_not_the_header_deadline(
    rig: Rig,
) -> None:
    client = await Client.open(rig)
    try:
        client.write(get("/connections/payments/version"))
        assert (await asyncio.wait_for(client.reply(), 10)).status == 200
        await asyncio.sleep(1.5)  # three header deadlines of idling, well inside idle_timeout
        client.write(get("/connections/payments/version"))
        assert (await asyncio.wait_for(client.reply(), 10)).status == 200
    finally:
        client.close()


@pytest.mark.parametrize("limits", [Limits(body_timeout=0.5)], indirect=True)
async def test_a_body_trickled_to_the_api_server_is_cut_at_its_deadline_but_a_watch_is_not(
    rig: Rig, kubeapi: KubeApi
) -> None:
    watching = kubeapi.watches_open
    watch = await Client.open(rig)
    client = await Client.open(rig)
    try:
        watch.write(get("/connections/payments/api/v1/namespaces/payments/pods?watch=true"))
        assert await watch.head() == 200
        client.write(
            b"POST /connections/payments/api/v1/namespaces/payments/pods HTTP/1.1\r\n"
            + f"Host: p\r\nAuthorization: Bearer {GRANT}\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"kind":'
        )
        reply = await asyncio.wait_for(client.reply(), 5)
        assert (reply.status, reply.json()["reason"]) == (408, "Timeout")
        assert reply.headers[b"connection"] == b"close"
        # The watch began first and has outlived the body deadline: it is no body.
        assert kubeapi.watches_open == watching + 1
        event = await asyncio.wait_for(watch.event(), 10)
        assert isinstance(event, h11.Data)
        assert b"ADDED" in event.data
    finally:
        watch.close()
        client.close()


@pytest.mark.parametrize(
    "limits",
    [Limits(max_connections=2), Limits(max_connections_per_ip=2)],
    indirect=True,
)
async def test_connections_over_the_cap_get_a_503_before_their_request_and_are_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jitgate.proxy.kube")
    held = [await Client.open(rig), await Client.open(rig)]
    try:
        over = await Client.open(rig)
        over.write(get("/connections/payments/version"))
        # The proxy answers ahead of the request and closes; it never reads it.
        refused = await asyncio.wait_for(over.reply(), 5)
        assert (refused.status, refused.json()["reason"]) == (503, "ServiceUnavailable")
        assert "too many connections" in refused.json()["message"]
        assert refused.headers[b"connection"] == b"close"
        assert await asyncio.wait_for(over.closed(), 5)
        over.close()
        assert "refused 1 new connection(s) over the cap, the last from 127.0.0.1" in caplog.text
        held.pop().close()
        await until(lambda: rig.front.connections == 1)
        held.append(await Client.open(rig))
        held[-1].write(get("/connections/payments/version"))
        assert (await asyncio.wait_for(held[-1].reply(), 10)).status == 200
    finally:
        for client in held:
            client.close()


@pytest.mark.parametrize("limits", [Limits(max_in_flight=1)], indirect=True)
async def test_a_grant_over_its_requests_in_flight_gets_a_429(rig: Rig) -> None:
    watch = await Client.open(rig)
    try:
        watch.write(get("/connections/payments/api/v1/namespaces/payments/pods?watch=true"))
        assert await watch.head() == 200
        reply = await send(rig, get("/connections/payments/version"))
        assert (reply.status, reply.json()["reason"]) == (429, "TooManyRequests")
        assert reply.headers[b"retry-after"] == b"1"
    finally:
        watch.close()
    held = await rig.front.grants.get(GRANT, "payments", "test")
    await until(lambda: held.in_flight == 0)
    assert (await send(rig, get("/connections/payments/version"))).status == 200


@pytest.mark.parametrize(
    "error", [TimeoutError("read timed out"), ConnectionResetError(104, "reset by peer")]
)
async def test_an_error_in_the_middle_of_a_stream_ends_that_request_in_one_line(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    caplog.set_level(logging.INFO)
    real = kubeforward.Forward._receive_upstream
    calls = 0

    async def failing(self: kubeforward.Forward, up: h11.Connection, reader: Any) -> object:
        """The API server's response head arrives; then its connection fails."""
        nonlocal calls
        calls += 1
        if calls == 2:
            raise error
        return await real(self, up, reader)

    monkeypatch.setattr(kubeforward.Forward, "_receive_upstream", failing)
    client = await Client.open(rig)
    try:
        client.write(get("/connections/payments/api/v1/namespaces/payments/pods"))
        assert await client.head() == 200
        assert await asyncio.wait_for(client.closed(), 5)  # a cut, not an end
    finally:
        client.close()
    await until(lambda: rig.front.connections == 0)
    [line] = [r.getMessage() for r in caplog.records if "ended early" in r.getMessage()]
    assert f"ended early: {type(error).__name__}" in line
    assert "(1 so far in this session)" in line
    _no_tracebacks(caplog)
    held = await rig.front.grants.get(GRANT, "payments", "test")
    assert held.failed == 1


async def test_an_upstream_that_fails_before_its_answer_gives_a_502(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(self: kubeforward.Forward, up: h11.Connection, reader: Any) -> object:
        """The API server's connection fails before its response head."""
        raise ssl.SSLError(1, "decryption failed")

    monkeypatch.setattr(kubeforward.Forward, "_receive_upstream", failing)
    reply = await send(rig, get("/connections/payments/version"))
    assert (reply.status, reply.json()["reason"]) == (502, "InternalError")
    assert reply.headers[b"connection"] == b"close"
    _no_tracebacks(caplog)


async def test_stopping_with_connections_open_is_quiet(
    rig: Rig, kubeapi: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    idle, watch = await Client.open(rig), await Client.open(rig)
    try:
        watch.write(get("/connections/payments/api/v1/namespaces/payments/pods?watch=true"))
        assert await watch.head() == 200
        assert rig.front.connections == 2
        await rig.front.stop()
        assert rig.front.connections == 0
        await asyncio.sleep(0)  # a done callback asyncio would complain from runs by now
    finally:
        idle.close()
        watch.close()
    # Before: "Exception in callback … CancelledError" from asyncio, for each connection.
    _no_tracebacks(caplog)


async def test_a_path_prefix_of_the_server_url_comes_before_every_path(
    rig: Rig, kubeapi: KubeApi
) -> None:
    before = len(kubeapi.seen)
    reply = await send(rig, get("/connections/prefixed/version"))
    assert reply.status == 404  # the test API server has no /prefix/k8s/version
    assert [s.path for s in kubeapi.seen[before:]] == ["/prefix/k8s/version"]


@contextlib.asynccontextmanager
async def _half_event_watch(
    rig: Rig, kubeapi: KubeApi, until: bytes
) -> AsyncIterator[tuple[Client, bytearray]]:
    """A watch whose API server sends an event and half another; the body read until `until`."""
    kubeapi.half_event = True
    watch = await Client.open(rig)
    body = bytearray()
    try:
        watch.write(get("/connections/payments/api/v1/namespaces/payments/pods?watch=true"))
        assert await watch.head() == 200
        while until not in body:
            event = await asyncio.wait_for(watch.event(), 10)
            assert isinstance(event, h11.Data)
            body += event.data
        yield watch, body
    finally:
        kubeapi.half_event = False
        watch.close()


async def test_revoking_a_watch_mid_event_ends_it_with_whole_events_and_why(
    rig: Rig, kubeapi: KubeApi
) -> None:
    """Half an event is held until its newline, so the cut can still add the ERROR event."""
    async with _half_event_watch(rig, kubeapi, b"\n") as (watch, body):
        assert rig.registry.revoke(GRANT_ID) == 1
        while not isinstance(event := await asyncio.wait_for(watch.event(), 5), h11.EndOfMessage):
            assert isinstance(event, h11.Data)
            body += event.data
    events = [json.loads(line) for line in body.splitlines()]  # whole lines only
    assert [e["type"] for e in events] == ["ADDED", "ERROR"]
    assert events[1]["object"]["message"] == "jitgate: the grant has been revoked"


async def _drain(client: Client) -> None:
    """Read the response's body to its end."""
    while isinstance(await client.event(), h11.Data):
        pass


async def test_an_event_too_large_to_hold_goes_on_as_it_comes(
    rig: Rig, kubeapi: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_HELD_EVENT the proxy's memory wins: the half event is sent, the cut is bare."""
    monkeypatch.setattr(kubeforward, "MAX_HELD_EVENT", 16)
    async with _half_event_watch(rig, kubeapi, b'"MODIFIED"') as (watch, body):
        assert rig.registry.revoke(GRANT_ID) == 1
        with pytest.raises(h11.RemoteProtocolError):  # cut mid-body: no ERROR event can follow
            await asyncio.wait_for(_drain(watch), 5)
    assert not body.endswith(b"\n")


@pytest.mark.parametrize("limits", [Limits(max_handshakes=1)], indirect=True)
async def test_a_tls_handshake_flood_is_closed_at_accept_past_the_cap(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Handshakes in progress are counted from accept, as OpenSSH's MaxStartups."""
    _, silent = await asyncio.open_connection("127.0.0.1", rig.port)  # never says hello
    try:
        await until(lambda: rig.front._listener.handshakes.total == 1)  # counted at accept
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 1.0  # not the 10 s handshake deadline
        writer.close()
        assert "TLS handshakes in progress" in caplog.text
    finally:
        silent.close()
    await until(lambda: rig.front._listener.handshakes.total == 0)
    assert (await send(rig, get("/connections/payments/version"))).status == 200
