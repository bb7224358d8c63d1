"""The proxy's sessions against a real PostgreSQL that demands SCRAM: clients see only the grant."""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psycopg
import pytest
import redis.asyncio as aioredis

from jitgate.common import grants
from jitgate.common.errors import PermissionDenied, Unauthenticated, Unavailable
from jitgate.common.grants import REVOCATION_CHANNEL
from jitgate.devstack import pki
from jitgate.devstack.redis_server import RedisServer
from jitgate.proxy import config, pgwire
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.main import canceller, opener
from jitgate.proxy.server import ProxyServer, agent_tls
from jitgate.proxy.session import Hooks, Redeemed, Registry, Relay
from tests.proxy.test_upstream import APP_DB, PrivateServer, make_role, scram_pg

__all__ = ["scram_pg"]  # the fixture, imported to be used here

pytestmark = pytest.mark.integration
SECRET = "upstream-Secret-7f3a9c"  # the role's password in the test server
TOKEN = "grant.token.ok"  # what the fake check accepts
GRANT_ID = "ab" * 16


@dataclass
class Rig:
    port: int
    proxy: ProxyServer
    publisher: aioredis.Redis
    reports: list[tuple[str, Relay]] = field(default_factory=list)
    ttl: float = 60.0


@pytest.fixture
async def rig(
    scram_pg: PrivateServer, dev_pki: pki.DevPki, redis_server: RedisServer
) -> AsyncIterator[Rig]:
    role = make_role(scram_pg, SECRET)
    upstreams = {
        name: config.Upstream(
            name=name,
            database=APP_DB,
            user=role,
            password=SECRET,
            socket_dir=scram_pg.socket_dir,
            port=scram_pg.port,
            read_only=read_only,
        )
        for name, read_only in (("orders", False), ("orders-ro", True))
    }
    client = aioredis.Redis.from_url(redis_server.url("admin"))
    # The grant is live in Redis, as the issuer leaves it: the proxy's sweep looks.
    await client.delete(grants.revoked_key(GRANT_ID))
    await client.set(grants.grant_key(GRANT_ID), "live", ex=300)
    state = Rig(port=0, proxy=None, publisher=client)  # type: ignore[arg-type]

    async def check(token: str, connection: str, kind: str) -> Claims:
        assert kind == "postgres"
        if token == "other":
            raise PermissionDenied("WRONG_CONNECTION", "another connection")
        if token == "revoked":
            raise PermissionDenied("GRANT_REVOKED", "revoked at 12:00")
        if token == "expired":
            raise Unauthenticated("expired", "exp 1 <= now 2")
        if token == "down":
            raise Unavailable("redis", "connection refused")
        if token != TOKEN:
            raise Unauthenticated("signature", "bad")
        return Claims(
            grant_id="ab" * 16,
            subject="deploy-bot",
            connection=connection,
            kind="postgres",
            expires_at=time.time() + state.ttl,
        )

    async def redeem(token: str, connection: str, session_id: str, client: str) -> Redeemed:
        return Redeemed(
            grant_id="ab" * 16,
            subject="deploy-bot",
            connection=connection,
            expires_at=time.time() + state.ttl,
        )

    async def report(redeemed: Redeemed, session_id: str, relay: Relay) -> None:
        state.reports.append((session_id, relay))

    files = dev_pki.files("proxy")
    hooks = Hooks(
        check=check,
        redeem=redeem,
        open_upstream=opener(upstreams),
        report=report,
        known=upstreams.__contains__,
        tls=agent_tls(str(files.cert), str(files.key)),
        registry=Registry(),
        cancel=canceller(upstreams),
    )
    proxy = ProxyServer(hooks=hooks, redis_client=client)
    state.port = await proxy.start("127.0.0.1", 0)
    state.proxy = proxy
    await asyncio.wait_for(proxy.subscribed.wait(), 5)
    yield state
    await proxy.stop()
    await client.aclose()


async def _connect(rig: Rig, dbname: str = "orders", **kw: str) -> psycopg.AsyncConnection:
    params = {"password": TOKEN, "sslmode": "require", **kw}
    return await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=rig.port, dbname=dbname, user="agent", autocommit=True, **params
    )


async def _reports(rig: Rig, count: int) -> list[tuple[str, Relay]]:
    """The session reports, once count of them have arrived (they follow the close)."""
    for _ in range(100):
        if len(rig.reports) >= count:
            break
        await asyncio.sleep(0.02)
    return rig.reports


async def test_a_client_queries_through_the_proxy_with_its_grant(rig: Rig) -> None:
    async with await _connect(rig) as conn:
        cursor = await conn.execute("SELECT 42, current_user, current_setting('application_name')")
        count, user, application = await cursor.fetchone() or (None, None, None)
        assert count == 42
        assert user.startswith("jg_")  # the proxy's role, not anything the agent named
        assert application == "jitgate:deploy-bot"
        await conn.execute("INSERT INTO items VALUES (1)")
    [(_, relay)] = await _reports(rig, 1)
    assert relay.reason == "client_closed"
    assert relay.bytes_from_client > 0
    assert relay.bytes_to_client > 0


async def test_a_client_without_tls_is_refused_before_any_password(rig: Rig) -> None:
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        await _connect(rig, sslmode="disable")


@pytest.mark.parametrize(
    ("password", "dbname", "sqlstate", "message", "logged"),
    [
        ("forged", "orders", "28P01", "this grant is not valid", "rejected: signature: bad"),
        ("expired", "orders", "28P01", "this grant has expired", "rejected: expired: exp 1"),
        ("other", "orders", "28000", "this grant is for another connection", "WRONG_CONNECTION"),
        ("revoked", "orders", "28000", "this grant was revoked", "refused: GRANT_REVOKED"),
        ("down", "orders", "08006", "cannot redeem grants right now; retry", "failing closed"),
        (TOKEN, "nowhere", "28000", "no connection named", ""),
    ],
)
async def test_bad_grants_get_an_error_response(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
    password: str,
    dbname: str,
    sqlstate: str,
    message: str,
    logged: str,
) -> None:
    # The agent learns whether asking again helps; the operator's log has the failed check.
    caplog.set_level(logging.INFO, logger="jitgate.proxy.session")
    with pytest.raises(psycopg.OperationalError, match=message):
        await _connect(rig, dbname, password=password)
    fields = await _refusal(rig.port, password, dbname)
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate)
    assert message in fields["M"]
    assert "exp 1" not in fields["M"]
    assert "signature" not in fields["M"]
    assert logged in caplog.text
    assert not rig.reports  # nothing was redeemed, so there is no session to report


async def test_a_revoked_grant_ends_its_session_within_a_second(rig: Rig) -> None:
    conn = await _connect(rig)
    try:
        await conn.execute("SELECT 1")
        started = time.monotonic()
        await rig.publisher.publish(REVOCATION_CHANNEL, "ab" * 16)
        for _ in range(100):
            if not len(rig.proxy.registry):
                break
            await asyncio.sleep(0.02)
        assert len(rig.proxy.registry) == 0
        assert time.monotonic() - started < 1.0
        with pytest.raises(psycopg.OperationalError, match="grant revoked"):
            await conn.execute("SELECT 1")
    finally:
        await conn.close()
    assert [relay.reason for _, relay in await _reports(rig, 1)] == ["revoked"]


async def test_an_expired_grant_ends_its_session(rig: Rig) -> None:
    rig.ttl = 1.0
    conn = await _connect(rig)
    try:
        await conn.execute("SELECT 1")
        await asyncio.sleep(1.5)
        with pytest.raises(psycopg.OperationalError, match="grant expired"):
            await conn.execute("SELECT 1")
    finally:
        await conn.close()
    assert [relay.reason for _, relay in await _reports(rig, 1)] == ["expired"]


async def test_writes_fail_on_a_read_only_connection(rig: Rig) -> None:
    async with await _connect(rig, "orders-ro") as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await conn.execute("INSERT INTO items VALUES (2)")


async def _started(
    port: int, database: str = "orders"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw protocol client that has sent its start-up message over TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack("!ii", 8, pgwire.SSL_REQUEST))
    assert await reader.readexactly(1) == b"S"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    await writer.start_tls(context)
    body = b"user\x00agent\x00database\x00" + database.encode() + b"\x00\x00"
    writer.write(struct.pack("!ii", len(body) + 8, pgwire.PROTOCOL_3) + body)
    return reader, writer


async def _tls_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw protocol client, past TLS and the start-up, asked for its password."""
    reader, writer = await _started(port)
    assert await reader.readexactly(9) == pgwire.authentication(pgwire.AUTH_CLEARTEXT)
    return reader, writer


async def _refusal(port: int, token: str, database: str) -> dict[str, str]:
    """The fields of the ErrorResponse an agent gets (PostgreSQL docs, "Error Message Fields")."""
    reader, writer = await _started(port, database)
    kind, body = await pgwire.read_message(reader, 1 << 16)
    if kind == b"R":  # asked for the password: the grant token
        writer.write(pgwire.message(b"p", token.encode() + b"\x00"))
        await writer.drain()
        kind, body = await pgwire.read_message(reader, 1 << 16)
    assert await reader.read() == b""  # the proxy closes after the refusal
    writer.close()
    assert kind == b"E"
    return {f[:1].decode(): f[1:].decode() for f in body.rstrip(b"\x00").split(b"\x00")}


async def _raw_session(port: int, caplog: pytest.LogCaptureFixture) -> bytes:
    """Everything an agent receives in a session, byte for byte."""
    reader, writer = await _tls_client(port)
    received = pgwire.authentication(pgwire.AUTH_CLEARTEXT)  # checked by _tls_client
    writer.write(pgwire.message(b"p", TOKEN.encode() + b"\x00"))
    writer.write(
        pgwire.message(b"Q", b"SELECT rolname FROM pg_roles WHERE rolname = current_user\x00")
    )
    writer.write(pgwire.message(b"X"))
    await writer.drain()
    received += await reader.read()
    writer.close()
    return received


async def test_the_upstream_password_reaches_no_client_byte_and_no_log(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        received = await _raw_session(rig.port, caplog)
    assert b"Z" in received  # the session really ran
    assert SECRET.encode() not in received
    assert SECRET not in caplog.text


async def test_a_client_cancel_reaches_its_own_query_only(rig: Rig) -> None:
    async with await _connect(rig) as conn:
        started = time.monotonic()
        sleeping = asyncio.create_task(conn.execute("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.3)
        await conn.cancel_safe()  # libpq's cancel: a new connection carrying the proxy's key
        with pytest.raises(psycopg.errors.QueryCanceled):
            await sleeping
        assert time.monotonic() - started < 5
        # The session goes on.
        cursor = await conn.execute("SELECT 7")
        assert await cursor.fetchone() == (7,)


async def test_a_query_sent_with_the_password_is_not_lost(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # _raw_session sends the password, a query and Terminate before reading
    # AuthenticationOk: the query waits in the handshake's buffer and must
    # reach the server when the relay takes the connection over.
    received = await _raw_session(rig.port, caplog)
    assert b"C\x00\x00\x00\rSELECT 1\x00" in received  # CommandComplete: it ran


async def test_a_client_that_stops_reading_stops_the_server_not_the_proxys_memory(
    rig: Rig,
) -> None:
    # 48 MB is more than the kernel's socket buffers on both hops can hold,
    # so without flow control the proxy would buffer most of it.
    rows, width = 48_000, 1000
    async with await _connect(rig) as conn:
        cursor = conn.cursor()
        query = f"COPY (SELECT repeat('x', {width - 1}) FROM generate_series(1, {rows})) TO STDOUT"  # noqa: S608  # constants
        async with cursor.copy(query) as copy:
            first = await anext(aiter(copy))
            [session] = rig.proxy.registry.sessions()
            buffered = []
            for _ in range(20):  # the agent reads nothing for a second
                buffered.append(session.writer.transport.get_write_buffer_size())
                await asyncio.sleep(0.05)
            received = len(first) + sum([len(data) async for data in copy])
    assert received == rows * width  # every byte, once, however slowly it was read
    assert max(buffered) < 4 * 1024 * 1024, max(buffered)


async def _ended_within(rig: Rig, conn: psycopg.AsyncConnection, seconds: float) -> float:
    """Wait for the proxy to end every session; return how long it took."""
    started = time.monotonic()
    for _ in range(int(seconds / 0.05)):
        if not len(rig.proxy.registry):
            break
        await asyncio.sleep(0.05)
    took = time.monotonic() - started
    assert len(rig.proxy.registry) == 0, f"still live after {took:.1f}s"
    with pytest.raises(psycopg.OperationalError, match="grant revoked"):
        await conn.execute("SELECT 1")
    return took


async def test_a_revocation_whose_message_was_missed_still_ends_the_session(rig: Rig) -> None:
    # The marker is set but nothing is published (a subscription being re-made,
    # a failover that lost the message): the sweep finds it within its interval.
    conn = await _connect(rig)
    try:
        await conn.execute("SELECT 1")
        await rig.publisher.set(grants.revoked_key(GRANT_ID), "1", ex=60)
        assert await _ended_within(rig, conn, 3.0) < 2.0
    finally:
        await conn.close()
    assert [relay.reason for _, relay in await _reports(rig, 1)] == ["revoked"]


async def test_a_grant_gone_from_redis_ends_its_session(rig: Rig) -> None:
    # Redis lost the grant (a restart without its data): nobody could revoke
    # it any more, so it is not left running until it expires.
    conn = await _connect(rig)
    try:
        await conn.execute("SELECT 1")
        await rig.publisher.delete(grants.grant_key(GRANT_ID))
        assert await _ended_within(rig, conn, 3.0) < 2.0
    finally:
        await conn.close()


def _backends(server: PrivateServer) -> list[tuple[object, ...]]:
    with psycopg.connect(server.admin(APP_DB), autocommit=True) as admin:
        return admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'jitgate:%'"
        ).fetchall()


async def test_a_revoked_session_ends_on_the_server_even_when_it_is_blocked_writing(
    rig: Rig, scram_pg: PrivateServer
) -> None:
    # The agent starts a large result and floods queries without reading: the
    # server blocks writing, never reads, and the proxy's buffer toward it
    # fills. A polite close would wait for that buffer forever; the backend
    # (and its connection slot) must go with the grant all the same.
    _reader, writer = await _tls_client(rig.port)
    writer.write(pgwire.message(b"p", TOKEN.encode() + b"\x00"))
    query = b"COPY (SELECT repeat('x', 999) FROM generate_series(1, 200000)) TO STDOUT\x00"
    writer.write(pgwire.message(b"Q", query))
    filler = pgwire.message(b"Q", b"SELECT 1\x00") * 1000
    for _ in range(300):
        writer.write(filler)
        await asyncio.sleep(0.005)
    assert await asyncio.to_thread(_backends, scram_pg)
    await rig.publisher.publish(REVOCATION_CHANNEL, GRANT_ID)
    left = None
    for _ in range(40):
        left = await asyncio.to_thread(_backends, scram_pg)
        if not left:
            break
        await asyncio.sleep(0.05)
    writer.transport.abort()
    assert not left, "the backend outlived the revocation"


async def test_a_client_gone_right_after_its_password_still_has_its_end_reported(
    rig: Rig, scram_pg: PrivateServer
) -> None:
    _reader, writer = await _tls_client(rig.port)
    writer.write(pgwire.message(b"p", TOKEN.encode() + b"\x00"))
    await writer.drain()
    writer.transport.abort()
    reports = await _reports(rig, 1)
    assert [relay.reason for _, relay in reports] == ["client_closed"]
    assert len(rig.proxy.registry) == 0
    for _ in range(40):
        if not await asyncio.to_thread(_backends, scram_pg):
            break
        await asyncio.sleep(0.05)
    assert not await asyncio.to_thread(_backends, scram_pg)


async def test_a_sessions_end_is_reported_promptly(rig: Rig) -> None:
    conn = await _connect(rig)
    await conn.execute("SELECT 1")
    closed = time.monotonic()
    await conn.close()
    for _ in range(100):
        if rig.reports:
            break
        await asyncio.sleep(0.01)
    assert rig.reports
    assert time.monotonic() - closed < 0.5
