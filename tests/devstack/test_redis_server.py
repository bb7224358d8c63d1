"""Redis users for jitgate: on a server jitgate starts, and on one it is given."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jitgate.common.errors import ConfigError
from jitgate.devstack.redis_server import RedisServer, free_port, provision


@pytest.fixture
def given(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of its own: provisioning resets the users it creates."""
    server = RedisServer(workdir=tmp_path, port=free_port())
    server.start()
    yield server
    server.stop()


def test_a_given_redis_gets_one_user_per_service(given: RedisServer) -> None:
    urls = provision(given.url("admin"))
    assert set(urls) == {"issuer", "policy", "proxy"}
    issuer = redis.Redis.from_url(urls["issuer"])
    issuer.hset("grant:x", "a", "b")
    with pytest.raises(redis.exceptions.NoPermissionError):
        issuer.set("revoked:x", "1")
    issuer.close()
    policy = redis.Redis.from_url(urls["policy"])
    policy.set("revoked:x", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        policy.set("elsewhere:x", "1")
    policy.close()


def test_a_url_that_cannot_create_users_is_refused(given: RedisServer) -> None:
    with pytest.raises(ConfigError, match="ACL SETUSER"):
        provision(given.url("issuer"))


def test_free_port_never_repeats_within_a_process() -> None:
    # A stack draws a port per service before any of them binds; a repeat
    # made the later service fail to listen (seen in CI).
    drawn = [free_port() for _ in range(500)]
    assert len(set(drawn)) == len(drawn)
