"""Agent forwarding through the SSH front end: the agent's own ssh-agent, only where allowed."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest

from jitgate.devstack.sshd_server import create_key
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
    rig: ssh_rig.Rig, connection: str, agent_socket: Path
) -> asyncssh.SSHCompletedProcess:
    conn, _ = await ssh_rig.log_in(
        rig,
        ssh_rig.Agent,
        connection,
        ssh_rig.TOKEN,
        None,
        agent_path=str(agent_socket),
        agent_forwarding=True,
    )
    async with conn:
        return await conn.run("ssh-add -l")


async def test_agent_forwarding_only_where_the_connection_allows_it(
    rig: ssh_rig.Rig, ssh_agent: tuple[Path, str]
) -> None:
    socket, comment = ssh_agent
    refused = await _agent_keys(rig, "box", socket)
    assert refused.exit_status == 2  # ssh-add: no agent to talk to on the host
    assert comment not in str(refused.stdout)
    allowed = await _agent_keys(rig, "box-agent", socket)
    assert allowed.exit_status == 0, allowed.stderr
    assert comment in str(allowed.stdout)  # the agent's own agent, reached from the host
