"""The demo sshd: a real OpenSSH server that lets in one key and nothing else."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitgate.common.errors import ConfigError
from jitgate.devstack import sshd_server
from jitgate.devstack.sshd_server import DemoSshd, create_key, public_key
from jitgate.proxy import config


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the allowed key and a stranger's."""
    folder = tmp_path_factory.mktemp("keys")
    create_key(folder / "allowed", "allowed")
    create_key(folder / "stranger", "stranger")
    return folder


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Iterator[DemoSshd]:
    """One demo sshd for the module."""
    server = DemoSshd(
        workdir=tmp_path_factory.mktemp("sshd"),
        authorized_key=(keys / "allowed.pub").read_text(),
    )
    server.start()
    yield server
    server.stop()


def _ssh(
    sshd: DemoSshd, tmp_path: Path, *options: str, key: Path | None = None
) -> subprocess.CompletedProcess[str]:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n")
    argv = [
        "ssh",
        "-F",
        "none",
        "-p",
        str(sshd.port),
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        *(["-i", str(key)] if key else []),
        *options,
        f"{sshd.user}@127.0.0.1",
        "echo logged-in-as-$(whoami)",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_the_authorized_key_logs_in_and_the_host_key_is_pinned(
    sshd: DemoSshd, keys: Path, tmp_path: Path
) -> None:
    done = _ssh(sshd, tmp_path, key=keys / "allowed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"logged-in-as-{sshd.user}"
    assert sshd.host_key.startswith("ssh-ed25519 ")


def test_another_key_and_passwords_are_refused(sshd: DemoSshd, keys: Path, tmp_path: Path) -> None:
    stranger = _ssh(sshd, tmp_path, key=keys / "stranger")
    assert stranger.returncode == 255
    assert "Permission denied (publickey)" in stranger.stderr  # the only method offered


def test_its_connections_table_is_one_the_proxy_loads(sshd: DemoSshd, keys: Path) -> None:
    text = sshd.connections_toml("bastion-eu1", keys / "allowed")
    [target] = config.parse(text, base=keys).values()
    assert isinstance(target, config.SshTarget)
    assert (target.host, target.port, target.user) == ("127.0.0.1", sshd.port, sshd.user)
    assert target.host_key == sshd.host_key
    assert target.private_key == (keys / "allowed").read_text().rstrip("\n")
    assert not target.allow_agent_forwarding
    assert not target.allow_port_forwarding


def test_keys_are_private_and_public_lines_drop_the_comment(keys: Path) -> None:
    assert (keys / "allowed").stat().st_mode & 0o777 == 0o600
    line = (keys / "allowed.pub").read_text().strip()
    assert line.endswith(" allowed")
    assert public_key(line) == " ".join(line.split()[:2])
    assert len(public_key(line).split()) == 2


def test_stop_ends_the_server(tmp_path: Path, keys: Path) -> None:
    server = DemoSshd(workdir=tmp_path / "sshd", authorized_key=(keys / "allowed.pub").read_text())
    server.start()
    process = server.process
    assert process is not None
    server.stop()
    assert process.poll() is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    assert "Server listening on 127.0.0.1" in server.log.read_text()


def test_without_sshd_the_error_names_make_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.devnull)
    monkeypatch.setattr(sshd_server, "SSHD_PATHS", ())
    with pytest.raises(ConfigError, match="make tools"):
        sshd_server.sshd_binary()


def test_the_stack_gives_the_proxy_its_ssh_keys_and_agents_a_known_hosts(tmp_path: Path) -> None:
    from jitgate.devstack.stack import Stack

    stack = Stack(tmp_path, redis_url="redis://127.0.0.1:1/0")
    stack.redis_users = {"proxy": "redis://127.0.0.1:1/0"}
    stack._prepare_ssh()
    host_line = (tmp_path / "ssh" / "proxy_host_ed25519.pub").read_text()
    port = stack.ports["proxy-ssh"]
    assert stack.agent_known_hosts.read_text() == f"[127.0.0.1]:{port} {public_key(host_line)}\n"
    assert stack._env("proxy")["JITGATE_PROXY_SSH_HOST_KEY"] == str(stack.proxy_ssh_host_key)
    for key in (stack.proxy_ssh_host_key, stack.proxy_ssh_client_key):
        assert key.stat().st_mode & 0o777 == 0o600
    # Made once: a restarted stack keeps the keys agents and hosts already know.
    stack._prepare_ssh()
    assert (tmp_path / "ssh" / "proxy_host_ed25519.pub").read_text() == host_line


def test_given_connections_start_no_demo_sshd(tmp_path: Path) -> None:
    from jitgate.devstack.stack import Stack

    given = tmp_path / "connections.toml"
    stack = Stack(tmp_path / "state", upstreams=given)
    stack._start_sshd()
    assert stack.sshd is None
    assert not given.exists()
