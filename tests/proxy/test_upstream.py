"""The upstream side against real PostgreSQL servers, and against fakes that misbehave.

The shared test server (tests/conftest.py) lets every local role in with
"trust", so SCRAM is tested on a private server from the same wheel whose
pg_hba.conf demands scram-sha-256 (and md5 or password for two roles). That
build has no TLS, so TLS against a real server needs a PostgreSQL built with
OpenSSL on the machine (Debian's postgresql package): those tests skip where
there is none. A fake TLS server checks the client's side everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import struct
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from jitgate.devstack import pki
from jitgate.devstack.postgres_server import PrivateServer, embedded_bin, openssl_bin
from jitgate.proxy import upstream
from jitgate.proxy.upstream import Target, Upstream

if TYPE_CHECKING:
    from tests.conftest import PostgresDatabase

MD5_ROLE = "jg_md5"
CLEARTEXT_ROLE = "jg_clear"
APP_DB = "app"

Messages = list[tuple[bytes, bytes]]


# --- a tiny frontend, to use the session connect() returns -------------------------


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], await reader.readexactly(length - 4)


async def query(session: Upstream, text: str, timeout: float = 10.0) -> Messages:
    """Send a simple Query ('Q') and return the messages up to ReadyForQuery."""
    session.writer.write(upstream.message(b"Q", text.encode() + b"\x00"))
    await session.writer.drain()
    messages: Messages = []
    async with asyncio.timeout(timeout):
        while True:
            kind, body = await read_message(session.reader)
            messages.append((kind, body))
            if kind == b"Z":
                return messages


def rows(messages: Messages) -> list[list[str | None]]:
    out: list[list[str | None]] = []
    for kind, body in messages:
        if kind != b"D":
            continue
        (count,) = struct.unpack("!h", body[:2])
        at, row = 2, []
        for _ in range(count):
            (size,) = struct.unpack("!i", body[at : at + 4])
            at += 4
            row.append(None if size < 0 else body[at : at + size].decode())
            at += max(size, 0)
        out.append(row)
    return out


def error_of(messages: Messages) -> upstream.ServerError:
    errors = [body for kind, body in messages if kind == b"E"]
    assert errors, f"no ErrorResponse in {[kind for kind, _ in messages]}"
    return upstream.server_error(errors[0])


async def value(session: Upstream, text: str) -> str | None:
    messages = await query(session, text)
    assert b"E" not in [kind for kind, _ in messages], error_of(messages)
    return rows(messages)[0][0]


# --- private PostgreSQL servers ----------------------------------------------------


def provision(server: PrivateServer) -> None:
    """The app database with a table, and the roles that pg_hba.conf singles out."""
    with psycopg.connect(server.admin(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(APP_DB)))
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'clear-pw'").format(
                sql.Identifier(CLEARTEXT_ROLE)
            )
        )
        # Deprecated, and still what some servers have: a verifier stored as MD5.
        admin.execute("SET password_encryption = 'md5'")
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'md5-pw'").format(sql.Identifier(MD5_ROLE))
        )
    with psycopg.connect(server.admin(APP_DB), autocommit=True) as admin:
        admin.execute("CREATE TABLE items (id int)")


def make_role(server: PrivateServer, password: str) -> str:
    """A login role with password (stored as SCRAM), allowed to read and write items."""
    role = f"jg_{secrets.token_hex(5)}"
    with psycopg.connect(server.admin(APP_DB), autocommit=True) as admin:
        admin.execute("SET password_encryption = 'scram-sha-256'")
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        admin.execute(sql.SQL("GRANT SELECT, INSERT ON items TO {}").format(sql.Identifier(role)))
    return role


@pytest.fixture(scope="module")
def scram_pg() -> Iterator[PrivateServer]:
    """The wheel's PostgreSQL demanding SCRAM on its socket; TCP too, where it has no TLS."""
    hba = (
        "local all postgres trust\n"
        f"local all {MD5_ROLE} md5\n"
        f"local all {CLEARTEXT_ROLE} password\n"
        "local all all scram-sha-256\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    server = PrivateServer(embedded_bin(), hba=hba, settings={"listen_addresses": "'127.0.0.1'"})
    try:
        provision(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_pg(dev_pki: pki.DevPki) -> Iterator[PrivateServer]:
    """A PostgreSQL with ssl=on and the dev PKI's "idp" certificate (localhost, 127.0.0.1)."""
    bin_dir = openssl_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL built with OpenSSL here (Debian's postgresql package has one)")
    files = dev_pki.files("idp")
    hba = (
        "local all postgres trust\n"
        f"hostssl all {CLEARTEXT_ROLE} 127.0.0.1/32 password\n"
        "hostssl all all 127.0.0.0/8 scram-sha-256\n"
    )
    server = PrivateServer(
        bin_dir,
        hba=hba,
        settings={
            "listen_addresses": "'127.0.0.1,127.0.0.2'",
            "ssl": "on",
            "ssl_cert_file": "'server.crt'",
            "ssl_key_file": "'server.key'",
        },
        files={"server.crt": files.cert, "server.key": files.key},
    )
    try:
        provision(server)
        yield server
    finally:
        server.stop()


def local(server: PrivateServer, user: str, password: str, database: str = APP_DB) -> Target:
    return Target(
        socket_dir=server.socket_dir,
        port=server.port,
        database=database,
        user=user,
        password=password,
    )


def tcp(
    server: PrivateServer,
    user: str,
    password: str,
    *,
    tls: str,
    host: str = "127.0.0.1",
    ca_file: Path | None = None,
) -> Target:
    return Target(
        host=host,
        port=server.port,
        database=APP_DB,
        user=user,
        password=password,
        tls=tls,
        ca_file=str(ca_file) if ca_file else None,
    )


async def login(target: Target, *, read_only: bool = False, timeout: float = 10.0) -> Upstream:
    return await upstream.connect(
        target, read_only=read_only, application_name="jitgate:test", timeout=timeout
    )


# --- real servers: SCRAM ------------------------------------------------------------


@pytest.mark.integration
async def test_scram_login_over_the_unix_socket(scram_pg: PrivateServer) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(scram_pg, password)
    session = await login(local(scram_pg, role, password))
    try:
        assert session.authentication == "scram-sha-256"
        assert not session.tls
        assert session.transaction_status == b"I"
        assert session.parameters["session_authorization"] == role
        assert session.parameters["application_name"] == "jitgate:test"
        assert "server_version" in session.parameters
        assert session.backend_key is not None
        assert await value(session, "SELECT pg_backend_pid()") == str(session.backend_key[0])
        # PostgreSQL 16+: how this session was authenticated, in the server's own words.
        assert await value(session, "SELECT system_user") == f"scram-sha-256:{role}"
        assert await value(session, "SHOW default_transaction_read_only") == "off"
        assert rows(await query(session, "INSERT INTO items VALUES (1) RETURNING id")) == [["1"]]
    finally:
        await session.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    "password",
    [
        "pen,cil=and \"quotes\" 'and' \\ spaces",
        "I\u00adX\u2168 caf\u00e9",  # SASLprep maps and normalizes; the server does too
        "pw\u200e",  # SASLprep prohibits: both sides use the raw bytes
        "pw\U0001f600",  # unassigned in Unicode 3.2: raw bytes as well
        "\u0627\u0031",  # bidi violation: raw bytes
        "x" * 200,
    ],
)
async def test_scram_agrees_with_the_server_on_every_password(
    scram_pg: PrivateServer, password: str
) -> None:
    role = make_role(scram_pg, password)
    session = await login(local(scram_pg, role, password))
    await session.close()
    assert session.authentication == "scram-sha-256"


@pytest.mark.integration
async def test_a_wrong_password_is_28P01_and_never_echoed(
    scram_pg: PrivateServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = secrets.token_urlsafe(16)
    role = make_role(scram_pg, password)
    wrong = "wrong-" + secrets.token_urlsafe(16)
    target = local(scram_pg, role, wrong)
    with pytest.raises(upstream.ServerError) as caught:
        await login(target)
    error = caught.value
    assert error.code == "28P01"
    assert error.severity == "FATAL"
    assert role in error.message
    rendered = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), repr(error.args), rendered, caplog.text, repr(target)):
        assert wrong not in text
        assert password not in text


@pytest.mark.integration
async def test_read_only_sessions_cannot_write(scram_pg: PrivateServer) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(scram_pg, password)
    session = await login(local(scram_pg, role, password), read_only=True)
    try:
        assert await value(session, "SHOW default_transaction_read_only") == "on"
        error = error_of(await query(session, "INSERT INTO items VALUES (2)"))
        assert error.code == "25006"  # read_only_sql_transaction
        assert await value(session, "SELECT count(*) FROM items WHERE id = 2") == "0"
    finally:
        await session.close()


@pytest.mark.integration
async def test_a_missing_database_is_3D000(scram_pg: PrivateServer) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(scram_pg, password)
    with pytest.raises(upstream.ServerError) as caught:
        await login(local(scram_pg, role, password, database="no_such_db"))
    assert caught.value.code == "3D000"


@pytest.mark.integration
async def test_cancel_stops_a_running_query(scram_pg: PrivateServer) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(scram_pg, password)
    target = local(scram_pg, role, password)
    session = await login(target)
    try:
        assert session.backend_key is not None
        running = asyncio.create_task(query(session, "SELECT pg_sleep(10)"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await upstream.cancel(target, *session.backend_key)
        messages = await asyncio.wait_for(running, 5)
        assert time.monotonic() - started < 3
        assert error_of(messages).code == "57014"  # query_canceled
        assert await value(session, "SELECT 1") == "1"  # the session goes on
    finally:
        await session.close()


@pytest.mark.integration
async def test_md5_is_refused_even_when_the_server_asks(scram_pg: PrivateServer) -> None:
    with pytest.raises(upstream.AuthRefused, match="MD5") as caught:
        await login(local(scram_pg, MD5_ROLE, "md5-pw"))
    assert caught.value.code == "28000"
    assert "md5-pw" not in str(caught.value)


@pytest.mark.integration
async def test_cleartext_is_refused_without_verified_tls(scram_pg: PrivateServer) -> None:
    with pytest.raises(upstream.AuthRefused, match="cleartext") as caught:
        await login(local(scram_pg, CLEARTEXT_ROLE, "clear-pw"))
    assert "clear-pw" not in str(caught.value)


@pytest.mark.integration
async def test_a_server_without_tls_is_refused_when_tls_is_required(
    scram_pg: PrivateServer,
) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(scram_pg, password)
    for mode in ("require", "verify-full"):
        with pytest.raises(upstream.TlsFailed, match="does not offer TLS"):
            await login(tcp(scram_pg, role, password, tls=mode))
    # The same server over TCP without TLS, for contrast.
    session = await login(tcp(scram_pg, role, password, tls="disable"))
    await session.close()


@pytest.mark.integration
async def test_the_shared_test_server_lets_roles_in_by_trust(postgres: PostgresDatabase) -> None:
    dsn = conninfo_to_dict(postgres.writer)
    host = str(dsn.get("host") or "")
    target = Target(
        host="" if host.startswith("/") else host,
        socket_dir=host if host.startswith("/") else "",
        port=int(dsn.get("port") or 5432),
        database=postgres.name,
        user=postgres.writer_role,
        password=str(dsn.get("password") or ""),
    )
    session = await login(target)
    try:
        assert session.parameters["session_authorization"] == postgres.writer_role
        assert await value(session, "SELECT current_database()") == postgres.name
    finally:
        await session.close()


# --- real servers: TLS --------------------------------------------------------------


@pytest.mark.integration
async def test_scram_over_verified_tls(tls_pg: PrivateServer, dev_pki: pki.DevPki) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(tls_pg, password)
    for host in ("127.0.0.1", "localhost"):
        target = tcp(tls_pg, role, password, tls="verify-full", host=host, ca_file=dev_pki.ca)
        session = await login(target)
        try:
            assert session.tls
            assert session.authentication == "scram-sha-256"
            assert await value(session, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        finally:
            await session.close()


@pytest.mark.integration
async def test_tls_verification_against_a_real_server(
    tls_pg: PrivateServer, dev_pki: pki.DevPki, foreign_pki: pki.DevPki
) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(tls_pg, password)
    refused = [
        tcp(tls_pg, role, password, tls="verify-full", ca_file=foreign_pki.ca),
        tcp(tls_pg, role, password, tls="verify-full"),  # the system's CAs
        # The certificate names 127.0.0.1 and localhost, not 127.0.0.2.
        tcp(tls_pg, role, password, tls="verify-full", host="127.0.0.2", ca_file=dev_pki.ca),
        tcp(tls_pg, role, password, tls="require", ca_file=foreign_pki.ca),
    ]
    for target in refused:
        with pytest.raises(upstream.TlsFailed, match="not accepted"):
            await login(target)
    # require: encrypted, unverified (libpq's sslmode=require), so any name will do.
    session = await login(tcp(tls_pg, role, password, tls="require", host="127.0.0.2"))
    await session.close()
    assert session.tls


@pytest.mark.integration
async def test_cleartext_only_over_verified_tls(tls_pg: PrivateServer, dev_pki: pki.DevPki) -> None:
    with pytest.raises(upstream.AuthRefused, match="cleartext"):
        await login(tcp(tls_pg, CLEARTEXT_ROLE, "clear-pw", tls="require"))
    target = tcp(tls_pg, CLEARTEXT_ROLE, "clear-pw", tls="verify-full", ca_file=dev_pki.ca)
    session = await login(target)
    try:
        assert session.authentication == "cleartext"
        assert await value(session, "SELECT current_user") == CLEARTEXT_ROLE
    finally:
        await session.close()


@pytest.mark.integration
async def test_cancel_over_tls(tls_pg: PrivateServer, dev_pki: pki.DevPki) -> None:
    password = secrets.token_urlsafe(16)
    role = make_role(tls_pg, password)
    target = tcp(tls_pg, role, password, tls="verify-full", ca_file=dev_pki.ca)
    session = await login(target)
    try:
        assert session.backend_key is not None
        running = asyncio.create_task(query(session, "SELECT pg_sleep(10)"))
        await asyncio.sleep(0.3)
        await upstream.cancel(target, *session.backend_key)
        assert error_of(await asyncio.wait_for(running, 5)).code == "57014"
    finally:
        await session.close()


# --- fake servers: what a broken or hostile upstream gets ----------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
PASSWORD = "fake-server-password"


@asynccontextmanager
async def fake_server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[int]:
    done: list[asyncio.Task[object]] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        done.append(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass  # the test is over; asyncio would log a cancelled handler
        finally:
            writer.close()

    server = await asyncio.start_server(run, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # Handlers end when the client hangs up; give them the time to see it.
        if done:
            await asyncio.wait(done, timeout=5)
        for task in done:
            task.cancel()
        await asyncio.gather(*done, return_exceptions=True)
        await server.wait_closed()


def fake(
    port: int, *, tls: str = "disable", ca_file: Path | None = None, host: str = "127.0.0.1"
) -> Target:
    return Target(
        host=host,
        port=port,
        database="db",
        user="agent_role",
        password=PASSWORD,
        tls=tls,
        ca_file=str(ca_file) if ca_file else None,
    )


async def read_startup(reader: asyncio.StreamReader) -> dict[str, str]:
    (length,) = struct.unpack("!i", await reader.readexactly(4))
    body = await reader.readexactly(length - 4)
    assert struct.unpack("!i", body[:4])[0] == upstream.PROTOCOL_3_0
    fields = body[4:-2].split(b"\x00")
    return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}


def send(writer: asyncio.StreamWriter, kind: bytes, body: bytes = b"") -> None:
    writer.write(kind + struct.pack("!i", len(body) + 4) + body)


def auth(code: int, payload: bytes = b"") -> bytes:
    return struct.pack("!i", code) + payload


def ready(writer: asyncio.StreamWriter) -> None:
    send(writer, b"R", auth(upstream.AUTH_OK))
    send(writer, b"S", b"server_version\x0018.0\x00")
    send(writer, b"S", b"client_encoding\x00UTF8\x00")
    send(writer, b"K", struct.pack("!ii", 4242, -7))
    send(writer, b"Z", b"I")


async def rest(reader: asyncio.StreamReader) -> bytes:
    """Everything the client sends until it closes."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except (ConnectionError, ssl.SSLError):
        return b""


class ScramServer:
    """The server half of SCRAM-SHA-256 (RFC 5802 section 3), for a fake to play."""

    def __init__(self, password: str, iterations: int = 4096) -> None:
        self.salt = secrets.token_bytes(16)
        self.iterations = iterations
        self.salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, iterations)

    async def exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        signature: bytes | None = None,
        skip_final: bool = False,
    ) -> bool:
        send(writer, b"R", auth(upstream.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
        kind, body = await read_message(reader)
        assert kind == b"p"
        mechanism, rest_ = body.split(b"\x00", 1)
        assert mechanism == b"SCRAM-SHA-256"
        first = rest_[4:].decode()
        assert first.startswith("n,,n=,r=")
        bare = first[3:]
        nonce = bare.removeprefix("n=,r=") + "srv"
        salt = base64.b64encode(self.salt).decode()
        server_first = f"r={nonce},s={salt},i={self.iterations}"
        send(writer, b"R", auth(upstream.AUTH_SASL_CONTINUE, server_first.encode()))
        kind, body = await read_message(reader)
        assert kind == b"p"
        without_proof, proof = body.decode().rsplit(",p=", 1)
        message = f"{bare},{server_first},{without_proof}".encode()
        client_key = hmac.digest(self.salted, b"Client Key", "sha256")
        client_signature = hmac.digest(hashlib.sha256(client_key).digest(), message, "sha256")
        expected = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        if base64.b64decode(proof) != expected:
            return False
        if not skip_final:
            server_key = hmac.digest(self.salted, b"Server Key", "sha256")
            good = hmac.digest(server_key, message, "sha256")
            final = b"v=" + base64.b64encode(signature or good)
            send(writer, b"R", auth(upstream.AUTH_SASL_FINAL, final))
        return True


async def test_a_good_fake_login_and_the_startup_packet() -> None:
    seen: dict[str, str] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.update(await read_startup(reader))
        assert await ScramServer(PASSWORD).exchange(reader, writer)
        send(writer, b"N", b"SNOTICE\x00VNOTICE\x00C00000\x00Mhello\x00\x00")
        ready(writer)
        await rest(reader)

    async with fake_server(handler) as port:
        session = await upstream.connect(
            fake(port), read_only=True, application_name="jitgate:ag\u00e9nt\x00x", timeout=5
        )
        await session.close()
    assert seen == {
        "user": "agent_role",
        "database": "db",
        "application_name": "jitgate:ag?nt?x",
        "options": "-c default_transaction_read_only=on",
    }
    assert session.parameters == {"server_version": "18.0", "client_encoding": "UTF8"}
    assert list(session.parameters) == ["server_version", "client_encoding"]
    assert session.backend_key == (4242, -7)
    assert session.transaction_status == b"I"
    assert session.notices == (upstream.Notice("NOTICE", "00000", "hello"),)
    assert "4242" not in repr(session)


async def test_without_read_only_there_are_no_options() -> None:
    seen: dict[str, str] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.update(await read_startup(reader))
        ready(writer)
        await rest(reader)

    async with fake_server(handler) as port:
        session = await upstream.connect(
            fake(port), read_only=False, application_name="a" * 100, timeout=5
        )
        await session.close()
    assert "options" not in seen
    assert seen["application_name"] == "a" * 63
    assert session.authentication == "trust"


async def test_a_forged_server_signature_fails_mutual_authentication() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_startup(reader)
        await ScramServer(PASSWORD).exchange(reader, writer, signature=bytes(32))
        ready(writer)
        await rest(reader)

    async with fake_server(handler) as port:
        with pytest.raises(upstream.ScramFailed, match="signature is wrong"):
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)


async def test_authentication_ok_before_the_server_proved_itself_is_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_startup(reader)
        await ScramServer(PASSWORD).exchange(reader, writer, skip_final=True)
        ready(writer)
        await rest(reader)

    async with fake_server(handler) as port:
        with pytest.raises(upstream.ScramFailed, match="without proving"):
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)


async def test_too_few_iterations_are_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_startup(reader)
        await ScramServer(PASSWORD, iterations=1000).exchange(reader, writer)
        await rest(reader)

    async with fake_server(handler) as port:
        with pytest.raises(upstream.ScramFailed, match="below 4096"):
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)


@pytest.mark.parametrize(
    ("request_", "error", "match"),
    [
        (auth(upstream.AUTH_MD5, b"salt"), upstream.AuthRefused, "MD5"),
        (auth(upstream.AUTH_CLEARTEXT), upstream.AuthRefused, "cleartext"),
        (auth(upstream.AUTH_GSS), upstream.AuthRefused, "GSSAPI"),
        (auth(99), upstream.AuthRefused, "method 99"),
        (
            auth(upstream.AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00\x00"),
            upstream.AuthRefused,
            "channel binding",
        ),
        (auth(upstream.AUTH_SASL, b"OTHER\x00\x00"), upstream.AuthRefused, "only SCRAM-SHA-256"),
        (auth(upstream.AUTH_SASL, b"SCRAM-SHA-256"), upstream.ProtocolViolation, "malformed"),
        (auth(upstream.AUTH_SASL_CONTINUE, b"r=x"), upstream.ProtocolViolation, "out of order"),
        (auth(upstream.AUTH_SASL_FINAL, b"v=x"), upstream.ProtocolViolation, "out of order"),
    ],
)
async def test_refused_authentication_requests_send_nothing(
    request_: bytes, error: type[upstream.UpstreamError], match: str
) -> None:
    after: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_startup(reader)
        send(writer, b"R", request_)
        after.append(await rest(reader))

    async with fake_server(handler) as port:
        with pytest.raises(error, match=match):
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)
    assert after == [b""]  # no password, no hash, no answer at all


@pytest.mark.parametrize(
    ("script", "error", "match"),
    [
        ([(b"D", b"\x00\x00")], upstream.ProtocolViolation, "expected an authentication"),
        ([(b"R", auth(0)), (b"D", b"\x00\x00")], upstream.ProtocolViolation, "unexpected"),
        ([(b"R", auth(0)), (b"K", b"\x00" * 4)], upstream.ProtocolViolation, "8 bytes"),
        ([(b"R", auth(0)), (b"Z", b"Q")], upstream.ProtocolViolation, "ReadyForQuery"),
        ([(b"R", auth(0)), (b"S", b"only-a-name\x00")], upstream.ProtocolViolation, "Parameter"),
        (
            [(b"E", b"SFATAL\x00VFATAL\x00C53300\x00Mtoo many clients\x00\x00")],
            upstream.ServerError,
            "too many clients",
        ),
        ([(b"R", auth(0)), (b"E", b"C42501\x00Mno\x00\x00")], upstream.ServerError, "no"),
    ],
)
async def test_malformed_or_refusing_servers(
    script: list[tuple[bytes, bytes]], error: type[upstream.UpstreamError], match: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_startup(reader)
        for kind, body in script:
            send(writer, kind, body)
        await rest(reader)

    async with fake_server(handler) as port:
        with pytest.raises(error, match=match):
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)


async def test_an_oversized_message_is_refused_without_reading_it() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_startup(reader)
        writer.write(b"R" + struct.pack("!i", 2**30))
        await rest(reader)

    async with fake_server(handler) as port:
        with pytest.raises(upstream.ProtocolViolation, match="bytes"):
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)


async def test_a_silent_server_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await rest(reader)

    async with fake_server(handler) as port:
        started = time.monotonic()
        with pytest.raises(upstream.UpstreamTimeout, match=r"within 0\.3s") as caught:
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=0.3)
        assert time.monotonic() - started < 2
    assert caught.value.code == "08001"


async def test_a_server_that_hangs_up_is_connect_failed() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_startup(reader)

    async with fake_server(handler) as port:
        with pytest.raises(upstream.ConnectFailed, match="closed the connection"):
            await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)


async def test_nobody_listening_is_connect_failed(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(upstream.ConnectFailed, match="cannot connect"):
        await upstream.connect(fake(port), read_only=False, application_name="t", timeout=5)
    target = Target(socket_dir=str(tmp_path), database="d", user="u", password=PASSWORD)
    with pytest.raises(upstream.ConnectFailed, match=r"\.s\.PGSQL\.5432"):
        await upstream.connect(target, read_only=False, application_name="t", timeout=5)


async def test_a_timed_out_cancel_is_reported() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(16)
        await rest(reader)

    async with fake_server(handler) as port:
        with pytest.raises(upstream.UpstreamTimeout):
            await upstream.cancel(fake(port), 1, 2, timeout=0.3)


async def test_a_cancel_request_is_the_16_bytes_of_the_protocol() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readexactly(16))

    async with fake_server(handler) as port:
        await upstream.cancel(fake(port), 4242, -7, timeout=5)
    assert seen == [struct.pack("!iiii", 16, 80877102, 4242, -7)]


# --- fake servers: TLS --------------------------------------------------------------


def server_context(files: pki.DevPki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls = files.files("idp")
    context.load_cert_chain(tls.cert, tls.key)
    return context


def tls_handler(context: ssl.SSLContext, received: list[bytes]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(8) == upstream.ssl_request()
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(context)
        startup = await read_startup(reader)
        if startup["user"] == "cleartext":
            send(writer, b"R", auth(upstream.AUTH_CLEARTEXT))
            _, body = await read_message(reader)
            received.append(body)
        else:
            assert await ScramServer(PASSWORD).exchange(reader, writer)
        ready(writer)
        await rest(reader)

    return handler


async def test_tls_modes_against_a_fake_server(
    dev_pki: pki.DevPki, foreign_pki: pki.DevPki, tmp_path: Path
) -> None:
    received: list[bytes] = []
    async with fake_server(tls_handler(server_context(dev_pki), received)) as port:
        for target in (
            fake(port, tls="verify-full", ca_file=dev_pki.ca),
            fake(port, tls="verify-full", ca_file=dev_pki.ca, host="localhost"),
            fake(port, tls="require"),
            fake(port, tls="require", ca_file=dev_pki.ca),
        ):
            session = await upstream.connect(
                target, read_only=False, application_name="t", timeout=5
            )
            assert session.tls
            assert session.authentication == "scram-sha-256"
            await session.close()
        for target in (
            fake(port, tls="verify-full", ca_file=foreign_pki.ca),
            fake(port, tls="verify-full"),
            fake(port, tls="require", ca_file=foreign_pki.ca),
        ):
            with pytest.raises(upstream.TlsFailed, match="not accepted"):
                await upstream.connect(target, read_only=False, application_name="t", timeout=5)
        missing = fake(port, tls="verify-full", ca_file=tmp_path / "missing.pem")
        with pytest.raises(upstream.TlsFailed, match="cannot load the CA file"):
            await upstream.connect(missing, read_only=False, application_name="t", timeout=5)
        clear = Target(
            host="127.0.0.1",
            port=port,
            database="db",
            user="cleartext",
            password=PASSWORD,
            tls="verify-full",
            ca_file=str(dev_pki.ca),
        )
        session = await upstream.connect(clear, read_only=False, application_name="t", timeout=5)
        await session.close()
        assert session.authentication == "cleartext"
    assert received == [PASSWORD.encode() + b"\x00"]


async def test_a_wrong_host_name_fails_verify_full(dev_pki: pki.DevPki) -> None:
    # The certificate names localhost and 127.0.0.1 only.
    async with fake_server(tls_handler(server_context(dev_pki), []), host="127.0.0.2") as port:
        target = fake(port, tls="verify-full", ca_file=dev_pki.ca, host="127.0.0.2")
        with pytest.raises(upstream.TlsFailed, match="not accepted"):
            await upstream.connect(target, read_only=False, application_name="t", timeout=5)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (b"N", upstream.TlsFailed, "does not offer TLS"),
        (b"E", upstream.TlsFailed, "with an error"),
        (b"X", upstream.ProtocolViolation, "answered the TLS request"),
        (b"", upstream.ConnectFailed, "closed the connection"),
        # Plaintext after 'S' must never pass for TLS data (CVE-2021-23222).
        (b"S" + b"\x00" * 64, upstream.TlsFailed, "TLS with"),
    ],
)
async def test_tls_negotiation_failures(
    answer: bytes, error: type[upstream.UpstreamError], match: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(8) == upstream.ssl_request()
        writer.write(answer)
        await writer.drain()
        if answer:
            await rest(reader)

    async with fake_server(handler) as port:
        with pytest.raises(error, match=match):
            await upstream.connect(
                fake(port, tls="require"), read_only=False, application_name="t", timeout=5
            )


# --- the target --------------------------------------------------------------------


def test_the_password_never_shows_in_a_repr() -> None:
    target = Target(host="db", database="d", user="u", password="s3cret-value")
    assert "s3cret-value" not in repr(target)
    assert "s3cret-value" not in str(target)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"host": "db", "socket_dir": "/tmp"}, "exactly one"),
        ({}, "exactly one"),
        ({"host": "db", "tls": "prefer"}, "not one of"),
        ({"socket_dir": "/tmp", "tls": "require"}, "Unix socket"),
        ({"host": "db", "port": 0}, "port"),
        ({"host": "db", "user": "a\x00b"}, "NUL"),
        ({"host": "db", "database": ""}, "non-empty"),
    ],
)
def test_impossible_targets_are_refused(fields: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"database": "d", "user": "u", "password": "p"}
    with pytest.raises(ValueError, match=match):
        Target(**{**base, **fields})  # type: ignore[arg-type]


def test_errors_carry_their_sqlstate() -> None:
    error = upstream.server_error(b"SFATAL\x00VFATAL\x00C28P01\x00Mbad\x00Dmore\x00\x00")
    assert (error.code, error.message, error.severity, error.detail) == (
        "28P01",
        "bad",
        "FATAL",
        "more",
    )
    assert str(error) == "bad (SQLSTATE 28P01)"
    assert isinstance(upstream.UpstreamTimeout("x"), upstream.UpstreamError)
