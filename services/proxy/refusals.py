"""How a failed grant check or redemption is put to the agent and the operator, for every kind."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jitgate.common.errors import (
    InvalidArgument,
    JitgateError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

DENIALS = {
    "GRANT_REVOKED": "this grant was revoked",
    "GRANT_EXPIRED": "this grant has expired or is not live",
    "WRONG_CONNECTION": "this grant is for another connection",
    "GRANT_INVALID": "this grant is not valid",
}
"""The agent's text for each reason a grant is not admitted."""
UNAVAILABLE = "cannot redeem grants right now; retry"


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why a grant was not admitted: what the agent is told, and how loudly to log it."""

    outcome: str
    """"rejected" (the token), "refused" (by policy), "unavailable" or "failed"."""
    message: str
    """For the agent: whether asking again could help, never the token or the failed check."""
    reason: str = ""
    """The policy's reason code, when refused."""
    level: int = logging.INFO
    """The operator's log level: a warning when jitgate, not the grant, is at fault."""

    @property
    def logged(self) -> str:
        """How the operator's log line introduces the outcome, before the full error."""
        return _LOGGED[self.outcome]


_LOGGED = {
    "rejected": "grant token rejected",
    "refused": "grant refused",
    "unavailable": "failing closed",
    "failed": "redemption failed",
}


def refused(exc: JitgateError, logger: logging.Logger, session: str) -> Refusal:
    """Classify exc for the agent and log it for the operator: "<session>: <outcome>: <error>"."""
    denied = refusal(exc)
    logger.log(denied.level, "%s: %s: %s", session, denied.logged, exc)
    return denied


def refusal(exc: JitgateError) -> Refusal:
    """How a failed check or redemption is put to the agent, whatever the session's kind."""
    if isinstance(exc, Unauthenticated) and exc.check == "upstream":
        # The core zone refused the proxy's own identity (status.from_rpc_error):
        # jitgate's fault, not the grant's, and worth a warning.
        return Refusal(outcome="unavailable", message=UNAVAILABLE, level=logging.WARNING)
    if isinstance(exc, Unauthenticated | InvalidArgument | NotFound):
        # The reason (expired, signature, format, …) is the operator's; the
        # agent learns only whether asking for a new grant would help.
        expired = isinstance(exc, Unauthenticated) and exc.check == "expired"
        return Refusal(
            outcome="rejected", message=DENIALS["GRANT_EXPIRED" if expired else "GRANT_INVALID"]
        )
    if isinstance(exc, PermissionDenied):
        # Wrong connection or kind, revoked, not live: the message says which.
        message = DENIALS.get(exc.reason, "grant refused")
        return Refusal(outcome="refused", message=message, reason=exc.reason)
    if isinstance(exc, Unavailable):
        return Refusal(outcome="unavailable", message=UNAVAILABLE, level=logging.WARNING)
    return Refusal(outcome="failed", message="grant refused", level=logging.WARNING)
