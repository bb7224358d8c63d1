"""The policy service's own record of the grants it signed, and their revocations.

Revocation is decided from this ledger, never from the issuer's grant:* keys:
the issuer is agent-reachable and its Redis user can rewrite those, so an owner
or an expiry read from them could be forged to revoke someone else's grant or
to make a revocation marker expire at once. Only the policy user may write
issued:* and revoked:* (the Redis ACLs in jitgate.devstack.redis_server).
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from jitgate.common.errors import Unavailable
from jitgate.common.grants import REVOCATION_CHANNEL, GrantRecord, issued_key, revoked_key

MARKER_MARGIN_MS = 60_000
"""Records and markers outlive their grant a little, so a proxy racing the expiry sees them."""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Ledger:
    """Issued grants and revocation markers in Redis; any Redis failure is Unavailable."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    async def issue(self, record: GrantRecord) -> None:
        """Remember a grant the policy service is about to sign, until shortly after it ends."""
        fields: Any = record.to_hash()  # redis-py types mapping keys invariantly
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(issued_key(record.grant_id), mapping=fields)
                pipe.pexpireat(
                    issued_key(record.grant_id), _ms(record.expires_at) + MARKER_MARGIN_MS
                )
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc

    async def issued(self, grant_id: str) -> GrantRecord | None:
        """Return the grant as the policy service signed it, or None."""
        try:
            fields = await self._redis.hgetall(issued_key(grant_id))
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        return GrantRecord.from_hash(fields) if fields else None

    async def revoked_at(self, grant_id: str) -> float | None:
        """Return when grant_id was revoked, or None if it was not."""
        try:
            marker = await self._redis.get(revoked_key(grant_id))
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        if marker is None:
            return None
        try:
            return float(json.loads(marker)["at"])
        except (ValueError, KeyError, TypeError):
            return 0.0  # a marker we cannot read still means revoked

    async def revoke(self, record: GrantRecord, *, actor: str, now: float) -> None:
        """Write the marker, then tell every proxy; a marker alone already stops redemption."""
        marker = json.dumps({"at": now, "by": actor})
        # Never at or before now: a marker must not vanish the moment it is set.
        expiry = _ms(max(record.expires_at, now)) + MARKER_MARGIN_MS
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(revoked_key(record.grant_id), marker)
                pipe.pexpireat(revoked_key(record.grant_id), expiry)
                pipe.publish(REVOCATION_CHANNEL, record.grant_id)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
