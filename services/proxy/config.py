"""connections.toml: where each connection really is, and the secret the proxy logs in with.

Read by the proxy only. The secret is named by reference (a file or an
environment variable) and read at start-up; it lives in memory, never in a
log line, an error message, an audit record or anything an agent receives.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jitgate.common import validate
from jitgate.common.errors import ConfigError, InvalidArgument
from jitgate.proxy.upstream import TLS_MODES, Target


@dataclass(frozen=True, kw_only=True)
class Upstream(Target):
    """One connection's real server and role (an upstream Target), by name."""

    name: str
    read_only: bool = False


def _string(table: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise ConfigError(f"{path}.{key}: required, a string")
    return value


def _secret(table: Mapping[str, Any], path: str, base: Path) -> str:
    file, env = table.get("password_file"), table.get("password_env")
    if (file is None) == (env is None):
        raise ConfigError(f"{path}: set exactly one of password_file, password_env")
    if file is not None:
        if not isinstance(file, str):
            raise ConfigError(f"{path}.password_file: must be a path")
        where = (base / file).expanduser()
        try:
            secret = where.read_text().rstrip("\n")
        except OSError as exc:
            # The path is fine to name; the content never is.
            raise ConfigError(
                f"{path}.password_file: cannot read {where}: {exc.strerror}"
            ) from None
    else:
        if not isinstance(env, str) or not env:
            raise ConfigError(f"{path}.password_env: must name an environment variable")
        secret = os.environ.get(env, "")
    if not secret:
        raise ConfigError(f"{path}: the password is empty")
    return secret


def _upstream(name: str, table: Any, base: Path) -> Upstream:
    path = f"connections.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: must be a table")
    try:
        validate.connection_name(name)
    except InvalidArgument as exc:
        raise ConfigError(f"{path}: the name {exc.description}") from None
    known = {
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
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{path}.{key}: unknown key; expected one of {', '.join(sorted(known))}"
            )
    host, socket_dir = table.get("host", ""), table.get("socket_dir", "")
    if (
        bool(host) == bool(socket_dir)
        or not isinstance(host, str)
        or not isinstance(socket_dir, str)
    ):
        raise ConfigError(f"{path}: set exactly one of host, socket_dir")
    port = table.get("port", 5432)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{path}.port: must be 1 to 65535")
    tls = _string(table, "tls", path, "disable")
    if tls not in TLS_MODES:
        raise ConfigError(f"{path}.tls: {tls!r} is not one of {', '.join(TLS_MODES)}")
    if socket_dir and tls != "disable":
        raise ConfigError(f"{path}.tls: a Unix socket does not use TLS")
    read_only = table.get("read_only", False)
    if not isinstance(read_only, bool):
        raise ConfigError(f"{path}.read_only: must be true or false")
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


def parse(data: str, *, base: Path, source: str = "connections") -> dict[str, Upstream]:
    """Return the upstreams in data (TOML); relative paths are relative to base."""
    try:
        document = tomllib.loads(data)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    if set(document) - {"connections"}:
        raise ConfigError(f"{source}: only [connections.NAME] tables belong here")
    tables = document.get("connections", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: connections must be tables")
    return {name: _upstream(name, table, base) for name, table in tables.items()}


def load(path: Path) -> dict[str, Upstream]:
    """Parse the connections file at path."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(text, base=path.parent, source=str(path))
