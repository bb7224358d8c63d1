"""Each part SIGKILLed or SIGSTOPped under load: fail fast, no unrecorded grant, recover.

Short scenarios of tests/faults/rig.py; `bench/faults.py` runs longer ones.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg
import pytest
import redis

from jitgate import client as sdk
from jitgate.common.grants import REVOCATION_CHANNEL
from jitgate.devstack.stack import Stack
from tests.faults.rig import (
    CONNECTION,
    FAULTS,
    GRANT_TTL,
    PARTS,
    PROMISED,
    RECOVERY_BOUND,
    Rig,
    header,
    heal,
    inject,
    resume,
)

pytestmark = pytest.mark.e2e

BEFORE = 1.0
DOWN = {"SIGKILL": 1.5, "SIGSTOP": PROMISED + 0.5}
"""A paused part fails requests only at their deadline: it stays down long enough to see many."""
AFTER = 0.5


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("part", PARTS)
def test_fault_under_load(rig: Rig, part: str, fault: str) -> None:
    result = rig.scenario(part, fault, before=BEFORE, down=DOWN[fault], after=AFTER)
    print(f"\n{header()}\n{result.row()}")  # shown with -s, and with the failure
    assert not result.problems, "\n".join(result.problems[:20])
    assert result.failed_during > 0
    assert result.grants_while_down == 0
    assert result.unrecorded_returned == 0
    assert result.unrecorded_in_redis == 0
    assert result.grants > 0
    assert result.recovery is not None
    assert result.log_verifies


def _session(stack: Stack, token: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host="127.0.0.1",
        port=stack.ports["proxy"],
        sslmode="verify-full",
        sslrootcert=str(stack.pki.ca),
        dbname=CONNECTION,
        user="deploy-bot",
        password=token,
        connect_timeout=5,
        autocommit=True,
    )


def _subscribed(stack: Stack) -> bool:
    client = redis.Redis.from_url(stack.redis_url("admin"), socket_timeout=5)
    try:
        return any(count for _, count in client.pubsub_numsub(REVOCATION_CHANNEL))
    finally:
        client.close()


def test_a_session_does_not_outlive_its_revocation_across_a_redis_restart(stack: Stack) -> None:
    """A grant's proxy session, opened before Redis restarted, still ends when it is revoked."""
    with sdk.IssuerClient(
        stack.address("issuer"), token=stack.token("deploy-bot"), ca_file=stack.pki.ca
    ) as agent:
        grant = agent.request_grant(CONNECTION, ttl_seconds=GRANT_TTL, reason="redis restart")
        with _session(stack, grant.token) as conn:
            conn.execute("SELECT 1")
            try:
                inject(stack, "redis", "SIGKILL")
                resume(stack, "redis", "SIGKILL")
            finally:
                heal(stack, "redis")
            # Wait until the stack serves again and the proxy listens for revocations.
            deadline = time.monotonic() + RECOVERY_BOUND
            while True:
                with contextlib.suppress(sdk.Unavailable):
                    agent.request_grant(CONNECTION, ttl_seconds=GRANT_TTL)
                    if _subscribed(stack):
                        break
                assert time.monotonic() < deadline, "no recovery after the Redis restart"
                time.sleep(0.1)
            since = time.monotonic()
            # A revocation is refused as NOT_FOUND when policy no longer knows the grant;
            # either way the session must not go on.
            with contextlib.suppress(sdk.NotFound):
                agent.revoke_grant(grant.grant_id, reason="incident")
            while True:
                try:
                    conn.execute("SELECT 1")
                except psycopg.Error:
                    break
                assert time.monotonic() - since < 1.0, (
                    f"grant {grant.grant_id}'s session outlived its revocation after Redis"
                    " restarted: Redis lost the grants, and with them what revocation needs"
                )
                time.sleep(0.02)
