"""Port forwarding through the SSH front end (-L, -R, -D): only where allowed, capped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.proxy import ssh_rig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ssh_rig.Host]:
    """A real sshd for this module's tests."""
    with ssh_rig.running_host(tmp_path_factory) as running:
        yield running


@pytest.fixture
async def rig(host: ssh_rig.Host, tmp_path: Path) -> AsyncIterator[ssh_rig.Rig]:
    """The SSH front end in front of it."""
    async with ssh_rig.running_rig(host, tmp_path) as running:
        yield running


async def test_forwarding_is_refused_unless_the_connection_allows_it(
    rig: ssh_rig.Rig, host: ssh_rig.Host
) -> None:
    conn, _ = await ssh_rig.connect(rig)
    async with conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", host.sshd.port)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 1)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process("true", x11_forwarding=True, x11_display="127.0.0.1:0")
    [(_, _, relay)] = await ssh_rig.reports(rig, 1)
    assert relay.bytes_to_client == 0  # nothing was relayed


async def test_a_connection_that_allows_forwarding_forwards_through_the_host(
    rig: ssh_rig.Rig, host: ssh_rig.Host
) -> None:
    echo = await asyncio.start_server(ssh_rig.echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    allowed, _ = await ssh_rig.connect(rig, "box-fwd")
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
    [(_, _, relay)] = await ssh_rig.reports(rig, 1)
    assert relay.bytes_from_client >= len(b"echo:ping\n")
    assert relay.bytes_to_client >= len(b"ping\n")


async def test_stock_ssh_forwards_from_a_port_the_host_picks(
    rig: ssh_rig.Rig, tmp_path: Path
) -> None:
    # ssh -R 0:...: the host picks the port, and OpenSSH's client accepts a
    # forwarded connection only if it names that port (asyncssh's client
    # would also take one naming port 0, so the stock ssh is the test).
    echo = await asyncio.start_server(ssh_rig.echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho {ssh_rig.TOKEN}\n")
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


async def test_forwarded_channels_past_the_cap_are_refused(
    rig: ssh_rig.Rig, host: ssh_rig.Host, caplog: pytest.LogCaptureFixture
) -> None:
    echo = await asyncio.start_server(ssh_rig.echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    async with echo, ssh_rig.listener(rig, host, max_forwards=2) as port:
        conn, _ = await ssh_rig.connect(rig, "box-fwd", port=port)
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
    rig: ssh_rig.Rig, host: ssh_rig.Host, caplog: pytest.LogCaptureFixture
) -> None:
    echo = await asyncio.start_server(ssh_rig.echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    async with echo, ssh_rig.listener(rig, host, max_listeners=2) as port:
        conn, _ = await ssh_rig.connect(rig, "box-fwd", port=port)
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
