"""The refusal classifier every front end shares: the agent's message, the operator's log."""

from __future__ import annotations

import logging

import pytest

from jitgate.common.errors import (
    JitgateError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from jitgate.proxy.refusals import refusal


@pytest.mark.parametrize(
    ("exc", "outcome", "message", "level"),
    [
        (
            Unauthenticated("expired", "exp 1"),
            "rejected",
            "this grant has expired or is not live",
            logging.INFO,
        ),
        (Unauthenticated("signature", "bad"), "rejected", "this grant is not valid", logging.INFO),
        (NotFound("grant"), "rejected", "this grant is not valid", logging.INFO),
        (PermissionDenied("GRANT_REVOKED", "x"), "refused", "this grant was revoked", logging.INFO),
        (PermissionDenied("ODD", "x"), "refused", "grant refused", logging.INFO),
        (
            Unavailable("redis", "down"),
            "unavailable",
            "cannot redeem grants right now; retry",
            logging.WARNING,
        ),
        (JitgateError("?"), "failed", "grant refused", logging.WARNING),
        (
            Unauthenticated("upstream", "policy: the caller's certificate was refused"),
            "unavailable",
            "cannot redeem grants right now; retry",
            logging.WARNING,
        ),
    ],
)
def test_a_refusal_tells_the_agent_only_whether_asking_again_helps(
    exc: JitgateError, outcome: str, message: str, level: int
) -> None:
    denied = refusal(exc)
    assert (denied.outcome, denied.message, denied.level) == (outcome, message, level)
    assert str(exc) not in denied.message  # never the failed check or its detail


@pytest.mark.parametrize(
    ("exc", "logged"),
    [
        (Unauthenticated("signature", "bad"), "grant token rejected"),
        (PermissionDenied("GRANT_REVOKED", "x"), "grant refused"),
        (Unavailable("redis", "down"), "failing closed"),
        (JitgateError("?"), "redemption failed"),
    ],
)
def test_the_operator_log_names_the_outcome(exc: JitgateError, logged: str) -> None:
    assert refusal(exc).logged == logged
