"""An SSH front end on a fake gate, in front of a real OpenSSH sshd: shared by the SSH tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from jitgate.common.errors import PermissionDenied, Unauthenticated, Unavailable
from jitgate.devstack.sshd_server import DemoSshd, create_key, public_key
from jitgate.proxy.config import SshTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.session import Redeemed, Registry, Relay
from jitgate.proxy.ssh import Limits, SshFrontend

TOKEN = "grant.token.ok"  # what the fake check accepts
GRANT_ID = "cd" * 16


@dataclass(frozen=True)
class Host:
    """A real sshd, the proxy's client key it trusts, and the proxy's own host key."""

    sshd: DemoSshd
    client_key: Path
    proxy_host_key: Path


class AcceptingSshd(DemoSshd):
    """The demo sshd with AcceptEnv * : whatever environment reaches it, it takes."""

    def _write_config(self) -> None:
        super()._write_config()
        with self.config.open("a") as out:
            out.write("AcceptEnv *\n")


@contextlib.contextmanager
def running_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """A real sshd that lets in only the proxy's client key (and takes any env variable)."""
    keys = tmp_path_factory.mktemp("ssh-keys")
    client = keys / "proxy_client_ed25519"
    authorized = create_key(client, "jitgate-proxy")
    create_key(keys / "proxy_host_ed25519", "jitgate-proxy-host")
    sshd = AcceptingSshd(workdir=tmp_path_factory.mktemp("sshd"), authorized_key=authorized)
    sshd.start()
    try:
        yield Host(sshd=sshd, client_key=client, proxy_host_key=keys / "proxy_host_ed25519")
    finally:
        sshd.stop()


@dataclass
class Rig:
    """A running front end and what its fake gate saw."""

    port: int
    frontend: SshFrontend
    registry: Registry
    reports: list[tuple[Redeemed, str, Relay]] = field(default_factory=list)
    redeemed: list[str] = field(default_factory=list)
    ttl: float = 60.0
    core_down: bool = False


def target(host: Host, name: str, **overrides: object) -> SshTarget:
    """An SshTarget on host, as the proxy's config would make it, with overrides."""
    fields: dict[str, object] = {
        "name": name,
        "host": "127.0.0.1",
        "port": host.sshd.port,
        "user": host.sshd.user,
        "private_key": host.client_key.read_text(),
        "host_key": host.sshd.host_key,
        **overrides,
    }
    return SshTarget(**fields)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_rig(host: Host, tmp_path: Path) -> AsyncIterator[Rig]:
    """An SshFrontend on a fake gate, in front of host; its targets named box*."""
    registry = Registry()
    state = Rig(port=0, frontend=None, registry=registry)  # type: ignore[arg-type]

    async def check(token: str, connection: str, kind: str) -> Claims:
        assert kind == "ssh"
        if state.core_down:
            raise Unavailable("redis", "connection refused at 10.0.0.7:6379")
        if token == "other":
            raise PermissionDenied("WRONG_CONNECTION", "this grant is for orders, not box")
        if token == "revoked":
            raise PermissionDenied("GRANT_REVOKED", "this grant was revoked")
        if token != TOKEN:
            raise Unauthenticated("signature", "bad")
        return Claims(
            grant_id=GRANT_ID,
            subject="ops-bot",
            connection=connection,
            kind=kind,
            expires_at=time.time() + state.ttl,
        )

    async def redeem(token: str, connection: str, session_id: str, client: str) -> Redeemed:
        state.redeemed.append(session_id)
        return Redeemed(
            grant_id=GRANT_ID,
            subject="ops-bot",
            connection=connection,
            expires_at=time.time() + state.ttl,
        )

    async def report(redeemed: Redeemed, session_id: str, relay: Relay) -> None:
        state.reports.append((redeemed, session_id, relay))

    wrong = public_key(create_key(tmp_path / "impostor", "not-the-host"))
    targets = {
        "box": target(host, "box"),
        "box-fwd": target(host, "box-fwd", allow_port_forwarding=True),
        "box-agent": target(host, "box-agent", allow_agent_forwarding=True),
        "box-impostor": target(host, "box-impostor", host_key=wrong),
        "box-down": target(host, "box-down", port=1),
    }
    gate = Gate(check=check, redeem=redeem, report=report, registry=registry)
    frontend = SshFrontend(
        gate=gate, targets=targets, host_key=host.proxy_host_key, listen="127.0.0.1:0"
    )
    address = await frontend.start()
    state.port = int(address.split()[0].rpartition(":")[2])
    state.frontend = frontend
    try:
        yield state
    finally:
        await frontend.stop()


class Agent(asyncssh.SSHClient):
    """An agent's SSH client that keeps every banner it is shown."""

    def __init__(self) -> None:
        self.banners: list[str] = []

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self.banners.append(msg)


async def log_in(
    rig: Rig,
    client: type[Agent],
    user: str,
    password: str,
    port: int | None,
    **options: object,
) -> tuple[asyncssh.SSHClientConnection, Agent]:
    """Log in by password alone, as an agent does: no keys, no ssh-agent, no config.

    options override those asyncssh defaults (an agent to forward, say).
    """
    settings: dict[str, object] = {
        "username": user,
        "password": password,
        "known_hosts": None,
        "config": None,
        "agent_path": None,
        "client_keys": None,
        "preferred_auth": "password",
        "connect_timeout": 5,
        **options,
    }
    conn, agent = await asyncssh.create_connection(
        client,
        "127.0.0.1",
        port or rig.port,
        **settings,  # type: ignore[arg-type]  # asyncssh's options are typed one by one
    )
    return conn, agent


async def connect(
    rig: Rig, user: str = "box", password: str = TOKEN, port: int | None = None
) -> tuple[asyncssh.SSHClientConnection, Agent]:
    """Log in as an agent whose login is expected to succeed."""
    return await log_in(rig, Agent, user, password, port)


async def refused(
    rig: Rig, user: str = "box", password: str = TOKEN, port: int | None = None
) -> tuple[str, list[str]]:
    """Log in expecting a refusal; return the disconnect reason and the banners shown."""
    banners: list[str] = []

    class Watching(Agent):
        def __init__(self) -> None:
            super().__init__()
            self.banners = banners

    with pytest.raises(asyncssh.DisconnectError) as caught:
        await log_in(rig, Watching, user, password, port)
    return caught.value.reason, banners


async def reports(rig: Rig, count: int) -> list[tuple[Redeemed, str, Relay]]:
    """The session reports, once count of them have arrived (they follow the close)."""
    for _ in range(200):
        if len(rig.reports) >= count:
            break
        await asyncio.sleep(0.01)
    return rig.reports


@contextlib.asynccontextmanager
async def listener(rig: Rig, host: Host, **limits: int) -> AsyncIterator[int]:
    """A second listener on rig's gate and targets with smaller limits; yields its port."""
    frontend = SshFrontend(
        gate=rig.frontend.gate,
        targets=rig.frontend.targets,
        host_key=host.proxy_host_key,
        listen="127.0.0.1:0",
        limits=Limits(**limits),
    )
    address = await frontend.start()
    try:
        yield int(address.split()[0].rpartition(":")[2])
    finally:
        await frontend.stop()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A TCP echo of one line, prefixed "echo:"."""
    writer.write(b"echo:" + await reader.readline())
    await writer.drain()
    writer.close()
