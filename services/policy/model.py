"""The policy file, parsed strictly into frozen objects.

A binding names one group and one connection; there is no wildcard, so the
widest grant a binding can produce is one connection for max_ttl.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jitgate.common import validate
from jitgate.common.errors import ConfigError, InvalidArgument

KINDS = ("postgres", "ssh", "kubernetes")
DEFAULT_TTL_CEILING = 15 * 60
_DURATION = re.compile(r"([0-9]+)(s|m|h)?")  # ASCII digits only
_UNITS = {"s": 1, "m": 60, "h": 3600, None: 1}


@dataclass(frozen=True, kw_only=True)
class Connection:
    """One named thing an agent can be granted: a database, a host, a namespace."""

    name: str
    kind: str
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class Binding:
    """Members of group may have connection for at most max_ttl seconds."""

    group: str
    connection: str
    max_ttl: int


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Connections and the bindings that reach them; empty denies everything."""

    connections: Mapping[str, Connection]
    bindings: tuple[Binding, ...] = ()
    ttl_ceiling: int = DEFAULT_TTL_CEILING
    version: str = ""
    """SHA-256 of the file the policy was parsed from, recorded with every decision."""

    def bindings_for(self, connection: str) -> tuple[Binding, ...]:
        """Return the bindings naming connection, in file order."""
        return tuple(b for b in self.bindings if b.connection == connection)


class _Reader:
    """Reads a TOML table, naming the key path in every error."""

    def __init__(self, table: Mapping[str, Any], path: str) -> None:
        self.table = table
        self.path = path

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def no_extra(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                raise ConfigError(
                    f"{self._where(key)}: unknown key; expected one of {', '.join(sorted(allowed))}"
                )

    def string(self, key: str, *, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if value is None:
            raise ConfigError(f"{self._where(key)}: required")
        if not isinstance(value, str):
            raise ConfigError(f"{self._where(key)}: must be a string")
        return value

    def duration(self, key: str, *, default: int | None = None) -> int:
        value = self.table.get(key, default)
        if value is None:
            raise ConfigError(f"{self._where(key)}: required")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f'{self._where(key)}: must be seconds or a duration like "5m"')
        if isinstance(value, int):
            seconds = value
        else:
            match = _DURATION.fullmatch(value)
            if match is None:
                raise ConfigError(f'{self._where(key)}: {value!r} is not a duration like "5m"')
            seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if not 0 < seconds <= validate.MAX_TTL_SECONDS:
            raise ConfigError(
                f"{self._where(key)}: must be between 1 and {validate.MAX_TTL_SECONDS} seconds"
            )
        return seconds


def _connection(name: str, table: Any) -> Connection:
    path = f"connections.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: must be a table")
    try:
        validate.connection_name(name)
    except InvalidArgument as exc:
        raise ConfigError(f"{path}: the name {exc.description}") from None
    reader = _Reader(table, path)
    reader.no_extra({"kind", "description"})
    kind = reader.string("kind")
    if kind not in KINDS:
        raise ConfigError(f"{path}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    return Connection(name=name, kind=kind, description=reader.string("description", default=""))


def _group(name: str, path: str) -> str:
    # Okta group names may hold spaces, but not at the ends, and never a "*":
    # there is no wildcard, and a group that looks like one misleads reviewers.
    if not name.strip() or name != name.strip() or not name.isprintable() or "*" in name:
        raise ConfigError(
            f"{path}: {name!r} is not a group name (empty, padded, control characters or '*')"
        )
    return name


def parse(data: str | bytes, *, source: str = "policy") -> Policy:
    """Return the Policy in TOML data, or raise ConfigError naming the offending key path.

    The policy's version is the SHA-256 of the bytes as given, so it matches
    `sha256sum policy.toml` whatever the file's line endings.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = _Reader(document, "")
    top.no_extra({"connections", "bindings", "ttl_ceiling"})
    ceiling = top.duration("ttl_ceiling", default=DEFAULT_TTL_CEILING)
    raw_connections = document.get("connections", {})
    if not isinstance(raw_connections, dict):
        raise ConfigError("connections: must be a table of [connections.NAME] tables")
    connections = {name: _connection(name, table) for name, table in raw_connections.items()}
    raw_bindings = document.get("bindings", [])
    if not isinstance(raw_bindings, list):
        raise ConfigError("bindings: must be an array of [[bindings]] tables")
    bindings: list[Binding] = []
    for index, table in enumerate(raw_bindings):
        path = f"bindings[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: must be a table")
        reader = _Reader(table, path)
        reader.no_extra({"group", "connection", "max_ttl"})
        binding = Binding(
            group=_group(reader.string("group"), f"{path}.group"),
            connection=reader.string("connection"),
            max_ttl=reader.duration("max_ttl"),
        )
        if binding.connection not in connections:
            raise ConfigError(f"{path}.connection: {binding.connection!r} is not a connection")
        if binding.max_ttl > ceiling:
            raise ConfigError(f"{path}.max_ttl: {binding.max_ttl}s is above ttl_ceiling {ceiling}s")
        if any((b.group, b.connection) == (binding.group, binding.connection) for b in bindings):
            raise ConfigError(
                f"{path}: duplicate binding of {binding.group} to {binding.connection}"
            )
        bindings.append(binding)
    return Policy(
        connections=connections,
        bindings=tuple(bindings),
        ttl_ceiling=ceiling,
        version=hashlib.sha256(raw).hexdigest(),
    )


def load(path: Path) -> Policy:
    """Parse the policy file at path."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from exc
    return parse(raw, source=str(path))
