"""Group commit: one thread owns the store; appends queued meanwhile share one transaction."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jitgate.audit.record import StoredRecord, format_time, seal
from jitgate.audit.store import Store, StoreError
from jitgate.common.clock import Clock, system_clock

log = logging.getLogger(__name__)

MAX_QUEUE = 10_000
MAX_BATCH = 1_000


class WriterBusy(StoreError):
    """The queue is full: fail fast rather than keep a caller waiting past its deadline."""


class WriterClosed(StoreError):
    """The writer is not running, so nothing more can become durable."""


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """Proof that a record is durable: its index and the SHA-256 of its canonical bytes."""

    index: int
    record_hash: bytes


@dataclass(frozen=True, kw_only=True)
class _Pending:
    caller: str
    event: Mapping[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Receipt]


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
        clock: Clock = system_clock,
        max_queue: int = MAX_QUEUE,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be positive")
        self._open_store = open_store
        self._clock = clock
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
            store.head()
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
        try:
            records, accepted = self._seal(store, batch)
            if not records:
                return
            store.append(records)
        except StoreError as exc:
            log.error("audit batch of %d appends failed: %s", len(batch), exc)
            for pending in batch:
                self._reply(pending, StoreError(str(exc)))
            return
        except Exception as exc:
            log.exception("audit batch of %d appends failed unexpectedly", len(batch))
            for pending in batch:
                self._reply(pending, StoreError(f"unexpected: {type(exc).__name__}"))
            return
        self.transactions += 1
        for pending, stored in zip(accepted, records, strict=True):
            self._reply(pending, Receipt(index=stored.index, record_hash=stored.record_hash))

    def _seal(
        self, store: Store, batch: list[_Pending]
    ) -> tuple[list[StoredRecord], list[_Pending]]:
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
        return records, accepted

    @staticmethod
    def _reply(pending: _Pending, outcome: Receipt | BaseException) -> None:
        try:
            pending.loop.call_soon_threadsafe(_settle, pending.future, outcome)
        except RuntimeError:  # the caller's event loop is closed; nobody is waiting
            log.debug("audit reply dropped: event loop closed")
