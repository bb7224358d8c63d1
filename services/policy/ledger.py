"""The policy service's own record of the grants it signed, and their revocations.

Revocation is decided from this ledger, never from the issuer's grant:* keys:
the issuer is agent-reachable and its Redis user can rewrite those, so an owner
or an expiry read from them could be forged to revoke someone else's grant or
to make a revocation marker expire at once. Only the policy user may write
issued:* and revoked:* (the Redis ACLs in jitgate.devstack.redis_server).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

from jitgate.common.errors import Unavailable
from jitgate.common.grants import (
    REVOCATION_CHANNEL,
    GrantRecord,
    agent_index_key,
    connection_index_key,
    grant_key,
    issued_key,
    reply_text,
    revoked_key,
    slots_key,
    subject_index_key,
)

MARKER_MARGIN_MS = 60_000
"""Records and markers outlive their grant a little, so a proxy racing the expiry sees them."""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# Take one of `limit` slots, atomically: Redis runs a script alone, so two
# requests can never both see the last free slot (the check and the add are
# one step). Time is the server's, shared by every policy replica.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return {1, 0}
"""


# Record a grant and index it, in one step and one round trip. The issued
# record lives until shortly after the grant ends; each index drops expired
# grants and lives as long as its longest grant (an expiry is only ever pushed
# later: Redis 6.2 has no PEXPIREAT GT). KEYS: the record, then the indexes.
# ARGV: the grant id, its expiry (ms), the record's expiry (ms), the deadline
# (ms), then the record's field/value pairs. Returns 0, writing nothing, when
# Redis's clock is past the deadline: a write that reaches a stalled Redis
# after policy gave up must not leave a record of a grant never signed.
_ISSUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
for i = 2, #KEYS do
  -- Expired grants leave the index here, or a busy subject's index grows forever.
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1])
  local left = redis.call('PTTL', KEYS[i])
  if left < 0 or now + left < tonumber(ARGV[3]) then
    redis.call('PEXPIREAT', KEYS[i], ARGV[3])
  end
end
return 1
"""


class SlotsTaken(Exception):
    """Every slot is held; one frees in retry_after seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"a slot frees in {retry_after:.1f}s")
        self.retry_after = retry_after


class Ledger:
    """Issued grants and revocation markers in Redis; any Redis failure is Unavailable."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._take = client.register_script(_TAKE_SLOT)
        self._issue = client.register_script(_ISSUE)

    async def issue(self, record: GrantRecord, *, deadline: float) -> None:
        """Remember a grant the policy service is about to sign, until shortly after it ends.

        deadline is a wall-clock time (epoch seconds) checked by Redis's own
        clock: past it the write does nothing and this raises Unavailable.

        It is also indexed by subject and by connection, so an operator can
        revoke every grant of either without the issuer's help.
        """
        until = _ms(record.expires_at) + MARKER_MARGIN_MS
        pairs = [item for field in record.to_hash().items() for item in field]
        try:
            # A script, not MULTI: a pipeline holding a script asks SCRIPT EXISTS
            # first, a second round trip on every grant.
            stored = await self._issue(
                keys=[
                    issued_key(record.grant_id),
                    subject_index_key(record.subject),
                    connection_index_key(record.connection),
                ],
                args=[record.grant_id, _ms(record.expires_at), until, _ms(deadline), *pairs],
            )
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        if stored != 1:
            raise Unavailable("redis", "the write reached Redis after its deadline")

    async def take_slot(self, record: GrantRecord, limit: int) -> None:
        """Count record against its subject's limit on its connection, or raise SlotsTaken."""
        try:
            taken, wait_ms = await self._take(
                keys=[slots_key(record.subject, record.connection)],
                args=[record.grant_id, _ms(record.expires_at), limit],
            )
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        if not int(taken):
            raise SlotsTaken(max(0.0, int(wait_ms) / 1000))

    async def release_slot(self, record: GrantRecord) -> None:
        """Give back a slot: the grant was never signed, or was revoked."""
        try:
            await self._redis.zrem(slots_key(record.subject, record.connection), record.grant_id)
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc

    async def live(self, *, subject: str = "", connection: str = "", now: float) -> list[str]:
        """Return the ids of grants signed for subject (or connection), not expired or revoked."""
        key = subject_index_key(subject) if subject else connection_index_key(connection)
        try:
            ids = await self._redis.zrangebyscore(key, f"({_ms(now)}", "+inf")
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def soonest(
        self,
        *,
        subjects: Sequence[str] = (),
        connections: Sequence[str] = (),
        now: float,
        count: int,
    ) -> list[tuple[str, float]]:
        """The count live grants of the subjects' and connections' indexes expiring soonest.

        (id, expiry) pairs, soonest first. The indexes are read a page at a
        time, one round trip per round, and an index is read further only
        while its last entry could still be among the soonest: the work
        follows count, not the number of indexes times count.
        """
        keys = [subject_index_key(s) for s in subjects]
        keys += [connection_index_key(c) for c in connections]
        page = min(count, max(16, -(-count // max(1, len(keys)))))
        offsets = dict.fromkeys(keys, 0)
        found: dict[str, float] = {}
        pending, low = keys, f"({_ms(now)}"  # live: expiring after now
        while pending:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key in pending:
                        pipe.zrangebyscore(key, low, "+inf", offsets[key], page, withscores=True)
                    rows = await pipe.execute()
            except RedisError as exc:
                raise Unavailable("redis", str(exc)) from exc
            full: list[tuple[str, float]] = []
            for key, row in zip(pending, rows, strict=True):
                for grant_id, score in row:
                    found[reply_text(grant_id)] = score / 1000
                offsets[key] += len(row)
                if len(row) == page:  # there may be more in this index
                    full.append((key, row[-1][1] / 1000))
            ranked = sorted(found.values())
            bar = ranked[count - 1] if len(ranked) >= count else float("inf")
            pending = [key for key, last in full if last <= bar]
        return sorted(found.items(), key=lambda pair: (pair[1], pair[0]))[:count]

    async def records(self, ids: Sequence[str]) -> list[GrantRecord]:
        """The grants as signed, in the order of ids, less any gone or revoked; one round trip.

        The revocation marker is read too: a grant is out of the live indexes
        once revoked, but one revoked between reading them and this is not.
        """
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for grant_id in ids:
                    pipe.hgetall(issued_key(grant_id))
                    pipe.get(revoked_key(grant_id))
                rows = await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        live = (fields for fields, marker in zip(rows[::2], rows[1::2], strict=True) if not marker)
        return [r for r in (GrantRecord.from_hash(f) for f in live if f) if r is not None]

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
        """Write the marker, forget the grant everywhere, then tell every proxy.

        The marker alone already stops redemption. The issuer's copy and index
        entry go too (policy may write them; the issuer may not write markers),
        so a grant revoked by an operator leaves the agent's ListGrants at once,
        and its concurrency slot is free for the next request.
        """
        marker = json.dumps({"at": now, "by": actor})
        # Never at or before now: a marker must not vanish the moment it is set.
        expiry = _ms(max(record.expires_at, now)) + MARKER_MARGIN_MS
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(revoked_key(record.grant_id), marker)
                pipe.pexpireat(revoked_key(record.grant_id), expiry)
                pipe.delete(grant_key(record.grant_id))
                pipe.zrem(agent_index_key(record.subject), record.grant_id)
                pipe.zrem(slots_key(record.subject, record.connection), record.grant_id)
                # Out of the live indexes: a bulk revocation or the live-grants
                # count must not see it again. The issued record stays for Redeem.
                pipe.zrem(subject_index_key(record.subject), record.grant_id)
                pipe.zrem(connection_index_key(record.connection), record.grant_id)
                pipe.publish(REVOCATION_CHANNEL, record.grant_id)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
