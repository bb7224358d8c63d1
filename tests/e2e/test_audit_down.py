"""With audit paused or gone, no grant exists: UNAVAILABLE within the deadline, nothing in Redis."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from jitgate import client as sdk
from jitgate.devstack.stack import Stack
from tests.e2e.conftest import verify_audit_log

pytestmark = pytest.mark.e2e
PROMISED = 3.0
"""The issue's promise: a dead audit means UNAVAILABLE within 3 s (default deadline 2 s)."""


def _request(stack: Stack, token: str) -> sdk.Grant:
    with sdk.IssuerClient(
        stack.address("issuer"), token=token, ca_file=stack.pki.ca, timeout=10
    ) as agent:
        return agent.request_grant("orders-replica", ttl_seconds=60)


def _denied_fast(stack: Stack, token: str, redis_admin: redis.Redis) -> None:
    before = set(redis_admin.keys("grant:*"))
    started = time.monotonic()
    with pytest.raises(sdk.Unavailable):
        _request(stack, token)
    assert time.monotonic() - started < PROMISED
    assert set(redis_admin.keys("grant:*")) == before


def test_paused_audit(stack: Stack, redis_admin: redis.Redis) -> None:
    token = stack.token("deploy-bot")
    _request(stack, token)
    audit = stack.processes["audit"]
    audit.send_signal(signal.SIGSTOP)
    try:
        _denied_fast(stack, token, redis_admin)
        _denied_fast(stack, token, redis_admin)
    finally:
        audit.send_signal(signal.SIGCONT)
    assert _request(stack, token).grant_id


def test_stopped_audit_then_restarted(stack: Stack, redis_admin: redis.Redis) -> None:
    token = stack.token("deploy-bot")
    stack.stop_service("audit")
    _denied_fast(stack, token, redis_admin)
    stack.start_service("audit")
    # The policy service reconnects by itself; no manual step.
    deadline = time.monotonic() + 10
    while True:
        try:
            grant = _request(stack, token)
            break
        except sdk.Unavailable:
            assert time.monotonic() < deadline, "service did not resume after audit restarted"
            time.sleep(0.2)
    assert grant.grant_id
    report, _ = verify_audit_log(stack)
    assert report.ok, report.found
