"""The proxy's listeners and the revocation listener that ends sessions within a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from jitgate.common.grants import REVOCATION_CHANNEL
from jitgate.proxy.grantcheck import grant_states
from jitgate.proxy.session import Hooks, Registry, Session

log = logging.getLogger(__name__)

RESUBSCRIBE_DELAY = 0.5
SWEEP_INTERVAL = 1.0
"""How often live sessions' grants are looked up in Redis, besides the revocation channel."""
EXPIRY_SLACK = 2.0
"""Near its expiry a grant's key may be gone by Redis's clock first; the timer ends those."""


def agent_tls(cert: str, key: str) -> ssl.SSLContext:
    """The TLS context agents' clients meet: TLS 1.2 or newer, no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class Frontend(Protocol):
    """A listener for one more kind of connection (SSH, Kubernetes) sharing the registry."""

    async def start(self) -> str:
        """Listen; return the address listened on, for the log."""
        ...

    async def stop(self) -> None:
        """Stop listening and end its sessions."""
        ...


class ProxyServer:
    """Accepts agents, one Session each; ends sessions whose grant is revoked.

    PostgreSQL is served here; other kinds by their Frontend, all in one
    Registry, so the revocation listener and the sweep end sessions of every kind.
    """

    def __init__(
        self, *, hooks: Hooks, redis_client: redis.Redis, frontends: Sequence[Frontend] = ()
    ) -> None:
        self._hooks = hooks
        self._redis = redis_client
        self._frontends = list(frontends)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    @property
    def registry(self) -> Registry:
        """The live sessions."""
        return self._hooks.registry

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks one); return the port."""
        self._server = await asyncio.start_server(self._accept, host, port)
        self._listener = asyncio.create_task(self._revocations(), name="revocations")
        self._sweeper = asyncio.create_task(self._sweep(), name="sweep")
        for frontend in self._frontends:
            log.info("listening on %s", await frontend.start())
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await Session(reader=reader, writer=writer, hooks=self._hooks).run()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _revocations(self) -> None:
        # Every revocation is published by the policy service; a session of a
        # revoked grant ends as soon as the message arrives. The marker in
        # Redis stops new redemptions even if this listener is down.
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL)
                self.subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message.get("data")
                    grant_id = data.decode() if isinstance(data, bytes) else str(data)
                    ended = self.registry.revoke(grant_id)
                    if ended:
                        log.info("grant %s revoked: ended %d session(s)", grant_id, ended)
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("revocation channel lost, resubscribing: %s", exc)
                await asyncio.sleep(RESUBSCRIBE_DELAY)
            except Exception:
                # A bug, not Redis: say so loudly, but keep listening.
                self.subscribed.clear()
                log.exception("revocation listener failed, resubscribing")
                await asyncio.sleep(RESUBSCRIBE_DELAY)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _sweep(self) -> None:
        # A revocation message can be missed (the subscription is re-made
        # after a Redis restart, a failover can lose the last writes): every
        # second, each live session's grant must still be in Redis and not
        # revoked. Redis unreachable ends nothing; it cannot revoke either.
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            live = self.registry.grants()
            if not live:
                continue
            try:
                states = await grant_states(self._redis, list(live))
            except Exception as exc:  # the safety net must not die with one bad round
                log.warning("cannot check live sessions' grants: %s", exc)
                continue
            now = time.time()
            for (grant_id, expires_at), (present, revoked) in zip(
                live.items(), states, strict=True
            ):
                if revoked or (not present and now < expires_at - EXPIRY_SLACK):
                    ended = self.registry.revoke(grant_id)
                    log.warning(
                        "grant %s is %s in Redis: ended %d session(s)",
                        grant_id,
                        "revoked" if revoked else "gone",
                        ended,
                    )

    async def stop(self) -> None:
        """Stop listening and end every session."""
        if self._server is not None:
            self._server.close()
        for frontend in self._frontends:
            with contextlib.suppress(Exception):
                await frontend.stop()
        for task in (self._listener, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
