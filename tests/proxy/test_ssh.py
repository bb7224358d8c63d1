"""The SSH front end against a real OpenSSH sshd: agents see only their grant, never the key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from jitgate.common.errors import ConfigError, PermissionDenied, Unauthenticated, Unavailable
from jitgate.devstack.sshd_server import DemoSshd, create_key, public_key
from jitgate.proxy.config import SshTarget
from jitgate.proxy.gate import Gate
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.session import Redeemed, Registry, Relay
from jitgate.proxy.ssh import Limits, SshFrontend
from jitgate.proxy.sshrelay import PENDING_WINDOW

pytestmark = pytest.mark.integration

TOKEN = "grant.token.ok"  # what the fake check accepts
GRANT_ID = "cd" * 16


@dataclass(frozen=True)
class Host:
    sshd: DemoSshd
    client_key: Path
    proxy_host_key: Path


class AcceptingSshd(DemoSshd):
    """The demo sshd with AcceptEnv * : whatever environment reaches it, it takes."""

    def _write_config(self) -> None:
        super()._write_config()
        with self.config.open("a") as out:
            out.write("AcceptEnv *\n")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """A real sshd that lets in only the proxy's client key (and takes any env variable)."""
    keys = tmp_path_factory.mktemp("ssh-keys")
    client = keys / "proxy_client_ed25519"
    authorized = create_key(client, "jitgate-proxy")
    create_key(keys / "proxy_host_ed25519", "jitgate-proxy-host")
    sshd = AcceptingSshd(workdir=tmp_path_factory.mktemp("sshd"), authorized_key=authorized)
    sshd.start()
    yield Host(sshd=sshd, client_key=client, proxy_host_key=keys / "proxy_host_ed25519")
    sshd.stop()


@dataclass
class Rig:
    port: int
    frontend: SshFrontend
    registry: Registry
    reports: list[tuple[Redeemed, str, Relay]] = field(default_factory=list)
    redeemed: list[str] = field(default_factory=list)
    ttl: float = 60.0
    core_down: bool = False


def _target(host: Host, name: str, **overrides: object) -> SshTarget:
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


@pytest.fixture
async def rig(host: Host, tmp_path: Path) -> AsyncIterator[Rig]:
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
        "box": _target(host, "box"),
        "box-fwd": _target(host, "box-fwd", allow_port_forwarding=True),
        "box-agent": _target(host, "box-agent", allow_agent_forwarding=True),
        "box-impostor": _target(host, "box-impostor", host_key=wrong),
        "box-down": _target(host, "box-down", port=1),
    }
    gate = Gate(check=check, redeem=redeem, report=report, registry=registry)
    frontend = SshFrontend(
        gate=gate, targets=targets, host_key=host.proxy_host_key, listen="127.0.0.1:0"
    )
    address = await frontend.start()
    state.port = int(address.split()[0].rpartition(":")[2])
    state.frontend = frontend
    yield state
    await frontend.stop()


class Agent(asyncssh.SSHClient):
    """An agent's SSH client that keeps every banner it is shown."""

    def __init__(self) -> None:
        self.banners: list[str] = []

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self.banners.append(msg)


async def _log_in(
    rig: Rig, client: type[Agent], user: str, password: str, port: int | None
) -> tuple[asyncssh.SSHClientConnection, Agent]:
    """Log in by password alone, as an agent does: no keys, no ssh-agent, no config."""
    conn, agent = await asyncssh.create_connection(
        client,
        "127.0.0.1",
        port or rig.port,
        username=user,
        password=password,
        known_hosts=None,
        config=None,
        agent_path=None,
        client_keys=None,
        preferred_auth="password",
        connect_timeout=5,
    )
    return conn, agent


async def _connect(
    rig: Rig, user: str = "box", password: str = TOKEN, port: int | None = None
) -> tuple[asyncssh.SSHClientConnection, Agent]:
    """Log in as an agent whose login is expected to succeed."""
    return await _log_in(rig, Agent, user, password, port)


async def _refused(
    rig: Rig, user: str = "box", password: str = TOKEN, port: int | None = None
) -> tuple[str, list[str]]:
    """Log in expecting a refusal; return the disconnect reason and the banners shown."""
    banners: list[str] = []

    class Watching(Agent):
        def __init__(self) -> None:
            super().__init__()
            self.banners = banners

    with pytest.raises(asyncssh.DisconnectError) as refused:
        await _log_in(rig, Watching, user, password, port)
    return refused.value.reason, banners


async def _reports(rig: Rig, count: int) -> list[tuple[Redeemed, str, Relay]]:
    """The session reports, once count of them have arrived (they follow the close)."""
    for _ in range(200):
        if len(rig.reports) >= count:
            break
        await asyncio.sleep(0.01)
    return rig.reports


async def test_exec_relays_output_stderr_and_the_exit_status(rig: Rig, host: Host) -> None:
    conn, _ = await _connect(rig)
    async with conn:
        done = await conn.run("echo out; whoami; echo err >&2; cat; exit 7", input="from-stdin\n")
    assert done.exit_status == 7
    assert done.stdout == f"out\n{host.sshd.user}\nfrom-stdin\n"
    assert done.stderr == "err\n"
    [(redeemed, session_id, relay)] = await _reports(rig, 1)
    assert session_id == rig.redeemed[0]
    assert redeemed.grant_id == GRANT_ID
    assert relay.reason == "client_closed"
    assert relay.bytes_from_client == len("from-stdin\n")
    assert relay.bytes_to_client == len(done.stdout) + len(done.stderr)


async def test_a_signal_that_killed_the_command_reaches_the_agent(rig: Rig) -> None:
    conn, _ = await _connect(rig)
    async with conn:
        done = await conn.run("kill -TERM $$")
    assert done.exit_signal is not None
    assert done.exit_signal[0] == "TERM"


async def test_a_pty_shell_gets_its_terminal_and_window_changes(rig: Rig) -> None:
    conn, _ = await _connect(rig)
    async with conn:
        process = await conn.create_process(term_type="xterm-256color", term_size=(91, 27))
        process.stdin.write("echo TERM=$TERM; stty size; tty\n")
        seen = ""
        while "/dev/pts" not in seen:
            seen += await asyncio.wait_for(process.stdout.read(1024), 5)
        assert "TERM=xterm-256color" in seen
        assert "27 91" in seen
        process.change_terminal_size(120, 40)
        process.stdin.write("stty size; exit 4\n")
        await asyncio.wait_for(process.wait_closed(), 5)
        rest = await process.stdout.read()
    assert "40 120" in rest
    assert process.exit_status == 4


async def test_sftp_is_relayed(rig: Rig, tmp_path: Path) -> None:
    target = tmp_path / "via-sftp.txt"
    conn, _ = await _connect(rig)
    async with conn, conn.start_sftp_client() as sftp:
        async with sftp.open(str(target), "w") as out:
            await out.write("written through the proxy\n")
        assert target.name in await sftp.listdir(str(tmp_path))
        async with sftp.open(str(target)) as back:
            assert await back.read() == "written through the proxy\n"
    assert target.read_text() == "written through the proxy\n"


async def test_forwarding_is_refused_unless_the_connection_allows_it(rig: Rig, host: Host) -> None:
    conn, _ = await _connect(rig)
    async with conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", host.sshd.port)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 1)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process("true", x11_forwarding=True, x11_display="127.0.0.1:0")
    [(_, _, relay)] = await _reports(rig, 1)
    assert relay.bytes_to_client == 0  # nothing was relayed


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real ssh-agent holding one key: its socket and the name it lists the key by."""
    socket = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        create_key(tmp_path / "agent_key", "key-in-the-agents-agent")
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket)}
        for _ in range(100):  # ssh-add fails until the agent listens
            added = subprocess.run(
                ["ssh-add", str(tmp_path / "agent_key")], env=env, capture_output=True, check=False
            )
            if added.returncode == 0:
                break
            agent_gone = agent.poll() is not None
            assert not agent_gone, agent.stderr.read() if agent.stderr else ""
            time.sleep(0.02)
        assert added.returncode == 0, added.stderr
        # The key file holds no comment: ssh-add names the key by its path.
        yield socket, str(tmp_path / "agent_key")
    finally:
        agent.terminate()
        agent.wait()


async def _agent_keys(
    rig: Rig, connection: str, agent_socket: Path
) -> asyncssh.SSHCompletedProcess:
    conn, _ = await asyncssh.create_connection(
        Agent,
        "127.0.0.1",
        rig.port,
        username=connection,
        password=TOKEN,
        known_hosts=None,
        config=None,
        agent_path=str(agent_socket),
        agent_forwarding=True,
        client_keys=None,
        preferred_auth="password",
    )
    async with conn:
        return await conn.run("ssh-add -l")


async def test_agent_forwarding_only_where_the_connection_allows_it(
    rig: Rig, ssh_agent: tuple[Path, str]
) -> None:
    socket, comment = ssh_agent
    refused = await _agent_keys(rig, "box", socket)
    assert refused.exit_status == 2  # ssh-add: no agent to talk to on the host
    assert comment not in str(refused.stdout)
    allowed = await _agent_keys(rig, "box-agent", socket)
    assert allowed.exit_status == 0, allowed.stderr
    assert comment in str(allowed.stdout)  # the agent's own agent, reached from the host


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"echo:" + await reader.readline())
    await writer.drain()
    writer.close()


async def test_a_connection_that_allows_forwarding_forwards_through_the_host(
    rig: Rig, host: Host
) -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    allowed, _ = await _connect(rig, "box-fwd")
    async with allowed, echo:
        # -L: opened by the upstream host; what answers is the sshd itself.
        reader, writer = await allowed.open_connection("127.0.0.1", host.sshd.port)
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-2.0-OpenSSH")
        writer.close()
        # -R: the host listens; a connection to it comes back to the agent.
        listener = await allowed.forward_remote_port("127.0.0.1", 0, "127.0.0.1", echo_port)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.read(), 5) == b"echo:ping\n"
        writer.close()
        listener.close()
    [(_, _, relay)] = await _reports(rig, 1)
    assert relay.bytes_from_client >= len(b"echo:ping\n")
    assert relay.bytes_to_client >= len(b"ping\n")


async def test_stock_ssh_forwards_from_a_port_the_host_picks(rig: Rig, tmp_path: Path) -> None:
    # ssh -R 0:...: the host picks the port, and OpenSSH's client accepts a
    # forwarded connection only if it names that port (asyncssh's client
    # would also take one naming port 0, so the stock ssh is the test).
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho {TOKEN}\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    env.pop("SSH_AUTH_SOCK", None)
    ssh = await asyncio.create_subprocess_exec(
        *("ssh", "-F", "none", "-p", str(rig.port), "-N", "-R", f"0:127.0.0.1:{echo_port}"),
        *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
        *("-o", "PubkeyAuthentication=no", "-o", "IdentityAgent=none"),
        *("-o", "ExitOnForwardFailure=yes", "box-fwd@127.0.0.1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert ssh.stderr is not None
    try:
        async with echo:
            allocated = None
            while allocated is None:
                line = await asyncio.wait_for(ssh.stderr.readline(), 15)
                assert line, "ssh ended before its forward was set up"
                allocated = re.search(rb"Allocated port (\d+) for remote forward", line)
            reader, writer = await asyncio.open_connection("127.0.0.1", int(allocated[1]))
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"echo:ping\n"
            writer.close()
    finally:
        ssh.terminate()
        await ssh.wait()


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("box", "forged", "jitgate: this grant is not valid"),
        ("box", "x" * 20_000, "jitgate: this grant is not valid"),
        ("box", "other", "jitgate: this grant is for another connection"),
        ("box", "revoked", "jitgate: this grant was revoked"),
        ("nowhere", TOKEN, "jitgate: no connection named 'nowhere'"),
    ],
)
async def test_refusals_say_why_in_a_banner_and_disconnect(
    rig: Rig, user: str, password: str, message: str
) -> None:
    reason, banners = await _refused(rig, user, password)
    assert reason == message
    assert [banner.strip() for banner in banners] == [message]
    assert rig.redeemed == []
    assert len(rig.registry) == 0


async def test_an_agent_that_stalls_before_login_is_dropped(host: Host, rig: Rig) -> None:
    quick = SshFrontend(
        gate=rig.frontend.gate,
        targets=rig.frontend.targets,
        host_key=host.proxy_host_key,
        listen="127.0.0.1:0",
        login_timeout=0.5,
    )
    address = await quick.start()
    try:
        reader, writer = await asyncio.open_connection(*address.split()[0].rsplit(":", 1))
        assert (await reader.readline()).startswith(b"SSH-2.0-")
        started = time.monotonic()
        writer.write(b"SSH-2.0-stalling\r\n")  # then nothing: no key exchange, no login
        await asyncio.wait_for(reader.read(), 5)  # up to EOF: the proxy closed it
        assert time.monotonic() - started < 2.0
        writer.close()
    finally:
        await quick.stop()
    assert rig.redeemed == []


async def test_the_core_down_fails_closed_without_internals(rig: Rig) -> None:
    rig.core_down = True
    reason, banners = await _refused(rig)
    assert reason == "jitgate: cannot redeem grants right now; retry"
    assert "10.0.0.7" not in reason + "".join(banners)


@pytest.mark.parametrize("connection", ["box-impostor", "box-down"])
async def test_an_upstream_it_cannot_trust_or_reach_is_refused_and_reported(
    rig: Rig, connection: str
) -> None:
    reason, banners = await _refused(rig, connection)
    assert reason == f"jitgate: cannot reach {connection}"
    assert [banner.strip() for banner in banners] == [reason]
    # Redeemed, so its end is on the record too.
    [(_, session_id, relay)] = await _reports(rig, 1)
    assert session_id == rig.redeemed[0]
    assert relay.reason == "error"
    assert len(rig.registry) == 0


async def _revoked_session(rig: Rig, end: str) -> tuple[str, float, asyncssh.SSHClientProcess]:
    conn, _ = await _connect(rig)
    process = await conn.create_process("echo started; sleep 30", stderr=asyncssh.STDOUT)
    assert (await asyncio.wait_for(process.stdout.readline(), 5)) == "started\n"
    started = time.monotonic()
    if end == "revoked":
        assert rig.registry.revoke(GRANT_ID) == 1
    await asyncio.wait_for(process.wait_closed(), 5)
    took = time.monotonic() - started
    output = await process.stdout.read()
    await asyncio.wait_for(conn.wait_closed(), 5)
    return output, took, process


async def test_revocation_closes_the_channel_with_the_reason_within_a_second(rig: Rig) -> None:
    output, took, process = await _revoked_session(rig, "revoked")
    assert "jitgate: grant revoked" in output
    assert took < 1.0
    assert process.exit_status is None or process.exit_status != 0
    [(_, _, relay)] = await _reports(rig, 1)
    assert relay.reason == "revoked"
    assert relay.bytes_to_client == len("started\n")
    assert len(rig.registry) == 0


async def test_expiry_closes_the_channel_with_the_reason(rig: Rig) -> None:
    rig.ttl = 1.5
    output, _, _ = await _revoked_session(rig, "expired")
    assert "jitgate: grant expired" in output
    [(_, _, relay)] = await _reports(rig, 1)
    assert relay.reason == "expired"


async def test_the_upstream_key_reaches_no_agent_byte(
    rig: Rig, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    conn, agent = await _connect(rig)
    async with conn:
        done = await conn.run("echo hi; cat /nonexistent")
        server_key = conn.get_server_host_key()
    received = "".join([str(done.stdout), str(done.stderr), *agent.banners])
    received += server_key.export_public_key().decode() if server_key else ""
    private = host.client_key.read_text()
    body = "".join(private.strip().splitlines()[1:-1])
    assert "hi" in received
    assert body not in received
    assert body[:40] not in caplog.text
    # The proxy shows agents its own host key, not the host's or its client key.
    assert public_key(host.sshd.host_key) not in received


async def test_bad_keys_are_config_errors_that_never_show_the_key(
    host: Host, tmp_path: Path
) -> None:
    gate = Gate(
        check=None,  # type: ignore[arg-type]
        redeem=None,  # type: ignore[arg-type]
        report=None,  # type: ignore[arg-type]
        registry=Registry(),
    )
    garbled = "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END"
    with pytest.raises(ConfigError, match=r"connections\.box\.key_file") as bad:
        SshFrontend(
            gate=gate,
            targets={"box": _target(host, "box", private_key=garbled)},
            host_key=host.proxy_host_key,
            listen="127.0.0.1:0",
        )
    assert "c2VjcmV0" not in str(bad.value)
    missing = SshFrontend(
        gate=gate,
        targets={"box": _target(host, "box")},
        host_key=tmp_path / "absent",
        listen="127.0.0.1:0",
    )
    with pytest.raises(ConfigError, match="JITGATE_PROXY_SSH_HOST_KEY"):
        await missing.start()


# Limits -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _listener(rig: Rig, host: Host, **limits: int) -> AsyncIterator[int]:
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


async def _greeting(port: int, source: str = "127.0.0.1") -> tuple[bytes, asyncio.StreamWriter]:
    """Connect from source; return the proxy's first line (b"" if it closed at once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
    except ConnectionResetError:
        line = b""
    return line, writer


async def test_session_channels_past_the_cap_are_refused(
    rig: Rig, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    async with _listener(rig, host, max_sessions=2) as port:
        conn, _ = await _connect(rig, port=port)
        async with conn:
            first = await conn.create_process("cat")
            second = await conn.create_process("cat")
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.create_process("echo third")
            assert refused.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
            assert refused.value.reason == "jitgate: at most 2 sessions per connection"
            assert "session channel refused, 2 open, the limit" in caplog.text
            # A place comes back when a session closes.
            first.stdin.write_eof()
            await asyncio.wait_for(first.wait_closed(), 5)
            assert (await conn.run("echo third")).stdout == "third\n"
            second.stdin.write_eof()


async def test_forwarded_channels_past_the_cap_are_refused(
    rig: Rig, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    async with echo, _listener(rig, host, max_forwards=2) as port:
        conn, _ = await _connect(rig, "box-fwd", port=port)
        async with conn:
            listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", echo_port)
            opened = []
            for _ in range(2):
                reader, writer = await conn.open_connection("127.0.0.1", host.sshd.port)
                assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-2.0-")
                opened.append(writer)
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.open_connection("127.0.0.1", host.sshd.port)
            assert refused.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
            assert "forwarded channel refused, 2 open, the limit" in caplog.text
            # A connection to the host's listener (ssh -R) counts too: the
            # host's channel open is refused and the host closes it unanswered.
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
            writer.write(b"ping\n")
            with contextlib.suppress(ConnectionResetError):  # closed with "ping" unread
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            # A place comes back when a forwarded channel closes.
            opened[0].close()
            await asyncio.wait_for(opened[0].channel.wait_closed(), 5)
            reader, writer = await conn.open_connection("127.0.0.1", host.sshd.port)
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-2.0-")
            listener.close()


async def test_host_listeners_past_the_cap_are_refused(
    rig: Rig, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    async with echo, _listener(rig, host, max_listeners=2) as port:
        conn, _ = await _connect(rig, "box-fwd", port=port)
        async with conn:
            first = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", echo_port)
            second = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", echo_port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", echo_port)
            assert "host listener refused, 2 held, the limit" in caplog.text
            # A listener the host would not open gives its place back at once:
            # the second listener's own port is taken on the host.
            first.close()
            await first.wait_closed()
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port(
                    "127.0.0.1", second.get_port(), "127.0.0.1", echo_port
                )
            # Both places that closed (cancelled, refused by the host) came back.
            third = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", echo_port)
            reader, writer = await asyncio.open_connection("127.0.0.1", third.get_port())
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"echo:ping\n"
            writer.close()
            third.close()
            second.close()


async def test_logins_in_progress_past_the_cap_are_closed_at_accept(
    rig: Rig, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    writers: list[asyncio.StreamWriter] = []
    try:
        async with _listener(rig, host, max_startups=10, max_startups_per_source=1) as port:
            line, stalled = await _greeting(port)
            writers.append(stalled)
            assert line.startswith(b"SSH-2.0-")  # in progress: it never logs in
            line, same_source = await _greeting(port)
            writers.append(same_source)
            assert line == b""  # closed before the proxy's version line
            assert "logins in progress from 127.0.0.1, the limit" in caplog.text
            line, other_source = await _greeting(port, "127.0.0.2")
            writers.append(other_source)
            assert line.startswith(b"SSH-2.0-")
        async with _listener(rig, host, max_startups=1) as port:
            line, stalled = await _greeting(port)
            writers.append(stalled)
            assert line.startswith(b"SSH-2.0-")
            line, other_source = await _greeting(port, "127.0.0.2")
            writers.append(other_source)
            assert line == b""
            assert "1 logins in progress, the limit" in caplog.text
    finally:
        for writer in writers:
            writer.close()


async def test_a_finished_login_frees_its_place(rig: Rig, host: Host) -> None:
    async with _listener(rig, host, max_startups=1) as port:
        first, _ = await _connect(rig, port=port)
        second, _ = await _connect(rig, port=port)  # the first is in, no longer starting
        async with first, second:
            assert (await second.run("echo both")).stdout == "both\n"


async def test_agent_connections_past_the_cap_are_closed_at_accept(
    rig: Rig, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    async with _listener(rig, host, max_connections=1) as port:
        conn, _ = await _connect(rig, port=port)
        async with conn:
            line, writer = await _greeting(port, "127.0.0.2")
            writer.close()
            assert line == b""
            assert "1 agent connections open, the limit" in caplog.text


async def test_a_grant_past_its_cap_of_connections_is_refused_before_redemption(
    rig: Rig, host: Host
) -> None:
    async with _listener(rig, host, max_per_grant=1) as port:
        conn, _ = await _connect(rig, port=port)
        async with conn:
            reason, banners = await _refused(rig, port=port)
        assert reason == "jitgate: too many sessions on this grant (the limit is 1)"
        assert [banner.strip() for banner in banners] == [reason]
        assert len(rig.redeemed) == 1  # the refused login redeemed nothing
        await _reports(rig, 1)  # the first session is over and on the record
        again, _ = await _connect(rig, port=port)
        async with again:
            assert (await again.run("echo again")).stdout == "again\n"


MIB = 1024 * 1024


async def test_an_agent_can_queue_little_before_the_host_opens_its_channel(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, _ = await _connect(rig)
    opening, open_now = asyncio.Event(), asyncio.Event()
    create_session = asyncssh.SSHClientConnection.create_session

    async def held(self: asyncssh.SSHClientConnection, *args: Any, **kwargs: Any) -> Any:
        if self is not conn:  # the proxy's upstream connection, not this agent's
            opening.set()
            await open_now.wait()
        return await create_session(self, *args, **kwargs)

    monkeypatch.setattr(asyncssh.SSHClientConnection, "create_session", held)
    async with conn:
        process = await conn.create_process("wc -c", encoding=None)
        await asyncio.wait_for(opening.wait(), 5)
        # The proxy's window is all the agent may send (RFC 4254 section 5.2):
        # the rest stays in the agent's own buffer.
        process.stdin.write(b"x" * MIB)
        assert process.channel.get_write_buffer_size() >= MIB - PENDING_WINDOW
        open_now.set()
        process.stdin.write_eof()
        done = await asyncio.wait_for(process.wait(), 10)
        assert done.stdout == f"{MIB}\n".encode()
        # Once the host's channel is open, the window is the full one again.
        process = await conn.create_process(
            f"head -c {MIB} >/dev/null; echo taken; cat >/dev/null", encoding=None
        )
        process.stdin.write(b"x" * MIB)
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"taken\n"
        process.stdin.write(b"y" * (MIB // 2))
        assert process.channel.get_write_buffer_size() == 0
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), 10)


async def test_only_locale_and_terminal_variables_reach_the_host(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="jitgate.proxy.sshrelay")
    sent = {
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "COLORTERM": "truecolor",
        "JITGATE_PROBE": "leaked",
        "LD_LIBRARY_PATH": "/jitgate-probe",
    }
    conn, _ = await _connect(rig)
    async with conn:
        done = await conn.run("env", env=sent)
    seen = str(done.stdout).splitlines()
    assert {"LANG=C.UTF-8", "LC_TIME=C", "COLORTERM=truecolor"} <= set(seen)
    assert [line for line in seen if "probe" in line.lower() or "leaked" in line] == []
    assert "env b'JITGATE_PROBE' not passed on" in caplog.text
