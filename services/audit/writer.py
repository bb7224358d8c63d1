"""The sequencer: one thread owns the store and the Merkle tree; queued appends share a commit.

Each batch gets contiguous indices, extends the tree, and is stored with a
checkpoint of the new tree signed by the audit key, in one transaction and one
fsync. An append is acknowledged only after that commit: its receipt names a
durable, signed checkpoint that covers it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jitgate.audit.checkpoint import Checkpoint, NoteSigner
from jitgate.audit.merkle import Tree, leaf_hash
from jitgate.audit.record import StoredRecord, format_time, seal
from jitgate.audit.store import Store, StoredCheckpoint, StoreError, iter_records
from jitgate.common import telemetry
from jitgate.common.clock import Clock, system_clock

log = logging.getLogger(__name__)

BATCH_SIZE = telemetry.meter().create_histogram(
    "jitgate.audit.batch.size", unit="{record}", description="Records committed per transaction"
)

MAX_QUEUE = 10_000
MAX_BATCH = 1_000


class WriterBusy(StoreError):
    """The queue is full: fail fast rather than keep a caller waiting past its deadline."""


class WriterClosed(StoreError):
    """The writer is not running, so nothing more can become durable."""


class LogMismatch(StoreError):
    """The stored records do not hash to the root of the stored checkpoint: tampering."""


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """Proof that a record is durable: its index, hashes, and a signed checkpoint covering it."""

    index: int
    record_hash: bytes
    leaf_hash: bytes
    checkpoint_size: int


@dataclass(frozen=True, kw_only=True)
class _Pending:
    caller: str
    event: Mapping[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Receipt]


def _settle_all(settled: list[tuple[asyncio.Future[Receipt], Receipt | BaseException]]) -> None:
    for future, outcome in settled:
        _settle(future, outcome)


def _settle(future: asyncio.Future[Receipt], outcome: Receipt | BaseException) -> None:
    if future.done():  # the caller gave up (deadline); the record may still be durable
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class Writer:
    """Appends records in order; each append returns only after its batch's COMMIT.

    A caller whose deadline passes while its record is being written is told
    nothing, yet the record may be durable: the log can hold a decision whose
    grant was never signed, never the other way round.
    """

    def __init__(
        self,
        *,
        open_store: Callable[[], Store],
        signer: NoteSigner,
        origin: str,
        clock: Clock = system_clock,
        max_queue: int = MAX_QUEUE,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be positive")
        Checkpoint(origin=origin, size=0, root=bytes(32))  # checks the origin now, not per batch
        self._open_store = open_store
        self._signer = signer
        self._origin = origin
        self._clock = clock
        # The tree is extended on the writer thread and read (proofs) on the
        # event loop: every access holds this lock, and readers only ask about
        # sizes up to the latest durable checkpoint.
        self._tree = Tree()
        self._tree_lock = threading.Lock()
        self._latest: StoredCheckpoint | None = None
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.transactions = 0
        """Batches committed so far: with appends, how well group commit is working."""

    async def start(self) -> None:
        """Open the store on the writer thread; raise StoreError if it cannot be opened."""
        if self._thread is not None:
            raise RuntimeError("the writer is already started")
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="audit-writer", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(opened)

    async def append(self, caller: str, event: Mapping[str, Any]) -> Receipt:
        """Queue one event from caller (a SPIFFE ID); return its receipt once it is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Receipt] = loop.create_future()
        with self._cond:
            if self._closing or self._thread is None:
                raise WriterClosed("the audit writer is not running")
            if len(self._queue) >= self._max_queue:
                raise WriterBusy(f"the audit queue is full ({self._max_queue} appends waiting)")
            self._queue.append(_Pending(caller=caller, event=event, loop=loop, future=future))
            self._cond.notify()
        return await future

    @property
    def latest(self) -> StoredCheckpoint | None:
        """The latest durable checkpoint (None before the writer has started)."""
        return self._latest

    def inclusion_proof(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """Return (leaf hash, RFC 9162 inclusion proof) of index in the tree of size."""
        self._check_durable(size)
        with self._tree_lock:
            return self._tree.leaf(index), self._tree.inclusion_proof(index, size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Return the RFC 9162 consistency proof from old_size to new_size."""
        self._check_durable(new_size)
        with self._tree_lock:
            return self._tree.consistency_proof(old_size, new_size)

    def _check_durable(self, size: int) -> None:
        latest = self._latest
        if latest is None or size > latest.size:
            have = 0 if latest is None else latest.size
            raise ValueError(f"tree size {size} is past the latest checkpoint ({have})")

    async def close(self) -> None:
        """Write what is queued, then stop the thread and close the store; idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _run(self, opened: concurrent.futures.Future[None]) -> None:
        try:
            store = self._open_store()
            self._load(store)
        except Exception as exc:
            with self._cond:
                self._closing = True
            opened.set_exception(exc if isinstance(exc, StoreError) else StoreError(str(exc)))
            return
        opened.set_result(None)
        try:
            while (batch := self._take()) is not None:
                self._commit(store, batch)
        finally:
            self._fail_leftovers()
            try:
                store.close()
            except Exception:
                log.exception("closing the audit store failed")

    def _load(self, store: Store) -> None:
        """Rebuild the tree from the stored records; refuse a log its checkpoint disowns."""
        head = store.head()
        with self._tree_lock:
            self._tree = Tree(leaf_hash(r.canonical) for r in iter_records(store))
            size = self._tree.size
        if size != head.size:
            raise StoreError(f"the log has {size} readable records but its head says {head.size}")
        latest = store.latest_checkpoint()
        # The checkpoint was signed over these records: if they no longer hash
        # to its root, the file was changed behind the service's back, and
        # appending on top would bury the evidence, so refuse to start.
        # Records past the latest checkpoint cannot come from this writer,
        # which stores each batch with its checkpoint.
        if latest is not None and (
            latest.size != size or self._tree.root(latest.size) != latest.root
        ):
            raise LogMismatch(
                f"{size} stored records do not match the checkpoint of size {latest.size}:"
                " the log was altered; run `jitgate audit verify`"
            )
        if latest is None and size:
            # Records are only ever stored with their checkpoint: records
            # without one mean the checkpoints were deleted.
            raise LogMismatch(f"{size} stored records and no checkpoint: the log was altered")
        if latest is None:
            # A new log: its first checkpoint is of the empty tree.
            latest = self._checkpoint(size, format_time(self._clock()))
            store.append([], latest)
        self._latest = latest
        log.info("audit log: %d records, checkpoint root %s", size, latest.root.hex()[:16])

    def _checkpoint(self, size: int, time: str) -> StoredCheckpoint:
        with self._tree_lock:
            root = self._tree.root(size)
        note = self._signer.sign(Checkpoint(origin=self._origin, size=size, root=root))
        return StoredCheckpoint(size=size, root=root, time=time, note=note)

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            count = min(len(self._queue), self._max_batch)
            return [self._queue.popleft() for _ in range(count)]

    def _fail_leftovers(self) -> None:
        with self._cond:
            self._closing = True
            leftovers = list(self._queue)
            self._queue.clear()
        for pending in leftovers:
            self._reply(pending, WriterClosed("the audit writer stopped"))

    def _commit(self, store: Store, batch: list[_Pending]) -> None:
        size = self._tree.size
        try:
            records, accepted, now = self._seal(store, batch)
            if not records:
                return
            leaves = [leaf_hash(r.canonical) for r in records]
            with self._tree_lock:
                self._tree.extend(leaves)
            checkpoint = self._checkpoint(size + len(records), now)
            store.append(records, checkpoint)
        except Exception as exc:
            if isinstance(exc, StoreError):
                log.error("audit batch of %d appends failed: %s", len(batch), exc)
                failure = StoreError(str(exc))
            else:
                log.exception("audit batch of %d appends failed unexpectedly", len(batch))
                failure = StoreError(f"unexpected: {type(exc).__name__}")
            self._resync(store, size)
            self._reply_all([(pending, failure) for pending in batch])
            return
        self._latest = checkpoint
        self.transactions += 1
        BATCH_SIZE.record(len(records))
        self._reply_all(
            [
                (
                    pending,
                    Receipt(
                        index=stored.index,
                        record_hash=stored.record_hash,
                        leaf_hash=leaf,
                        checkpoint_size=checkpoint.size,
                    ),
                )
                for pending, stored, leaf in zip(accepted, records, leaves, strict=True)
            ]
        )

    def _resync(self, store: Store, size: int) -> None:
        # After a failed commit the batch may or may not be on disk (an fsync
        # error leaves it unknown): the tree follows what the store now says,
        # so the next batch continues without a gap, a duplicate or a root
        # that disagrees with the records.
        try:
            head = store.head()
            with self._tree_lock:
                self._tree.truncate(min(size, self._tree.size))
                if head.size > self._tree.size:
                    fresh = iter_records(store, self._tree.size)
                    self._tree.extend(leaf_hash(r.canonical) for r in fresh)
            self._latest = store.latest_checkpoint() or self._latest
        except (StoreError, ValueError) as exc:
            log.error("audit log state unknown after a failed append: %s", exc)

    def _seal(
        self, store: Store, batch: list[_Pending]
    ) -> tuple[list[StoredRecord], list[_Pending], str]:
        head = store.head()
        # One time for the batch: the moment its records were put in order.
        now = format_time(self._clock())
        records: list[StoredRecord] = []
        accepted: list[_Pending] = []
        prev = head.record_hash
        for pending in batch:
            try:
                stored = seal(
                    index=head.size + len(records),
                    time=now,
                    caller=pending.caller,
                    event=pending.event,
                    prev_hash=prev,
                )
            except ValueError as exc:  # this event alone cannot be recorded
                self._reply(pending, exc)
                continue
            records.append(stored)
            accepted.append(pending)
            prev = stored.record_hash
        return records, accepted, now

    @staticmethod
    def _reply_all(outcomes: list[tuple[_Pending, Receipt | BaseException]]) -> None:
        # One wake-up per event loop for the whole batch, not one per append:
        # the writer thread is the sequencer, and its time is the log's speed.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Receipt], Any]]] = {}
        for pending, outcome in outcomes:
            by_loop.setdefault(pending.loop, []).append((pending.future, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:  # the caller's event loop is closed; nobody is waiting
                log.debug("audit replies dropped: event loop closed")

    @staticmethod
    def _reply(pending: _Pending, outcome: Receipt | BaseException) -> None:
        try:
            pending.loop.call_soon_threadsafe(_settle, pending.future, outcome)
        except RuntimeError:  # the caller's event loop is closed; nobody is waiting
            log.debug("audit reply dropped: event loop closed")
