"""The images' probe: grpc.health.v1 over the service's own mTLS, which nothing else passes."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitgate.devstack import pki
from tests.deploy import zones
from tests.support import running

healthcheck = zones.load_script(zones.COMPOSE_DIR / "healthcheck.py")


def env(dev: pki.DevPki, name: str, port: int) -> dict[str, str]:
    """What the container of workload name has in its environment."""
    files = dev.files(name)
    return {
        "JITGATE_LISTEN": f"0.0.0.0:{port}",
        "JITGATE_TLS_CA": str(files.ca),
        "JITGATE_TLS_CERT": str(files.cert),
        "JITGATE_TLS_KEY": str(files.key),
    }


async def check(name: str, environment: dict[str, str]) -> int:
    """Run the probe as the kubelet or Docker would, off the event loop serving the server."""
    argv = ["jitgate-healthcheck", name]
    return int(await asyncio.to_thread(healthcheck.main, argv, environment))


async def test_a_serving_mtls_service_is_healthy(dev_pki: pki.DevPki) -> None:
    # acl={}: a server that demands a client certificate, like verifier, policy and audit.
    async with running(dev_pki, "verifier", lambda server: None, acl={}) as port:
        assert await check("verifier", env(dev_pki, "verifier", port)) == 0


async def test_the_issuer_without_client_certificates_is_healthy(dev_pki: pki.DevPki) -> None:
    async with running(dev_pki, "issuer", lambda server: None, acl=None) as port:
        assert await check("issuer", env(dev_pki, "issuer", port)) == 0


async def test_a_plaintext_probe_gets_no_answer(dev_pki: pki.DevPki) -> None:
    # What the kubelet's built-in gRPC probe sends: why the manifests exec this script.
    def plaintext(port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)

    async with running(dev_pki, "policy", lambda server: None, acl={}) as port:
        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(plaintext, port)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_another_services_listener_is_unhealthy(dev_pki: pki.DevPki) -> None:
    # The audit probe pointed at the verifier's port: its certificate names another service.
    async with running(dev_pki, "verifier", lambda server: None, acl={}) as port:
        assert await check("audit", env(dev_pki, "audit", port)) == 1


async def test_a_certificate_of_another_ca_is_unhealthy(
    dev_pki: pki.DevPki, foreign_pki: pki.DevPki
) -> None:
    async with running(dev_pki, "audit", lambda server: None, acl={}) as port:
        assert await check("audit", env(foreign_pki, "audit", port)) == 1


async def test_nothing_listening_is_unhealthy(dev_pki: pki.DevPki) -> None:
    async with running(dev_pki, "policy", lambda server: None, acl={}) as port:
        pass
    assert await check("policy", env(dev_pki, "policy", port)) == 1


def test_the_proxy_is_healthy_while_it_listens(dev_pki: pki.DevPki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert healthcheck.main(["x", "proxy"], env(dev_pki, "proxy", port)) == 0
    assert healthcheck.main(["x", "proxy"], env(dev_pki, "proxy", port)) == 1


def test_misuse_is_not_health(dev_pki: pki.DevPki) -> None:
    assert healthcheck.main(["x"], {}) == 2
    assert healthcheck.main(["x", "redis"], {}) == 2
    assert healthcheck.main(["x", "audit"], {"JITGATE_LISTEN": "0.0.0.0:1"}) == 2
