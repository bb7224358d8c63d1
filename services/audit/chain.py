"""Walk the hash chain from record 0 and name the first record that breaks it."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from jitgate.audit.record import GENESIS, StoredRecord, parse, record_hash
from jitgate.audit.store import SqliteStore, Store, iter_records


@dataclass(frozen=True, kw_only=True)
class ChainReport:
    """The outcome of a chain check: intact, or broken at one index and why.

    count is how many records verified from index 0 and head the hash of the
    last of them. A chain alone cannot show that records were cut from its end
    or that its last record was rewritten whole: compare head with one
    recorded earlier (signed checkpoints will do that).
    """

    count: int
    head: bytes = GENESIS
    broken_at: int | None = None
    reason: str = ""

    @property
    def intact(self) -> bool:
        """True when every record verified."""
        return self.broken_at is None


def _fault(item: StoredRecord, expected: int, prev: bytes) -> str | None:
    """Return why item cannot be record number expected after prev, or None."""
    # 1. Indices are contiguous: a gap is a deleted record.
    if item.index != expected:
        return f"record {expected} is missing (the next stored record is {item.index})"
    # 2. The stored hash is the hash of the stored bytes: catches an edited payload.
    if not hmac.compare_digest(record_hash(item.canonical), item.record_hash):
        return "the stored hash is not the SHA-256 of the record's bytes"
    # 3. The bytes are a record in canonical form.
    try:
        body = parse(item.canonical)
    except ValueError as exc:
        return f"the record's bytes are not a valid record: {exc}"
    # 4. The record names its own position: catches records moved or swapped.
    if body.index != expected:
        return f"the record says it is index {body.index}"
    # 5. The record links to its predecessor: catches a forged or re-hashed record.
    if not hmac.compare_digest(body.prev_hash, prev):
        if expected == 0:
            return "record 0 does not start the chain (prev is not all zeros)"
        return f"prev is not the hash of record {expected - 1}"
    # 6. The columns kept for queries say what the bytes say, so a query
    #    cannot be misled by a column edited on its own.
    if (item.time, item.caller, item.kind) != (body.time, body.caller, body.kind):
        return "the time, caller or kind column disagrees with the record's bytes"
    return None


def check(records: Iterable[StoredRecord]) -> ChainReport:
    """Check records, which must start at index 0 and come in index order."""
    count, prev = 0, GENESIS
    for item in records:
        why = _fault(item, count, prev)
        if why is not None:
            return ChainReport(count=count, head=prev, broken_at=count, reason=why)
        count, prev = count + 1, item.record_hash
    return ChainReport(count=count, head=prev)


def verify_store(store: Store) -> ChainReport:
    """Check the whole log in store."""
    return check(iter_records(store))


def verify_database(path: Path) -> ChainReport:
    """Check the SQLite log at path, opened read-only so verifying never writes.

    Raises StoreError when the file is missing, unreadable or not an audit log.
    """
    store = SqliteStore.open(path, read_only=True)
    try:
        return verify_store(store)
    finally:
        store.close()
