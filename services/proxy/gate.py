"""What every kind of proxied session shares: check and redeem a grant, hold it, report its end.

The PostgreSQL session (session.py) predates this module and does the same
steps inline around its byte relay; the SSH and Kubernetes front ends use a
Gate. Either way a session is in the one Registry, so a revocation (the Redis
channel or the per-second sweep in server.py) ends sessions of every kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.session import LIVE, Redeemed, Registry, Relay, record_end

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """A redeemed grant held by one session; ends once, at expiry or revocation.

    Front ends register what to do at the end (close a channel, cut a
    stream) with on_end; `ended` lets a task wait for it.
    """

    expires_at: float
    reason: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _callbacks: list[Callable[[str], None]] = field(default_factory=list)

    def on_end(self, callback: Callable[[str], None]) -> None:
        """Call callback(reason) when the lease ends (at once if it has)."""
        if self.ended.is_set():
            callback(self.reason)
        else:
            self._callbacks.append(callback)

    def end(self, reason: str) -> None:
        """End the lease: "expired" or "revoked"; later calls change nothing."""
        if self.ended.is_set():
            return
        self.reason = reason
        self.ended.set()
        for callback in self._callbacks:
            try:
                callback(reason)
            except Exception:  # one front end's failure must not keep another open
                log.exception("ending a session after its grant was %s", reason)
        self._callbacks.clear()


class Check(Protocol):
    """The proxy's own grant check (grantcheck.GrantChecker.check)."""

    def __call__(self, token: str, connection: str, kind: str) -> Awaitable[Claims]:
        """Return the claims or raise Unauthenticated/PermissionDenied/Unavailable."""
        ...


@dataclass(kw_only=True)
class Gate:
    """Redemption and the session lifecycle, shared by the SSH and Kubernetes front ends."""

    check: Check
    redeem: Callable[[str, str, str, str], Awaitable[Redeemed]]
    report: Callable[[Redeemed, str, Relay], Awaitable[None]]
    registry: Registry
    clock: Callable[[], float] = time.time

    async def admit(
        self, token: str, connection: str, kind: str, session_id: str, client: str
    ) -> Redeemed:
        """Check the token here, then have policy redeem it (audited); raise a JitgateError."""
        await self.check(token, connection, kind)
        return await self.redeem(token, connection, session_id, client)

    @contextlib.asynccontextmanager
    async def hold(
        self, redeemed: Redeemed, session_id: str, *, kind: str
    ) -> AsyncIterator[tuple[Lease, Relay]]:
        """Track a session for its grant's life; on exit, report how it ended.

        The lease ends at the grant's expiry, or sooner on revocation. The
        caller counts bytes and may set the reason on the Relay; a lease's end
        reason wins over the caller's.
        """
        loop = asyncio.get_running_loop()
        lease = Lease(expires_at=redeemed.expires_at)
        stats = Relay(opened_at=self.clock())
        self.registry.add(redeemed.grant_id, lease)
        timer = loop.call_later(max(0.0, redeemed.expires_at - self.clock()), lease.end, "expired")
        LIVE.add(1)
        try:
            yield lease, stats
        finally:
            timer.cancel()
            self.registry.remove(redeemed.grant_id, lease)
            if lease.reason:
                stats.reason = lease.reason
            record_end(stats, kind)
            log.info(
                "%s session %s ended (%s): %d bytes in, %d out",
                kind,
                session_id,
                stats.reason,
                stats.bytes_from_client,
                stats.bytes_to_client,
            )
            with contextlib.suppress(Exception):
                await self.report(redeemed, session_id, stats)
