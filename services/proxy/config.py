"""connections.toml: where each connection really is, and the secret the proxy logs in with.

Read by the proxy only. Each `[connections.NAME]` table has a `kind`:
"postgres" (the default), "ssh" or "kubernetes". The secret (a password, an
SSH private key, a ServiceAccount token) is named by reference (a file or an
environment variable) and read at start-up; it lives in memory, never in a
log line, an error message, an audit record or anything an agent receives.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from jitgate.common import validate
from jitgate.common.errors import ConfigError, InvalidArgument
from jitgate.proxy.upstream import TLS_MODES, Target

KINDS = ("postgres", "ssh", "kubernetes")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1123 label
_HOST_KEY = re.compile(
    r"(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|rsa-sha2-(256|512)|ssh-rsa)"
    r" [A-Za-z0-9+/]+={0,2}( .*)?"
)


@dataclass(frozen=True, kw_only=True)
class Upstream(Target):
    """One PostgreSQL connection's real server and role (an upstream Target), by name."""

    name: str
    read_only: bool = False
    kind: str = "postgres"


@dataclass(frozen=True, kw_only=True)
class SshTarget:
    """One SSH host: where it is, the key the proxy logs in with, its pinned host key."""

    name: str
    host: str
    port: int
    user: str
    private_key: str = field(repr=False)
    """The OpenSSH private key, in memory only."""
    host_key: str
    """The upstream's public host key ("ssh-ed25519 AAAA…"); any other is refused."""
    allow_agent_forwarding: bool = False
    allow_port_forwarding: bool = False
    kind: str = "ssh"


@dataclass(frozen=True, kw_only=True)
class KubeTarget:
    """One Kubernetes namespace: the API server and the ServiceAccount token for it."""

    name: str
    server: str
    """The API server's https:// URL."""
    namespace: str
    token: str = field(repr=False)
    ca_file: str | None = None
    """The CA bundle for the API server's certificate; None means the system's."""
    allow_exec: bool = False
    """exec and attach into pods of the namespace."""
    allow_port_forward: bool = False
    kind: str = "kubernetes"


Connection = Upstream | SshTarget | KubeTarget
_C = TypeVar("_C", Upstream, SshTarget, KubeTarget)


def _string(table: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise ConfigError(f"{path}.{key}: required, a string")
    return value


def _secret(
    table: Mapping[str, Any], path: str, base: Path, what: str = "password", *, env_ok: bool = True
) -> str:
    file_key, env_key = f"{what}_file", f"{what}_env"
    file, env = table.get(file_key), table.get(env_key) if env_ok else None
    if env_ok and (file is None) == (env is None):
        raise ConfigError(f"{path}: set exactly one of {file_key}, {env_key}")
    if file is None and env is None:
        raise ConfigError(f"{path}.{file_key}: required, a path")
    if file is not None:
        if not isinstance(file, str):
            raise ConfigError(f"{path}.{file_key}: must be a path")
        where = (base / file).expanduser()
        try:
            secret = where.read_text().rstrip("\n")
        except OSError as exc:
            # The path is fine to name; the content never is.
            raise ConfigError(f"{path}.{file_key}: cannot read {where}: {exc.strerror}") from None
    else:
        if not isinstance(env, str) or not env:
            raise ConfigError(f"{path}.{env_key}: must name an environment variable")
        secret = os.environ.get(env, "")
    if not secret:
        raise ConfigError(f"{path}: the {what.replace('_', ' ')} is empty")
    return secret


def _no_extra(table: Mapping[str, Any], path: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{path}.{key}: unknown key; expected one of {', '.join(sorted(known))}"
            )


def _flag(table: Mapping[str, Any], key: str, path: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}: must be true or false")
    return value


def _port(table: Mapping[str, Any], path: str, default: int) -> int:
    port = table.get("port", default)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{path}.port: must be 1 to 65535")
    return port


def _ssh(name: str, table: Mapping[str, Any], base: Path, path: str) -> SshTarget:
    _no_extra(
        table,
        path,
        {
            "kind",
            "host",
            "port",
            "user",
            "key_file",
            "host_key",
            "allow_agent_forwarding",
            "allow_port_forwarding",
        },
    )
    host_key = _string(table, "host_key", path).strip()
    # Pinned, never learned on first use: a proxy that trusted whatever answered
    # would hand the agent's session to anyone who can redirect the connection.
    if not _HOST_KEY.fullmatch(host_key):
        raise ConfigError(f"{path}.host_key: must be an OpenSSH public key, e.g. ssh-ed25519 AAAA…")
    return SshTarget(
        name=name,
        host=_string(table, "host", path),
        port=_port(table, path, 22),
        user=_string(table, "user", path),
        private_key=_secret(table, path, base, "key", env_ok=False),
        host_key=host_key,
        allow_agent_forwarding=_flag(table, "allow_agent_forwarding", path),
        allow_port_forwarding=_flag(table, "allow_port_forwarding", path),
    )


# RFC 6750 §2.1 b64token: all a Bearer credential may be. Anything else (a
# space, a CR left by an editor) would make an Authorization header that h11
# refuses to send, and its error quotes the header, token and all.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A path prefix of the API server URL (kube.py puts it before every request
# path): plain segments only, nothing a server could decode or resolve.
_SERVER_PATH = re.compile(r"(/[A-Za-z0-9\-_~][A-Za-z0-9\-._~]*)*")


def _server(table: Mapping[str, Any], path: str) -> str:
    """The API server URL: https, a host, a valid port if any, no userinfo, query or fragment."""
    raw = _string(table, "server", path).rstrip("/")
    where = f"{path}.server"
    try:
        url = urlsplit(raw)
        port = url.port  # ValueError if not a number in 0-65535
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL (its port?)") from None
    if url.scheme != "https" or not url.hostname:
        raise ConfigError(f"{where}: must be an https:// URL with a host")
    if port == 0 or url.netloc.endswith(":"):
        raise ConfigError(f"{where}: the port must be 1 to 65535")
    if "@" in url.netloc:
        # The proxy's credential is the token; a password in a URL ends up in logs.
        raise ConfigError(f"{where}: no user or password in the URL; use token_file or token_env")
    if "?" in raw or "#" in raw:
        raise ConfigError(f"{where}: no query or fragment")
    if not _SERVER_PATH.fullmatch(url.path):
        raise ConfigError(f"{where}: the path prefix must be plain segments (no %, '.' or '..')")
    return raw


def _kubernetes(name: str, table: Mapping[str, Any], base: Path, path: str) -> KubeTarget:
    """One [connections.NAME] table of kind "kubernetes": its server, namespace and token."""
    _no_extra(
        table,
        path,
        {
            "kind",
            "server",
            "namespace",
            "token_file",
            "token_env",
            "ca_file",
            "allow_exec",
            "allow_port_forward",
        },
    )
    server = _server(table, path)
    namespace = _string(table, "namespace", path)
    if not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(f"{path}.namespace: must be a DNS-1123 label (RFC 1123)")
    ca_file = _string(table, "ca_file", path, "")
    # Stripped whole (a file may end in CRLF or a space), then checked; the
    # error names the key, never the value.
    token = _secret(table, path, base, "token").strip()
    if not _B64TOKEN.fullmatch(token):
        key = "token_file" if "token_file" in table else "token_env"
        raise ConfigError(
            f"{path}.{key}: the token must be RFC 6750 bearer characters"
            " (A-Z a-z 0-9 - . _ ~ + / and trailing =)"
        )
    return KubeTarget(
        name=name,
        server=server,
        namespace=namespace,
        token=token,
        ca_file=str((base / ca_file).expanduser()) if ca_file else None,
        allow_exec=_flag(table, "allow_exec", path),
        allow_port_forward=_flag(table, "allow_port_forward", path),
    )


def _connection(name: str, table: Any, base: Path) -> Connection:
    path = f"connections.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: must be a table")
    try:
        validate.connection_name(name)
    except InvalidArgument as exc:
        raise ConfigError(f"{path}: the name {exc.description}") from None
    kind = table.get("kind", "postgres")
    if kind == "ssh":
        return _ssh(name, table, base, path)
    if kind == "kubernetes":
        return _kubernetes(name, table, base, path)
    if kind != "postgres":
        raise ConfigError(f"{path}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    return _upstream(name, table, base, path)


def _upstream(name: str, table: Mapping[str, Any], base: Path, path: str) -> Upstream:
    known = {
        "kind",
        "host",
        "port",
        "socket_dir",
        "database",
        "user",
        "password_file",
        "password_env",
        "tls",
        "ca_file",
        "read_only",
    }
    _no_extra(table, path, known)
    host, socket_dir = table.get("host", ""), table.get("socket_dir", "")
    if (
        bool(host) == bool(socket_dir)
        or not isinstance(host, str)
        or not isinstance(socket_dir, str)
    ):
        raise ConfigError(f"{path}: set exactly one of host, socket_dir")
    port = _port(table, path, 5432)
    tls = _string(table, "tls", path, "disable")
    if tls not in TLS_MODES:
        raise ConfigError(f"{path}.tls: {tls!r} is not one of {', '.join(TLS_MODES)}")
    if socket_dir and tls != "disable":
        raise ConfigError(f"{path}.tls: a Unix socket does not use TLS")
    read_only = _flag(table, "read_only", path)
    return Upstream(
        name=name,
        database=_string(table, "database", path),
        user=_string(table, "user", path),
        password=_secret(table, path, base),
        host=host,
        port=port,
        socket_dir=socket_dir,
        tls=tls,
        ca_file=_string(table, "ca_file", path, "") or None,
        read_only=read_only,
    )


def parse(data: str, *, base: Path, source: str = "connections") -> dict[str, Connection]:
    """Return the connections in data (TOML) by name; relative paths are relative to base."""
    try:
        document = tomllib.loads(data)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    if set(document) - {"connections"}:
        raise ConfigError(f"{source}: only [connections.NAME] tables belong here")
    tables = document.get("connections", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: connections must be tables")
    return {name: _connection(name, table, base) for name, table in tables.items()}


def load(path: Path) -> dict[str, Connection]:
    """Parse the connections file at path."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(text, base=path.parent, source=str(path))


def of_kind(connections: Mapping[str, Connection], kind: type[_C]) -> dict[str, _C]:
    """The connections of one kind, by name."""
    return {name: c for name, c in connections.items() if isinstance(c, kind)}
