"""Redis connections that fail fast: a slow or dead Redis is a denial, not a hang."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as redis
from opentelemetry import trace
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from jitgate.common import telemetry
from jitgate.common.errors import ConfigError


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


SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""URL schemes that name Sentinels to ask for the master, and whether they use TLS."""


def connect(url: str, *, timeout: float = 1.0) -> redis.Redis:
    """Return a client for url whose every command is bounded by timeout, with no retries.

    redis-py retries failed commands with backoff by default; behind a request
    deadline that turns an outage into a hang, so each caller fails closed
    instead and the next request tries again.

    url is redis://, rediss:// or unix:// for one server, or
    redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]
    (rediss+sentinel:// for TLS) to follow the master Sentinel names for
    SERVICE, through failovers; sentinel_username and sentinel_password in
    the query authenticate to the Sentinels themselves.
    """
    kind = TracedRedis if telemetry.exporting_traces() else redis.Redis
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        return _via_sentinels(url, kind, options, tls=SENTINEL_SCHEMES[scheme])
    return kind.from_url(url, **options)


def _via_sentinels(
    url: str, kind: type[redis.Redis], options: dict[str, Any], *, tls: bool
) -> redis.Redis:
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    sentinels = []
    for entry in hosts.split(","):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{redacted(url)}: each Sentinel is host:port")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = parts.path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ConfigError(f"{redacted(url)}: the path is /SERVICE or /SERVICE/DB")
    query = parse_qs(parts.query)
    sentinel_options = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "username": query.get("sentinel_username", [None])[0],
        "password": query.get("sentinel_password", [None])[0],
        "ssl": tls,
        "retry": options["retry"],  # a Sentinel that is down is a denial now, not after retries
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels,
        sentinel_kwargs=sentinel_options,
        username=unquote(username) or None,
        password=unquote(password) or None,
        db=int(db or 0),
        ssl=tls,
    )
    client: redis.Redis = sentinel.master_for(service, redis_class=kind, **options)
    return client


def redacted(url: str) -> str:
    """Return url as scheme, user, host, port and path only, for logs.

    Passwords can hide in the userinfo and in the query (?password=...), so
    both are dropped rather than masked.
    """
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    user = f"{credentials.partition(':')[0]}@" if at and credentials.partition(":")[0] else ""
    return f"{parts.scheme}://{user}{hosts}{parts.path}"
