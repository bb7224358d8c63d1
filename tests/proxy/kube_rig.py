"""A KubeFrontend with a fake gate, in front of a test API server, for the proxy's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jitgate.devstack import pki
from jitgate.proxy.config import KubeTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.kube import KubeFrontend, Limits
from jitgate.proxy.server import agent_tls
from jitgate.proxy.session import Registry, Relay
from tests.kubeapi import KubeApi


@dataclass
class Rig:
    """A running front end, its registry, the CA an agent trusts, what its fake gate reported."""

    front: KubeFrontend
    registry: Registry
    ca: Path
    reports: list[Relay] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The front end's port."""
        return self.front.port


def target(upstream: KubeApi, name: str, token: str, **options: Any) -> KubeTarget:
    """A connection to upstream's namespace payments with token; options override the rest."""
    fields: dict[str, Any] = {
        "server": upstream.url,
        "namespace": "payments",
        "token": token,
        "ca_file": str(upstream.files.ca),
        **options,
    }
    return KubeTarget(name=name, **fields)


@asynccontextmanager
async def serving(
    gate: Gate, targets: dict[str, KubeTarget], dev_pki: pki.DevPki, limits: Limits
) -> AsyncIterator[KubeFrontend]:
    """A KubeFrontend on a free port with the proxy's certificate, started, stopped afterwards."""
    tls = agent_tls(str(dev_pki.files("proxy").cert), str(dev_pki.files("proxy").key))
    tls.set_alpn_protocols(["http/1.1"])
    front = KubeFrontend(gate=gate, targets=targets, tls=tls, listen="127.0.0.1:0", limits=limits)
    await front.start()
    try:
        yield front
    finally:
        await front.stop()
