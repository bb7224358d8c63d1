"""Checks on request fields every service applies before trusting them."""

from __future__ import annotations

import re

from jitgate.common.errors import InvalidArgument

# Connection names are DNS-label-like: they appear in logs, Redis keys and
# audit records, so no spaces, no control characters, no path separators.
_CONNECTION = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_GRANT_ID = re.compile(r"[0-9a-f]{32}")
MAX_REASON_CHARS = 512
MAX_TTL_SECONDS = 12 * 3600
"""No grant lives longer than this, whatever a policy says."""


def connection_name(value: str, field: str = "connection") -> str:
    """Return value if it is a well-formed connection name."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not _CONNECTION.fullmatch(value):
        raise InvalidArgument(
            field, "must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a-z or 0-9"
        )
    return value


def grant_id(value: str, field: str = "grant_id") -> str:
    """Return value if it is a well-formed grant id (32 lowercase hex digits)."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not _GRANT_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 32 lowercase hexadecimal digits")
    return value


def reason(value: str, field: str = "reason") -> str:
    """Return value if it is a printable reason of bounded length."""
    if len(value) > MAX_REASON_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_REASON_CHARS} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "must not contain control characters")
    return value


def label(field: str, value: str, max_chars: int = 256) -> str:
    """Return value if it is a non-empty printable name of bounded length (e.g. a subject)."""
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > max_chars or not value.isprintable():
        raise InvalidArgument(field, f"must be at most {max_chars} printable characters")
    return value


def ttl_seconds(value: int, field: str = "ttl_seconds") -> int:
    """Return value if it is 0 (the binding's maximum) or a lifetime jitgate allows."""
    if value < 0 or value > MAX_TTL_SECONDS:
        raise InvalidArgument(field, f"must be between 0 and {MAX_TTL_SECONDS}")
    return value


def printable(value: str, max_chars: int) -> str:
    """Return value truncated to max_chars with control characters replaced.

    For context an edge reports (user agents, peers): recorded, never trusted.
    """
    return "".join(c if c.isprintable() else "?" for c in value[:max_chars])
