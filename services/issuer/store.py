"""Live grants in Redis: one hash per grant that expires with it, and a per-agent index."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from jitgate.common.errors import Unavailable
from jitgate.common.grants import GrantRecord, agent_index_key, grant_key
from jitgate.common.validate import MAX_TTL_SECONDS

# An agent's index must outlive every grant in it. No grant lives longer than
# MAX_TTL_SECONDS, so expiring the index that long after the newest grant's
# expiry covers all older ones without reading the index first.
_INDEX_MARGIN_MS = MAX_TTL_SECONDS * 1000


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class GrantStore:
    """Stores and finds live grants; any Redis failure is Unavailable (fail closed)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    async def put(self, record: GrantRecord, *, now: float) -> None:
        """Store record until its expiry, atomically with its index entry."""
        index = agent_index_key(record.subject)
        expiry_ms = _ms(record.expires_at)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                # redis-py types mapping keys invariantly; str keys are what it encodes.
                fields: Any = record.to_hash()
                pipe.hset(grant_key(record.grant_id), mapping=fields)
                pipe.pexpireat(grant_key(record.grant_id), expiry_ms)
                pipe.zadd(index, {record.grant_id: expiry_ms})
                pipe.zremrangebyscore(index, "-inf", _ms(now))
                pipe.pexpireat(index, expiry_ms + _INDEX_MARGIN_MS)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc

    async def get(self, grant_id: str) -> GrantRecord | None:
        """Return the live grant grant_id, or None."""
        try:
            fields = await self._redis.hgetall(grant_key(grant_id))
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        return GrantRecord.from_hash(fields) if fields else None

    async def live(self, subject: str, *, now: float) -> list[GrantRecord]:
        """Return subject's grants that have not expired, soonest expiry first."""
        try:
            ids = await self._redis.zrangebyscore(agent_index_key(subject), f"({_ms(now)}", "+inf")
            async with self._redis.pipeline(transaction=False) as pipe:
                for grant_id in ids:
                    if isinstance(grant_id, bytes):
                        pipe.hgetall(grant_key(grant_id.decode()))
                hashes = await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        records = (GrantRecord.from_hash(fields) for fields in hashes if fields)
        return [r for r in records if r is not None and r.subject == subject and r.expires_at > now]

    async def remove(self, record: GrantRecord) -> None:
        """Forget a grant (after its revocation is recorded and marked)."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(grant_key(record.grant_id))
                pipe.zrem(agent_index_key(record.subject), record.grant_id)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
