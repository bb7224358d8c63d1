"""The chain check finds each kind of tampering at the first index it touches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from jitgate.audit.chain import ChainReport, check, verify_database
from jitgate.audit.record import GENESIS, canonical_bytes, record_hash
from jitgate.audit.store import StoreError

from .factory import filled, raw, records


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return filled(tmp_path / "audit.db", 6)


def tamper(db: Path, sql: str, *params: Any) -> None:
    """Do what the store never does, as someone holding the file could."""
    with raw(db) as other:
        other.execute("DROP TRIGGER records_no_update")
        other.execute("DROP TRIGGER records_no_delete")
        other.execute(sql, params)


def row(db: Path, index: int) -> tuple[bytes, bytes]:
    with raw(db) as other:
        canonical, digest = other.execute(
            "SELECT canonical, hash FROM records WHERE idx = ?", (index,)
        ).fetchone()
    return canonical, digest


def rewritten(db: Path, index: int, **changes: Any) -> bytes:
    """Record index of db re-encoded with changes, in canonical form."""
    body = json.loads(row(db, index)[0])
    body.update(changes)
    return canonical_bytes(
        index=body["index"],
        time=body["time"],
        caller=body["caller"],
        event=body["event"],
        prev_hash=bytes.fromhex(body["prev"]),
    )


def test_an_intact_log(db: Path) -> None:
    report = verify_database(db)
    assert report == ChainReport(count=6, head=row(db, 5)[1])
    assert report.intact


def test_an_empty_log(tmp_path: Path) -> None:
    report = verify_database(filled(tmp_path / "empty.db", 0))
    assert report == ChainReport(count=0, head=GENESIS)


def test_edited_payload(db: Path) -> None:
    canonical = row(db, 3)[0].replace(b"orders-replica", b"billing-primar")
    tamper(db, "UPDATE records SET canonical = ? WHERE idx = 3", canonical)
    report = verify_database(db)
    assert (report.broken_at, report.count) == (3, 3)
    assert "stored hash" in report.reason
    assert report.head == row(db, 2)[1]


def test_edited_payload_with_its_hash_recomputed(db: Path) -> None:
    canonical = rewritten(db, 3, caller="spiffe://jitgate/verifier")
    tamper(
        db,
        "UPDATE records SET canonical = ?, hash = ?, caller = ? WHERE idx = 3",
        canonical,
        record_hash(canonical),
        "spiffe://jitgate/verifier",
    )
    report = verify_database(db)
    assert report.broken_at == 4
    assert "prev is not the hash of record 3" in report.reason


def test_deleted_middle_record(db: Path) -> None:
    tamper(db, "DELETE FROM records WHERE idx = 2")
    report = verify_database(db)
    assert report.broken_at == 2
    assert "record 2 is missing" in report.reason


def test_deleted_first_record(db: Path) -> None:
    tamper(db, "DELETE FROM records WHERE idx = 0")
    report = verify_database(db)
    assert report.broken_at == 0
    assert "record 0 is missing" in report.reason


def test_swapped_records(db: Path) -> None:
    two, three = row(db, 2), row(db, 3)
    tamper(db, "UPDATE records SET canonical = ?, hash = ? WHERE idx = 2", *three)
    tamper_again = "UPDATE records SET canonical = ?, hash = ? WHERE idx = 3"
    with raw(db) as other:
        other.execute(tamper_again, two)
    report = verify_database(db)
    assert report.broken_at == 2
    assert "says it is index 3" in report.reason


def test_forged_prev_link(db: Path) -> None:
    forged = rewritten(db, 4, prev=hashlib.sha256(b"forged").hexdigest())
    tamper(
        db, "UPDATE records SET canonical = ?, hash = ? WHERE idx = 4", forged, record_hash(forged)
    )
    report = verify_database(db)
    assert report.broken_at == 4
    assert "prev is not the hash of record 3" in report.reason


def test_forged_start_of_chain(db: Path) -> None:
    forged = rewritten(db, 0, prev="11" * 32)
    tamper(
        db, "UPDATE records SET canonical = ?, hash = ? WHERE idx = 0", forged, record_hash(forged)
    )
    report = verify_database(db)
    assert report.broken_at == 0
    assert "does not start the chain" in report.reason


def test_non_canonical_bytes_with_a_matching_hash(db: Path) -> None:
    canonical = row(db, 1)[0].replace(b",", b", ", 1)
    tamper(
        db,
        "UPDATE records SET canonical = ?, hash = ? WHERE idx = 1",
        canonical,
        record_hash(canonical),
    )
    report = verify_database(db)
    assert report.broken_at == 1
    assert "not a valid record" in report.reason


def test_edited_query_column(db: Path) -> None:
    tamper(db, "UPDATE records SET caller = 'spiffe://jitgate/issuer' WHERE idx = 5")
    report = verify_database(db)
    assert report.broken_at == 5
    assert "column disagrees" in report.reason


def test_file_edited_in_place(db: Path) -> None:
    # No SQL at all: bytes of one record's payload changed in the file itself.
    grant = f"{4:032x}".encode()
    data = db.read_bytes()
    assert data.count(grant) == 1
    db.write_bytes(data.replace(grant, f"{9:032x}".encode()))
    report = verify_database(db)
    assert report.broken_at == 4
    assert "stored hash" in report.reason


def test_verify_does_not_write(db: Path) -> None:
    before = db.read_bytes()
    assert verify_database(db).intact
    assert db.read_bytes() == before


def test_verify_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        verify_database(tmp_path / "missing.db")


def test_check_records_not_starting_at_zero() -> None:
    report = check(records(3)[1:])
    assert report == ChainReport(count=0, head=GENESIS, broken_at=0, reason=report.reason)
    assert "record 0 is missing" in report.reason


def test_check_a_wrong_stored_hash_length() -> None:
    chain = records(2)
    chain[1] = dataclasses.replace(chain[1], record_hash=chain[1].record_hash[:16])
    report = check(chain)
    assert report.broken_at == 1
    assert "stored hash" in report.reason
