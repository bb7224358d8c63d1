"""The jitgate.v1.Audit gRPC servicer: the caller from mTLS, the event checked, the writer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from google.protobuf import json_format

from jitgate.audit.record import StoredRecord, parse, parse_time
from jitgate.audit.store import Store, StoredCheckpoint, StoreError
from jitgate.audit.writer import Writer
from jitgate.common import telemetry
from jitgate.common.errors import InvalidArgument, PermissionDenied, Unavailable
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, spiffe_id
from jitgate.common.rpc import caller
from jitgate.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)

APPENDS = telemetry.meter().create_counter(
    "jitgate.audit.appends", unit="{record}", description="Appends, by event kind and outcome"
)
APPEND_MS = telemetry.meter().create_histogram(
    "jitgate.audit.append.duration", unit="ms", description="Append to durable receipt"
)
T = TypeVar("T", StoredRecord, StoredCheckpoint)

_HASH_READERS = frozenset({"auditor", "verifier", "policy"})
ACL: dict[str, frozenset[str]] = {
    "/jitgate.v1.Audit/Append": frozenset({"verifier", "policy"}),
    "/jitgate.v1.Audit/Read": frozenset({"auditor"}),
    "/jitgate.v1.Audit/ListCheckpoints": frozenset({"auditor"}),
    "/jitgate.v1.Audit/GetCheckpoint": _HASH_READERS,
    "/jitgate.v1.Audit/GetInclusionProof": _HASH_READERS,
    "/jitgate.v1.Audit/GetConsistencyProof": _HASH_READERS,
}
"""Who may call what: only the core zone appends, only the auditor reads records and
exports; checkpoints and proofs, which are hashes and nothing else, also serve
the core services that hold receipts. No agent-reachable workload is here: the
proxy's redemptions and closed sessions are recorded by policy (Policy.Redeem,
Policy.ReportSession), so a compromised edge cannot write to the log."""
ALLOWED_KINDS: dict[str, frozenset[str]] = {
    "verifier": frozenset({"token_rejected"}),
    "policy": frozenset(
        {"decision", "revocation", "policy_change", "redemption", "session_closed"}
    ),
}
"""The event kinds each workload may append: a service speaks only for what it checked."""
MAX_EVENT_BYTES = 16 * 1024
READ_PAGE = 256
EVENT_KINDS = tuple(f.name for f in audit_pb2.AuditEvent.DESCRIPTOR.oneofs_by_name["kind"].fields)


def allowed_kind(workload: str, kind: str) -> None:
    """Raise PermissionDenied unless workload may append events of kind (deny by default)."""
    if kind not in ALLOWED_KINDS.get(workload, frozenset()):
        raise PermissionDenied(
            "EVENT_KIND_NOT_ALLOWED",
            f"{workload or 'this caller'} may not append {kind} events",
            metadata={"kind": kind},
        )


def event_kind(event: audit_pb2.AuditEvent) -> str:
    """Return the kind of a well-formed event, or raise InvalidArgument naming the rule."""
    kind = event.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("event", f"must set one of {', '.join(EVENT_KINDS)}")
    if event.ByteSize() > MAX_EVENT_BYTES:
        raise InvalidArgument("event", f"must be at most {MAX_EVENT_BYTES} bytes serialized")
    return kind


def event_to_dict(event: audit_pb2.AuditEvent) -> dict[str, Any]:
    """Return the JSON form of an event, or raise InvalidArgument if it has none."""
    try:
        body = json_format.MessageToDict(event, preserving_proto_field_name=True)
        again = json_format.ParseDict(body, audit_pb2.AuditEvent())
    except (json_format.Error, ValueError) as exc:  # e.g. a timestamp out of range
        raise InvalidArgument("event", f"has no JSON form: {exc}") from None
    # What is acknowledged must be exactly what Read returns: fields unknown to
    # this build would be silently dropped from the record, so they are refused.
    if again.SerializeToString(deterministic=True) != event.SerializeToString(deterministic=True):
        raise InvalidArgument("event", "has fields this audit service does not know")
    return body


def to_message(stored: StoredRecord) -> audit_pb2.AuditRecord:
    """Return the wire form of a stored record; unreadable bytes are sent as they are."""
    message = audit_pb2.AuditRecord(
        index=stored.index,
        caller=stored.caller,
        canonical=stored.canonical,
        record_hash=stored.record_hash,
    )
    try:
        body = parse(stored.canonical)
        message.caller = body.caller  # the hashed bytes, not the query column, are the record
        message.time.FromDatetime(parse_time(body.time))
        message.prev_hash = body.prev_hash
        json_format.ParseDict(dict(body.event), message.event)
    except (ValueError, json_format.Error) as exc:
        # The auditor gets the stored bytes regardless and verifies them itself.
        log.warning("audit record %d does not parse: %s", stored.index, exc)
    return message


class AuditServicer(audit_pb2_grpc.AuditServicer):
    """Append and Read; ServiceGuard has already admitted the caller by its certificate."""

    def __init__(
        self,
        *,
        writer: Writer,
        open_reader: Callable[[], Store],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> None:
        self._writer = writer
        self._open_reader = open_reader
        self._trust_domain = trust_domain

    async def Append(
        self, request: audit_pb2.AppendRequest, context: Any
    ) -> audit_pb2.AppendResponse:
        """Record the event under the caller's mTLS identity; reply once it is durable."""
        # The caller is the certificate's SPIFFE ID, never anything in the request.
        workload = caller.get()
        allowed_kind(workload, event_kind(request.event))
        kind = event_kind(request.event)
        body = event_to_dict(request.event)
        started = time.perf_counter()
        try:
            receipt = await self._writer.append(spiffe_id(workload, self._trust_domain), body)
        except StoreError as exc:
            APPENDS.add(1, {"jitgate.event": kind, "jitgate.outcome": "failed"})
            raise Unavailable("audit store", str(exc)) from exc
        APPEND_MS.record((time.perf_counter() - started) * 1000, {"jitgate.event": kind})
        APPENDS.add(1, {"jitgate.event": kind, "jitgate.outcome": "durable"})
        telemetry.annotate(event=kind, audit_index=receipt.index)
        return audit_pb2.AppendResponse(
            index=receipt.index,
            record_hash=receipt.record_hash,
            leaf_hash=receipt.leaf_hash,
            checkpoint_size=receipt.checkpoint_size,
        )

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: Any
    ) -> audit_pb2.Checkpoint:
        """Return the latest signed checkpoint."""
        latest = self._writer.latest
        if latest is None:
            raise Unavailable("audit store", "the log is not open")
        return checkpoint_message(latest)

    async def ListCheckpoints(
        self, request: audit_pb2.ListCheckpointsRequest, context: Any
    ) -> AsyncIterator[audit_pb2.Checkpoint]:
        """Stream every checkpoint of size from_size or more, smallest first."""
        async for page in self._pages(
            lambda store, at: store.checkpoints(at, READ_PAGE), request.from_size
        ):
            for stored in page:
                yield checkpoint_message(stored)

    async def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: Any
    ) -> audit_pb2.InclusionProof:
        """Return the proof that the record at index is in the tree of tree_size."""
        if not request.index < request.tree_size:
            raise InvalidArgument("index", "must be less than tree_size")
        try:
            leaf, hashes = self._writer.inclusion_proof(request.index, request.tree_size)
        except ValueError as exc:
            raise InvalidArgument("tree_size", str(exc)) from exc
        return audit_pb2.InclusionProof(
            index=request.index, tree_size=request.tree_size, leaf_hash=leaf, hashes=hashes
        )

    async def GetConsistencyProof(
        self, request: audit_pb2.ConsistencyProofRequest, context: Any
    ) -> audit_pb2.ConsistencyProof:
        """Return the proof that the tree of old_size is a prefix of the tree of new_size."""
        if not 0 < request.old_size <= request.new_size:
            raise InvalidArgument("old_size", "must be at least 1 and at most new_size")
        try:
            hashes = self._writer.consistency_proof(request.old_size, request.new_size)
        except ValueError as exc:
            raise InvalidArgument("new_size", str(exc)) from exc
        return audit_pb2.ConsistencyProof(
            old_size=request.old_size, new_size=request.new_size, hashes=hashes
        )

    async def Read(
        self, request: audit_pb2.ReadRequest, context: Any
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        """Stream records from from_index to the end of the log."""
        async for page in self._pages(
            lambda store, at: store.read(at, READ_PAGE), request.from_index
        ):
            for stored in page:
                yield to_message(stored)

    async def _pages(
        self, read: Callable[[Store, int], list[T]], start: int
    ) -> AsyncIterator[list[T]]:
        """Yield pages read from a read-only store, each a thread hop, until one is short."""
        try:
            store = await asyncio.to_thread(self._open_reader)
        except StoreError as exc:
            raise Unavailable("audit store", str(exc)) from exc
        try:
            position = start
            while True:
                try:
                    page = await asyncio.to_thread(read, store, position)
                except StoreError as exc:
                    raise Unavailable("audit store", str(exc)) from exc
                yield page
                if len(page) < READ_PAGE:
                    return
                position = _position(page[-1]) + 1
        finally:
            store.close()


def _position(item: StoredRecord | StoredCheckpoint) -> int:
    return item.size if isinstance(item, StoredCheckpoint) else item.index


def checkpoint_message(stored: StoredCheckpoint) -> audit_pb2.Checkpoint:
    """Return the wire form of a stored checkpoint."""
    message = audit_pb2.Checkpoint(size=stored.size, root_hash=stored.root, note=stored.note)
    try:
        message.time.FromDatetime(parse_time(stored.time))
    except ValueError as exc:
        log.warning("checkpoint %d has an unreadable time: %s", stored.size, exc)
    return message
