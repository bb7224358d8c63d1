"""Offline verification: an untouched log passes; every kind of tampering is named."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate.audit import bundle, verify
from jitgate.audit.checkpoint import Checkpoint, NoteSigner, verifier_key_string
from jitgate.audit.merkle import leaf_hash, root_from_leaves
from jitgate.audit.record import format_time, parse, record_hash, seal
from jitgate.audit.store import SqliteStore
from jitgate.audit.verify import Failure
from jitgate.audit.writer import LogMismatch, Writer
from jitgate.cli import audit as audit_cli

from .factory import ORIGIN, POLICY, SIGNER, T0, VERIFIER, checkpoint_for, event, records

VKEY = verifier_key_string(ORIGIN, SIGNER.private_key.public_key())
COUNT = 40


def run(*argv: str) -> int:
    top = argparse.ArgumentParser(prog="jitgate")
    audit_cli.register(top.add_subparsers(dest="verb", required=True))
    args = top.parse_args(argv)
    code: int = args.func(args)
    return code


async def _write_log(db: Path) -> None:
    clock = iter(T0 + n for n in range(10_000))
    writer = Writer(
        open_store=lambda: SqliteStore.open(db),
        signer=SIGNER,
        origin=ORIGIN,
        clock=lambda: next(clock),
    )
    await writer.start()
    try:
        for number in range(COUNT // 2):  # one at a time: a checkpoint each
            await writer.append(POLICY, event(number))
        # and a burst that group commit batches
        await asyncio.gather(*(writer.append(POLICY, event(n)) for n in range(COUNT // 2, COUNT)))
    finally:
        await writer.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A log written by the real writer and store, and its export."""
    folder = tmp_path_factory.mktemp("log")
    db = folder / "audit.db"
    asyncio.run(_write_log(db))
    out = folder / "bundle"
    assert run("audit", "export", "--db", str(db), "--out", str(out)) == 0
    return db, out


@pytest.fixture
def db(pristine: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "audit.db"
    shutil.copyfile(pristine[0], copy)
    return copy


@pytest.fixture
def exported(pristine: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(pristine[1], copy)
    return copy


def lines(folder: Path, name: str = bundle.RECORDS) -> list[bytes]:
    return (folder / name).read_bytes().splitlines()


def rewrite(folder: Path, new: list[bytes], name: str = bundle.RECORDS) -> None:
    (folder / name).write_bytes(b"".join(line + b"\n" for line in new))


def verdict(target: Path, capsys: pytest.CaptureFixture[str], key: str = VKEY) -> tuple[int, str]:
    code = run("audit", "verify", str(target), "--key", key)
    return code, capsys.readouterr().out


# Untouched.


def test_an_untouched_export_verifies(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verdict(exported, capsys)
    assert code == 0, out
    manifest = bundle.read_manifest(exported)
    assert manifest.records == COUNT
    assert manifest.origin == ORIGIN
    first = out.splitlines()[0]
    assert (
        first
        == f"{manifest.checkpoints}/{manifest.checkpoints} checkpoints valid, 40/40 records valid"
    )
    assert manifest.checkpoints > COUNT // 2  # one per batch, and one at start


def test_the_database_itself_verifies(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verdict(db, capsys)
    assert code == 0, out
    assert "40/40 records valid" in out


def test_the_key_may_be_a_file(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    keyfile = tmp_path / "audit.vkey"
    # Two keys during a rotation: either may have signed.
    other_vkey = verifier_key_string(ORIGIN, other.private_key.public_key())
    keyfile.write_text(f"{other_vkey}\n{VKEY}\n")
    assert verdict(exported, capsys, str(keyfile))[0] == 0


# Tampered exports: each names its kind and exits with its code.


def test_a_flipped_byte_in_a_record_is_a_root_mismatch(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records_ = lines(exported)
    records_[7] = records_[7].replace(b"orders-replica", b"orders-replicb")
    rewrite(exported, records_)
    code, out = verdict(exported, capsys)
    assert code == Failure.ROOT_MISMATCH
    assert "FAILED: root mismatch" in out
    assert "39/40 records valid" in out  # record 8 no longer links to record 7


def test_a_flipped_byte_that_breaks_json_is_malformed(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records_ = lines(exported)
    records_[3] = records_[3][:-1] + b"]"
    rewrite(exported, records_)
    assert verdict(exported, capsys)[0] == Failure.MALFORMED


def test_a_deleted_record_is_a_gap(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records_ = lines(exported)
    del records_[12]
    rewrite(exported, records_)
    code, out = verdict(exported, capsys)
    assert code == Failure.GAP
    assert "record 12 is missing" in out


def test_a_record_deleted_in_the_database_is_a_gap(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(db, isolation_level=None) as other:
        other.execute("DROP TRIGGER records_no_delete")
        other.execute("DELETE FROM records WHERE idx = 5")
    assert verdict(db, capsys)[0] == Failure.GAP


def test_two_records_swapped_are_a_reorder(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records_ = lines(exported)
    records_[20], records_[21] = records_[21], records_[20]
    rewrite(exported, records_)
    code, out = verdict(exported, capsys)
    assert code == Failure.REORDER
    assert "out of order" in out


def test_a_tail_cut_below_a_checkpoint_is_a_truncation(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite(exported, lines(exported)[:-3])
    code, out = verdict(exported, capsys)
    assert code == Failure.TRUNCATED
    assert "covers 40 records but only 37 are here" in out


def test_an_inserted_record_renumbered_and_rechained_is_a_root_mismatch(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The best an attacker without the key can do: insert a record, renumber
    # and re-link everything after it. Only the signed roots can tell.
    bodies = [parse(line) for line in lines(exported)]
    forged = [*bodies[:10], bodies[10], *bodies[10:]]
    out: list[bytes] = []
    prev = bytes(32)
    for index, body in enumerate(forged):
        item = seal(
            index=index, time=body.time, caller=body.caller, event=body.event, prev_hash=prev
        )
        out.append(item.canonical)
        prev = item.record_hash
    rewrite(exported, out)
    code, text = verdict(exported, capsys)
    assert code == Failure.ROOT_MISMATCH
    assert "41/41 records valid" in text  # every record looks right on its own


def test_two_checkpoints_of_one_size_are_a_fork(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the key holder can do this: show two different trees of one size.
    other_log = records(COUNT)
    fork = checkpoint_for(other_log)
    notes = lines(exported, bundle.CHECKPOINTS)
    rewrite(exported, [*notes, json.dumps(fork.note).encode()], bundle.CHECKPOINTS)
    code, out = verdict(exported, capsys)
    assert code == Failure.FORK
    assert "two checkpoints of size 40" in out


def test_the_wrong_key_is_a_bad_signature(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = verifier_key_string(ORIGIN, Ed25519PrivateKey.generate().public_key())
    assert verdict(exported, capsys, stranger)[0] == Failure.BAD_SIGNATURE


def test_an_edited_checkpoint_is_a_bad_signature(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = lines(exported, bundle.CHECKPOINTS)
    note = json.loads(notes[-1])
    head, _, rest = note.partition("\n")
    size, _, tail = rest.partition("\n")
    notes[-1] = json.dumps(f"{head}\n{int(size) + 1}\n{tail}").encode()
    rewrite(exported, notes, bundle.CHECKPOINTS)
    assert verdict(exported, capsys)[0] == Failure.BAD_SIGNATURE


def test_decreasing_times_are_a_reorder() -> None:
    # Signed by the key holder, so the roots match: only the clock is wrong.
    log = records(3)
    late = seal(
        index=3,
        time=format_time(T0 - 60),
        caller=POLICY,
        event=event(3),
        prev_hash=log[-1].record_hash,
    )
    log.append(late)
    report = verify.verify(
        (r.canonical for r in log), [checkpoint_for(log).note], [VERIFIER], origin=ORIGIN
    )
    assert report.failure == Failure.REORDER


def test_a_checkpoint_for_another_log_is_refused() -> None:
    log = records(2)
    root = root_from_leaves(leaf_hash(r.canonical) for r in log)
    other = NoteSigner("someone/else", SIGNER.private_key)
    note = other.sign(Checkpoint(origin="someone/else", size=2, root=root))
    report = verify.verify((r.canonical for r in log), [note], [VERIFIER], origin=ORIGIN)
    assert report.failure == Failure.BAD_SIGNATURE


def test_a_forged_huge_index_costs_no_memory() -> None:
    log = records(2)
    body = parse(log[1].canonical)
    forged = seal(
        index=2**60, time=body.time, caller=body.caller, event=body.event, prev_hash=body.prev_hash
    )
    report = verify.verify(
        [log[0].canonical, forged.canonical], [checkpoint_for(log).note], [VERIFIER], origin=ORIGIN
    )
    assert report.failure == Failure.GAP


def test_an_unreadable_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b").mkdir()
    assert verdict(tmp_path / "b", capsys)[0] == Failure.UNREADABLE
    assert verdict(tmp_path / "nothing", capsys)[0] == Failure.UNREADABLE


def test_every_failure_has_its_own_exit_code() -> None:
    codes = [int(f) for f in Failure]
    assert len(set(codes)) == len(codes)
    assert 0 not in codes
    assert 1 not in codes  # 1 is what an unexpected Python error exits with


# The service refuses a log its checkpoint disowns.


async def test_the_writer_refuses_to_start_on_an_altered_log(db: Path) -> None:
    with sqlite3.connect(db, isolation_level=None) as other:
        other.execute("DROP TRIGGER records_no_update")
        canonical = other.execute("SELECT canonical FROM records WHERE idx = 3").fetchone()[0]
        edited = bytes(canonical).replace(b"orders-replica", b"orders-replicb")
        other.execute(
            "UPDATE records SET canonical = ?, hash = ? WHERE idx = 3",
            (edited, record_hash(edited)),
        )
    writer = Writer(open_store=lambda: SqliteStore.open(db), signer=SIGNER, origin=ORIGIN)
    with pytest.raises(LogMismatch, match="do not match the checkpoint"):
        await writer.start()


def test_the_jitgate_command_exits_with_the_kind(exported: Path) -> None:
    rewrite(exported, lines(exported)[:-3])
    done = subprocess.run(
        [sys.executable, "-m", "jitgate", "audit", "verify", str(exported), "--key", VKEY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == Failure.TRUNCATED, done.stdout + done.stderr
    assert "FAILED: truncated" in done.stdout


async def test_the_writer_refuses_records_whose_checkpoints_were_deleted(db: Path) -> None:
    with sqlite3.connect(db, isolation_level=None) as other:
        other.execute("DROP TRIGGER checkpoints_no_delete")
        other.execute("DELETE FROM checkpoints")
    writer = Writer(open_store=lambda: SqliteStore.open(db), signer=SIGNER, origin=ORIGIN)
    with pytest.raises(LogMismatch, match="no checkpoint"):
        await writer.start()


async def test_the_writer_refuses_records_appended_past_the_checkpoint(db: Path) -> None:
    store = SqliteStore.open(db)
    try:
        head = store.head()
        extra = records(1, head)
    finally:
        store.close()
    with sqlite3.connect(db, isolation_level=None) as other:
        item = extra[0]
        other.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
            (item.index, item.time, item.caller, item.kind, item.canonical, item.record_hash),
        )
    writer = Writer(open_store=lambda: SqliteStore.open(db), signer=SIGNER, origin=ORIGIN)
    with pytest.raises(LogMismatch, match="do not match the checkpoint"):
        await writer.start()
