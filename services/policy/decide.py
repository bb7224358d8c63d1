"""The decision itself: pure, deny by default, time as a parameter."""

from __future__ import annotations

from dataclasses import dataclass

from jitgate.common.assertion import Identity
from jitgate.policy.model import Binding, Connection, Policy

ALLOWED = "ALLOWED"
NO_BINDING = "NO_BINDING"
CONNECTION_UNKNOWN = "CONNECTION_UNKNOWN"
TOKEN_EXPIRING = "TOKEN_EXPIRING"  # noqa: S105  # a reason code, not a secret
"""The agent's token ends before a grant of at least MIN_TTL could."""
MIN_TTL = 1

MESSAGES = {
    NO_BINDING: "no policy binding gives any of your groups this connection",
    CONNECTION_UNKNOWN: "no such connection",
    TOKEN_EXPIRING: "your access token expires too soon; get a new one and ask again",
}


@dataclass(frozen=True, kw_only=True)
class Request:
    """One identity asking for one connection."""

    identity: Identity
    connection: str
    ttl_seconds: int
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The answer; the zero value denies."""

    allowed: bool = False
    reason_code: str = NO_BINDING
    binding: Binding | None = None
    connection: Connection | None = None
    ttl_seconds: int = 0


def decide(policy: Policy, request: Request, *, now: float) -> Decision:
    """Return the decision on request under policy at time now.

    The first binding in file order whose group the identity holds decides.
    Granted lifetime = min(requested or max_ttl, max_ttl, what is left of the
    token): a grant never outlives the token that asked for it.
    """
    connection = policy.connections.get(request.connection)
    if connection is None:
        return Decision(reason_code=CONNECTION_UNKNOWN)
    groups = set(request.identity.groups)
    binding = next((b for b in policy.bindings_for(connection.name) if b.group in groups), None)
    if binding is None:
        return Decision(reason_code=NO_BINDING, connection=connection)
    wanted = request.ttl_seconds or binding.max_ttl
    token_left = int(request.identity.token_expires_at - now)
    ttl = min(wanted, binding.max_ttl, token_left)
    if ttl < MIN_TTL:
        return Decision(reason_code=TOKEN_EXPIRING, binding=binding, connection=connection)
    return Decision(
        allowed=True, reason_code=ALLOWED, binding=binding, connection=connection, ttl_seconds=ttl
    )
