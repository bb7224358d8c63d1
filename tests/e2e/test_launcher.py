"""`jitgate up` and `jitgate demo` as a user runs them: real processes, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from jitgate.devstack.redis_server import RedisServer, free_port

pytestmark = pytest.mark.e2e


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose command line or environment mention text."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(cmdline)
    return found


def _children(pid: int) -> set[int]:
    """The live child processes of pid."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (after the parenthesised command name) is the parent pid.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_demo_walks_the_whole_path_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "jitgate", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for expected in (
        "ALLOWED  grant",
        "FROM orders -> 7, 1571449",
        "INSERT -> REFUSED 25006",
        "DENIED   NO_BINDING",
        "REJECTED UNAUTHENTICATED",
        "the operator's view (jitgate grant live): [",
        "… deploy-bot until",
        "live grants now: []",
        "next query fails: 'jitgate: grant revoked'",
        "SSH key never left the proxy",
        '"redemption": 2, "revocation": 2, "session_closed": 2',
        "checkpoints valid, 10/10 records valid",
    ):
        assert expected in out, out
    assert _processes_mentioning(str(tmp_path)) == []


def test_demo_on_a_given_redis(tmp_path: Path) -> None:
    given = RedisServer(workdir=tmp_path / "redis", port=free_port())
    given.start()
    try:
        env = {**os.environ, "TMPDIR": str(tmp_path), "REDIS_URL": given.url("admin")}
        done = subprocess.run(
            [sys.executable, "-m", "jitgate", "demo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        users = redis.Redis.from_url(given.url("admin")).acl_users()
        assert {"jitgate-issuer", "jitgate-policy", "jitgate-proxy"} <= set(users)
    finally:
        given.stop()


def test_up_serves_until_sigterm_then_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-m", "jitgate", "up", "--random-ports", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops everything" in line or not line:
                break
        assert any("jitgate is up" in line for line in lines), "".join(lines)
        children = _children(up.pid)
        assert len(children) == 9  # redis, postgres, sshd, the dev IdP, four services, the proxy
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
    finally:
        if up.poll() is None:
            up.kill()
    assert [pid for pid in children if _alive(pid)] == []
