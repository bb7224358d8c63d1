"""The real stack serving payments-staging from a test API server; an agent and its kubeconfig."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from jitgate.devstack.stack import Stack
from tests.kubeapi import KubeApi

CONNECTION = "payments-staging"
NAMESPACE = "payments"


@contextmanager
def serving(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: KubeApi,
    *,
    allow_exec: bool = False,
    allow_port_forward: bool = False,
) -> Iterator[Stack]:
    """The whole stack, its proxy serving payments-staging from upstream, stopped afterwards."""
    config = tmp_path_factory.mktemp("kube-connections")
    (config / "sa.token").write_text(upstream.token + "\n")
    allowed = "".join(
        f"{key} = true\n"
        for key, allow in (("allow_exec", allow_exec), ("allow_port_forward", allow_port_forward))
        if allow
    )
    (config / "connections.toml").write_text(
        f"[connections.{CONNECTION}]\n"
        'kind = "kubernetes"\n'
        f'server = "{upstream.url}"\n'
        f'namespace = "{NAMESPACE}"\n'
        'token_file = "sa.token"\n'
        f'ca_file = "{upstream.files.ca}"\n' + allowed
    )
    running = Stack(tmp_path_factory.mktemp("stack"), upstreams=config / "connections.toml")
    running.start()
    try:
        wait_listening(running)
        yield running
    finally:
        running.stop()


def wait_listening(stack: Stack, timeout: float = 15.0) -> None:
    """Wait until the proxy's Kubernetes listener accepts connections (it has no health check)."""
    deadline = time.monotonic() + timeout
    while True:
        assert stack.processes["proxy"].poll() is None, stack.log_tail("proxy")
        try:
            with socket.create_connection(("127.0.0.1", stack.ports["proxy-kube"]), timeout=0.5):
                return
        except OSError:
            assert time.monotonic() < deadline, stack.log_tail("proxy")
            time.sleep(0.05)


def jitgate(stack: Stack, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the jitgate CLI as deploy-bot's machine does, its home at home."""
    env = {
        **os.environ,
        **stack.client_env(),
        "JITGATE_HOME": str(home),
        "JITGATE_TOKEN": stack.token("deploy-bot"),
    }
    return subprocess.run(
        [sys.executable, "-m", "jitgate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Agent:
    """An agent's machine: its jitgate home, a fresh payments-staging grant, its kubeconfig."""

    def __init__(self, stack: Stack, home: Path, ttl: int = 120) -> None:
        self.stack = stack
        self.home = home
        requested = jitgate(
            stack, home, "grant", "request", CONNECTION, "--ttl", str(ttl), "--json"
        )
        assert requested.returncode == 0, requested.stderr
        self.grant: dict[str, Any] = json.loads(requested.stdout)
        self.kubeconfig = home / "kubeconfig"
        written = jitgate(
            stack, home, "grant", "kubeconfig", self.grant["grant_id"], "-o", str(self.kubeconfig)
        )
        assert written.returncode == 0, written.stderr
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "KUBECONFIG": str(self.kubeconfig),
        }
