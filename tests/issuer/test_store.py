"""Live grants in a real Redis, as the issuer's own ACL user sees them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis

from jitgate.common import grants
from jitgate.common.errors import Unavailable
from jitgate.common.grants import GrantRecord
from jitgate.devstack.redis_server import RedisServer, free_port
from jitgate.issuer.store import GrantStore


def _record(grant_id: str, subject: str = "deploy-bot", ttl: float = 300) -> GrantRecord:
    now = time.time()
    return GrantRecord(
        grant_id=grant_id,
        subject=subject,
        client_id=subject,
        connection="orders-replica",
        connection_kind="postgres",
        issued_at=now,
        expires_at=now + ttl,
        proxy_endpoint="127.0.0.1:6432",
    )


@pytest.fixture
async def store(redis_server: RedisServer, redis_admin: redis.Redis) -> AsyncIterator[GrantStore]:
    store = GrantStore(redis_server.url("issuer"))
    yield store
    await store.close()


async def test_a_grant_expires_in_redis_when_it_expires(
    store: GrantStore, redis_admin: redis.Redis
) -> None:
    record = _record("a" * 32, ttl=120)
    await store.put(record, within=5)
    assert await store.get(record.grant_id) == record
    ttl_ms = redis_admin.pttl(grants.grant_key(record.grant_id))
    assert 118_000 < ttl_ms <= 120_000


async def test_an_agent_sees_only_its_own_live_grants(store: GrantStore) -> None:
    now = time.time()
    await store.put(_record("a" * 32), within=5)
    await store.put(_record("b" * 32, ttl=60), within=5)
    await store.put(_record("c" * 32, subject="other-bot"), within=5)
    mine = await store.live("deploy-bot", now=now)
    assert [r.grant_id for r in mine] == ["b" * 32, "a" * 32]
    assert [r.grant_id for r in await store.live("deploy-bot", now=now + 100)] == ["a" * 32]
    assert await store.live("nobody", now=now) == []


async def test_an_index_entry_whose_grant_is_gone_is_not_listed(
    store: GrantStore, redis_admin: redis.Redis
) -> None:
    now = time.time()
    await store.put(_record("a" * 32), within=5)
    redis_admin.delete(grants.grant_key("a" * 32))
    assert await store.live("deploy-bot", now=now) == []


async def test_remove_forgets_the_grant_and_its_index_entry(
    store: GrantStore, redis_admin: redis.Redis
) -> None:
    record = _record("a" * 32)
    await store.put(record, within=5)
    await store.remove(record)
    assert await store.get(record.grant_id) is None
    assert redis_admin.zcard(grants.agent_index_key("deploy-bot")) == 0


async def test_the_index_outlives_every_grant_in_it(
    store: GrantStore, redis_admin: redis.Redis
) -> None:
    await store.put(_record("a" * 32, ttl=600), within=5)
    await store.put(_record("b" * 32, ttl=10), within=5)
    index_ttl = redis_admin.pttl(grants.agent_index_key("deploy-bot")) / 1000
    assert index_ttl > 600


async def test_the_issuer_user_cannot_touch_revocation_markers(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url("issuer"))
    for command in (
        lambda: client.delete(grants.revoked_key("a" * 32)),
        lambda: client.get(grants.revoked_key("a" * 32)),
        lambda: client.publish(grants.REVOCATION_CHANNEL, "x"),
        lambda: client.flushall(),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            command()
    client.close()


async def test_redis_down_is_unavailable_fast() -> None:
    now = time.time()
    store = GrantStore(f"redis://issuer:x@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await store.put(_record("a" * 32), within=5)
    with pytest.raises(Unavailable):
        await store.live("deploy-bot", now=now)
    assert time.monotonic() - started < 2
    await store.close()
