"""Child processes of the launcher that cannot outlive it."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
try:
    # Loaded once here: between fork and exec the child must not dlopen.
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, however it dies (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _preexec() -> Callable[[], None] | None:
    return _die_with_parent if sys.platform == "linux" else None


def spawn(
    argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start argv with its output appended to log; it dies if the launcher dies."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_preexec(),
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
