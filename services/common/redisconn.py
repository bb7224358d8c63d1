"""Redis connections that fail fast: a slow or dead Redis is a denial, not a hang."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from opentelemetry import trace
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from jitgate.common import telemetry


class TracedRedis(redis.Redis):
    """A client whose every command is a CLIENT span named for the command, never its keys."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command inside a span."""
        name = _command(args[0]) if args else "UNKNOWN"
        with telemetry.tracer().start_as_current_span(
            f"redis {name}",
            kind=trace.SpanKind.CLIENT,
            attributes={"db.system": "redis", "db.operation.name": name},
        ):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        """A pipeline whose execution is one span."""
        return TracedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


class TracedPipeline(Pipeline):
    """A pipeline (MULTI/EXEC when transactional) executed inside one span."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands inside a span that names them."""
        names = [_command(args[0]) for args, _ in self.command_stack if args]
        operation = "MULTI" if self.is_transaction else "PIPELINE"
        with telemetry.tracer().start_as_current_span(
            f"redis {operation}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "db.system": "redis",
                "db.operation.name": operation,
                "db.operation.batch.size": len(names),
                "jitgate.redis.commands": " ".join(names)[:200],
            },
        ):
            return await super().execute(raise_on_error)


def _command(name: object) -> str:
    text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return text.split(" ", 1)[0].upper()[:32]


def connect(url: str, *, timeout: float = 1.0) -> redis.Redis:
    """Return a client for url whose every command is bounded by timeout, with no retries.

    redis-py retries failed commands with backoff by default; behind a request
    deadline that turns an outage into a hang, so each caller fails closed
    instead and the next request tries again.
    """
    kind = TracedRedis if telemetry.exporting_traces() else redis.Redis
    return kind.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


def redacted(url: str) -> str:
    """Return url as scheme, user, host, port and path only, for logs.

    Passwords can hide in the userinfo and in the query (?password=...), so
    both are dropped rather than masked.
    """
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"
