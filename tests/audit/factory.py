"""Records and stores for audit tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from jitgate.audit.record import StoredRecord, format_time, seal
from jitgate.audit.store import Head, SqliteStore

POLICY = "spiffe://jitgate/policy"
T0 = 1_735_787_045.0


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


def filled(path: Path, count: int) -> Path:
    """An audit log at path holding count records."""
    store = SqliteStore.open(path)
    try:
        store.append(records(count))
    finally:
        store.close()
    return path


def raw(path: Path) -> sqlite3.Connection:
    """A plain SQLite connection, as someone with the file would have: no jitgate rules."""
    return sqlite3.connect(path, isolation_level=None)
