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
REASON_REQUIRED = "REASON_REQUIRED"
"""The binding asks the agent to say why, and the request did not."""
CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"
"""The subject already holds the binding's max_concurrent live grants of the connection."""
MIN_TTL = 1

MESSAGES = {
    NO_BINDING: "no policy binding gives any of your groups this connection",
    CONNECTION_UNKNOWN: "no such connection",
    TOKEN_EXPIRING: "your access token expires too soon; get a new one and ask again",
    REASON_REQUIRED: "this connection needs a reason: say why you need it",
    CONCURRENCY_LIMIT: "you already hold as many grants of this connection as allowed",
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
    Granted lifetime = min(requested or max_ttl, max_ttl, the ceiling, what is
    left of the token): a grant never outlives the token that asked for it.
    The concurrency cap needs the live grants, so the servicer applies it.
    """
    connection = policy.connections.get(request.connection)
    if connection is None:
        return Decision(reason_code=CONNECTION_UNKNOWN)
    groups = set(request.identity.groups)
    binding = next((b for b in policy.bindings_for(connection.name) if b.group in groups), None)
    if binding is None:
        return Decision(reason_code=NO_BINDING, connection=connection)
    wanted = request.ttl_seconds or binding.max_ttl
    # Whole seconds, as the grant is counted (servicer: issued at int(now)).
    token_left = int(request.identity.token_expires_at) - int(now)
    ttl = min(wanted, binding.max_ttl, policy.ttl_ceiling, token_left)
    if ttl < MIN_TTL:
        return Decision(reason_code=TOKEN_EXPIRING, binding=binding, connection=connection)
    if binding.require_reason and not request.reason.strip():
        return Decision(reason_code=REASON_REQUIRED, binding=binding, connection=connection)
    return Decision(
        allowed=True, reason_code=ALLOWED, binding=binding, connection=connection, ttl_seconds=ttl
    )
