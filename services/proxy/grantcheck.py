"""The proxy's own checks of a grant token before it asks the core zone to redeem it.

The signature, audience, connection and expiry are checked against the
policy service's published keys, then Redis says whether the grant is live
and not revoked. These are a fast first filter: Policy.Redeem checks again,
authoritatively, and records the redemption.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import redis.asyncio as redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from redis.exceptions import RedisError

from jitgate.common import grants
from jitgate.common.errors import PermissionDenied, Unauthenticated, Unavailable
from jitgate.common.jws import MAX_TOKEN_BYTES
from jitgate.v1 import policy_pb2

log = logging.getLogger(__name__)

KEY_REFRESH = 30.0
"""Seconds between fetches of the grant keys: under the policy's publish-ahead of 60 s."""
UNKNOWN_KID_COOLDOWN = 5.0


@dataclass(frozen=True, kw_only=True)
class Claims:
    """What a verified grant token says."""

    grant_id: str
    subject: str
    connection: str
    kind: str
    expires_at: float


class GrantKeys:
    """The policy service's grant-verifying keys, fetched and kept fresh."""

    def __init__(
        self, fetch: Callable[[], Awaitable[policy_pb2.GrantKeys]], clock: Callable[[], float]
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at = -1e18
        self._lock = asyncio.Lock()

    async def current(self, kid: str) -> list[Ed25519PublicKey]:
        """Return the keys, refreshed if stale or if kid is not among them (rate-limited)."""
        now = self._clock()
        stale = now - self._fetched_at > KEY_REFRESH
        unknown = kid not in self._keys and now - self._fetched_at > UNKNOWN_KID_COOLDOWN
        if stale or unknown:
            async with self._lock:
                if self._clock() - self._fetched_at > min(KEY_REFRESH, UNKNOWN_KID_COOLDOWN):
                    await self._refresh()
        if not self._keys:
            raise Unavailable("policy", "no grant keys")
        return list(self._keys.values())

    async def _refresh(self) -> None:
        try:
            published = await self._fetch()
        except Unavailable as exc:
            log.warning("grant keys not refreshed, keeping %d: %s", len(self._keys), exc)
            return
        keys: dict[str, Ed25519PublicKey] = {}
        for key in published.keys:
            try:
                keys[key.kid] = Ed25519PublicKey.from_public_bytes(key.public_key)
            except ValueError:
                log.warning("grant key %r ignored: not an Ed25519 key", key.kid[:40])
        if keys:
            self._keys = keys
        self._fetched_at = self._clock()


def _kid(token: str) -> str:
    # Only to know whether a key refresh could help; the checker verifies all.
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("size", f"{len(token)} bytes")
    try:
        kid = jwt.get_unverified_header(token).get("kid", "")
    except jwt.PyJWTError as exc:
        raise Unauthenticated("format", str(exc)) from exc
    return kid if isinstance(kid, str) else ""


def _claims(raw: Mapping[str, Any]) -> Claims:
    fields = (raw.get("jti"), raw.get("sub"), raw.get("con"), raw.get("knd"))
    exp = raw.get("exp")
    if not all(isinstance(f, str) and f for f in fields) or not isinstance(exp, int):
        raise Unauthenticated("grant-claims", "malformed grant claims")
    jti, sub, con, knd = (str(f) for f in fields)
    return Claims(grant_id=jti, subject=sub, connection=con, kind=knd, expires_at=float(exp))


class GrantChecker:
    """Checks a presented grant token for one connection: keys, claims, then Redis."""

    def __init__(
        self,
        *,
        keys: GrantKeys,
        redis_client: redis.Redis,
        audience: str,
        trust_domain: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._redis = redis_client
        self._audience = audience
        self._trust_domain = trust_domain
        self._clock = clock

    async def check(self, token: str, connection: str, kind: str) -> Claims:
        """Return the grant's claims for a connection of kind, or raise.

        Raises Unauthenticated, PermissionDenied or Unavailable.
        """
        kid = _kid(token)
        keys = await self._keys.current(kid)
        checker = grants.token_checker(
            keys, audience=self._audience, trust_domain=self._trust_domain
        )
        claims = _claims(checker.check(token, self._clock()))
        if claims.connection != connection:
            raise PermissionDenied(
                "WRONG_CONNECTION", f"this grant is for {claims.connection}, not {connection}"
            )
        if claims.kind != kind:
            # A grant is for one kind of access: one minted for an SSH host must
            # not open a database listener that happens to share the name.
            raise PermissionDenied("WRONG_CONNECTION", f"{connection} is not a {kind} connection")
        try:
            [(live, revoked)] = await grant_states(self._redis, [claims.grant_id])
        except RedisError as exc:
            raise Unavailable("redis", str(exc)) from exc
        if revoked:
            raise PermissionDenied("GRANT_REVOKED", "this grant was revoked")
        if not live:
            raise PermissionDenied("GRANT_EXPIRED", "this grant is not live")
        return claims


async def grant_states(client: redis.Redis, grant_ids: Sequence[str]) -> list[tuple[bool, bool]]:
    """For each grant id, in one round trip: (live in Redis, revoked). Raises RedisError."""
    async with client.pipeline(transaction=False) as pipe:
        for grant_id in grant_ids:
            pipe.exists(grants.grant_key(grant_id))
            pipe.exists(grants.revoked_key(grant_id))
        found = await pipe.execute()
    return [
        (bool(live), bool(revoked)) for live, revoked in zip(found[::2], found[1::2], strict=True)
    ]
