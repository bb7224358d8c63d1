"""Live grants in Redis: one hash per grant that expires with it, and a per-agent index."""

from __future__ import annotations

import asyncio
import contextlib
import time

from redis.exceptions import RedisError

from jitgate.common import redisconn
from jitgate.common.errors import Unavailable
from jitgate.common.grants import GrantRecord, agent_index_key, grant_key
from jitgate.common.validate import MAX_TTL_SECONDS

# An agent's index must outlive every grant in it. No grant lives longer than
# MAX_TTL_SECONDS, so expiring the index that long after the newest grant's
# expiry covers all older ones without reading the index first.
_INDEX_MARGIN_MS = MAX_TTL_SECONDS * 1000
_DEADLINE_MARGIN = 0.05
"""Seconds by which Redis's deadline precedes ours, for the reply's way back."""

# KEYS: the grant hash, the agent's index. ARGV: deadline ms, expiry ms, grant
# id, index expiry ms, then the hash's field/value pairs. Returns 1 if stored,
# 0 if Redis's own clock says the deadline has passed.
_PUT = """
redis.replicate_commands()
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if now > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PEXPIREAT', KEYS[2], ARGV[4])
return 1
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class GrantStore:
    """Stores and finds live grants; any Redis failure is Unavailable (fail closed)."""

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        self._redis = redisconn.connect(url, timeout=timeout)
        self._timeout = timeout
        self._put = self._redis.register_script(_PUT)

    async def put(self, record: GrantRecord, *, within: float) -> None:
        """Store record until its expiry with its index entry, or fail within `within` seconds.

        Redis itself checks a deadline, against its own clock, inside one script:
        a write that reaches Redis after we gave up (a stalled server resuming)
        does nothing, so a request that failed never leaves a grant behind. The
        deadline falls a little before we give up; this assumes the hosts'
        clocks agree (NTP).
        """
        within = min(within, self._timeout)
        deadline = time.time() + within - _DEADLINE_MARGIN
        fields: list[str] = [item for pair in record.to_hash().items() for item in pair]
        expiry_ms = _ms(record.expires_at)
        keys = [grant_key(record.grant_id), agent_index_key(record.subject)]
        args: list[str | int] = [
            _ms(deadline),
            expiry_ms,
            record.grant_id,
            expiry_ms + _INDEX_MARGIN_MS,
            *fields,
        ]
        try:
            stored = await asyncio.wait_for(self._put(keys=keys, args=args), within)
        except (RedisError, TimeoutError) as exc:
            await self.discard(record)
            raise Unavailable("redis", str(exc) or "no answer in time") from exc
        if stored != 1:
            raise Unavailable("redis", "the write reached Redis after its deadline")

    async def discard(self, record: GrantRecord) -> None:
        """Best effort: remove a grant whose request failed after it may have been stored."""
        with contextlib.suppress(Unavailable):
            await self.remove(record)

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
