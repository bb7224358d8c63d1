"""Where audit records live: a small Store interface and its SQLite implementation."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jitgate.audit.record import GENESIS, StoredRecord
from jitgate.common.errors import JitgateError

log = logging.getLogger(__name__)

APPLICATION_ID = 0x6A674155
"""Marks a SQLite file as a jitgate audit log ("jgAU"), so no other file is written to."""
SCHEMA_VERSION = 2
"""1: records; 2: and signed checkpoints, written in the same transaction as their records."""
_MAX_INDEX = 2**63 - 1  # SQLite integers are signed 64-bit

# Only INSERT and SELECT appear in this module. The triggers are defence in
# depth against other code sharing the file: whoever holds the file can still
# drop them, which is what the hash chain is for.
_SCHEMA = (
    """
    CREATE TABLE records (
        idx INTEGER PRIMARY KEY CHECK (idx >= 0),
        time TEXT NOT NULL,
        caller TEXT NOT NULL,
        kind TEXT NOT NULL,
        canonical BLOB NOT NULL,
        hash BLOB NOT NULL CHECK (length(hash) = 32)
    ) STRICT
    """,
    """
    CREATE TRIGGER records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END
    """,
    """
    CREATE TRIGGER records_no_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END
    """,
    f"PRAGMA application_id = {APPLICATION_ID}",
)
_CHECKPOINTS = (
    """
    CREATE TABLE checkpoints (
        size INTEGER PRIMARY KEY CHECK (size >= 0),
        root BLOB NOT NULL CHECK (length(root) = 32),
        time TEXT NOT NULL,
        note TEXT NOT NULL
    ) STRICT
    """,
    """
    CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END
    """,
    """
    CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END
    """,
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_INSERT = "INSERT INTO records (idx, time, caller, kind, canonical, hash) VALUES (?, ?, ?, ?, ?, ?)"
_SELECT = (
    "SELECT idx, time, caller, kind, canonical, hash FROM records"
    " WHERE idx >= ? ORDER BY idx LIMIT ?"
)
_INSERT_CHECKPOINT = "INSERT INTO checkpoints (size, root, time, note) VALUES (?, ?, ?, ?)"
_SELECT_CHECKPOINTS = (
    "SELECT size, root, time, note FROM checkpoints WHERE size >= ? ORDER BY size LIMIT ?"
)
_LATEST_CHECKPOINT = "SELECT size, root, time, note FROM checkpoints ORDER BY size DESC LIMIT 1"


class StoreError(JitgateError):
    """The audit store failed; whatever was being appended was not acknowledged."""


@dataclass(frozen=True, kw_only=True)
class Head:
    """The end of the log: how many records it holds and the hash of the last one."""

    size: int
    record_hash: bytes = GENESIS


@dataclass(frozen=True, kw_only=True)
class StoredCheckpoint:
    """A signed checkpoint as stored: the tree size and root it commits to, and the note."""

    size: int
    root: bytes
    time: str
    note: str


class Store(Protocol):
    """What the writer and readers need from a store; a PostgreSQL one can stand in."""

    def head(self) -> Head:
        """Return the end of the log as durably stored."""
        ...

    def append(self, records: Sequence[StoredRecord], checkpoint: StoredCheckpoint) -> Head:
        """Store records, which continue the log, and the checkpoint of the log they end.

        One durable transaction: the records and the checkpoint covering them
        are on disk together, or neither is.
        """
        ...

    def read(self, from_index: int, limit: int) -> list[StoredRecord]:
        """Return up to limit records from from_index on, in index order."""
        ...

    def checkpoints(self, from_size: int, limit: int) -> list[StoredCheckpoint]:
        """Return up to limit checkpoints of size from_size or more, smallest first."""
        ...

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """Return the checkpoint of the largest size, if there is one."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _blob(value: object) -> bytes:
    # A file edited by hand can hold any type in any column; keep the value
    # comparable so the chain check reports it instead of crashing on it.
    return value if isinstance(value, bytes) else str(value).encode()


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode, fsynced on every commit.

    A store is used by one thread at a time; the writer owns the writable one.
    """

    def __init__(self, *, connection: sqlite3.Connection, path: Path, read_only: bool) -> None:
        self._db = connection
        self.path = path
        self.read_only = read_only
        self._head: Head | None = None

    @classmethod
    def open(
        cls, path: Path, *, read_only: bool = False, max_bytes: int | None = None
    ) -> SqliteStore:
        """Open (and when writable, create) the audit log at path.

        max_bytes caps the database file: an append that would grow it further
        fails (SQLITE_FULL) and is refused, as on a full disk, rather than
        filling the disk the rest of the machine needs.
        """
        try:
            if read_only:
                # mode=ro: SQLite refuses every write on this connection, so a
                # reader or the offline verifier can never change the log.
                uri = f"{path.resolve().as_uri()}?mode=ro"
                db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                # Readable by the audit service's own user only; SQLite gives
                # the -wal and -shm files the database file's permissions.
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
        store = cls(connection=db, path=path, read_only=read_only)
        try:
            store._prepare()
            if max_bytes is not None:
                page = int(db.execute("PRAGMA page_size").fetchone()[0])
                db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page)}")
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot open {path}: {exc}") from exc
        except StoreError:
            db.close()
            raise
        return store

    def _prepare(self) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables or self.read_only:
                raise StoreError(f"{self.path} is not a jitgate audit log")
            db.execute("BEGIN IMMEDIATE")
            # Another process may have created the log while this one waited.
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                for statement in (*_SCHEMA, *_CHECKPOINTS):
                    db.execute(statement)
                log.info("created audit log %s", self.path)
            db.execute("COMMIT")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            # Version 1 logs had no checkpoints. One cannot be added later:
            # records with no checkpoint look exactly like a log whose
            # checkpoints were deleted, so such a log is read, never extended.
            raise StoreError(f"{self.path} has schema version {version}, not {SCHEMA_VERSION}")
        if not self.read_only:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path} cannot use WAL mode (got {mode})")
            # FULL: in WAL mode every COMMIT fsyncs the WAL, so a commit that
            # returned survives power loss; that is when an append is acknowledged.
            db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")

    def _read_head(self) -> Head:
        row = self._db.execute("SELECT idx, hash FROM records ORDER BY idx DESC LIMIT 1").fetchone()
        if row is None:
            return Head(size=0)
        return Head(size=int(row[0]) + 1, record_hash=_blob(row[1]))

    def head(self) -> Head:
        """Return the end of the log, from disk when it is not known for sure."""
        if self._head is None:
            try:
                self._head = self._read_head()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the head of {self.path}: {exc}") from exc
        return self._head

    def append(self, records: Sequence[StoredRecord], checkpoint: StoredCheckpoint) -> Head:
        """Insert records and their checkpoint in one BEGIN IMMEDIATE ... COMMIT: one fsync."""
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        head = self.head()
        check_continues(head, records, checkpoint)
        rows = [(r.index, r.time, r.caller, r.kind, r.canonical, r.record_hash) for r in records]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(_INSERT, rows)
            self._db.execute(
                _INSERT_CHECKPOINT,
                (checkpoint.size, checkpoint.root, checkpoint.time, checkpoint.note),
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abandon()
            raise StoreError(f"append of {len(rows)} records failed: {exc}") from exc
        if records:
            self._head = Head(size=records[-1].index + 1, record_hash=records[-1].record_hash)
        return self.head()

    def _abandon(self) -> None:
        # After a failed COMMIT the batch may or may not be on disk (an fsync
        # error leaves it unknown), so the head is whatever the disk now says:
        # the next batch then continues the log without a gap or a duplicate.
        self._head = None
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self.head()
        except (sqlite3.Error, StoreError) as exc:
            log.error("audit store %s: head unknown after a failed append: %s", self.path, exc)
            self._head = None

    def read(self, from_index: int, limit: int) -> list[StoredRecord]:
        """Return up to limit records from from_index on, in index order."""
        if from_index > _MAX_INDEX or limit <= 0:
            return []
        try:
            rows = self._db.execute(_SELECT, (max(from_index, 0), limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        return [record_from_row(row) for row in rows]

    def checkpoints(self, from_size: int, limit: int) -> list[StoredCheckpoint]:
        """Return up to limit checkpoints of size from_size or more, smallest first."""
        if from_size > _MAX_INDEX or limit <= 0:
            return []
        try:
            rows = self._db.execute(_SELECT_CHECKPOINTS, (max(from_size, 0), limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the checkpoints of {self.path}: {exc}") from exc
        return [checkpoint_from_row(row) for row in rows]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """Return the checkpoint of the largest size, if there is one."""
        try:
            row = self._db.execute(_LATEST_CHECKPOINT).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the checkpoints of {self.path}: {exc}") from exc
        return None if row is None else checkpoint_from_row(row)

    def close(self) -> None:
        """Close the connection; a writable store checkpoints its WAL first."""
        self._db.close()


def record_from_row(row: Sequence[object]) -> StoredRecord:
    """A records row (idx, time, caller, kind, canonical, hash) as a StoredRecord.

    Every store selects these columns in this order; values of unexpected
    types are kept comparable, so the chain check reports them.
    """
    idx, time, caller, kind, canonical, digest = row
    return StoredRecord(
        index=int(str(idx)),
        time=_text(time),
        caller=_text(caller),
        kind=_text(kind),
        canonical=_blob(canonical),
        record_hash=_blob(digest),
    )


def checkpoint_from_row(row: Sequence[object]) -> StoredCheckpoint:
    size, root, time, note = row
    return StoredCheckpoint(
        size=int(str(size)), root=_blob(root), time=_text(time), note=_text(note)
    )


def check_continues(
    head: Head, records: Sequence[StoredRecord], checkpoint: StoredCheckpoint
) -> None:
    """Raise ValueError unless records continue a log at head and checkpoint is its new size."""
    for offset, item in enumerate(records):
        if item.index != head.size + offset:
            raise ValueError(f"record {item.index} does not continue a log of {head.size}")
    if checkpoint.size != head.size + len(records):
        raise ValueError(
            f"a checkpoint of size {checkpoint.size} does not end a log of"
            f" {head.size + len(records)}"
        )


def iter_checkpoints(
    store: Store, from_size: int = 0, *, page: int = 1000
) -> Iterator[StoredCheckpoint]:
    """Yield every checkpoint from from_size on, smallest first, a page at a time."""
    while True:
        batch = store.checkpoints(from_size, page)
        yield from batch
        if len(batch) < page:
            return
        from_size = batch[-1].size + 1


def iter_records(store: Store, from_index: int = 0, *, page: int = 1000) -> Iterator[StoredRecord]:
    """Yield every record from from_index to the end of the log, a page at a time."""
    while True:
        batch = store.read(from_index, page)
        yield from batch
        if len(batch) < page:
            return
        from_index = batch[-1].index + 1
