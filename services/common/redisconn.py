"""Redis connections that fail fast: a slow or dead Redis is a denial, not a hang."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, *, timeout: float = 1.0) -> redis.Redis:
    """Return a client for url whose every command is bounded by timeout, with no retries.

    redis-py retries failed commands with backoff by default; behind a request
    deadline that turns an outage into a hang, so each caller fails closed
    instead and the next request tries again.
    """
    return redis.Redis.from_url(
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
