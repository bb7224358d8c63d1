"""The policy ledger in a real Redis: records, indexes, and what leaves them."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from jitgate.common import grants, redisconn
from jitgate.common.errors import Unavailable
from jitgate.common.grants import GrantRecord
from jitgate.devstack.redis_server import RedisServer
from jitgate.policy.ledger import Ledger


def _record(grant_id: str, ttl: float) -> GrantRecord:
    now = time.time()
    return GrantRecord(
        grant_id=grant_id,
        subject="busy-bot",
        client_id="busy-bot",
        connection="orders-replica",
        connection_kind="postgres",
        issued_at=now,
        expires_at=now + ttl,
        proxy_endpoint="",
    )


async def test_a_grant_is_recorded_and_indexed_in_one_step(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    ledger = Ledger(redisconn.connect(redis_server.url("policy")))
    record = _record("a" * 32, 60)
    await ledger.issue(record, deadline=time.time() + 1)
    assert await ledger.issued(record.grant_id) == record
    assert redis_admin.pttl(grants.issued_key(record.grant_id)) > 60_000  # outlives the grant
    for key in (
        grants.subject_index_key(record.subject),
        grants.connection_index_key(record.connection),
    ):
        assert redis_admin.zrange(key, 0, -1) == [record.grant_id.encode()]
        assert redis_admin.pttl(key) > 60_000
    await ledger.close()


async def test_expired_grants_leave_the_indexes(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    # A subject that asks all day must not grow its index all day.
    ledger = Ledger(redisconn.connect(redis_server.url("policy")))
    for n in range(5):
        await ledger.issue(_record(f"{n:032x}", 0.01), deadline=time.time() + 1)
    await asyncio.sleep(0.05)
    kept = _record("f" * 32, 60)
    await ledger.issue(kept, deadline=time.time() + 1)
    for key in (
        grants.subject_index_key(kept.subject),
        grants.connection_index_key(kept.connection),
    ):
        assert redis_admin.zrange(key, 0, -1) == [kept.grant_id.encode()]
    await ledger.close()


async def test_a_write_that_arrives_after_its_deadline_writes_nothing(
    redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    # A stalled Redis that resumes must not record a grant policy gave up on.
    ledger = Ledger(redisconn.connect(redis_server.url("policy")))
    late = _record("e" * 32, 60)
    with pytest.raises(Unavailable, match="after its deadline"):
        await ledger.issue(late, deadline=time.time() - 0.01)
    assert not redis_admin.exists(grants.issued_key(late.grant_id))
    assert not redis_admin.exists(grants.subject_index_key(late.subject))
    await ledger.close()


@pytest.mark.parametrize("count", [1, 5, 17, 40, 200])
async def test_the_soonest_across_many_indexes_are_found_page_by_page(
    redis_server: RedisServer, redis_admin: redis.Redis, count: int
) -> None:
    # Six connection indexes of uneven size and interleaved expiries: pages of
    # 16 or fewer, so an index is read over several rounds, and only while it
    # can still hold one of the soonest. The answer is the brute-force one.
    ledger = Ledger(redisconn.connect(redis_server.url("policy")))
    now = time.time()
    run = f"{time.time_ns()}"
    names = [f"soonest-{run}-{n}" for n in range(6)]
    every: list[tuple[str, float]] = []
    for n, name in enumerate(names):
        entries = {f"{run}-{n}-{i}": now + 10 + (i * 7 + n * 3) % 97 + n / 10 for i in range(n * 9)}
        if n == 5:  # the largest index also holds every one of the very soonest
            entries = {f"{run}-5-{i}": now + 1 + i / 100 for i in range(n * 9)}
        if entries:
            redis_admin.zadd(
                grants.connection_index_key(name), {k: int(v * 1000) for k, v in entries.items()}
            )
        every += [(k, int(v * 1000) / 1000) for k, v in entries.items()]
    expired = f"{run}-expired"  # at or before now: never among the live
    redis_admin.zadd(grants.connection_index_key(names[1]), {expired: int(now * 1000) - 1})
    found = await ledger.soonest(connections=names, now=now, count=count)
    assert found == sorted(every, key=lambda pair: (pair[1], pair[0]))[:count]
    await ledger.close()
