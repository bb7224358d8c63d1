"""Records and stores for audit tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate.audit.checkpoint import Checkpoint, NoteSigner, NoteVerifier
from jitgate.audit.merkle import leaf_hash, root_from_leaves
from jitgate.audit.record import StoredRecord, format_time, seal
from jitgate.audit.store import Head, SqliteStore, StoredCheckpoint

POLICY = "spiffe://jitgate/policy"
T0 = 1_735_787_045.0
ORIGIN = "jitgate/audit"
SIGNER = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
"""The tests' checkpoint key: fixed, so signed notes are the same every run."""
VERIFIER: NoteVerifier = SIGNER.verifier


def event(number: int) -> dict[str, Any]:
    """A decision event that differs per number."""
    return {"decision": {"connection": "orders-replica", "grant_id": f"{number:032x}"}}


def records(count: int, head: Head | None = None) -> list[StoredRecord]:
    """count records continuing the log that ends at head."""
    head = head or Head(size=0)
    out: list[StoredRecord] = []
    prev = head.record_hash
    for offset in range(count):
        index = head.size + offset
        item = seal(
            index=index,
            time=format_time(T0 + index),
            caller=POLICY,
            event=event(index),
            prev_hash=prev,
        )
        out.append(item)
        prev = item.record_hash
    return out


def checkpoint_for(log: list[StoredRecord], time: float = T0) -> StoredCheckpoint:
    """The signed checkpoint of a log holding exactly these records."""
    root = root_from_leaves(leaf_hash(r.canonical) for r in log)
    note = SIGNER.sign(Checkpoint(origin=ORIGIN, size=len(log), root=root))
    return StoredCheckpoint(size=len(log), root=root, time=format_time(time), note=note)


def extend(store: SqliteStore, batch: list[StoredRecord]) -> Head:
    """Append batch to store with the checkpoint of the log it then holds, as the writer does."""
    return store.append(batch, checkpoint_for(store.read(0, 1_000_000) + batch))


def filled(path: Path, count: int) -> Path:
    """An audit log at path holding count records and the checkpoint that covers them."""
    store = SqliteStore.open(path)
    try:
        log = records(count)
        store.append(log, checkpoint_for(log))
    finally:
        store.close()
    return path


def raw(path: Path) -> sqlite3.Connection:
    """A plain SQLite connection, as someone with the file would have: no jitgate rules."""
    return sqlite3.connect(path, isolation_level=None)
