"""The PostgreSQL store on a real server: roles, append-only rules, heads, and failed commits."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import errors, sql

from jitgate.audit.chain import verify_store
from jitgate.audit.checkpoint import open_signed
from jitgate.audit.merkle import leaf_hash, root_from_leaves
from jitgate.audit.pgstore import APPLICATION_NAME, SCHEMA_VERSION, PostgresStore
from jitgate.audit.record import GENESIS, StoredRecord
from jitgate.audit.store import (
    APPLICATION_ID,
    Head,
    StoreError,
    iter_checkpoints,
    iter_records,
)
from jitgate.audit.writer import Writer

from .factory import ORIGIN, POLICY, SIGNER, VERIFIER, checkpoint_for, event, records

if TYPE_CHECKING:
    from tests.conftest import PostgresDatabase

pytestmark = pytest.mark.integration

TABLES = ("audit_records", "audit_checkpoints", "audit_meta")


def extend(store: PostgresStore, batch: list[StoredRecord]) -> Head:
    """Append batch to store with the checkpoint of the log it then holds, as the writer does."""
    return store.append(batch, checkpoint_for(store.read(0, 1_000_000) + batch))


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A plain connection, as someone holding that role's credentials would have."""
    return psycopg.connect(dsn, autocommit=True)


def count(dsn: str, table: str = "audit_records") -> int:
    with connect(dsn) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        found = row.fetchone()
        assert found is not None
        return int(found[0])


@pytest.fixture
def pg(postgres: PostgresDatabase) -> PostgresDatabase:
    """A database provisioned as an audit log, with its writer and reader roles."""
    PostgresStore.provision(
        postgres.admin, writer_role=postgres.writer_role, reader_role=postgres.reader_role
    )
    return postgres


@pytest.fixture
def store(pg: PostgresDatabase) -> Iterator[PostgresStore]:
    opened = PostgresStore.open(pg.writer)
    yield opened
    opened.close()


def filled(pg: PostgresDatabase, size: int) -> None:
    """Store size records and the checkpoint that covers them, as the writer role."""
    opened = PostgresStore.open(pg.writer)
    try:
        log = records(size)
        opened.append(log, checkpoint_for(log))
    finally:
        opened.close()


def test_a_new_store_is_empty(store: PostgresStore) -> None:
    assert store.head() == Head(size=0, record_hash=GENESIS)
    assert store.read(0, 10) == []
    assert store.latest_checkpoint() is None


def test_session_settings(pg: PostgresDatabase, store: PostgresStore) -> None:
    def show(conn: psycopg.Connection[tuple[Any, ...]], name: str) -> str:
        row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
        assert row is not None
        return str(row[0])

    assert show(store._conn, "synchronous_commit") == "on"
    assert show(store._conn, "application_name") == APPLICATION_NAME
    assert show(store._conn, "default_transaction_read_only") == "off"
    reader = PostgresStore.open(pg.reader, read_only=True)
    try:
        assert show(reader._conn, "default_transaction_read_only") == "on"
        assert show(reader._conn, "application_name") == APPLICATION_NAME
    finally:
        reader.close()
    with connect(pg.admin) as admin:
        meta = admin.execute("SELECT application_id, schema_version FROM audit_meta").fetchall()
        assert meta == [(APPLICATION_ID, SCHEMA_VERSION)]


def test_indices_come_from_the_caller_not_a_sequence(pg: PostgresDatabase) -> None:
    with connect(pg.admin) as admin:
        sequences = admin.execute("SELECT count(*) FROM pg_class WHERE relkind = 'S'").fetchone()
        assert sequences == (0,)
        defaults = admin.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = ANY(%s)"
            " AND (column_default IS NOT NULL AND table_name <> 'audit_meta'"
            " OR is_identity = 'YES')",
            (list(TABLES),),
        ).fetchone()
        assert defaults == (0,)


def test_append_then_read(store: PostgresStore) -> None:
    batch = records(5)
    head = extend(store, batch)
    assert head == Head(size=5, record_hash=batch[-1].record_hash)
    assert store.read(0, 10) == batch
    assert store.read(3, 1) == batch[3:4]
    assert store.read(5, 10) == []
    assert store.latest_checkpoint() == checkpoint_for(batch)


def test_reopen_knows_its_head_and_continues_the_chain(pg: PostgresDatabase) -> None:
    first = records(3)
    store = PostgresStore.open(pg.writer)
    extend(store, first)
    store.close()
    store = PostgresStore.open(pg.writer)
    try:
        head = store.head()
        assert head == Head(size=3, record_hash=first[-1].record_hash)
        extend(store, records(2, head))
        report = verify_store(store)
        assert report.intact
        assert report.count == 5
    finally:
        store.close()


def test_append_must_continue_the_log(store: PostgresStore) -> None:
    extend(store, records(2))
    with pytest.raises(ValueError, match="does not continue"):
        extend(store, records(1))  # index 0 again
    assert store.head().size == 2


def test_a_checkpoint_must_end_the_log_it_is_stored_with(store: PostgresStore) -> None:
    batch = records(2)
    with pytest.raises(ValueError, match="does not end a log of 2"):
        store.append(batch, checkpoint_for(batch[:1]))
    assert store.head().size == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_records SET caller = 'spiffe://jitgate/issuer' WHERE idx = 1",
        "DELETE FROM audit_records WHERE idx = 1",
        "TRUNCATE audit_records",
        "UPDATE audit_checkpoints SET root = decode(repeat('00', 32), 'hex')",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_checkpoints",
        "UPDATE audit_meta SET schema_version = 9",
        "DELETE FROM audit_meta",
        "INSERT INTO audit_meta (singleton, application_id, schema_version) VALUES (false, 1, 1)",
    ],
)
def test_the_writer_role_may_only_insert_and_select(pg: PostgresDatabase, statement: str) -> None:
    filled(pg, 3)
    with connect(pg.writer) as writer, pytest.raises(errors.InsufficientPrivilege):
        writer.execute(statement)
    assert count(pg.admin) == 3
    assert count(pg.admin, "audit_checkpoints") == 1


def test_the_reader_role_may_only_select(pg: PostgresDatabase) -> None:
    filled(pg, 2)
    with connect(pg.reader) as reader:
        with pytest.raises(errors.InsufficientPrivilege):
            reader.execute("INSERT INTO audit_records VALUES (2, 't', 'c', 'k', '\\x00', '\\x00')")
        with pytest.raises(errors.InsufficientPrivilege):
            reader.execute("TRUNCATE audit_records")
    store = PostgresStore.open(pg.reader, read_only=True)
    try:
        assert verify_store(store).count == 2
    finally:
        store.close()


def test_privileges_as_granted(pg: PostgresDatabase) -> None:
    kinds = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]
    with connect(pg.admin) as admin:
        if admin.info.server_version >= 170000:
            kinds.append("MAINTAIN")  # VACUUM, REINDEX and LOCK in any mode
        rows = admin.execute(
            "SELECT r, t, p, has_table_privilege(r, t, p)"
            " FROM unnest(%s::text[]) r, unnest(%s::text[]) t, unnest(%s::text[]) p",
            ([pg.writer_role, pg.reader_role, "public"], list(TABLES), kinds),
        ).fetchall()
    granted = {(r, t, p) for r, t, p, allowed in rows if allowed}
    writer = {(pg.writer_role, t, p) for t in TABLES[:2] for p in ("SELECT", "INSERT")}
    writer.add((pg.writer_role, "audit_meta", "SELECT"))
    reader = {(pg.reader_role, t, "SELECT") for t in TABLES}
    assert granted == writer | reader


@pytest.mark.parametrize("replica", [False, True])
@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("audit_records", "UPDATE audit_records SET caller = 'x'"),
        ("audit_records", "DELETE FROM audit_records"),
        ("audit_records", "TRUNCATE audit_records"),
        ("audit_checkpoints", "UPDATE audit_checkpoints SET note = 'x'"),
        ("audit_checkpoints", "DELETE FROM audit_checkpoints"),
        ("audit_checkpoints", "TRUNCATE audit_checkpoints"),
        ("audit_meta", "UPDATE audit_meta SET schema_version = 9"),
        ("audit_meta", "DELETE FROM audit_meta"),
        ("audit_meta", "TRUNCATE audit_meta"),
    ],
)
def test_the_owner_is_stopped_by_the_always_triggers(
    pg: PostgresDatabase, table: str, statement: str, replica: bool
) -> None:
    filled(pg, 3)
    with connect(pg.admin) as admin:
        if replica:
            superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            if superuser.fetchone() != (True,):
                pytest.skip("session_replication_role needs a superuser")
            # Replica mode skips ordinary triggers; ALWAYS ones still fire.
            admin.execute("SET session_replication_role = replica")
        with pytest.raises(errors.RaiseException, match=f"{table} is append-only"):
            admin.execute(statement)
    assert count(pg.admin, table) == {"audit_records": 3}.get(table, 1)


def test_no_triggers_may_be_skipped(pg: PostgresDatabase) -> None:
    with connect(pg.admin) as admin:
        rows = admin.execute(
            "SELECT tgrelid::regclass::text, tgenabled FROM pg_trigger WHERE NOT tgisinternal"
        ).fetchall()
    assert sorted(rows) == sorted((t, "A") for t in TABLES for _ in range(2))


def fail_inserts(admin_dsn: str, table: str, condition: str) -> None:
    """A real server error inside the transaction, standing in for a full disk."""
    with connect(admin_dsn) as admin:
        admin.execute(
            "CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'could not extend file: No space left on device'"
            " USING ERRCODE = 'disk_full'; END $$"
        )
        admin.execute(
            sql.SQL(
                "CREATE TRIGGER fail BEFORE INSERT ON {} FOR EACH ROW WHEN ({})"
                " EXECUTE FUNCTION fail()"
            ).format(sql.Identifier(table), sql.SQL(condition))
        )


def heal(admin_dsn: str, table: str) -> None:
    with connect(admin_dsn) as admin:
        admin.execute(sql.SQL("DROP TRIGGER fail ON {}").format(sql.Identifier(table)))


def test_failed_commit_stores_nothing_and_the_next_append_continues(
    pg: PostgresDatabase, store: PostgresStore
) -> None:
    extend(store, records(2))
    fail_inserts(pg.admin, "audit_records", "NEW.idx = 4")
    head = store.head()
    with pytest.raises(StoreError, match="No space left on device"):
        extend(store, records(3, head))  # 2, 3 and 4: all or nothing
    assert store.head() == head
    assert count(pg.admin) == 2
    assert [c.size for c in store.checkpoints(0, 10)] == [2]
    heal(pg.admin, "audit_records")
    extend(store, records(3, store.head()))
    assert [r.index for r in store.read(0, 10)] == [0, 1, 2, 3, 4]
    assert verify_store(store).intact


def test_a_checkpoint_is_stored_with_its_records_or_neither_is(
    pg: PostgresDatabase, store: PostgresStore
) -> None:
    first = records(2)
    extend(store, first)
    fail_inserts(pg.admin, "audit_checkpoints", "NEW.size = 3")
    with pytest.raises(StoreError, match="No space left on device"):
        extend(store, records(1, store.head()))
    # The record went with its failed checkpoint: the log is as it was.
    assert store.head().size == 2
    assert count(pg.admin) == 2
    assert store.latest_checkpoint() == checkpoint_for(first)


def test_a_connection_lost_during_commit_rereads_the_head(
    pg: PostgresDatabase, store: PostgresStore
) -> None:
    extend(store, records(2))
    with connect(pg.admin) as admin:
        # Deferred: fires inside COMMIT, and ends the session there.
        admin.execute(
            "CREATE FUNCTION hang_up() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(0);"
            " RETURN NULL; END $$"
        )
        admin.execute(
            "CREATE CONSTRAINT TRIGGER hang_up AFTER INSERT ON audit_checkpoints"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.size = 3)"
            " EXECUTE FUNCTION hang_up()"
        )
    with pytest.raises(StoreError, match="administrator command"):
        extend(store, records(1, store.head()))
    # Whatever the server holds is the head: here the COMMIT never happened.
    assert store.head() == Head(size=2, record_hash=store.read(1, 1)[0].record_hash)
    assert count(pg.admin) == 2
    extend(store, records(3, store.head()))
    report = verify_store(store)
    assert report.intact
    assert report.count == 5


def test_a_terminated_session_is_replaced(pg: PostgresDatabase, store: PostgresStore) -> None:
    extend(store, records(1))
    with connect(pg.admin) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (APPLICATION_NAME,),
        )
    with pytest.raises(StoreError):
        store.read(0, 10)
    assert len(store.read(0, 10)) == 1
    extend(store, records(1, store.head()))
    assert store.head().size == 2


def test_a_second_writer_cannot_fork_the_log(pg: PostgresDatabase) -> None:
    one, two = PostgresStore.open(pg.writer), PostgresStore.open(pg.writer)
    try:
        assert two.head().size == 0
        extend(one, records(2))
        with pytest.raises(StoreError, match="another writer"):
            two.append(records(1), checkpoint_for(records(1)))  # built on the head it knew
        assert two.head().size == 2
        extend(two, records(1, two.head()))
        assert verify_store(one).count == 3
    finally:
        one.close()
        two.close()


def test_read_only_store_refuses_to_append(pg: PostgresDatabase) -> None:
    filled(pg, 1)
    store = PostgresStore.open(pg.writer, read_only=True)
    try:
        with pytest.raises(StoreError, match="read-only"):
            extend(store, records(1, store.head()))
        with pytest.raises(errors.ReadOnlySqlTransaction):
            store._conn.execute(
                "INSERT INTO audit_records VALUES (9, 't', 'c', 'k', '\\x00', '\\x00')"
            )
        assert store.head().size == 1
    finally:
        store.close()


def test_an_empty_database_is_not_a_log(postgres: PostgresDatabase) -> None:
    for dsn, read_only in (
        (postgres.writer, False),
        (postgres.admin, False),
        (postgres.reader, True),
    ):
        with pytest.raises(StoreError, match="not a jitgate audit log"):
            PostgresStore.open(dsn, read_only=read_only)
    with connect(postgres.admin) as admin:
        assert admin.execute("SELECT to_regclass('audit_meta')").fetchone() == (None,)


def test_another_application_database_is_not_provisioned(postgres: PostgresDatabase) -> None:
    with connect(postgres.admin) as admin:
        admin.execute("CREATE TABLE audit_records (id serial, what text)")
    with pytest.raises(StoreError, match="not a jitgate audit log"):
        PostgresStore.provision(postgres.admin, writer_role=postgres.writer_role)
    with connect(postgres.admin) as admin:
        assert admin.execute("SELECT to_regclass('audit_meta')").fetchone() == (None,)


def test_a_foreign_meta_table_is_refused(postgres: PostgresDatabase) -> None:
    with connect(postgres.admin) as admin:
        admin.execute("CREATE TABLE audit_meta (application_id bigint, schema_version integer)")
        admin.execute("INSERT INTO audit_meta VALUES (42, 1)")
        admin.execute(
            sql.SQL("GRANT SELECT ON audit_meta TO {}").format(sql.Identifier(postgres.writer_role))
        )
    with pytest.raises(StoreError, match="not a jitgate audit log"):
        PostgresStore.provision(postgres.admin, writer_role=postgres.writer_role)
    with pytest.raises(StoreError, match="not a jitgate audit log"):
        PostgresStore.open(postgres.writer)


def test_unknown_schema_version(pg: PostgresDatabase) -> None:
    with connect(pg.admin) as admin:
        # Only the owner can do this, and only by switching the triggers off first.
        admin.execute("ALTER TABLE audit_meta DISABLE TRIGGER USER")
        admin.execute("UPDATE audit_meta SET schema_version = 9")
    with pytest.raises(StoreError, match="schema version 9"):
        PostgresStore.open(pg.writer)
    with pytest.raises(StoreError, match="schema version 9"):
        PostgresStore.provision(pg.admin, writer_role=pg.writer_role)


def test_provision_again_keeps_the_log(pg: PostgresDatabase) -> None:
    filled(pg, 3)
    PostgresStore.provision(pg.admin, writer_role=pg.writer_role, reader_role=pg.reader_role)
    store = PostgresStore.open(pg.writer)
    try:
        assert verify_store(store).count == 3
        extend(store, records(1, store.head()))
    finally:
        store.close()


def test_provision_refuses_roles_privileges_would_not_bind(postgres: PostgresDatabase) -> None:
    with connect(postgres.admin) as admin:
        row = admin.execute("SELECT current_user").fetchone()
        assert row is not None
        owner = str(row[0])
    with pytest.raises(StoreError, match="owns the audit tables"):
        PostgresStore.provision(postgres.admin, writer_role=owner)
    with pytest.raises(StoreError, match="does not exist"):
        PostgresStore.provision(postgres.admin, writer_role="jitgate_nobody")
    # Refused before anything was committed.
    with connect(postgres.admin) as admin:
        assert admin.execute("SELECT to_regclass('audit_meta')").fetchone() == (None,)


def test_an_unreachable_server_fails_fast_and_keeps_the_password(tmp_path: Path) -> None:
    dsn = f"host={tmp_path} port=5 dbname=audit user=w password=sekrit"
    with pytest.raises(StoreError, match="cannot open") as caught:
        PostgresStore.open(dsn, connect_timeout=2)
    assert "sekrit" not in str(caught.value)
    assert "audit" in str(caught.value)


def test_read_beyond_bigint(pg: PostgresDatabase) -> None:
    filled(pg, 2)
    store = PostgresStore.open(pg.reader, read_only=True)
    try:
        assert store.read(2**64 - 1, 10) == []
        assert store.read(2**63, 10) == []
        assert store.read(0, 0) == []
        assert [r.index for r in store.read(-5, 1)] == [0]
        assert [r.index for r in store.read(0, 2**70)] == [0, 1]
        assert store.checkpoints(2**64, 1) == []
        assert store.checkpoints(0, 0) == []
    finally:
        store.close()


def test_iter_records_pages(pg: PostgresDatabase) -> None:
    filled(pg, 5)
    store = PostgresStore.open(pg.reader, read_only=True)
    try:
        assert [r.index for r in iter_records(store, page=2)] == [0, 1, 2, 3, 4]
        assert [r.index for r in iter_records(store, 3, page=2)] == [3, 4]
        assert [r.index for r in iter_records(store, 4, page=1)] == [4]
    finally:
        store.close()


def test_checkpoints_page_in_size_order(store: PostgresStore) -> None:
    for _ in range(4):
        extend(store, records(2, store.head()))
    assert [c.size for c in store.checkpoints(0, 10)] == [2, 4, 6, 8]
    assert [c.size for c in store.checkpoints(5, 1)] == [6]
    assert [c.size for c in iter_checkpoints(store, 3, page=1)] == [4, 6, 8]
    latest = store.latest_checkpoint()
    assert latest is not None
    assert latest.size == 8
    assert verify_store(store).intact


# The real writer on a PostgreSQL store.


async def test_the_writer_appends_concurrent_events_to_postgres(pg: PostgresDatabase) -> None:
    writer = Writer(open_store=lambda: PostgresStore.open(pg.writer), signer=SIGNER, origin=ORIGIN)
    await writer.start()
    try:
        receipts = await asyncio.gather(*(writer.append(POLICY, event(n)) for n in range(200)))
    finally:
        await writer.close()
    assert sorted(r.index for r in receipts) == list(range(200))
    assert 0 < writer.transactions <= 200
    store = PostgresStore.open(pg.reader, read_only=True)
    try:
        stored = list(iter_records(store))
        assert [r.index for r in stored] == list(range(200))
        assert {r.index: r.record_hash for r in receipts} == {
            r.index: r.record_hash for r in stored
        }
        latest = store.latest_checkpoint()
        assert latest is not None
        assert latest.size == 200
        assert latest.root == root_from_leaves(leaf_hash(r.canonical) for r in stored)
        signed = open_signed(latest.note, [VERIFIER])
        assert (signed.size, signed.root) == (200, latest.root)
        assert verify_store(store).intact
    finally:
        store.close()
    # A restarted writer rebuilds its tree from the server and continues.
    again = Writer(open_store=lambda: PostgresStore.open(pg.writer), signer=SIGNER, origin=ORIGIN)
    await again.start()
    try:
        assert (await again.append(POLICY, event(200))).index == 200
    finally:
        await again.close()


def test_jitgate_audit_provision(postgres: PostgresDatabase) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jitgate",
            "audit",
            "provision",
            "--admin-dsn",
            postgres.admin,
            "--writer-role",
            postgres.writer_role,
            "--reader-role",
            postgres.reader_role,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "audit schema ready" in done.stdout
    assert "password" not in done.stdout.lower()
    PostgresStore.open(postgres.writer).close()
