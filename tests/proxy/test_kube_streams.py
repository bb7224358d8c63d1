"""Attach and port-forward through the Kubernetes front end, to the test API server for streams.

The gate is a fake (the real stack's is in tests/e2e/test_proxy_kube_streams.py);
the proxy code, TLS, HTTP, WebSocket and the test API server (tests/kubestreams.py,
not a real API server) are real, and so is kubectl where a test runs it.
kubectl 1.32 attaches over WebSocket (v5.channel.k8s.io), but its port-forward
tunnels SPDY over WebSocket, which the test API server does not speak: port-forward
is driven by tests/kubestreams.PortForward, a WebSocket client of the API
server's port-forward protocol, not by kubectl.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jitgate.common.tls import TlsFiles
from jitgate.devstack import pki
from jitgate.proxy.gate import Gate
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.kube import Limits
from jitgate.proxy.session import Redeemed, Registry, Relay
from tests.kubestreams import BINARY, CONTINUATION, HALF, KubeStreams, PortForward
from tests.proxy import kube_rig

SA = "sa-streams-token-77c2"
GRANT = "grant.token.streams"
GRANT_ID = "ef" * 16
PODS = "/api/v1/namespaces/payments/pods"
CUT = 1.0
"""Seconds from a revocation to a stream's end, on both sides (it is an abort: ms, not s)."""


@pytest.fixture(scope="module")
def streams_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """The test API server's certificate, from a CA of its own."""
    root = tmp_path_factory.mktemp("kubestreams-pki")
    pki.init(root, names=())
    return pki.issue(root, "kubeapi")


@pytest.fixture
def streams(streams_tls: TlsFiles) -> Iterator[KubeStreams]:
    """A test API server for streams of the test's own: what reached it is the test's alone."""
    server = KubeStreams(streams_tls, SA).start()
    yield server
    server.stop()


@dataclass
class Rig(kube_rig.Rig):
    """The rig, and an event set at each report of its fake gate."""

    reported: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def rig(streams: KubeStreams, dev_pki: pki.DevPki, limits: Limits) -> AsyncIterator[Rig]:
    """A KubeFrontend with two connections to the test API server: "streams" allows both."""
    targets = {
        "payments": kube_rig.target(streams, "payments", SA),
        "streams": kube_rig.target(
            streams, "streams", SA, allow_exec=True, allow_port_forward=True
        ),
    }
    registry = Registry()
    state = Rig(front=None, registry=registry, ca=dev_pki.ca)  # type: ignore[arg-type]

    async def check(token: str, connection: str, kind: str) -> Claims:
        """The fake check: the one grant token is good."""
        assert (token, kind) == (GRANT, "kubernetes")
        return Claims(
            grant_id=GRANT_ID,
            subject="deploy-bot",
            connection=connection,
            kind=kind,
            expires_at=time.time() + 60,
        )

    async def redeem(token: str, connection: str, session_id: str, client: str) -> Redeemed:
        """The fake redemption: a minute's grant."""
        return Redeemed(
            grant_id=GRANT_ID,
            subject="deploy-bot",
            connection=connection,
            expires_at=time.time() + 60,
        )

    async def report(redeemed: Redeemed, session_id: str, relay: Relay) -> None:
        """The hold's end, as the proxy reports it."""
        state.reports.append(relay)
        state.reported.set()

    gate = Gate(check=check, redeem=redeem, report=report, registry=registry)
    async with kube_rig.serving(gate, targets, dev_pki, limits) as front:
        state.front = front
        yield state


async def kubectl(rig: Rig, home: Path, connection: str, *args: str) -> asyncio.subprocess.Process:
    """Start kubectl with a kubeconfig for connection through the rig; stdio piped."""
    config = home / "kubeconfig"
    cluster = {
        "server": f"https://127.0.0.1:{rig.front.port}/connections/{connection}",
        "certificate-authority": str(rig.ca),
    }
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "j", "cluster": cluster}],
                "users": [{"name": "u", "user": {"token": GRANT}}],
                "contexts": [
                    {"name": "c", "context": {"cluster": "j", "user": "u", "namespace": "payments"}}
                ],
                "current-context": "c",
            }
        )
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "KUBECONFIG": str(config)}
    return await asyncio.create_subprocess_exec(
        "kubectl", "--request-timeout=10s", *args, env=env, stdin=-1, stdout=-1, stderr=-1
    )


async def forward(rig: Rig, connection: str, ports: str) -> PortForward:
    """A port-forward stream through the rig to api-0, its channels opened (not kubectl)."""
    client, response, body = await PortForward.open(
        "127.0.0.1",
        rig.front.port,
        f"/connections/{connection}{PODS}/api-0/portforward?ports={ports}",
        GRANT,
        str(rig.ca),
    )
    assert client is not None, (response, body)
    await asyncio.wait_for(client.handshake(len(ports.split(","))), 10)
    return client


async def test_kubectl_attach_echoes_stdin_through_the_proxy_from_the_test_api_server(
    rig: Rig, streams: KubeStreams, tmp_path: Path
) -> None:
    """kubectl attach -i with allow_exec: stdin crosses the proxy, the echo comes back, exit 0."""
    typed = b"hello from the agent\n" + bytes(range(32, 127)) + b"\n"
    proc = await kubectl(rig, tmp_path, "streams", "attach", "-i", "api-0")
    out, err = await asyncio.wait_for(proc.communicate(typed), 30)
    # The test API server echoes stdin on stdout and ends with a Success
    # Status on the error channel when stdin closes: kubectl exits 0.
    assert (proc.returncode, out) == (0, typed), err
    assert streams.received("attach api-0") == typed
    [seen] = [s for s in streams.seen if s.path == f"{PODS}/api-0/attach"]
    assert seen.headers["upgrade"].lower() == "websocket"
    assert seen.headers["sec-websocket-protocol"] == "v5.channel.k8s.io"
    assert seen.headers["authorization"] == f"Bearer {SA}"
    assert GRANT not in json.dumps(seen.headers)
    await rig.front.stop()
    assert rig.reports[0].bytes_from_client > len(typed)  # framed: more than the bytes typed
    assert rig.reports[0].bytes_to_client > len(typed)


async def test_port_forward_bytes_reach_the_test_api_server_and_its_echo_comes_back(
    rig: Rig, streams: KubeStreams
) -> None:
    """Port-forward by a WebSocket client of the test's own (v4.channel.k8s.io), not kubectl."""
    client = await forward(rig, "streams", "8080,9090")
    try:
        # Each port's data and error channels open with the port, little-endian.
        assert client.ports == {0: 8080, 1: 8080, 2: 9090, 3: 9090}
        small, large = b"GET / HTTP/1.0\r\n\r\n", os.urandom(200_000)  # large: many TLS records
        client.send(0, small)
        client.send(2, large)
        assert await asyncio.wait_for(client.message(), 10) == (BINARY, b"\x00" + small)
        assert await asyncio.wait_for(client.message(), 10) == (BINARY, b"\x02" + large)
    finally:
        client.close()
    assert streams.received("portforward api-0:8080") == small
    assert streams.received("portforward api-0:9090") == large
    [seen] = [s for s in streams.seen if s.path == f"{PODS}/api-0/portforward"]
    assert seen.query["ports"] == ["8080,9090"]
    assert seen.headers["authorization"] == f"Bearer {SA}"
    assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)  # the agent left: so did we


async def test_kubectl_attach_is_refused_with_a_403_and_never_reaches_the_test_api_server(
    rig: Rig, streams: KubeStreams, tmp_path: Path
) -> None:
    """Without allow_exec, kubectl attach gets the proxy's 403 Status."""
    before = len(streams.seen)
    proc = await kubectl(rig, tmp_path, "payments", "attach", "-i", "api-0")
    _, err = await asyncio.wait_for(proc.communicate(b"x\n"), 30)
    assert proc.returncode != 0
    assert "attach into pods is not allowed on this connection" in err.decode()
    assert not [s for s in streams.seen[before:] if s.path.endswith("/attach")]


async def test_port_forward_is_refused_with_a_403_status_and_never_reaches_the_test_api_server(
    rig: Rig, streams: KubeStreams
) -> None:
    """By the test's own WebSocket client, not kubectl (the e2e test refuses kubectl's)."""
    before = len(streams.seen)
    client, response, body = await PortForward.open(
        "127.0.0.1",
        rig.front.port,
        f"/connections/payments{PODS}/api-0/portforward?ports=8080",
        GRANT,
        str(rig.ca),
    )
    assert client is None
    assert response is not None
    assert response.status_code == 403
    status = json.loads(body)
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 403, "Forbidden")
    assert status["message"] == "jitgate: pods/portforward is not allowed on this connection"
    assert not [s for s in streams.seen[before:] if s.path.endswith("/portforward")]


async def test_revoking_cuts_an_open_kubectl_attach_to_the_test_api_server_within_a_second(
    rig: Rig, streams: KubeStreams, tmp_path: Path
) -> None:
    """An attach streaming through the proxy ends on both sides within CUT of the revocation."""
    assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)
    proc = await kubectl(rig, tmp_path, "streams", "attach", "-i", "api-0")
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(b"still there?\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"still there?\n"
        assert streams.streams_open == 1
        assert rig.registry.revoke(GRANT_ID) == 1
        revoked = time.monotonic()
        code = await asyncio.wait_for(proc.wait(), 10)
        agent_cut = time.monotonic() - revoked
        assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)
        upstream_cut = time.monotonic() - revoked
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code != 0  # a cut, not the Success Status of a stdin that ended
    # The Status the proxy put on the error channel is what kubectl prints.
    assert b"jitgate: the grant has been revoked" in await proc.stderr.read()
    assert agent_cut < CUT
    assert upstream_cut < CUT
    await asyncio.wait_for(rig.reported.wait(), 5)
    assert [r.reason for r in rig.reports] == ["revoked"]


async def test_revoking_cuts_an_open_port_forward_to_the_test_api_server_within_a_second(
    rig: Rig, streams: KubeStreams
) -> None:
    """By the test's own WebSocket port-forward client, not kubectl."""
    assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)
    client = await forward(rig, "streams", "5432")
    try:
        client.send(0, b"before")
        assert await asyncio.wait_for(client.message(), 10) == (BINARY, b"\x00before")
        assert streams.streams_open == 1
        assert rig.registry.revoke(GRANT_ID) == 1
        revoked = time.monotonic()
        # Between two frames the proxy can say why: a close frame, 1008 and
        # the reason (RFC 6455 §5.5.1), then the end.
        closing = await asyncio.wait_for(client.message(), 5)
        assert closing == (8, b"\x03\xf0jitgate: the grant has been revoked")
        assert await asyncio.wait_for(client.ended(), 5)
        agent_cut = time.monotonic() - revoked
        assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)
        upstream_cut = time.monotonic() - revoked
    finally:
        client.close()
    assert agent_cut < CUT
    assert upstream_cut < CUT
    assert streams.received("portforward api-0:5432") == b"before"
    await asyncio.wait_for(rig.reported.wait(), 5)
    assert [r.reason for r in rig.reports] == ["revoked"]


SHORT = Limits(header_timeout=0.2, idle_timeout=0.2, body_timeout=0.2)


@pytest.mark.parametrize("limits", [SHORT], indirect=True)
async def test_an_idle_port_forward_to_the_test_api_server_outlives_the_request_deadlines(
    rig: Rig, streams: KubeStreams
) -> None:
    """A quiet stream is no slow request; by the test's own WebSocket client, not kubectl."""
    client = await forward(rig, "streams", "8080")
    try:
        await asyncio.sleep(1.0)  # five times each deadline, nothing sent: no event to wait for
        assert streams.streams_open == 1
        client.send(0, b"after a quiet second")
        assert await asyncio.wait_for(client.message(), 10) == (BINARY, b"\x00after a quiet second")
    finally:
        client.close()


async def test_revoking_mid_frame_ends_kubectl_attach_with_the_bytes_that_came_and_why(
    rig: Rig, streams: KubeStreams, tmp_path: Path
) -> None:
    """The test API server leaves its stdout frame half sent; the cut still says why."""
    proc = await kubectl(rig, tmp_path, "streams", "attach", "-i", "api-0")
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        proc.stdin.write(HALF + b" the first half of a long output\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == (
            HALF + b" the first half of a long output\n"
        )
        assert rig.registry.revoke(GRANT_ID) == 1
        revoked = time.monotonic()
        code = await asyncio.wait_for(proc.wait(), 10)
        agent_cut = time.monotonic() - revoked
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code != 0
    assert b"jitgate: the grant has been revoked" in await proc.stderr.read()
    assert agent_cut < CUT
    assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)


async def test_revoking_mid_frame_ends_a_port_forward_with_a_close_frame_and_why(
    rig: Rig, streams: KubeStreams
) -> None:
    """By the test's own WebSocket client: the frames themselves are checked."""
    client = await forward(rig, "streams", "5432")
    try:
        client.send(0, HALF + b"abc")
        # The API server's frame announces twice this; the proxy sends what came,
        # as fragments (one, unless the bytes came in more than one read).
        got, opcode = b"", BINARY
        while got != b"\x00" + HALF + b"abc":
            kind, fin, data = await asyncio.wait_for(client.frame(), 10)
            assert (kind, fin) == (opcode, False)
            got, opcode = got + data, CONTINUATION
        assert rig.registry.revoke(GRANT_ID) == 1
        revoked = time.monotonic()
        # The message cut short is finished (empty, final), then the close and its reason.
        assert await asyncio.wait_for(client.frame(), 5) == (CONTINUATION, True, b"")
        closing = await asyncio.wait_for(client.frame(), 5)
        assert closing == (8, True, b"\x03\xf0jitgate: the grant has been revoked")
        assert await asyncio.wait_for(client.ended(), 5)
        agent_cut = time.monotonic() - revoked
    finally:
        client.close()
    assert agent_cut < CUT
    assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)
    await asyncio.wait_for(rig.reported.wait(), 5)
    assert [r.reason for r in rig.reports] == ["revoked"]


async def test_an_extension_the_api_server_chose_unasked_gets_a_502_not_a_stream(
    rig: Rig, streams: KubeStreams, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames under an extension could not be re-cut, so the stream could not be cut cleanly."""
    streams.extension = "permessage-deflate"
    client, response, body = await PortForward.open(
        "127.0.0.1",
        rig.front.port,
        f"/connections/streams{PODS}/api-0/portforward?ports=5432",
        GRANT,
        str(rig.ca),
    )
    assert client is None
    assert response is not None
    assert response.status_code == 502
    message = json.loads(body)["message"]
    assert message == "jitgate: the API server of streams answered in a way jitgate cannot relay"
    assert "chose a WebSocket extension nobody asked for" in caplog.text
