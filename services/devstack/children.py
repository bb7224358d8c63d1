"""Child processes of the launcher that cannot outlive it.

No preexec_fn: the launcher runs gRPC threads, and code run between fork and
exec in a threaded parent can deadlock on a lock another thread held at the
fork (seen here as a launcher hung forever in Popen). Instead a jitgate child
arms PR_SET_PDEATHSIG itself as it starts (follow_parent), and redis-server is
started through util-linux's setpriv --pdeathsig where that exists.

PR_SET_PDEATHSIG fires when the thread that spawned the child exits, not only
the process: spawn from the thread that lives as long as the stack (the main
thread, as `up`, `demo` and the tests do).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

PARENT_ENV = "JITGATE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def follow_parent() -> None:
    """In a child started by spawn(): exit when the launcher exits, however it exits (Linux)."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit() or sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    # The parent may have died before the signal was armed.
    if os.getppid() != int(parent):
        sys.exit(1)


def binary_argv(argv: Sequence[str]) -> list[str]:
    """argv for a non-jitgate program, wrapped so that it dies with the launcher if possible."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or sys.platform != "linux":
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    account: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv with its output appended to log; as account (uid, gid) when given (root)."""
    child_env = {**(env if env is not None else os.environ), PARENT_ENV: str(os.getpid())}
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=account[0] if account else None,
            group=account[1] if account else None,
            extra_groups=[] if account else None,
        )


def stop(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """SIGTERM process and wait; SIGKILL it if it will not stop in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)  # a paused (SIGSTOP) process cannot handle SIGTERM
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
