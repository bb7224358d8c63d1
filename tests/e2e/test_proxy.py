"""The PostgreSQL proxy in the real stack: a grant in, a read-only session out, revocable."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from jitgate import client as sdk
from jitgate.devstack.postgres_server import READ_ONLY_ROLE, embedded_bin
from jitgate.devstack.stack import Stack
from tests.e2e.conftest import audit_records, operator_revokes

pytestmark = pytest.mark.e2e

Conn = psycopg.Connection[tuple[Any, ...]]


def _agent(stack: Stack) -> sdk.IssuerClient:
    return sdk.IssuerClient(
        stack.address("issuer"), token=stack.token("deploy-bot"), ca_file=stack.pki.ca
    )


def _conninfo(stack: Stack, dbname: str = "orders-replica") -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": stack.ports["proxy"],
        "sslmode": "verify-full",
        "sslrootcert": str(stack.pki.ca),
        "dbname": dbname,
        "user": "deploy-bot",
        "connect_timeout": 5,
    }


def _connect(stack: Stack, token: str, dbname: str = "orders-replica") -> Conn:
    return psycopg.connect(**_conninfo(stack, dbname), password=token, autocommit=True)


def _ended_within(conn: Conn, since: float, seconds: float = 1.0) -> psycopg.Error:
    """Query until the session fails; the failure must come within seconds of since."""
    while True:
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as ended:
            assert time.monotonic() - since < seconds
            return ended
        assert time.monotonic() - since < seconds, "the session outlived its revocation"
        time.sleep(0.02)


@pytest.fixture
def grant(stack: Stack) -> Iterator[sdk.Grant]:
    """A live orders-replica grant of deploy-bot's, revoked afterwards."""
    with _agent(stack) as agent:
        granted = agent.request_grant("orders-replica", ttl_seconds=120, reason="e2e proxy")
        yield granted
        if granted.grant_id in {g.grant_id for g in agent.list_grants()}:
            agent.revoke_grant(granted.grant_id, reason="test over")


def _password(stack: Stack) -> str:
    return stack.postgres_password_file.read_text().strip()


def test_the_issuer_names_the_stacks_proxy(grant: sdk.Grant, stack: Stack) -> None:
    assert grant.proxy_endpoint == stack.address("proxy")


def test_an_agent_queries_the_demo_database_read_only(stack: Stack, grant: sdk.Grant) -> None:
    received: list[str] = []
    with _connect(stack, grant.token) as conn:
        conn.add_notice_handler(lambda notice: received.append(str(notice)))
        row = conn.execute(
            "SELECT count(*), sum(total_cents), current_user, current_database() FROM orders"
        ).fetchone()
        assert row is not None
        assert row[0] >= 1
        assert row[2:] == (READ_ONLY_ROLE, "orders")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("INSERT INTO orders (customer, total_cents) VALUES ('x', 1)")
        assert refused.value.sqlstate == "25006"  # read-only transaction
        # Below the session setting, the role itself may not write or reach other tables.
        with contextlib.suppress(psycopg.Error):
            conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.Error) as denied:
            conn.execute("INSERT INTO orders (customer, total_cents) VALUES ('x', 1)")
        received.append(str(denied.value))
        assert denied.value.sqlstate in ("25006", "42501")
        received += [str(value) for value in row]
        received += [
            conn.info.parameter_status(name) or ""
            for name in ("server_version", "application_name", "session_authorization")
        ]
        received.append(str(refused.value))
    password = _password(stack)
    assert not any(password in text for text in received)


def test_psql_connects_through_the_proxy(stack: Stack, grant: sdk.Grant) -> None:
    candidates = [shutil.which("psql"), str(embedded_bin() / "psql")]
    conninfo = " ".join(f"{key}={value}" for key, value in _conninfo(stack).items())
    tried = []
    for psql in filter(None, candidates):
        done = subprocess.run(
            [psql, conninfo, "-AtXc", "SELECT count(*) > 0, current_user FROM orders"],
            env={**os.environ, "PGPASSWORD": grant.token},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if "SSL support is not compiled in" in done.stderr:
            tried.append(psql)
            continue  # the embedded wheel's psql is built without TLS
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"t|{READ_ONLY_ROLE}"
        return
    pytest.skip(f"no psql with TLS support (tried {tried})")


def _refusal(stack: Stack, token: str, dbname: str = "orders-replica") -> psycopg.Error:
    with pytest.raises(psycopg.OperationalError) as refused:
        _connect(stack, token, dbname).close()
    return refused.value


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    changed = claims.replace(b'"orders-replica"', b'"billing-primary"')
    assert changed != claims
    return ".".join([header, base64.urlsafe_b64encode(changed).rstrip(b"=").decode(), signature])


def test_bad_grants_are_refused_with_an_error_response(stack: Stack, grant: sdk.Grant) -> None:
    with _agent(stack) as agent:
        other = agent.request_grant("payments-staging", ttl_seconds=60, reason="e2e proxy")
        revoked = agent.request_grant("orders-replica", ttl_seconds=60, reason="e2e proxy")
        agent.revoke_grant(revoked.grant_id, reason="e2e proxy")
        agent.revoke_grant(other.grant_id, reason="e2e proxy")
    cases = {
        "another connection's grant": (_refusal(stack, other.token), "another connection"),
        "a revoked grant": (_refusal(stack, revoked.token), "revoked"),
        "a tampered grant": (_refusal(stack, _tampered(grant.token)), "not valid"),
        "garbage": (_refusal(stack, "not-a-grant"), "not valid"),
        "an unknown connection": (
            _refusal(stack, grant.token, "billing-primary"),
            "no connection named",
        ),
    }
    for case, (error, expected) in cases.items():
        # An ErrorResponse from the proxy, not a dropped connection.
        assert expected in str(error), (case, str(error))
        assert _password(stack) not in str(error)
    # The good grant still works: nothing above consumed or damaged it.
    with _connect(stack, grant.token) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_agent_revoking_ends_its_session_within_a_second(
    stack: Stack, grant: sdk.Grant
) -> None:
    with _connect(stack, grant.token) as conn:
        conn.execute("SELECT 1")
        with _agent(stack) as agent:
            agent.revoke_grant(grant.grant_id, reason="done")
        ended = _ended_within(conn, time.monotonic())
    assert "grant revoked" in str(ended)
    records = audit_records(stack)
    redeemed = [r.event.redemption for r in records if r.event.redemption.grant_id]
    mine = [r for r in redeemed if r.grant_id == grant.grant_id]
    assert len(mine) == 1
    assert (mine[0].subject, mine[0].connection) == ("deploy-bot", "orders-replica")
    closed = []
    for _ in range(50):  # the report follows the close
        closed = [
            r.event.session_closed
            for r in audit_records(stack)
            if r.event.session_closed.grant_id == grant.grant_id
        ]
        if closed:
            break
        time.sleep(0.05)
    assert [(c.session_id, c.reason) for c in closed] == [(mine[0].session_id, "revoked")]
    assert closed[0].bytes_to_client > 0


def test_the_operator_revoking_ends_its_session_within_a_second(
    stack: Stack, grant: sdk.Grant
) -> None:
    with _connect(stack, grant.token) as conn:
        conn.execute("SELECT 1")
        operator_revokes(stack, grant.grant_id, "incident 12")
        ended = _ended_within(conn, time.monotonic())
    assert "grant revoked" in str(ended)


def test_the_upstream_password_is_in_no_log(stack: Stack, grant: sdk.Grant) -> None:
    with _connect(stack, grant.token) as conn:
        conn.execute("SELECT count(*) FROM orders")
    password = _password(stack).encode()
    logs = sorted(stack.logs.glob("*.log"))
    assert {path.stem for path in logs} >= {"proxy", "policy", "issuer", "audit"}
    leaked = [path.name for path in logs if password in path.read_bytes()]
    assert leaked == []
    assert stack.postgres is not None
    assert stack.postgres.server is not None
    server_log = Path(stack.postgres.server.log)
    assert password not in server_log.read_bytes()
    assert stack.postgres_password_file.stat().st_mode & 0o777 == 0o600
