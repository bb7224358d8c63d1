"""The SSH front end against a real OpenSSH sshd: agents see only their grant, never the key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from jitgate.common.errors import ConfigError
from jitgate.devstack.sshd_server import public_key
from jitgate.proxy.gate import Gate
from jitgate.proxy.session import Registry
from jitgate.proxy.ssh import SshFrontend
from jitgate.proxy.sshrelay import PENDING_WINDOW
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


async def test_exec_relays_output_stderr_and_the_exit_status(
    rig: ssh_rig.Rig, host: ssh_rig.Host
) -> None:
    conn, _ = await ssh_rig.connect(rig)
    async with conn:
        done = await conn.run("echo out; whoami; echo err >&2; cat; exit 7", input="from-stdin\n")
    assert done.exit_status == 7
    assert done.stdout == f"out\n{host.sshd.user}\nfrom-stdin\n"
    assert done.stderr == "err\n"
    [(redeemed, session_id, relay)] = await ssh_rig.reports(rig, 1)
    assert session_id == rig.redeemed[0]
    assert redeemed.grant_id == ssh_rig.GRANT_ID
    assert relay.reason == "client_closed"
    assert relay.bytes_from_client == len("from-stdin\n")
    assert relay.bytes_to_client == len(done.stdout) + len(done.stderr)


async def test_a_signal_that_killed_the_command_reaches_the_agent(rig: ssh_rig.Rig) -> None:
    conn, _ = await ssh_rig.connect(rig)
    async with conn:
        done = await conn.run("kill -TERM $$")
    assert done.exit_signal is not None
    assert done.exit_signal[0] == "TERM"


async def test_a_pty_shell_gets_its_terminal_and_window_changes(rig: ssh_rig.Rig) -> None:
    conn, _ = await ssh_rig.connect(rig)
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


async def test_sftp_is_relayed(rig: ssh_rig.Rig, tmp_path: Path) -> None:
    target = tmp_path / "via-sftp.txt"
    conn, _ = await ssh_rig.connect(rig)
    async with conn, conn.start_sftp_client() as sftp:
        async with sftp.open(str(target), "w") as out:
            await out.write("written through the proxy\n")
        assert target.name in await sftp.listdir(str(tmp_path))
        async with sftp.open(str(target)) as back:
            assert await back.read() == "written through the proxy\n"
    assert target.read_text() == "written through the proxy\n"


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("box", "forged", "jitgate: this grant is not valid"),
        ("box", "x" * 20_000, "jitgate: this grant is not valid"),
        ("box", "other", "jitgate: this grant is for another connection"),
        ("box", "revoked", "jitgate: this grant was revoked"),
        ("nowhere", ssh_rig.TOKEN, "jitgate: no connection named 'nowhere'"),
    ],
)
async def test_refusals_say_why_in_a_banner_and_disconnect(
    rig: ssh_rig.Rig, user: str, password: str, message: str
) -> None:
    reason, banners = await ssh_rig.refused(rig, user, password)
    assert reason == message
    assert [banner.strip() for banner in banners] == [message]
    assert rig.redeemed == []
    assert len(rig.registry) == 0


async def test_an_agent_that_stalls_before_login_is_dropped(
    host: ssh_rig.Host, rig: ssh_rig.Rig
) -> None:
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


async def test_the_core_down_fails_closed_without_internals(rig: ssh_rig.Rig) -> None:
    rig.core_down = True
    reason, banners = await ssh_rig.refused(rig)
    assert reason == "jitgate: cannot redeem grants right now; retry"
    assert "10.0.0.7" not in reason + "".join(banners)


@pytest.mark.parametrize("connection", ["box-impostor", "box-down"])
async def test_an_upstream_it_cannot_trust_or_reach_is_refused_and_reported(
    rig: ssh_rig.Rig, connection: str
) -> None:
    reason, banners = await ssh_rig.refused(rig, connection)
    assert reason == f"jitgate: cannot reach {connection}"
    assert [banner.strip() for banner in banners] == [reason]
    # Redeemed, so its end is on the record too.
    [(_, session_id, relay)] = await ssh_rig.reports(rig, 1)
    assert session_id == rig.redeemed[0]
    assert relay.reason == "error"
    assert len(rig.registry) == 0


async def _revoked_session(
    rig: ssh_rig.Rig, end: str
) -> tuple[str, float, asyncssh.SSHClientProcess]:
    conn, _ = await ssh_rig.connect(rig)
    process = await conn.create_process("echo started; sleep 30", stderr=asyncssh.STDOUT)
    assert (await asyncio.wait_for(process.stdout.readline(), 5)) == "started\n"
    started = time.monotonic()
    if end == "revoked":
        assert rig.registry.revoke(ssh_rig.GRANT_ID) == 1
    await asyncio.wait_for(process.wait_closed(), 5)
    took = time.monotonic() - started
    output = await process.stdout.read()
    await asyncio.wait_for(conn.wait_closed(), 5)
    return output, took, process


async def test_revocation_closes_the_channel_with_the_reason_within_a_second(
    rig: ssh_rig.Rig,
) -> None:
    output, took, process = await _revoked_session(rig, "revoked")
    assert "jitgate: grant revoked" in output
    assert took < 1.0
    assert process.exit_status is None or process.exit_status != 0
    [(_, _, relay)] = await ssh_rig.reports(rig, 1)
    assert relay.reason == "revoked"
    assert relay.bytes_to_client == len("started\n")
    assert len(rig.registry) == 0


async def test_expiry_closes_the_channel_with_the_reason(rig: ssh_rig.Rig) -> None:
    rig.ttl = 1.5
    output, _, _ = await _revoked_session(rig, "expired")
    assert "jitgate: grant expired" in output
    [(_, _, relay)] = await ssh_rig.reports(rig, 1)
    assert relay.reason == "expired"


async def test_the_upstream_key_reaches_no_agent_byte(
    rig: ssh_rig.Rig, host: ssh_rig.Host, caplog: pytest.LogCaptureFixture
) -> None:
    conn, agent = await ssh_rig.connect(rig)
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
    host: ssh_rig.Host, tmp_path: Path
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
            targets={"box": ssh_rig.target(host, "box", private_key=garbled)},
            host_key=host.proxy_host_key,
            listen="127.0.0.1:0",
        )
    assert "c2VjcmV0" not in str(bad.value)
    missing = SshFrontend(
        gate=gate,
        targets={"box": ssh_rig.target(host, "box")},
        host_key=tmp_path / "absent",
        listen="127.0.0.1:0",
    )
    with pytest.raises(ConfigError, match="JITGATE_PROXY_SSH_HOST_KEY"):
        await missing.start()


# Limits -----------------------------------------------------------------------


async def _greeting(port: int, source: str = "127.0.0.1") -> tuple[bytes, asyncio.StreamWriter]:
    """Connect from source; return the proxy's first line (b"" if it closed at once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
    except ConnectionResetError:
        line = b""
    return line, writer


async def test_session_channels_past_the_cap_are_refused(
    rig: ssh_rig.Rig, host: ssh_rig.Host, caplog: pytest.LogCaptureFixture
) -> None:
    async with ssh_rig.listener(rig, host, max_sessions=2) as port:
        conn, _ = await ssh_rig.connect(rig, port=port)
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


async def test_logins_in_progress_past_the_cap_are_closed_at_accept(
    rig: ssh_rig.Rig, host: ssh_rig.Host, caplog: pytest.LogCaptureFixture
) -> None:
    writers: list[asyncio.StreamWriter] = []
    try:
        async with ssh_rig.listener(rig, host, max_startups=10, max_startups_per_source=1) as port:
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
        async with ssh_rig.listener(rig, host, max_startups=1) as port:
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


async def test_a_finished_login_frees_its_place(rig: ssh_rig.Rig, host: ssh_rig.Host) -> None:
    async with ssh_rig.listener(rig, host, max_startups=1) as port:
        first, _ = await ssh_rig.connect(rig, port=port)
        second, _ = await ssh_rig.connect(rig, port=port)  # the first is in, no longer starting
        async with first, second:
            assert (await second.run("echo both")).stdout == "both\n"


async def test_agent_connections_past_the_cap_are_closed_at_accept(
    rig: ssh_rig.Rig, host: ssh_rig.Host, caplog: pytest.LogCaptureFixture
) -> None:
    async with ssh_rig.listener(rig, host, max_connections=1) as port:
        conn, _ = await ssh_rig.connect(rig, port=port)
        async with conn:
            line, writer = await _greeting(port, "127.0.0.2")
            writer.close()
            assert line == b""
            assert "1 agent connections open, the limit" in caplog.text


async def test_a_grant_past_its_cap_of_connections_is_refused_before_redemption(
    rig: ssh_rig.Rig, host: ssh_rig.Host
) -> None:
    async with ssh_rig.listener(rig, host, max_per_grant=1) as port:
        conn, _ = await ssh_rig.connect(rig, port=port)
        async with conn:
            reason, banners = await ssh_rig.refused(rig, port=port)
        assert reason == "jitgate: too many sessions on this grant (the limit is 1)"
        assert [banner.strip() for banner in banners] == [reason]
        assert len(rig.redeemed) == 1  # the refused login redeemed nothing
        await ssh_rig.reports(rig, 1)  # the first session is over and on the record
        again, _ = await ssh_rig.connect(rig, port=port)
        async with again:
            assert (await again.run("echo again")).stdout == "again\n"


MIB = 1024 * 1024


async def test_an_agent_can_queue_little_before_the_host_opens_its_channel(
    rig: ssh_rig.Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, _ = await ssh_rig.connect(rig)
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
    rig: ssh_rig.Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="jitgate.proxy.sshrelay")
    sent = {
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "COLORTERM": "truecolor",
        "JITGATE_PROBE": "leaked",
        "LD_LIBRARY_PATH": "/jitgate-probe",
    }
    conn, _ = await ssh_rig.connect(rig)
    async with conn:
        done = await conn.run("env", env=sent)
    seen = str(done.stdout).splitlines()
    assert {"LANG=C.UTF-8", "LC_TIME=C", "COLORTERM=truecolor"} <= set(seen)
    assert [line for line in seen if "probe" in line.lower() or "leaked" in line] == []
    assert "env b'JITGATE_PROBE' not passed on" in caplog.text
