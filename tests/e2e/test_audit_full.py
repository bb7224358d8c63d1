"""An audit log that cannot grow refuses appends: grants are denied, nothing is acknowledged."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from jitgate import client as sdk
from jitgate.devstack.stack import Stack
from tests.e2e.conftest import verify_audit_log

pytestmark = pytest.mark.e2e
PROMISED = 3.0
CAP = 48 * 1024
"""Room for the schema and a few dozen records: the log is 'full' within the test."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("stack"), env={"JITGATE_AUDIT_MAX_BYTES": str(CAP)})
    running.start()
    yield running
    running.stop()


def test_a_full_log_refuses_and_no_grant_exists_without_its_record(
    stack: Stack, redis_admin: redis.Redis
) -> None:
    token = stack.token("deploy-bot")
    granted: list[str] = []
    with sdk.IssuerClient(
        stack.address("issuer"), token=token, ca_file=stack.pki.ca, timeout=10
    ) as agent:
        for _ in range(500):
            before = set(redis_admin.keys("grant:*"))
            started = time.monotonic()
            try:
                granted.append(agent.request_grant("orders-replica", ttl_seconds=60).grant_id)
            except sdk.Unavailable:
                took = time.monotonic() - started
                break
        else:
            pytest.fail("the capped log never filled up")
        assert took < PROMISED
        assert set(redis_admin.keys("grant:*")) == before
        # Still full: still refused, still fast, still nothing in Redis.
        started = time.monotonic()
        with pytest.raises(sdk.Unavailable):
            agent.request_grant("orders-replica", ttl_seconds=60)
        assert time.monotonic() - started < PROMISED
        assert set(redis_admin.keys("grant:*")) == before
    assert granted
    assert stack.health("audit") == "SERVING"
    # Every grant that exists has its decision in the log, and the log verifies.
    report, logged = verify_audit_log(stack)
    assert report.ok, report.found
    assert all(grant_id.encode() in logged for grant_id in granted)
