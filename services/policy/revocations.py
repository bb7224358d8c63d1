"""Revocation markers and events in Redis, written only by the policy service."""

from __future__ import annotations

import json

import redis.asyncio as redis
from redis.exceptions import RedisError

from jitgate.common.errors import Unavailable
from jitgate.common.grants import REVOCATION_CHANNEL, GrantRecord, grant_key, revoked_key

MARKER_MARGIN_MS = 60_000
"""Markers outlive their grant a little, so a proxy racing the expiry still sees one."""


class Revocations:
    """Reads grants and marks them revoked; a Redis failure is Unavailable."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    async def grant(self, grant_id: str) -> GrantRecord | None:
        """Return the live grant grant_id, or None."""
        try:
            fields = await self._redis.hgetall(grant_key(grant_id))
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        return GrantRecord.from_hash(fields) if fields else None

    async def revoke(self, record: GrantRecord, *, actor: str, now: float) -> None:
        """Write the marker, then tell every proxy; a marker alone already stops redemption."""
        marker = json.dumps({"at": now, "by": actor})
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(revoked_key(record.grant_id), marker)
                pipe.pexpireat(
                    revoked_key(record.grant_id), int(record.expires_at * 1000) + MARKER_MARGIN_MS
                )
                pipe.publish(REVOCATION_CHANNEL, record.grant_id)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
