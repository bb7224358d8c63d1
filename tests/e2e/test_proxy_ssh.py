"""The SSH proxy in the real stack: the stock ssh client, a grant as its password, a real sshd."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate import client as sdk
from jitgate.common import grants
from jitgate.devstack.stack import SSH_CONNECTION, SSH_CONNECTIONS, Stack
from jitgate.v1 import audit_pb2
from tests.e2e.conftest import audit_records, operator_revokes

pytestmark = pytest.mark.e2e

AGENT = "ops-bot"


def _agent(stack: Stack, name: str = AGENT) -> sdk.IssuerClient:
    return sdk.IssuerClient(stack.address("issuer"), token=stack.token(name), ca_file=stack.pki.ca)


@pytest.fixture
def grant(stack: Stack) -> Iterator[sdk.Grant]:
    """A live bastion-eu1 grant of ops-bot's, revoked afterwards."""
    with _agent(stack) as agent:
        granted = agent.request_grant(SSH_CONNECTION, ttl_seconds=120, reason="e2e ssh")
        yield granted
        if granted.grant_id in {g.grant_id for g in agent.list_grants()}:
            agent.revoke_grant(granted.grant_id, reason="test over")


def _ssh_argv(
    stack: Stack, user: str, askpass: Path, *options: str
) -> tuple[list[str], dict[str, str]]:
    """The stock ssh client as an agent runs it: no key of its own, the grant from SSH_ASKPASS."""
    argv = [
        "ssh",
        "-F",
        "none",
        "-p",
        str(stack.ports["proxy-ssh"]),
        "-o",
        f"UserKnownHostsFile={stack.agent_known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "IdentityAgent=none",
        "-o",
        "NumberOfPasswordPrompts=1",
        "-o",
        "ConnectTimeout=5",
        *options,
        f"{user}@127.0.0.1",
    ]
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    env.pop("SSH_AUTH_SOCK", None)
    return argv, env


def _askpass(tmp_path: Path, token: str) -> Path:
    """An SSH_ASKPASS program that answers the password prompt with token."""
    secret = tmp_path / "token"
    secret.write_text(token)
    secret.chmod(0o600)
    program = tmp_path / "askpass"
    program.write_text(f"#!/bin/sh\nexec cat {secret}\n")
    program.chmod(0o700)
    return program


def _ssh(
    stack: Stack,
    tmp_path: Path,
    token: str,
    *command: str,
    user: str = SSH_CONNECTION,
    options: tuple[str, ...] = (),
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    argv, env = _ssh_argv(stack, user, _askpass(tmp_path, token), *options)
    return subprocess.run(
        [*argv, *command],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_issuer_names_the_ssh_listener(stack: Stack, grant: sdk.Grant) -> None:
    assert grant.proxy_endpoint == stack.address("proxy-ssh")


def test_an_agent_runs_a_command_with_its_grant(
    stack: Stack, grant: sdk.Grant, tmp_path: Path
) -> None:
    done = _ssh(stack, tmp_path, grant.token, "echo via-jitgate; whoami; exit 5")
    assert done.returncode == 5, done.stderr
    assert stack.sshd is not None
    assert done.stdout == f"via-jitgate\n{stack.sshd.user}\n"


def test_an_agent_gets_an_interactive_shell(stack: Stack, grant: sdk.Grant, tmp_path: Path) -> None:
    done = _ssh(
        stack,
        tmp_path,
        grant.token,
        options=("-tt",),
        stdin="echo sum=$((20+22)); tty; exit 3\n",
    )
    assert done.returncode == 3, done.stderr
    assert "sum=42" in done.stdout  # computed remotely: the echoed input says 20+22
    assert "/dev/pts/" in done.stdout


def _refusal(stack: Stack, tmp_path: Path, token: str, user: str = SSH_CONNECTION) -> str:
    done = _ssh(stack, tmp_path, token, "echo should-not-run", user=user)
    assert done.returncode == 255
    assert "should-not-run" not in done.stdout
    return done.stderr


def test_grants_for_another_host_or_kind_are_refused(
    stack: Stack, grant: sdk.Grant, tmp_path: Path
) -> None:
    with _agent(stack, "deploy-bot") as other:
        database = other.request_grant("orders-replica", ttl_seconds=60, reason="e2e ssh")
        cluster = other.request_grant("payments-staging", ttl_seconds=60, reason="e2e ssh")
        try:
            for token in (database.token, cluster.token):
                assert "jitgate: this grant is for another connection" in _refusal(
                    stack, tmp_path, token
                )
        finally:
            other.revoke_grant(database.grant_id, reason="e2e ssh")
            other.revoke_grant(cluster.grant_id, reason="e2e ssh")
    # The SSH grant names bastion-eu1: no other name opens anything with it.
    refused = _refusal(stack, tmp_path, grant.token, user="orders-replica")
    assert "jitgate: no connection named 'orders-replica'" in refused
    assert "jitgate: this grant is not valid" in _refusal(stack, tmp_path, "not-a-grant")
    # Two SSH hosts behind one proxy (the same demo sshd): a grant for one is
    # refused as the other, each way, though both are kind "ssh".
    [other_host] = [name for name in SSH_CONNECTIONS if name != SSH_CONNECTION]
    with _agent(stack) as agent:
        us = agent.request_grant(other_host, ttl_seconds=60, reason="e2e ssh other host")
        try:
            for token, user in ((us.token, SSH_CONNECTION), (grant.token, other_host)):
                assert "jitgate: this grant is for another connection" in _refusal(
                    stack, tmp_path, token, user=user
                )
            done = _ssh(stack, tmp_path, us.token, "echo on-the-other-host", user=other_host)
            assert (done.returncode, done.stdout) == (0, "on-the-other-host\n"), done.stderr
        finally:
            agent.revoke_grant(us.grant_id, reason="e2e ssh")
    # The good grant still works: nothing above consumed or damaged it.
    assert _ssh(stack, tmp_path, grant.token, "true").returncode == 0


def test_an_expired_grant_is_refused(stack: Stack, tmp_path: Path) -> None:
    with _agent(stack) as agent:
        short = agent.request_grant(SSH_CONNECTION, ttl_seconds=1, reason="e2e ssh expiry")
    client = redis.Redis.from_url(stack.redis_url("admin"))
    try:
        # Wait for the grant's own end: its key leaves Redis when it expires.
        deadline = time.monotonic() + 10
        while client.exists(grants.grant_key(short.grant_id)) or time.time() < (
            short.expires_at.timestamp()
        ):
            assert time.monotonic() < deadline, "the grant outlived its TTL"
            time.sleep(0.05)
    finally:
        client.close()
    assert "jitgate: this grant has expired or is not live" in _refusal(
        stack, tmp_path, short.token
    )


def test_a_revoked_grant_is_refused(stack: Stack, grant: sdk.Grant, tmp_path: Path) -> None:
    with _agent(stack) as agent:
        agent.revoke_grant(grant.grant_id, reason="e2e ssh")
    assert "jitgate: this grant was revoked" in _refusal(stack, tmp_path, grant.token)


def _closed_records(stack: Stack, grant_id: str) -> list[audit_pb2.SessionClosed]:
    closed: list[audit_pb2.SessionClosed] = []
    for _ in range(100):  # the report follows the close
        closed = [
            r.event.session_closed
            for r in audit_records(stack)
            if r.event.session_closed.grant_id == grant_id
        ]
        if closed:
            break
        time.sleep(0.05)
    return closed


def test_the_operator_revoking_cuts_the_session_within_a_second(
    stack: Stack, grant: sdk.Grant, tmp_path: Path
) -> None:
    argv, env = _ssh_argv(stack, SSH_CONNECTION, _askpass(tmp_path, grant.token))
    with subprocess.Popen(
        [*argv, "echo started; sleep 60"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as session:
        try:
            assert session.stdout is not None
            assert session.stdout.readline() == "started\n"
            operator_revokes(stack, grant.grant_id, "incident 13")
            revoked_at = time.monotonic()
            session.wait(timeout=10)
            took = time.monotonic() - revoked_at
        finally:
            session.kill()
        stderr = session.stderr.read() if session.stderr else ""
    assert took < 1.0, f"the session outlived its revocation by {took:.2f}s"
    assert "jitgate: grant revoked" in stderr
    records = audit_records(stack)
    redeemed = [r.event.redemption for r in records if r.event.redemption.grant_id]
    mine = [r for r in redeemed if r.grant_id == grant.grant_id]
    assert [(r.subject, r.connection) for r in mine] == [(AGENT, SSH_CONNECTION)]
    closed = _closed_records(stack, grant.grant_id)
    assert [(c.session_id, c.reason) for c in closed] == [(mine[0].session_id, "revoked")]
    assert closed[0].bytes_to_client >= len("started\n")


def _secret_forms(key_file: Path) -> list[bytes]:
    """The proxy's private key as an agent might see it: PEM body, raw bytes in base64 and hex."""
    pem = key_file.read_bytes()
    body = b"".join(pem.strip().splitlines()[1:-1])
    key = serialization.load_ssh_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    forms = [
        body,
        base64.b64encode(raw).rstrip(b"="),
        raw.hex().encode(),
        raw.hex().upper().encode(),
    ]
    # Every PEM line on its own too, and a middle slice of the body, in case of re-wrapping.
    forms += [line for line in pem.splitlines()[1:-1] if len(line) > 16]
    forms.append(body[len(body) // 3 : len(body) // 3 + 24])
    return forms


async def test_the_upstream_key_reaches_no_agent_byte_and_no_log(
    stack: Stack, grant: sdk.Grant, tmp_path: Path
) -> None:
    received: list[bytes] = []
    for options, token, command in (
        (("-vvv",), grant.token, "echo hi; cat /nonexistent; env"),
        (("-vvv", "-tt"), grant.token, "echo tty"),
        (("-vvv",), "not-a-grant", "true"),
    ):
        done = _ssh(stack, tmp_path, token, command, options=options)
        received += [done.stdout.encode(), done.stderr.encode()]
    assert b"debug1:" in received[1]  # -vvv really logged the handshake
    banners: list[str] = []

    class Watching(asyncssh.SSHClient):
        def auth_banner_received(self, msg: str, lang: str) -> None:
            banners.append(msg)

    conn, _ = await asyncssh.create_connection(
        Watching,
        "127.0.0.1",
        stack.ports["proxy-ssh"],
        username=SSH_CONNECTION,
        password=grant.token,
        known_hosts=str(stack.agent_known_hosts),
        config=None,
        agent_path=None,
        client_keys=None,
    )
    async with conn:
        done = await conn.run("echo from-asyncssh; ls -la ~/.ssh 2>&1", encoding=None)
        host_key = conn.get_server_host_key()
        received += [
            bytes(done.stdout or b""),
            bytes(done.stderr or b""),
            str(conn.get_extra_info("server_version")).encode(),
            host_key.public_data if host_key else b"",
        ]
    received += [banner.encode() for banner in banners]
    everything = b"\n".join(received)
    assert b"from-asyncssh" in everything
    forms = _secret_forms(stack.proxy_ssh_client_key)
    assert [form for form in forms if form in everything] == []
    assert stack.sshd is not None
    logs = [*sorted(stack.logs.glob("*.log")), stack.sshd.log]
    leaked = [(path.name, form) for path in logs for form in forms if form in path.read_bytes()]
    assert leaked == []
    assert stack.proxy_ssh_client_key.stat().st_mode & 0o777 == 0o600
