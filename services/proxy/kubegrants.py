"""The Kubernetes front end's redeemed grants: one redemption and one hold per grant.

A grant is redeemed on its first request (Policy.Redeem is audited, too
costly per request) and held (Gate.hold) until it expires or is revoked,
however idle it is in between. The lease's end drops it from the cache, cuts
every request of it still in flight and reports the end; its token is
refused from then on, cache or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from jitgate.common import telemetry
from jitgate.common.errors import JitgateError
from jitgate.proxy.gate import Gate, Lease
from jitgate.proxy.refusals import UNAVAILABLE as CANNOT_REDEEM
from jitgate.proxy.refusals import refused
from jitgate.proxy.session import Redeemed, Relay

log = logging.getLogger(__name__)

KIND = "kubernetes"
UNAVAILABLE = f"jitgate {CANNOT_REDEEM}"


class Refused(Exception):
    """A request answered by us with a Status, never forwarded."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False, kw_only=True)
class Held:
    """A redeemed grant in use: its lease, its counters, the streams open on it."""

    redeemed: Redeemed
    session_id: str
    lease: Lease
    stats: Relay
    streams: set[Callable[[str], None]] = field(default_factory=set)
    in_flight: int = 0
    """Requests of the grant being served now (capped by kube.Limits.max_in_flight)."""
    failed: int = 0
    """Requests cut short by an error talking to the API server or the agent."""

    def cut(self, reason: str) -> None:
        """The lease ended: abort every request of the grant still in flight."""
        for abort in list(self.streams):
            abort(reason)
        self.streams.clear()


def _digest(token: str) -> str:
    """The cache key of a token: its SHA-256, so no token is kept in the cache."""
    # The cache never holds a token, only what identifies it.
    return hashlib.sha256(token.encode()).hexdigest()


class Grants:
    """Redeemed grants by token digest and connection: one redemption and one hold each."""

    def __init__(self, gate: Gate, clock: Callable[[], float] = time.time) -> None:
        self._gate = gate
        self._clock = clock
        self._held: dict[tuple[str, str], Held] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[Held]] = {}
        self._ended: dict[str, tuple[str, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._held)

    async def get(self, token: str, connection: str, client: str) -> Held:
        """The held grant for token on connection, redeeming it first if new; raise Refused."""
        digest = _digest(token)
        gone = self._ended.get(digest)
        if gone is not None:
            # A revoked or expired grant never works again, cache or not.
            raise Refused(401, f"this grant has {gone[0]}")
        key = (digest, connection)
        held = self._held.get(key)
        if held is not None:
            return held
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._pending[key] = pending
            task = asyncio.create_task(self._keep(key, token, connection, client, pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(pending)

    async def _keep(
        self,
        key: tuple[str, str],
        token: str,
        connection: str,
        client: str,
        pending: asyncio.Future[Held],
    ) -> None:
        """Redeem the grant, then hold it until its lease ends; waiters get the Held or Refused."""
        session_id = secrets.token_hex(8)
        # One span per redeemed grant, the redemption's RPC its child, as for PostgreSQL.
        with telemetry.tracer().start_as_current_span(
            "proxy session",
            kind=trace.SpanKind.SERVER,
            attributes={"jitgate.kind": KIND, "jitgate.session_id": session_id},
        ):
            try:
                redeemed = await self._gate.admit(token, connection, KIND, session_id, client)
            except BaseException as exc:
                self._pending.pop(key, None)
                stopping = isinstance(exc, asyncio.CancelledError)
                refused = Refused(503, "jitgate is stopping") if stopping else None
                pending.set_exception(refused or _refusal(exc, session_id, client))
                pending.exception()  # retrieved: the waiters re-raise it
                if stopping:
                    raise
                return
            telemetry.annotate(grant_id=redeemed.grant_id, connection=connection)
            log.info(
                "session %s: %s on %s until %s (grant %s)",
                session_id,
                redeemed.subject,
                connection,
                time.strftime("%H:%M:%S", time.gmtime(redeemed.expires_at)),
                redeemed.grant_id,
            )
            async with self._gate.hold(redeemed, session_id, kind=KIND) as (lease, stats):
                held = Held(redeemed=redeemed, session_id=session_id, lease=lease, stats=stats)
                self._held[key] = held
                self._pending.pop(key, None)
                pending.set_result(held)
                lease.on_end(held.cut)
                try:
                    await lease.ended.wait()
                except asyncio.CancelledError:
                    stats.reason = "server_closed"  # the proxy is stopping
                    held.cut("stopped")
                    raise
                finally:
                    self._held.pop(key, None)
                    self._forget(key[0], lease.reason, redeemed.expires_at)

    def _forget(self, digest: str, reason: str, expires_at: float) -> None:
        """Drop the grant from the cache; a revoked or expired one is refused until its expiry."""
        now = self._clock()
        for old in [d for d, (_, until) in self._ended.items() if until < now]:
            del self._ended[old]
        if reason in ("revoked", "expired"):
            self._ended[digest] = (ended(reason), expires_at)

    async def stop(self) -> None:
        """End every hold (each reports its end)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _refusal(exc: BaseException, session_id: str, client: str) -> Refused:
    """What the agent is told when a grant cannot be redeemed; the log says more."""
    if not isinstance(exc, JitgateError):
        log.error("session %s from %s: redemption failed", session_id, client, exc_info=exc)
        return Refused(503, UNAVAILABLE)
    denied = refused(exc, log, f"session {session_id} from {client}")
    if denied.outcome == "rejected":
        return Refused(401, denied.message)
    if denied.outcome == "refused":
        return Refused(403 if denied.reason == "WRONG_CONNECTION" else 401, denied.message)
    return Refused(503, UNAVAILABLE)


def ended(reason: str) -> str:
    """How an ended lease is put to the agent: "been revoked", "expired" or "ended"."""
    return "been revoked" if reason == "revoked" else "expired" if reason == "expired" else "ended"
