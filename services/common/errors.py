"""The errors jitgate raises on purpose, under one root.

Errors an attacker can cause (a bad token) carry their reason for the operator's
log only; `jitgate.common.status` decides what the caller sees.
"""

from __future__ import annotations

from collections.abc import Mapping


class JitgateError(Exception):
    """Root of every error jitgate raises on purpose."""


class Unauthenticated(JitgateError):
    """A credential failed a named check; the caller is told nothing more."""

    def __init__(self, check: str, detail: str = "") -> None:
        super().__init__(f"{check}: {detail}" if detail else check)
        self.check = check
        self.detail = detail


class PermissionDenied(JitgateError):
    """A decision or an allow-list said no, with a machine-readable reason."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after


class InvalidArgument(JitgateError):
    """A request field is malformed; the message names the field and the rule."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(JitgateError):
    """The thing asked for does not exist, or is not the caller's to see."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")
        self.what = what


class Unavailable(JitgateError):
    """A dependency did not answer in time or at all; jitgate fails closed."""

    def __init__(self, dependency: str, detail: str = "") -> None:
        super().__init__(
            f"{dependency} unavailable: {detail}" if detail else f"{dependency} unavailable"
        )
        self.dependency = dependency
        self.detail = detail


class ConfigError(JitgateError):
    """A setting is missing or wrong; the message names it and says how to fix it."""
