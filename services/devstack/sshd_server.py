"""A real OpenSSH sshd on a loopback port: the SSH host behind the proxy in the demo and tests.

It runs as the current user in the foreground from a directory of its own,
with a fresh Ed25519 host key, public-key authentication only, and the one
client key it is given (the proxy's) in its authorized keys.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate.common.errors import ConfigError
from jitgate.devstack import children
from jitgate.devstack.redis_server import free_port

SSHD_PATHS = ("/usr/sbin/sshd",)
"""Where sshd lives when it is not on PATH (sbin is often not on a user's)."""
PRIVSEP_DIR = Path("/run/sshd")
"""Where Debian's sshd chroots its unprivileged child; as root it refuses to start without it."""


def sshd_binary() -> Path:
    """The sshd to run: on PATH, else /usr/sbin/sshd; a ConfigError naming `make tools` if none."""
    found = shutil.which("sshd")
    for candidate in (found, *SSHD_PATHS):
        if candidate and os.access(candidate, os.X_OK):
            # sshd re-executes itself and insists on an absolute path.
            return Path(candidate).resolve()
    raise ConfigError("no OpenSSH server (sshd) found: run `make tools` to install it")


def write_private(path: Path, data: bytes) -> None:
    """Write data to path, readable by this user only (sshd and ssh refuse keys others can read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def create_key(path: Path, comment: str) -> str:
    """Write a new Ed25519 key (OpenSSH, 0600) to path and path.pub; return the public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_private(path, private)
    line = f"{public.decode()} {comment}"
    path.with_name(path.name + ".pub").write_text(line + "\n")
    return line


def ensure_key(path: Path, comment: str) -> str:
    """The public line of the Ed25519 key at path, creating the key first if it is missing."""
    pub = path.with_name(path.name + ".pub")
    if path.exists() and pub.exists():
        return pub.read_text().strip()
    return create_key(path, comment)


def public_key(line: str) -> str:
    """The "type base64" of an OpenSSH public key line, without its comment."""
    return " ".join(line.split()[:2])


class DemoSshd:
    """An sshd of our own on 127.0.0.1: its config, host key and logs all under workdir."""

    def __init__(
        self, *, workdir: Path, authorized_key: str, port: int | None = None, timeout: float = 10.0
    ) -> None:
        """An sshd in workdir letting in only authorized_key, on port (else a free one)."""
        self.workdir = workdir.resolve()
        self.authorized_key = authorized_key
        """The one public key that may log in: the proxy's client key."""
        self.port = port or free_port()
        self.timeout = timeout
        self.user = getpass.getuser()
        """The account logged in to: the one sshd runs as (root in CI)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.host_key = ""
        """The host's public key ("ssh-ed25519 AAAA…"), for the proxy to pin."""

    @property
    def log(self) -> Path:
        """sshd's own log (-e: everything it would send to syslog)."""
        return self.workdir / "sshd.log"

    @property
    def config(self) -> Path:
        """The sshd_config written for this server."""
        return self.workdir / "sshd_config"

    def _write_config(self) -> None:
        """Write a fresh host key, the authorized key and sshd_config."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        host_key = self.workdir / "ssh_host_ed25519_key"
        self.host_key = public_key(create_key(host_key, "jitgate-demo-sshd"))
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(self.authorized_key.strip() + "\n")
        settings = {
            "Port": str(self.port),
            "ListenAddress": "127.0.0.1",
            "HostKey": str(host_key),
            "PidFile": str(self.workdir / "sshd.pid"),
            "AuthorizedKeysFile": str(authorized),
            # Only the proxy's key opens this host: no password can be guessed.
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "UsePAM": "no",
            # The files are ours under a temp directory whose parents sshd would judge.
            "StrictModes": "no",
            "PermitRootLogin": "prohibit-password",
            "AllowUsers": self.user,
            "X11Forwarding": "no",
            "PrintMotd": "no",
            "PrintLastLog": "no",
            "LogLevel": "VERBOSE",
            "Subsystem": "sftp internal-sftp",
        }
        self.config.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))

    def start(self) -> None:
        """Write the config and host key, start sshd, wait until it greets; stop it on failure."""
        binary = sshd_binary()
        self._write_config()
        if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
            # What the openssh-server package creates at boot; absent in a bare container.
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        checked = subprocess.run(
            [str(binary), "-t", "-f", str(self.config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if checked.returncode != 0:
            raise ConfigError(f"sshd refused its config: {checked.stderr.strip()}")
        self.process = children.spawn(
            children.binary_argv([str(binary), "-D", "-e", "-f", str(self.config)]), log=self.log
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Wait until sshd sends its version line; fail fast if it exited."""
        deadline = time.monotonic() + self.timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ConfigError(f"sshd exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as probe:
                    # RFC 4253 section 4.2: the server speaks first, with its version line.
                    if probe.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"sshd not ready after {self.timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines sshd logged."""
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM sshd and wait (its sessions' children get SIGHUP as it goes)."""
        if self.process is not None:
            children.stop(self.process, timeout=5.0)
            self.process = None

    def connections_toml(self, connection: str, key_file: Path) -> str:
        """A connections.toml table for this host, logging in with the key at key_file."""
        return (
            f"[connections.{connection}]\n"
            'kind = "ssh"\n'
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"user = {json.dumps(self.user)}\n"
            f"key_file = {json.dumps(str(key_file))}\n"
            f"host_key = {json.dumps(self.host_key)}\n"
        )

    def __enter__(self) -> DemoSshd:
        """Start; stop at the end of the with block."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop."""
        self.stop()
