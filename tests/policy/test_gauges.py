"""The live-grants gauge counts what the ledger holds: unexpired, unrevoked, per connection."""

from __future__ import annotations

import time

import redis

from jitgate.common import redisconn
from jitgate.devstack.redis_server import RedisServer
from jitgate.policy.gauges import LiveGrants
from jitgate.policy.ledger import Ledger
from tests.policy.test_servicer import Rig, _assertion, _decide, _operator_revoke, rig

__all__ = ["rig"]  # the fixture, imported to be used here


async def test_live_grants_are_counted_per_connection(
    rig: Rig, redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    kept = [await _decide(rig, "orders-replica", assertion=_assertion(f"g-{n}")) for n in range(3)]
    revoked = await _decide(rig, "orders-replica", assertion=_assertion("g-9"))
    await _decide(rig, "ledger-admin", reason="r", assertion=_assertion("g-0"))
    await _operator_revoke(rig, grant_id=revoked.grant_id)
    ledger = Ledger(redisconn.connect(redis_server.url("policy")))
    connections = ["orders-replica", "ledger-admin", "billing-primary"]
    gauge = LiveGrants(ledger, lambda: connections, time.time)
    await gauge.count()
    assert gauge.counts == {"orders-replica": len(kept), "ledger-admin": 1, "billing-primary": 0}
    # Later than every grant's expiry, nothing is live.
    later = LiveGrants(ledger, lambda: connections, lambda: time.time() + 86_400)
    await later.count()
    assert later.counts == dict.fromkeys(connections, 0)
    await ledger.close()


async def test_a_redis_failure_keeps_the_last_count(redis_server: RedisServer) -> None:
    ledger = Ledger(redisconn.connect("redis://127.0.0.1:1/0", timeout=0.2))
    gauge = LiveGrants(ledger, lambda: ["orders-replica"], time.time)
    gauge.counts = {"orders-replica": 4}
    await gauge.count()
    assert gauge.counts == {"orders-replica": 4}
    await ledger.close()
