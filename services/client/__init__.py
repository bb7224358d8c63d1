"""The agent SDK: ask the issuer for a grant, list, inspect and revoke your grants."""

from jitgate.client.issuer import (
    Denied,
    Grant,
    GrantError,
    InvalidRequest,
    IssuerClient,
    NotFound,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Denied",
    "Grant",
    "GrantError",
    "InvalidRequest",
    "IssuerClient",
    "NotFound",
    "Unauthenticated",
    "Unavailable",
]
