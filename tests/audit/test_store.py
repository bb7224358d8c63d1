"""The SQLite store: durable settings, append-only rules, heads, and failed commits."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from jitgate.audit.chain import verify_store
from jitgate.audit.record import GENESIS
from jitgate.audit.store import (
    APPLICATION_ID,
    Head,
    SqliteStore,
    StoreError,
    iter_checkpoints,
    iter_records,
)

from .factory import checkpoint_for, extend, filled, raw, records


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


def test_a_new_store_is_empty(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        assert store.head() == Head(size=0, record_hash=GENESIS)
        assert store.read(0, 10) == []
    finally:
        store.close()


def test_durability_settings(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()
    with raw(db) as other:
        assert other.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_append_then_read(db: Path) -> None:
    batch = records(5)
    store = SqliteStore.open(db)
    try:
        head = extend(store, batch)
        assert head == Head(size=5, record_hash=batch[-1].record_hash)
        assert store.read(0, 10) == batch
        assert store.read(3, 1) == batch[3:4]
        assert store.read(5, 10) == []
    finally:
        store.close()


def test_reopen_knows_its_head_and_continues_the_chain(db: Path) -> None:
    first = records(3)
    store = SqliteStore.open(db)
    extend(store, first)
    store.close()
    store = SqliteStore.open(db)
    try:
        head = store.head()
        assert head == Head(size=3, record_hash=first[-1].record_hash)
        extend(store, records(2, head))
        assert verify_store(store).intact
        assert verify_store(store).count == 5
    finally:
        store.close()


def test_append_must_continue_the_log(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        extend(store, records(2))
        with pytest.raises(ValueError, match="does not continue"):
            extend(store, records(1))  # index 0 again
        assert store.head().size == 2
    finally:
        store.close()


def test_triggers_refuse_update_and_delete(db: Path) -> None:
    filled(db, 3)
    with raw(db) as other:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute("UPDATE records SET caller = 'spiffe://jitgate/issuer' WHERE idx = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute("DELETE FROM records WHERE idx = 1")
        assert other.execute("SELECT count(*) FROM records").fetchone()[0] == 3


def test_no_update_or_delete_in_the_code() -> None:
    forbidden = re.compile(
        r"\b(UPDATE\s+RECORDS|DELETE\s+FROM|OR\s+REPLACE|REPLACE\s+INTO|DROP\s+(TABLE|TRIGGER))"
    )
    source = Path(__file__).parents[2] / "services" / "audit"
    modules = sorted(source.glob("*.py"))
    assert any(m.name == "store.py" for m in modules)
    for module in modules:
        assert not forbidden.search(module.read_text().upper()), module.name


def test_failed_commit_stores_nothing_and_the_next_append_continues(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        extend(store, records(2))
        # A real SQLite error inside the transaction, standing in for a full disk.
        with raw(db) as other:
            other.execute(
                "CREATE TRIGGER fail BEFORE INSERT ON records WHEN NEW.idx = 4"
                " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        head = store.head()
        with pytest.raises(StoreError, match="disk is full"):
            extend(store, records(3, head))  # 2, 3 and 4: all or nothing
        assert store.head() == head
        assert len(store.read(0, 10)) == 2
        with raw(db) as other:
            other.execute("DROP TRIGGER fail")
        extend(store, records(3, store.head()))
        assert [r.index for r in store.read(0, 10)] == [0, 1, 2, 3, 4]
        assert verify_store(store).intact
    finally:
        store.close()


def test_read_only_store_refuses_to_append(db: Path) -> None:
    filled(db, 1)
    store = SqliteStore.open(db, read_only=True)
    try:
        with pytest.raises(StoreError, match="read-only"):
            extend(store, records(1, store.head()))
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store._db.execute("INSERT INTO records VALUES (9, 't', 'c', 'k', x'00', x'00')")
        assert store.head().size == 1
    finally:
        store.close()


def test_read_only_does_not_create_a_log(db: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore.open(db, read_only=True)
    assert not db.exists()


def test_another_sqlite_file_is_not_written(db: Path) -> None:
    with raw(db) as other:
        other.execute("CREATE TABLE mine (x)")
    before = db.read_bytes()
    with pytest.raises(StoreError, match="not a jitgate audit log"):
        SqliteStore.open(db)
    assert db.read_bytes() == before


def test_an_empty_file_read_only_is_not_a_log(db: Path) -> None:
    db.write_bytes(b"")
    with pytest.raises(StoreError, match="not a jitgate audit log"):
        SqliteStore.open(db, read_only=True)


def test_garbage_is_not_a_log(db: Path) -> None:
    db.write_bytes(b"not a database " * 100)
    with pytest.raises(StoreError, match="not a database"):
        SqliteStore.open(db)


def test_unknown_schema_version(db: Path) -> None:
    filled(db, 0)
    with raw(db) as other:
        other.execute("PRAGMA user_version = 3")
    with pytest.raises(StoreError, match="schema version 3"):
        SqliteStore.open(db)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore.open(tmp_path / "nowhere" / "audit.db")


def test_read_beyond_sqlite_integers(db: Path) -> None:
    filled(db, 2)
    store = SqliteStore.open(db, read_only=True)
    try:
        assert store.read(2**64 - 1, 10) == []
        assert store.read(0, 0) == []
    finally:
        store.close()


def test_iter_records_pages(db: Path) -> None:
    filled(db, 5)
    store = SqliteStore.open(db, read_only=True)
    try:
        assert [r.index for r in iter_records(store, page=2)] == [0, 1, 2, 3, 4]
        assert [r.index for r in iter_records(store, 3, page=2)] == [3, 4]
        assert [r.index for r in iter_records(store, 4, page=1)] == [4]
    finally:
        store.close()


def test_a_new_log_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = SqliteStore.open(path)
    store.close()
    assert path.stat().st_mode & 0o777 == 0o600


# Checkpoints: stored with their records, append-only, and a quota.


def test_a_checkpoint_is_stored_with_its_records_or_neither_is(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        first = records(2)
        extend(store, first)
        assert store.latest_checkpoint() == checkpoint_for(first)
        with raw(db) as other:
            other.execute(
                "CREATE TRIGGER fail BEFORE INSERT ON checkpoints WHEN NEW.size = 3"
                " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        with pytest.raises(StoreError, match="disk is full"):
            extend(store, records(1, store.head()))
        # The record went with its failed checkpoint: the log is as it was.
        assert store.head().size == 2
        assert [c.size for c in store.checkpoints(0, 10)] == [2]
    finally:
        store.close()


def test_a_checkpoint_must_end_the_log_it_is_stored_with(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        batch = records(2)
        with pytest.raises(ValueError, match="does not end a log of 2"):
            store.append(batch, checkpoint_for(batch[:1]))
        assert store.head().size == 0
    finally:
        store.close()


def test_triggers_refuse_changing_a_checkpoint(db: Path) -> None:
    filled(db, 3)
    with raw(db) as other:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute("UPDATE checkpoints SET root = zeroblob(32)")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute("DELETE FROM checkpoints")


def test_checkpoints_page_in_size_order(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        for _ in range(4):
            extend(store, records(2, store.head()))
        assert [c.size for c in store.checkpoints(0, 10)] == [2, 4, 6, 8]
        assert [c.size for c in store.checkpoints(5, 1)] == [6]
        assert [c.size for c in iter_checkpoints(store, 3, page=1)] == [4, 6, 8]
        latest = store.latest_checkpoint()
        assert latest is not None
        assert latest.size == 8
    finally:
        store.close()


def test_a_full_log_refuses_appends_and_keeps_what_it_has(db: Path) -> None:
    store = SqliteStore.open(db, max_bytes=64 * 1024)

    def fill() -> None:
        for _ in range(1000):
            extend(store, records(20, store.head()))

    try:
        with pytest.raises(StoreError, match="full"):
            fill()
        size = store.head().size
        assert size > 0
        assert verify_store(store).count == size
        assert store.latest_checkpoint() is not None
    finally:
        store.close()
