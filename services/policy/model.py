"""The policy file, parsed strictly into frozen objects.

A binding names one group and one connection; there is no wildcard, so the
widest grant a binding can produce is one connection for max_ttl.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jitgate.common import validate
from jitgate.common.errors import ConfigError, InvalidArgument

KINDS = ("postgres", "ssh", "kubernetes")
DEFAULT_TTL_CEILING = 15 * 60
_DURATION = re.compile(r"([0-9]+)(s|m|h)?")  # ASCII digits only
_UNITS = {"s": 1, "m": 60, "h": 3600, None: 1}
_TAG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_NAMESPACE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # Kubernetes: an RFC 1123 label


@dataclass(frozen=True, kw_only=True)
class Connection:
    """One named thing an agent can be granted: a database, a host, a namespace."""

    name: str
    kind: str
    description: str = ""
    environment: str = ""
    """A tag such as "production" or "staging", shown by explain and recorded with grants."""
    read_only: bool = False
    namespace: str = ""
    """For kind "kubernetes": the one namespace the connection reaches."""


@dataclass(frozen=True, kw_only=True)
class Binding:
    """Members of group may have connection for at most max_ttl seconds, on conditions."""

    group: str
    connection: str
    max_ttl: int
    require_reason: bool = False
    """The request must say why (recorded in the audit log)."""
    max_concurrent: int | None = None
    """Live grants of this connection one subject may hold at once; None: no cap."""
    path: str = field(default="", compare=False)
    """Where in the file the binding is, for messages."""


@dataclass(frozen=True, kw_only=True)
class Finding:
    """A problem lint reports: an error stops the policy loading, a warning does not."""

    severity: str
    code: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message} [{self.code}]"


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

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._where(key)}: must be true or false")
        return value

    def count(self, key: str) -> int | None:
        value = self.table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise ConfigError(f"{self._where(key)}: must be a whole number from 1 to 1000")
        return value

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
    reader.no_extra({"kind", "description", "environment", "read_only", "namespace"})
    kind = reader.string("kind")
    if kind not in KINDS:
        raise ConfigError(f"{path}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    environment = reader.string("environment", default="")
    if environment and not _TAG.fullmatch(environment):
        raise ConfigError(f'{path}.environment: {environment!r} is not a tag like "staging"')
    namespace = reader.string("namespace", default="")
    # A kubernetes connection is one namespace, never a cluster: without one
    # it would mean "everything the credential can reach".
    if kind == "kubernetes" and not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(
            f"{path}.namespace: a kubernetes connection names exactly one namespace"
            " (an RFC 1123 label)"
        )
    if kind != "kubernetes" and "namespace" in table:
        raise ConfigError(f"{path}.namespace: only a kubernetes connection has a namespace")
    return Connection(
        name=name,
        kind=kind,
        description=reader.string("description", default=""),
        environment=environment,
        read_only=reader.boolean("read_only", default=False),
        namespace=namespace,
    )


def _group(name: str, path: str) -> str:
    # Okta group names may hold spaces, but not at the ends, and never a "*":
    # there is no wildcard, and a group that looks like one misleads reviewers.
    if not name.strip() or name != name.strip() or not name.isprintable() or "*" in name:
        raise ConfigError(
            f"{path}: {name!r} is not a group name (empty, padded, control characters or '*')"
        )
    return name


def parse(data: str | bytes, *, source: str = "policy") -> Policy:
    """Return the usable Policy in TOML data, or raise ConfigError naming the key path."""
    return checked(read(data, source=source), source)


def read(data: str | bytes, *, source: str = "policy") -> Policy:
    """Return the Policy in TOML data if its shape is right, or raise ConfigError.

    The shape: every key known, every value of its type. What the bindings
    mean together (see errors) is for parse and lint to check.

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
        reader.no_extra({"group", "connection", "max_ttl", "require_reason", "max_concurrent"})
        bindings.append(
            Binding(
                group=_group(reader.string("group"), f"{path}.group"),
                connection=reader.string("connection"),
                max_ttl=reader.duration("max_ttl"),
                require_reason=reader.boolean("require_reason", default=False),
                max_concurrent=reader.count("max_concurrent"),
                path=path,
            )
        )
    return Policy(
        connections=connections,
        bindings=tuple(bindings),
        ttl_ceiling=ceiling,
        version=hashlib.sha256(raw).hexdigest(),
    )


def errors(policy: Policy) -> list[Finding]:
    """Return what makes policy unusable: a binding to no connection, over the ceiling, twice."""
    found: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    for binding in policy.bindings:
        if binding.connection not in policy.connections:
            found.append(
                Finding(
                    severity="error",
                    code="unknown-connection",
                    path=f"{binding.path}.connection",
                    message=f"{binding.connection!r} is not a connection",
                )
            )
        if binding.max_ttl > policy.ttl_ceiling:
            found.append(
                Finding(
                    severity="error",
                    code="ttl-above-ceiling",
                    path=f"{binding.path}.max_ttl",
                    message=f"{binding.max_ttl}s is above ttl_ceiling {policy.ttl_ceiling}s",
                )
            )
        key = (binding.group, binding.connection)
        if key in seen:
            found.append(
                Finding(
                    severity="error",
                    code="duplicate-binding",
                    path=binding.path,
                    message=f"{binding.group!r} is bound to {binding.connection!r} again",
                )
            )
        seen.add(key)
    return found


def checked(policy: Policy, source: str) -> Policy:
    """Return policy if it has no errors, else raise ConfigError listing them."""
    problems = errors(policy)
    if problems:
        listed = "; ".join(f"{f.path}: {f.message}" for f in problems)
        raise ConfigError(f"{source}: {listed}" if source != "policy" else listed)
    return policy


def load(path: Path) -> Policy:
    """Parse the policy file at path."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from exc
    return parse(raw, source=str(path))
