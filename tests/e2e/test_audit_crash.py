"""Crash safety of the audit log: SIGKILL under load loses nothing that was acknowledged.

Each round streams concurrent appends from the policy identity into the real
`jitgate serve audit` process, kills it with SIGKILL a random moment after the
round's first receipt (on odd rounds, at the first receipt after that moment),
restarts it on the same database, and checks that:

- every receipt ever given (this round's and all earlier ones) names a stored
  record with the receipt's record and leaf hashes, holding the event that was
  sent, under a stored checkpoint of the receipt's size;
- the indices run from 0 without a gap, and nothing is stored that was not sent;
- the whole log verifies offline against the checkpoint key, its last
  checkpoint covering every record;
- the restarted service continues the log: a new append gets the next index.

A killed process keeps what it had handed to the kernel; what power loss would
also take (data written but not fsynced) needs a VM or a fault-injecting
filesystem to show. What a kill does catch is a receipt sent before its batch
was written: that batch dies with the process, and its receipts name records
that are not there, or are different ones.

`bench/audit_crash.py` runs the same rounds, more of them, and prints figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitgate.audit.checkpoint import parse_verifier_key, verifier_key_string
from jitgate.audit.client import AuditClient
from jitgate.audit.merkle import leaf_hash
from jitgate.audit.record import StoredRecord, parse, record_hash
from jitgate.audit.store import SqliteStore, StoredCheckpoint, iter_checkpoints, iter_records
from jitgate.audit.verify import verify
from jitgate.common import keys
from jitgate.common.errors import Unavailable
from jitgate.devstack import pki
from jitgate.devstack.redis_server import free_port
from jitgate.v1 import audit_pb2
from tests.support import channel

pytestmark = pytest.mark.e2e

ORIGIN = "jitgate/audit"
"""The service's default origin for the default trust domain, "jitgate"."""
CALLER = "spiffe://jitgate/policy"
ROUNDS = 20
CLIENTS = 8
"""Client tasks streaming appends at once, each on its own mTLS channel."""
KILL_AFTER = (0.01, 0.25)
"""The kill comes this many seconds (uniformly at random) after the round's first receipt."""
START_TIMEOUT = 20.0


def decision(grant_id: str) -> tuple[audit_pb2.AuditEvent, dict[str, Any]]:
    """A decision event naming grant_id, and its JSON form as the record must hold it."""
    event = audit_pb2.AuditEvent(
        decision=audit_pb2.DecisionRecorded(
            connection="orders-replica",
            allowed=True,
            reason_code="ALLOWED",
            grant_id=grant_id,
        )
    )
    expected = {
        "decision": {
            "connection": "orders-replica",
            "allowed": True,
            "reason_code": "ALLOWED",
            "grant_id": grant_id,
        }
    }
    return event, expected


@dataclass(frozen=True, kw_only=True)
class Ack:
    """A receipt as the client got it, with the event that was sent for it."""

    index: int
    record_hash: bytes
    leaf_hash: bytes
    checkpoint_size: int
    event: dict[str, Any]
    round: int


@dataclass(kw_only=True)
class RoundResult:
    """What one kill-and-restart round saw."""

    number: int
    sent: int = 0
    acknowledged: int = 0
    present: int = 0
    """This round's acknowledged appends found intact after the restart."""
    lost: int = 0
    """Acknowledged appends, of any round so far, not found intact: must be 0."""
    durable_unacknowledged: int = 0
    """Appends in flight at the kill that were stored anyway (allowed, never required)."""
    batches: int = 0
    """Distinct checkpoint sizes among this round's receipts: group commits seen."""
    kill_after: float = 0.0
    restart_seconds: float = 0.0
    verify_seconds: float = 0.0
    size: int = 0
    """Records in the log after the restart and the continuing append."""
    problems: list[str] = field(default_factory=list)


class CrashRig:
    """One audit database, served by a process that is killed and restarted round after round."""

    def __init__(
        self,
        dev: pki.DevPki,
        workdir: Path,
        *,
        clients: int = CLIENTS,
        kill_after: tuple[float, float] = KILL_AFTER,
        seed: int | None = None,
    ) -> None:
        self.dev = dev
        self.db = workdir / "audit.db"
        self.log_path = workdir / "audit.log"
        self.signing_key = workdir / "audit-signing.key"
        private = keys.create_pair(self.signing_key, workdir / "audit-signing.pub")
        self.vkey = verifier_key_string(ORIGIN, private.public_key())
        self.verifier = parse_verifier_key(self.vkey)
        self.clients = clients
        self.kill_after = kill_after
        self.random = random.Random(seed)
        self.acks: dict[int, Ack] = {}
        self.lost: dict[tuple[int, bytes], Ack] = {}
        """Every acknowledged append that some round found missing or changed."""
        self.size = 0
        """The log's size when the next round starts streaming."""
        self._read: set[tuple[int, bytes]] = set()
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None
        self._counter = itertools.count()
        self._log: BinaryIO = self.log_path.open("ab")

    def environ(self) -> dict[str, str]:
        """The audit process's environment."""
        files = self.dev.files("audit")
        return {
            **os.environ,
            "JITGATE_LISTEN": f"127.0.0.1:{self.port}",
            "JITGATE_TLS_CA": str(files.ca),
            "JITGATE_TLS_CERT": str(files.cert),
            "JITGATE_TLS_KEY": str(files.key),
            "JITGATE_AUDIT_DB": str(self.db),
            "JITGATE_AUDIT_SIGNING_KEY": str(self.signing_key),
        }

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the audit processes wrote to stderr."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def start(self) -> float:
        """Start the audit process on a fresh port; return the seconds until it was SERVING."""
        self.port = free_port()
        started = time.perf_counter()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jitgate",
            "serve",
            "audit",
            env=self.environ(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log,
        )
        await self._wait_serving(self._process)
        return time.perf_counter() - started

    async def _wait_serving(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        # Poll the port first: a gRPC channel that failed to connect backs off
        # for 100 ms or more, which would blur the restart time.
        while True:
            if process.returncode is not None:
                raise AssertionError(
                    f"the audit process exited with {process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the audit process did not listen:\n{self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.005)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        health = channel(self.dev, "auditor", self.port, "audit")
        try:
            request = health_pb2.HealthCheckRequest(service="jitgate.v1.Audit")
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health_pb2_grpc.HealthStub(health).Check(
                        request, timeout=2, wait_for_ready=True
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline or process.returncode is not None:
                    raise AssertionError(f"the audit process is not SERVING:\n{self.log_tail()}")
                await asyncio.sleep(0.005)
        finally:
            await health.close(grace=None)

    async def close(self) -> int | None:
        """Stop the audit process with SIGTERM; return its exit code."""
        code = None
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                code = await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()
        self._log.close()
        return code

    def _next_event(self) -> tuple[str, audit_pb2.AuditEvent, dict[str, Any]]:
        grant_id = f"{next(self._counter):032x}"
        event, expected = decision(grant_id)
        return grant_id, event, expected

    def _remember(
        self, result: RoundResult, receipt: audit_pb2.AppendResponse, expected: dict[str, Any]
    ) -> None:
        if receipt.index in self.acks:
            result.problems.append(f"index {receipt.index} was acknowledged twice")
        self.acks[receipt.index] = Ack(
            index=receipt.index,
            record_hash=receipt.record_hash,
            leaf_hash=receipt.leaf_hash,
            checkpoint_size=receipt.checkpoint_size,
            event=expected,
            round=result.number,
        )

    async def crash_round(self, number: int, *, verify_log: bool = True) -> RoundResult:
        """Stream appends, SIGKILL the process, restart it, check the log, append once more.

        verify_log=False leaves out the offline verification of the whole log,
        whose cost grows with it; every other check is made all the same.
        """
        process = self._process
        assert process is not None, "start() the rig first"
        result = RoundResult(number=number)
        sent: set[str] = set()
        acked: set[str] = set()
        sizes: set[int] = set()
        first = asyncio.Event()
        # Odd rounds kill at the first receipt after the delay, the moment a
        # receipt sent before its batch was written is most likely to be lost.
        on_receipt = number % 2 == 1
        armed = killed = False

        def kill() -> None:
            nonlocal killed
            if not killed and process.returncode is None:
                killed = True
                process.kill()

        async def stream(client: AuditClient) -> None:
            while not killed:
                grant_id, event, expected = self._next_event()
                sent.add(grant_id)
                result.sent += 1
                try:
                    receipt = await client.append(event, timeout=5)
                except Unavailable as exc:
                    if not killed:
                        result.problems.append(f"an append failed before the kill: {exc}")
                    return
                # A receipt that arrives after the kill was still sent by the
                # process before it died: it counts as acknowledged too.
                self._remember(result, receipt, expected)
                acked.add(grant_id)
                sizes.add(receipt.checkpoint_size)
                first.set()
                if armed:
                    kill()

        clients = [
            AuditClient(channel(self.dev, "policy", self.port, "audit"))
            for _ in range(self.clients)
        ]
        tasks = [asyncio.create_task(stream(client)) for client in clients]
        try:
            try:
                await asyncio.wait_for(first.wait(), timeout=10)
            except TimeoutError:
                result.problems.append("no append was acknowledged within 10 s")
            result.kill_after = self.random.uniform(*self.kill_after)
            await asyncio.sleep(result.kill_after)
            armed = on_receipt
            if on_receipt:
                # Wait for a receipt to trigger it, but not forever.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=2)
            kill()
            await process.wait()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        finally:
            kill()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                await client.close()
        result.acknowledged = len(acked)
        result.batches = len(sizes)
        result.restart_seconds = await self.start()
        records = self.check(result, sent, acked, verify_log=verify_log)
        await self._continue(result, len(records))
        return result

    def read(self) -> tuple[list[StoredRecord], list[StoredCheckpoint]]:
        """Every record and checkpoint in the database, read-only."""
        store = SqliteStore.open(self.db, read_only=True)
        try:
            return list(iter_records(store)), list(iter_checkpoints(store))
        finally:
            store.close()

    def check(
        self, result: RoundResult, sent: set[str], acked: set[str], *, verify_log: bool = True
    ) -> list[StoredRecord]:
        """Check the log after a restart; add what is wrong to result.problems."""
        records, checkpoints = self.read()
        problems = result.problems
        gap = next((i for i, r in enumerate(records) if r.index != i), None)
        if gap is not None:
            problems.append(f"the record at position {gap} has index {records[gap].index}")
        if len(records) < self.size:
            problems.append(f"the log shrank from {self.size} to {len(records)} records")
        sizes = {c.size for c in checkpoints}
        lost: list[tuple[Ack, str]] = []
        for ack in self.acks.values():
            # The event is read once; from then on the hashes show the bytes are the same.
            key = (ack.index, ack.record_hash)
            why = _why(ack, records, sizes, read_event=key not in self._read)
            if why:
                lost.append((ack, why))
                self.lost[key] = ack
            else:
                self._read.add(key)
                if ack.round == result.number:
                    result.present += 1
        result.lost = len(lost)
        problems.extend(why for _, why in lost[:5])
        # What the round added: only events that were sent, some of them never acknowledged.
        for stored in records[self.size :]:
            grant_id = _grant_id(stored)
            if grant_id not in sent:
                problems.append(f"record {stored.index} holds an event nobody sent this round")
            elif grant_id not in acked:
                result.durable_unacknowledged += 1
        if not verify_log:
            return records
        started = time.perf_counter()
        report = verify(
            (r.canonical for r in records),
            (c.note for c in checkpoints),
            [self.verifier],
            origin=ORIGIN,
        )
        result.verify_seconds = time.perf_counter() - started
        if not report.ok:
            problems.append(f"the log does not verify: {report.summary()}: {report.detail}")
        elif report.largest is None or report.largest.size != len(records):
            covered = 0 if report.largest is None else report.largest.size
            problems.append(f"the last checkpoint covers {covered} of {len(records)} records")
        return records

    async def _continue(self, result: RoundResult, size: int) -> None:
        """Append once to the restarted process: it must take the next index."""
        _, event, expected = self._next_event()
        client = AuditClient(channel(self.dev, "policy", self.port, "audit"))
        try:
            receipt = await client.append(event, timeout=5)
        except Unavailable as exc:
            result.problems.append(f"the restarted service refused an append: {exc}")
            return
        finally:
            await client.close()
        if receipt.index != size or receipt.checkpoint_size != size + 1:
            result.problems.append(
                f"after the restart an append got index {receipt.index} under checkpoint"
                f" {receipt.checkpoint_size}; the log held {size} records"
            )
        self._remember(result, receipt, expected)
        self.size = result.size = receipt.index + 1


def _grant_id(stored: StoredRecord) -> str | None:
    try:
        body = parse(stored.canonical)
        grant_id = body.event["decision"]["grant_id"]
    except (ValueError, KeyError, TypeError):
        return None
    return grant_id if isinstance(grant_id, str) else None


def _why(ack: Ack, records: Sequence[StoredRecord], sizes: set[int], *, read_event: bool) -> str:
    """Say how an acknowledged append is not in the log as acknowledged, or return ""."""
    where = f"acknowledged index {ack.index} (round {ack.round})"
    if ack.index >= len(records) or records[ack.index].index != ack.index:
        return f"{where} is missing: the log holds {len(records)} records"
    stored = records[ack.index]
    if stored.record_hash != ack.record_hash or record_hash(stored.canonical) != ack.record_hash:
        return f"{where} holds another record than the receipt's"
    if not ack.index < ack.checkpoint_size or ack.checkpoint_size not in sizes:
        return f"{where}: the receipt's checkpoint {ack.checkpoint_size} is not stored"
    if not read_event:
        return ""
    if leaf_hash(stored.canonical) != ack.leaf_hash:
        return f"{where}: the receipt's leaf hash is not the record's"
    try:
        body = parse(stored.canonical)
    except ValueError as exc:
        return f"{where} does not parse: {exc}"
    if body.caller != CALLER or dict(body.event) != ack.event:
        return f"{where} holds {body.caller} {dict(body.event)}, not {ack.event}"
    return ""


async def test_sigkill_under_load_loses_no_acknowledged_append(
    tmp_path: Path, dev_pki: pki.DevPki
) -> None:
    rig = CrashRig(dev_pki, tmp_path)
    results: list[RoundResult] = []
    try:
        await rig.start()
        for number in range(ROUNDS):
            results.append(await rig.crash_round(number))
    finally:
        code = await rig.close()
    problems = [f"round {r.number}: {p}" for r in results for p in r.problems]
    assert not problems, "\n".join(problems[:20])
    assert all(r.acknowledged > 0 and r.lost == 0 for r in results)
    assert sum(r.present for r in results) == sum(r.acknowledged for r in results)
    assert len(rig.acks) == sum(r.acknowledged for r in results) + ROUNDS
    assert code == 0, rig.log_tail()
