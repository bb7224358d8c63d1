"""Settings from JITGATE_* environment variables, parsed once into typed values.

A wrong value is a ConfigError that names the variable and says what it wants.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from jitgate.common.errors import ConfigError
from jitgate.common.tls import TlsFiles

_ADDRESS = re.compile(r"(?:\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


class Env:
    """Typed, validated reads from an environment mapping."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if environ is None else environ)

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        return value.strip() if value is not None and value.strip() else None

    def string(self, name: str, default: str | None = None) -> str:
        """Return the variable, or default; missing with no default is an error."""
        value = self._raw(name)
        if value is None:
            if default is None:
                raise ConfigError(f"{name} is required")
            return default
        return value

    def optional(self, name: str) -> str | None:
        """Return the variable, or None when it is unset or empty."""
        return self._raw(name)

    def path(self, name: str, default: str | None = None) -> Path:
        """Return the variable as a path."""
        return Path(self.string(name, default)).expanduser()

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        """Return the variable as an integer within [low, high]."""
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not an integer") from None
        if not low <= number <= high:
            raise ConfigError(f"{name}={number} is out of range; use {low} to {high}")
        return number

    def seconds(self, name: str, default: float, *, low: float, high: float) -> float:
        """Return the variable as a duration in seconds within [low, high]."""
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value.removesuffix("s"))
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number of seconds") from None
        if not low <= number <= high:
            raise ConfigError(f"{name}={number} is out of range; use {low} to {high} seconds")
        return number

    def address(self, name: str, default: str | None = None) -> str:
        """Return the variable as host:port."""
        value = self.string(name, default)
        match = _ADDRESS.fullmatch(value)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise ConfigError(f"{name}={value!r} is not host:port")
        return value

    def names(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Return the variable as a comma-separated list."""
        value = self._raw(name)
        if value is None:
            return default
        return tuple(part.strip() for part in value.split(",") if part.strip())

    def paths(self, name: str) -> tuple[Path, ...]:
        """Return the variable as comma-separated paths; at least one is required."""
        values = self.names(name, ())
        if not values:
            raise ConfigError(f"{name} is required (one or more comma-separated paths)")
        return tuple(Path(value).expanduser() for value in values)

    def tls(self) -> TlsFiles:
        """Return this workload's TLS files from JITGATE_TLS_{CA,CERT,KEY}."""
        return TlsFiles(
            ca=self.path("JITGATE_TLS_CA"),
            cert=self.path("JITGATE_TLS_CERT"),
            key=self.path("JITGATE_TLS_KEY"),
        )
