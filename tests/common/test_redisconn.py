"""Redis connections: one server by URL, or the master a real Sentinel names."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from jitgate.common import redisconn
from jitgate.common.errors import ConfigError
from jitgate.devstack import children
from jitgate.devstack.redis_server import RedisServer, find_binary, free_port, username


@pytest.fixture(scope="module")
def sentinel(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server in Sentinel mode watching the test Redis as "jitgate"; its port."""
    workdir = tmp_path_factory.mktemp("sentinel")
    port = free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor jitgate 127.0.0.1 {redis_server.port} 1\n"
        # The Sentinel logs in to the master as the admin user (its default user is off).
        f"sentinel auth-user jitgate {username('admin')}\n"
        f"sentinel auth-pass jitgate {redis_server.passwords['admin']}\n"
    )
    process = children.spawn(
        children.binary_argv([str(find_binary()), str(conf), "--sentinel"]),
        log=workdir / "sentinel.log",
    )
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.sentinel_get_master_addr_by_name("jitgate"):
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError((workdir / "sentinel.log").read_text())
            time.sleep(0.1)
        client.close()
        yield port
    finally:
        children.stop(process, timeout=5)


async def test_the_master_is_found_through_a_sentinel(
    redis_server: RedisServer, sentinel: int
) -> None:
    password = redis_server.passwords["policy"]
    url = f"redis+sentinel://{username('policy')}:{password}@127.0.0.1:{sentinel}/jitgate/0"
    client = redisconn.connect(url)
    try:
        assert await client.ping()
        # The policy user's own rights on the master: it may write the ledger, not the grants' TTLs.
        await client.set("revoked:sentinel-test", "1")
        assert await client.get("revoked:sentinel-test") == b"1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.set("unrelated:key", "1")
    finally:
        await client.aclose()


async def test_a_sentinel_that_is_down_fails_fast() -> None:
    client = redisconn.connect(f"redis+sentinel://u:p@127.0.0.1:{free_port()}/jitgate", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(redis.RedisError):
        await client.ping()
    assert time.monotonic() - started < 3
    await client.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://u:p@127.0.0.1/jitgate",  # no port
        "redis+sentinel://u:p@127.0.0.1:26379/",  # no service
        "redis+sentinel://u:p@127.0.0.1:26379/jitgate/zero",  # a db that is not a number
    ],
)
def test_a_malformed_sentinel_url_is_a_config_error_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        redisconn.connect(url)
    assert ":p@" not in str(raised.value)


def test_sentinel_urls_are_redacted() -> None:
    url = "rediss+sentinel://policy:s3cret@h1:26379,h2:26379/jitgate/0?sentinel_password=s3cret"
    assert redisconn.redacted(url) == "rediss+sentinel://policy@h1:26379,h2:26379/jitgate/0"
