"""Group commit: contiguous indices, fewer transactions than appends, nothing acked on failure."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from jitgate.audit.chain import verify_store
from jitgate.audit.record import StoredRecord, format_time
from jitgate.audit.store import Head, SqliteStore, StoredCheckpoint, StoreError
from jitgate.audit.writer import Receipt, Writer, WriterBusy, WriterClosed

from .factory import ORIGIN, POLICY, SIGNER, T0, event, raw


class Gated:
    """A real store whose appends can be held back, and which counts transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inner: SqliteStore | None = None
        self.open_gate = threading.Event()
        self.open_gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.explode = False

    def open(self) -> Gated:
        self.inner = SqliteStore.open(self.path)
        return self

    def head(self) -> Head:
        assert self.inner is not None
        return self.inner.head()

    def append(self, records: Sequence[StoredRecord], checkpoint: StoredCheckpoint) -> Head:
        assert self.inner is not None
        if not records:  # the writer's first checkpoint, at start-up
            return self.inner.append(records, checkpoint)
        self.entered.set()
        self.open_gate.wait(10)
        if self.explode:
            raise RuntimeError("a bug in a store")
        head = self.inner.append(records, checkpoint)
        self.batches.append(len(records))
        return head

    def checkpoints(self, from_size: int, limit: int) -> list[StoredCheckpoint]:
        assert self.inner is not None
        return self.inner.checkpoints(from_size, limit)

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        assert self.inner is not None
        return self.inner.latest_checkpoint()

    def read(self, from_index: int, limit: int) -> list[StoredRecord]:
        assert self.inner is not None
        return self.inner.read(from_index, limit)

    def close(self) -> None:
        assert self.inner is not None
        self.inner.close()


@pytest.fixture
def gated(tmp_path: Path) -> Gated:
    return Gated(tmp_path / "audit.db")


@pytest.fixture
async def writer(gated: Gated) -> AsyncIterator[Writer]:
    started = Writer(signer=SIGNER, origin=ORIGIN, open_store=gated.open, clock=lambda: T0)
    await started.start()
    yield started
    gated.open_gate.set()
    await started.close()


async def held(gated: Gated, writer: Writer) -> asyncio.Task[Receipt]:
    """Start an append and hold its transaction open, so later appends queue up."""
    gated.open_gate.clear()
    gated.entered.clear()
    first = asyncio.create_task(writer.append(POLICY, event(0)))
    assert await asyncio.to_thread(gated.entered.wait, 5)
    return first


async def test_concurrent_appends_get_contiguous_indices_in_few_transactions(
    gated: Gated, writer: Writer
) -> None:
    receipts = await asyncio.gather(*(writer.append(POLICY, event(n)) for n in range(200)))
    assert sorted(r.index for r in receipts) == list(range(200))
    assert sum(gated.batches) == 200
    assert len(gated.batches) < 200
    assert writer.transactions == len(gated.batches)
    stored = {r.index: r.record_hash for r in gated.read(0, 1000)}
    assert {r.index: r.record_hash for r in receipts} == stored
    report = verify_store(gated)
    assert report.intact
    assert report.count == 200


async def test_appends_queued_during_a_transaction_share_the_next(
    gated: Gated, writer: Writer
) -> None:
    first = await held(gated, writer)
    rest = [asyncio.create_task(writer.append(POLICY, event(n))) for n in range(1, 50)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in (first, *rest))  # nothing before COMMIT
    gated.open_gate.set()
    receipts = await asyncio.gather(first, *rest)
    assert [r.index for r in receipts] == list(range(50))
    assert gated.batches == [1, 49]


async def test_records_carry_the_caller_and_the_injected_time(gated: Gated, writer: Writer) -> None:
    await writer.append("spiffe://jitgate/verifier", {"token_rejected": {"reason": "audience"}})
    (stored,) = gated.read(0, 10)
    assert stored.caller == "spiffe://jitgate/verifier"
    assert stored.kind == "token_rejected"
    assert stored.time == format_time(T0)


async def test_a_failed_commit_acknowledges_nothing_and_the_next_batch_continues(
    gated: Gated, writer: Writer
) -> None:
    for n in range(3):
        await writer.append(POLICY, event(n))
    with raw(gated.path) as other:
        other.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON records"
            " BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
    outcomes = await asyncio.gather(
        *(writer.append(POLICY, event(n)) for n in range(3, 13)), return_exceptions=True
    )
    assert all(isinstance(o, StoreError) for o in outcomes), outcomes
    assert len(gated.read(0, 100)) == 3
    with raw(gated.path) as other:
        other.execute("DROP TRIGGER fail")
    after = await asyncio.gather(*(writer.append(POLICY, event(n)) for n in range(2)))
    assert sorted(r.index for r in after) == [3, 4]
    assert verify_store(gated).count == 5


async def test_an_unexpected_store_error_fails_the_batch_only(gated: Gated, writer: Writer) -> None:
    gated.explode = True
    with pytest.raises(StoreError, match="unexpected"):
        await writer.append(POLICY, event(0))
    gated.explode = False
    assert (await writer.append(POLICY, event(1))).index == 0


async def test_a_bad_event_fails_alone(gated: Gated, writer: Writer) -> None:
    first = await held(gated, writer)
    bad = asyncio.create_task(writer.append(POLICY, {"decision": {"ttl": 1.5}}))
    good = asyncio.create_task(writer.append(POLICY, event(2)))
    await asyncio.sleep(0.01)
    gated.open_gate.set()
    assert (await first).index == 0
    with pytest.raises(ValueError, match="float"):
        await bad
    assert (await good).index == 1
    assert verify_store(gated).count == 2


async def test_a_full_queue_fails_fast(tmp_path: Path) -> None:
    gated = Gated(tmp_path / "audit.db")
    writer = Writer(signer=SIGNER, origin=ORIGIN, open_store=gated.open, max_queue=2)
    await writer.start()
    try:
        first = await held(gated, writer)
        queued = [asyncio.create_task(writer.append(POLICY, event(n))) for n in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(WriterBusy, match="full"):
            await writer.append(POLICY, event(3))
        gated.open_gate.set()
        assert [r.index for r in await asyncio.gather(first, *queued)] == [0, 1, 2]
    finally:
        gated.open_gate.set()
        await writer.close()


async def test_a_caller_that_gives_up_does_not_stop_the_writer(
    gated: Gated, writer: Writer
) -> None:
    first = await held(gated, writer)
    first.cancel()
    gated.open_gate.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await writer.append(POLICY, event(1))).index == 1
    # The abandoned record may be durable: the log over-reports, never under-reports.
    assert verify_store(gated).count == 2


async def test_close_writes_what_is_queued_then_refuses(gated: Gated) -> None:
    writer = Writer(signer=SIGNER, origin=ORIGIN, open_store=gated.open)
    await writer.start()
    first = await held(gated, writer)
    queued = [asyncio.create_task(writer.append(POLICY, event(n))) for n in range(1, 5)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0.01)
    gated.open_gate.set()
    await closing
    assert [r.index for r in await asyncio.gather(first, *queued)] == [0, 1, 2, 3, 4]
    with pytest.raises(WriterClosed):
        await writer.append(POLICY, event(5))
    await writer.close()  # idempotent
    reopened = SqliteStore.open(gated.path, read_only=True)
    try:
        assert reopened.head().size == 5
    finally:
        reopened.close()


async def test_append_before_start_is_refused(gated: Gated) -> None:
    writer = Writer(signer=SIGNER, origin=ORIGIN, open_store=gated.open)
    with pytest.raises(WriterClosed):
        await writer.append(POLICY, event(0))
    await writer.close()


async def test_a_store_that_cannot_open(tmp_path: Path) -> None:
    writer = Writer(
        signer=SIGNER,
        origin=ORIGIN,
        open_store=lambda: SqliteStore.open(tmp_path / "no" / "audit.db"),
    )
    with pytest.raises(StoreError, match="cannot open"):
        await writer.start()
    with pytest.raises(WriterClosed):
        await writer.append(POLICY, event(0))
    await writer.close()


def test_bounds_must_be_positive(gated: Gated) -> None:
    with pytest.raises(ValueError, match="positive"):
        Writer(signer=SIGNER, origin=ORIGIN, open_store=gated.open, max_queue=0)
