"""Audit log: durable appends per second with and without group commit; verifying 1M records.

Run: `make bench-audit` (or `.venv/bin/python bench/audit.py [--records N] [--seconds S]`).

Appends. Both rows run the real Writer over a real SqliteStore (WAL,
synchronous=FULL) in this process, on the same disk, with the same number of
appenders (asyncio tasks in one event loop, each awaiting its receipt before
sending the next), so the figure is the sequencer and the store, no gRPC:

- group commit: the Writer as the service runs it (max_batch=1000); every
  append queued while a transaction runs joins the next one.
- one fsync per record: the same Writer with max_batch=1, which makes every
  record its own transaction, its own signed checkpoint and its own fsync.
  Same code, same callers, only the batching differs, so the ratio is what
  group commit buys. SqliteStore.append called per record from one thread
  (no Writer, no event loop) is printed beside it, to show that the Writer
  itself adds little to that per-record cost.

The same appends through gRPC and mTLS into the real `jitgate serve audit`
process come next; there the client side, in this one Python process, shares
the machine's cores with the service.

Verify. A valid 1,000,000-record log (decision events, one signed checkpoint
every 10,000 records, as group commit would leave) is written with
SqliteStore.append, exported with `jitgate audit export --db`, and verified
with `jitgate audit verify BUNDLE --key VKEY` as a subprocess (interpreter
start-up included), then with the verify module alone, in this process.
When the CLI takes longer than the 10 s goal, the module is profiled and the
functions that take the time are printed. That log is the cheap case: the
service stores a signed checkpoint with every batch, and each costs the
verifier an Ed25519 check and a consistency proof, so the module is also timed
on 10,000 records with a checkpoint on each, as a quiet service writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate.audit import bundle
from jitgate.audit.checkpoint import Checkpoint, NoteSigner, verifier_key_string
from jitgate.audit.client import AuditClient
from jitgate.audit.merkle import Tree, leaf_hash
from jitgate.audit.record import GENESIS, StoredRecord, canonical_bytes, format_time, seal
from jitgate.audit.store import SqliteStore, StoredCheckpoint
from jitgate.audit.verify import verify
from jitgate.audit.writer import Writer
from jitgate.devstack import pki
from jitgate.v1 import audit_pb2
from tests.e2e.test_audit_crash import CrashRig
from tests.support import channel

ORIGIN = "jitgate/audit"
CALLER = "spiffe://jitgate/policy"
T0 = 1_764_288_000.0  # 2025-11-28T00:00:00Z
APPENDS_GOAL = 5_000
RATIO_GOAL = 10.0
VERIFY_GOAL = 10.0
WARM_UP = 0.5


def decision(grant_id: str) -> dict[str, Any]:
    """A decision event shaped as the policy service records one (JSON form)."""
    return {
        "decision": {
            "connection": "orders-replica",
            "requested_ttl_seconds": 900,
            "request_reason": "INC-4242: replica lag",
            "identity": {
                "subject": "deploy-bot",
                "client_id": "0oa1deploybot",
                "groups": ["platform", "sre"],
                "issuer": "https://idp.example.com/oauth2/default",
            },
            "allowed": True,
            "reason_code": "ALLOWED",
            "binding": {"group": "sre", "connection": "orders-replica", "max_ttl_seconds": 3600},
            "grant_id": grant_id,
            "expires_at": "2025-11-28T00:15:00Z",
            "policy_version": "b7e4c1d2",
        }
    }


@dataclass(frozen=True, kw_only=True)
class Rate:
    """Appends acknowledged within a measured window."""

    appends: int
    seconds: float
    transactions: int = 0

    @property
    def per_second(self) -> float:
        """Acknowledged appends per second."""
        return self.appends / self.seconds

    @property
    def batch(self) -> float:
        """Mean records per transaction."""
        return self.appends / self.transactions if self.transactions else 1.0


async def writer_rate(
    path: Path, signer: NoteSigner, *, max_batch: int, tasks: int, seconds: float
) -> Rate:
    """Appends per second through a Writer with max_batch, from tasks concurrent appenders."""
    writer = Writer(
        open_store=lambda: SqliteStore.open(path),
        signer=signer,
        origin=ORIGIN,
        max_batch=max_batch,
    )
    await writer.start()
    done = 0
    stop = False

    async def appender(task: int) -> None:
        nonlocal done
        number = 0
        while not stop:
            await writer.append(CALLER, decision(f"{task:08x}{number:024x}"))
            done += 1
            number += 1

    workers = [asyncio.create_task(appender(task)) for task in range(tasks)]
    try:
        await asyncio.sleep(WARM_UP)
        count, started, transactions = done, time.perf_counter(), writer.transactions
        await asyncio.sleep(seconds)
        count, elapsed, transactions = (
            done - count,
            time.perf_counter() - started,
            writer.transactions - transactions,
        )
        stop = True
        await asyncio.gather(*workers)
    finally:
        await writer.close()
    return Rate(appends=count, seconds=elapsed, transactions=transactions)


def store_rate(path: Path, signer: NoteSigner, *, seconds: float) -> Rate:
    """One record per SqliteStore.append, sealed and checkpointed as the Writer does, one thread."""
    store = SqliteStore.open(path)
    tree = Tree()
    prev, count = GENESIS, 0
    try:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            now = format_time(time.time())
            item = seal(
                index=count,
                time=now,
                caller=CALLER,
                event=decision(f"{count:032x}"),
                prev_hash=prev,
            )
            tree.append(leaf_hash(item.canonical))
            root = tree.root()
            note = signer.sign(Checkpoint(origin=ORIGIN, size=count + 1, root=root))
            store.append([item], StoredCheckpoint(size=count + 1, root=root, time=now, note=note))
            prev, count = item.record_hash, count + 1
    finally:
        store.close()
    return Rate(appends=count, seconds=elapsed, transactions=count)


def fsync_rate(path: Path, *, seconds: float) -> float:
    """Bare write + fsync pairs per second on this disk: the floor under one fsync per record."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    count = 0
    try:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            os.write(fd, b"x" * 400)
            os.fsync(fd)
            count += 1
    finally:
        os.close(fd)
    return count / elapsed


async def grpc_rate(root: Path, *, tasks: int, channels: int, seconds: float) -> tuple[Rate, float]:
    """Appends per second through gRPC + mTLS into the real audit process; and one append's p50."""
    dev = pki.init(root / "pki")
    (root / "grpc").mkdir()
    rig = CrashRig(dev, root / "grpc")
    await rig.start()
    clients = [
        AuditClient(channel(dev, "policy", rig.port, "audit")) for _ in range(max(1, channels))
    ]
    done = 0
    stop = False

    async def appender(client: AuditClient, task: int) -> None:
        nonlocal done
        number = 0
        while not stop:
            grant = audit_pb2.DecisionRecorded(
                connection="orders-replica",
                allowed=True,
                reason_code="ALLOWED",
                grant_id=f"{task:08x}{number:024x}",
            )
            await client.append(audit_pb2.AuditEvent(decision=grant), timeout=10)
            done += 1
            number += 1

    try:
        latencies = []
        for _ in range(200):  # one caller alone: the latency of a durable append
            started = time.perf_counter()
            await clients[0].append(
                audit_pb2.AuditEvent(decision=audit_pb2.DecisionRecorded(connection="x")),
                timeout=10,
            )
            latencies.append((time.perf_counter() - started) * 1000)
        workers = [
            asyncio.create_task(appender(clients[task % len(clients)], task))
            for task in range(tasks)
        ]
        await asyncio.sleep(WARM_UP * 2)
        count, started = done, time.perf_counter()
        await asyncio.sleep(seconds)
        count, elapsed = done - count, time.perf_counter() - started
        stop = True
        await asyncio.gather(*workers)
    finally:
        for client in clients:
            await client.close()
        await rig.close()
    return Rate(appends=count, seconds=elapsed), statistics.median(latencies[50:])


def record_maker() -> Callable[[int, str, str], bytes]:
    """A fast builder of the canonical bytes seal() makes for decision(grant) at index.

    canonical_bytes is called once with marker values; each record is then
    that text with the markers replaced, which is what sorted-key JSON gives.
    """
    grant, index, prev = "G" * 32, 987_654_321_012_345, bytes([0xAB]) * 32
    time_mark = "2999-01-01T00:00:00.000000Z"
    text = canonical_bytes(
        index=index, time=time_mark, caller=CALLER, event=decision(grant), prev_hash=prev
    ).decode()
    assert "%" not in text
    marks = [grant, str(index), prev.hex(), time_mark]
    assert [text.count(m) for m in marks] == [1, 1, 1, 1]
    assert sorted(marks, key=text.index) == marks, "the fields are not in the expected order"
    template = text
    for mark in marks:
        template = template.replace(mark, "%s")

    def make(number: int, time_text: str, prev_hex: str) -> bytes:
        return (template % (f"{number:032x}", number, prev_hex, time_text)).encode()

    return make


def build_log(path: Path, signer: NoteSigner, *, count: int, every: int) -> None:
    """Write a valid log of count records with a signed checkpoint every `every` records."""
    make = record_maker()
    sha256 = hashlib.sha256
    store = SqliteStore.open(path)
    tree = Tree()
    append = tree.append
    prev = GENESIS
    try:
        for start in range(0, count, every):
            now = format_time(T0 + start / 1000)
            batch_prev = prev
            batch = []
            for number in range(start, min(start + every, count)):
                canonical = make(number, now, prev.hex())
                digest = sha256(canonical).digest()
                append(sha256(b"\x00" + canonical).digest())
                batch.append(
                    StoredRecord(
                        index=number,
                        time=now,
                        caller=CALLER,
                        kind="decision",
                        canonical=canonical,
                        record_hash=digest,
                    )
                )
                prev = digest
            # The first record of each batch is checked against the real encoder.
            first = batch[0]
            assert first.canonical == canonical_bytes(
                index=start,
                time=now,
                caller=CALLER,
                event=decision(f"{start:032x}"),
                prev_hash=batch_prev,
            )
            root = tree.root()
            note = signer.sign(Checkpoint(origin=ORIGIN, size=tree.size, root=root))
            store.append(batch, StoredCheckpoint(size=tree.size, root=root, time=now, note=note))
    finally:
        store.close()


def dense_verify(signer: NoteSigner, *, count: int) -> tuple[float, bool]:
    """Seconds the verify module takes over count records with a checkpoint on every one.

    The service signs and stores one checkpoint per batch, so a log written
    one append at a time (a quiet service) has as many checkpoints as records.
    """
    make = record_maker()
    sha256 = hashlib.sha256
    now = format_time(T0)
    tree = Tree()
    records: list[bytes] = []
    notes: list[str] = []
    prev = GENESIS
    for number in range(count):
        canonical = make(number, now, prev.hex())
        prev = sha256(canonical).digest()
        tree.append(leaf_hash(canonical))
        records.append(canonical)
        notes.append(signer.sign(Checkpoint(origin=ORIGIN, size=tree.size, root=tree.root())))
    started = time.perf_counter()
    report = verify(records, notes, [signer.verifier], origin=ORIGIN)
    return time.perf_counter() - started, report.ok and report.checkpoints_valid == count


def _goal(goal: str, met: bool) -> str:
    return f"{goal} ({'met' if met else 'missed'})"


def _timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return time.perf_counter() - started, done


def _jitgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "jitgate", *args]


def profile_verify(out: Path, verifier: Any) -> str:
    """Profile the verify module over the bundle; return the top functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    verify(bundle.read_records(out), bundle.read_notes(out), [verifier], origin=ORIGIN)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    return text.getvalue()


def main() -> int:
    """Measure, print a Markdown table; exit 1 if the 1M log failed to verify."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="records in the log")
    parser.add_argument("--every", type=int, default=10_000, help="records per checkpoint")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per append row")
    parser.add_argument("--tasks", type=int, default=256, help="concurrent appenders")
    parser.add_argument("--profile", action="store_true", help="profile verify even if fast")
    args = parser.parse_args()
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    vkey = verifier_key_string(ORIGIN, signer.private_key.public_key())
    rows: list[tuple[str, str, str]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="jitgate-bench-") as tmp:
        root = Path(tmp)
        fsyncs = fsync_rate(root / "fsync.bin", seconds=1.0)
        grouped = asyncio.run(
            writer_rate(
                root / "grouped.db", signer, max_batch=1000, tasks=args.tasks, seconds=args.seconds
            )
        )
        single = asyncio.run(
            writer_rate(
                root / "single.db", signer, max_batch=1, tasks=args.tasks, seconds=args.seconds
            )
        )
        bare = store_rate(root / "bare.db", signer, seconds=args.seconds)
        ratio = grouped.per_second / single.per_second
        over_grpc, latency = asyncio.run(
            grpc_rate(root, tasks=64, channels=8, seconds=args.seconds)
        )
        rows += [
            (
                f"durable appends/s, group commit (Writer, {args.tasks} tasks, in-process)",
                f"{grouped.per_second:,.0f} ({grouped.batch:.0f} records a transaction)",
                _goal(f">= {APPENDS_GOAL:,}", grouped.per_second >= APPENDS_GOAL),
            ),
            (
                f"durable appends/s, one fsync per record (Writer max_batch=1, {args.tasks} tasks)",
                f"{single.per_second:,.0f}",
                "",
            ),
            (
                "group commit / one fsync per record",
                f"{ratio:.1f}x",
                _goal(f">= {RATIO_GOAL:.0f}x", ratio >= RATIO_GOAL),
            ),
            (
                "appends/s, SqliteStore.append per record, one thread (no Writer)",
                f"{bare.per_second:,.0f}",
                "",
            ),
            ("bare write + fsync per second, same disk", f"{fsyncs:,.0f}", ""),
            (
                "durable appends/s through gRPC + mTLS (real process, 64 tasks, 8 channels)",
                f"{over_grpc.per_second:,.0f}",
                "",
            ),
            ("one append alone through gRPC + mTLS, p50", f"{latency:.2f} ms", ""),
        ]
        db, out = root / "million.db", root / "bundle"
        started = time.perf_counter()
        build_log(db, signer, count=args.records, every=args.every)
        built = time.perf_counter() - started
        exported, export = _timed(_jitgate("audit", "export", "--db", str(db), "--out", str(out)))
        if export.returncode != 0:
            print(export.stdout + export.stderr, file=sys.stderr)
            return 1
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        os.remove(db)
        cli_time, cli = _timed(_jitgate("audit", "verify", str(out), "--key", vkey))
        started = time.perf_counter()
        report = verify(
            bundle.read_records(out), bundle.read_notes(out), [signer.verifier], origin=ORIGIN
        )
        module_time = time.perf_counter() - started
        complete = report.largest is not None and report.largest.size == args.records
        failed = cli.returncode != 0 or not report.ok or not complete
        n = f"{args.records:,}"
        rows += [
            (
                f"build a {n}-record log (SqliteStore.append, batches of {args.every:,})",
                f"{built:.1f} s",
                "",
            ),
            (f"`jitgate audit export --db` ({size:,.0f} MiB bundle)", f"{exported:.1f} s", ""),
            (
                f"`jitgate audit verify BUNDLE --key` on {n} records (subprocess)",
                f"{cli_time:.1f} s (exit {cli.returncode})",
                _goal(f"<= {VERIFY_GOAL:.0f} s", cli_time <= VERIFY_GOAL),
            ),
            (
                "verify module alone, same bundle, in-process",
                f"{module_time:.1f} s ({args.records / module_time:,.0f} records/s)",
                "",
            ),
        ]
        dense = 10_000
        dense_time, dense_ok = dense_verify(signer, count=dense)
        failed = failed or not dense_ok
        rows.append(
            (
                f"verify module, {dense:,} records with a checkpoint on each"
                " (one append per batch, as a quiet service writes them)",
                f"{dense_time:.1f} s ({dense_time / dense * 1e6:,.0f} µs a record:"
                f" {dense_time / dense * 1e6:,.0f} s for 1M such records)",
                "",
            )
        )
        profile = ""
        if args.profile or cli_time > VERIFY_GOAL:
            profile = profile_verify(out, signer.verifier)
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}")
    print(
        f"{os.cpu_count()} cores; SQLite WAL, synchronous=FULL, on the disk of"
        f" {tempfile.gettempdir()}; {args.seconds:g} s per append row after {WARM_UP} s warm-up\n"
    )
    print("| measure | result | goal |")
    print("|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")
    print(f"\nverify: {cli.stdout.strip().splitlines()[0] if cli.stdout.strip() else cli.stderr}")
    print(f"verify module: {report.summary()}, ok={report.ok}")
    if profile:
        print("\nverify module, cProfile, by own time:\n")
        print(profile)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
