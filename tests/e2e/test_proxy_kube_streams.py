"""Attach and port-forward through the real stack's proxy, to the test API server for streams.

There is no real Kubernetes API server here: the upstream is tests/kubestreams.py,
a test API server that answers attach and port-forward over WebSocket and
records the bytes that reach it. Everything else is real: the stack's
processes, `jitgate grant request` and `jitgate grant kubeconfig`, kubectl for
attach, and the operator's revocation. Port-forward is driven by
tests/kubestreams.PortForward, a WebSocket client of the API server's
port-forward protocol, not by kubectl: kubectl 1.32's port-forward tunnels
SPDY over WebSocket, which the test API server does not speak.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitgate.devstack import pki
from jitgate.devstack.stack import Stack
from tests.e2e import kube_rig
from tests.e2e.conftest import operator_revokes
from tests.e2e.kube_rig import CONNECTION, NAMESPACE
from tests.kubestreams import BINARY, KubeStreams, PortForward

pytestmark = pytest.mark.e2e

PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
CUT = 1.0
"""Seconds from the operator's revocation to a stream's end, on both sides."""


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeStreams]:
    """The test API server for streams, with a CA of its own and a ServiceAccount token."""
    root = tmp_path_factory.mktemp("kubestreams-pki")
    pki.init(root, names=())
    token = f"sa-test-{secrets.token_urlsafe(24)}"
    server = KubeStreams(pki.issue(root, "kubeapi"), token).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, streams: KubeStreams) -> Iterator[Stack]:
    """The whole stack, its proxy serving payments-staging with exec and port-forward allowed."""
    with kube_rig.serving(
        tmp_path_factory, streams, allow_exec=True, allow_port_forward=True
    ) as running:
        yield running


class Agent(kube_rig.Agent):
    """An agent's machine: a fresh grant, its kubeconfig, kubectl."""

    async def kubectl(self, *args: str) -> asyncio.subprocess.Process:
        """Start kubectl with this agent's kubeconfig, stdio piped."""
        return await asyncio.create_subprocess_exec(
            "kubectl", "--request-timeout=10s", *args, env=self.env, stdin=-1, stdout=-1, stderr=-1
        )

    async def forward(self, ports: str) -> PortForward:
        """A port-forward stream to api-0 through the proxy, its channels opened (not kubectl)."""
        client, response, body = await PortForward.open(
            "127.0.0.1",
            self.stack.ports["proxy-kube"],
            f"/connections/{CONNECTION}{PODS}/api-0/portforward?ports={ports}",
            self.grant["token"],
            str(self.stack.pki.ca),
        )
        assert client is not None, (response, body)
        await asyncio.wait_for(client.handshake(len(ports.split(","))), 10)
        return client


@pytest.fixture
def agent(stack: Stack, tmp_path: Path) -> Agent:
    """deploy-bot with a fresh payments-staging grant and its kubeconfig."""
    return Agent(stack, tmp_path)


async def test_kubectl_attach_through_the_stack_echoes_from_the_test_api_server(
    agent: Agent, streams: KubeStreams
) -> None:
    """kubectl attach -i with allow_exec: stdin crosses the stack's proxy, the echo comes back."""
    typed = b"attached through jitgate " + secrets.token_hex(8).encode() + b"\n"
    proc = await agent.kubectl("attach", "-i", "api-0")
    out, err = await asyncio.wait_for(proc.communicate(typed), 30)
    assert (proc.returncode, out) == (0, typed), err
    assert typed in streams.received("attach api-0")
    attaches = [s for s in streams.seen if s.path == f"{PODS}/api-0/attach"]
    assert attaches[-1].headers["authorization"] == f"Bearer {streams.token}"
    assert agent.grant["token"] not in json.dumps(attaches[-1].headers)


async def test_port_forward_through_the_stack_reaches_the_test_api_server_and_echoes(
    agent: Agent, streams: KubeStreams
) -> None:
    """By the test's own WebSocket port-forward client (v4.channel.k8s.io), not kubectl."""
    sent = b"forwarded " + secrets.token_hex(8).encode()
    client = await agent.forward("6379")
    try:
        assert client.ports == {0: 6379, 1: 6379}
        client.send(0, sent)
        assert await asyncio.wait_for(client.message(), 10) == (BINARY, b"\x00" + sent)
    finally:
        client.close()
    assert sent in streams.received("portforward api-0:6379")
    forwards = [s for s in streams.seen if s.path == f"{PODS}/api-0/portforward"]
    assert forwards[-1].headers["authorization"] == f"Bearer {streams.token}"


async def test_the_operator_revoking_cuts_an_attach_and_a_port_forward_within_a_second(
    stack: Stack, agent: Agent, streams: KubeStreams
) -> None:
    """Port-forward by the test's own WebSocket client, attach by kubectl."""
    assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)
    attach = await agent.kubectl("attach", "-i", "api-0")
    assert attach.stdin is not None
    assert attach.stdout is not None
    client = await agent.forward("8443")
    try:
        attach.stdin.write(b"still attached?\n")
        assert await asyncio.wait_for(attach.stdout.readline(), 30) == b"still attached?\n"
        client.send(0, b"still forwarding?")
        assert await asyncio.wait_for(client.message(), 10) == (BINARY, b"\x00still forwarding?")
        assert streams.streams_open == 2
        operator_revokes(stack, agent.grant["grant_id"], "incident 8")
        revoked = time.monotonic()
        closing = await asyncio.wait_for(client.message(), 5)  # the reason, then the end
        assert closing == (8, b"\x03\xf0jitgate: the grant has been revoked")
        assert await asyncio.wait_for(client.ended(), 5)
        forward_cut = time.monotonic() - revoked
        code = await asyncio.wait_for(attach.wait(), 10)
        attach_cut = time.monotonic() - revoked
        assert await asyncio.to_thread(streams.wait_streams, 0, 5.0)
        upstream_cut = time.monotonic() - revoked
    finally:
        client.close()
        if attach.returncode is None:
            attach.kill()
            await attach.wait()
    assert code != 0  # a cut, not the Success Status of a stdin that ended
    assert attach.stderr is not None
    assert b"jitgate: the grant has been revoked" in await attach.stderr.read()
    assert forward_cut < CUT
    assert attach_cut < CUT
    assert upstream_cut < CUT
    # From then on the grant opens no stream.
    _, response, body = await PortForward.open(
        "127.0.0.1",
        stack.ports["proxy-kube"],
        f"/connections/{CONNECTION}{PODS}/api-0/portforward?ports=8443",
        agent.grant["token"],
        str(stack.pki.ca),
    )
    assert response is not None
    assert (response.status_code, json.loads(body)["reason"]) == (401, "Unauthorized")
