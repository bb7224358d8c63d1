"""The jitgate.v1.Audit gRPC servicer: the caller from mTLS, the event checked, the writer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf import json_format

from jitgate.audit.record import StoredRecord, parse, parse_time
from jitgate.audit.store import Store, StoreError
from jitgate.audit.writer import Writer
from jitgate.common.errors import InvalidArgument, PermissionDenied, Unavailable
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, spiffe_id
from jitgate.common.rpc import caller
from jitgate.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)

ACL: dict[str, frozenset[str]] = {
    "/jitgate.v1.Audit/Append": frozenset({"verifier", "policy"}),
    "/jitgate.v1.Audit/Read": frozenset({"auditor"}),
}
"""Who may call what: only the core zone appends, only the auditor reads."""
ALLOWED_KINDS: dict[str, frozenset[str]] = {
    "verifier": frozenset({"token_rejected"}),
    "policy": frozenset({"decision", "revocation"}),
}
"""The event kinds each workload may append: a service speaks only for itself."""
MAX_EVENT_BYTES = 16 * 1024
READ_PAGE = 256


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
        raise InvalidArgument("event", "must set one of token_rejected, decision, revocation")
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
        body = event_to_dict(request.event)
        try:
            receipt = await self._writer.append(spiffe_id(workload, self._trust_domain), body)
        except StoreError as exc:
            raise Unavailable("audit store", str(exc)) from exc
        return audit_pb2.AppendResponse(index=receipt.index, record_hash=receipt.record_hash)

    async def Read(
        self, request: audit_pb2.ReadRequest, context: Any
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        """Stream records from from_index to the end of the log."""
        try:
            store = await asyncio.to_thread(self._open_reader)
        except StoreError as exc:
            raise Unavailable("audit store", str(exc)) from exc
        try:
            position = request.from_index
            while True:
                try:
                    page = await asyncio.to_thread(store.read, position, READ_PAGE)
                except StoreError as exc:
                    raise Unavailable("audit store", str(exc)) from exc
                for stored in page:
                    yield to_message(stored)
                if len(page) < READ_PAGE:
                    return
                position = page[-1].index + 1
        finally:
            store.close()
