"""The Audit service over real mTLS: who may append what, who may read, and the statuses."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from jitgate.audit import servicer as servicer_module
from jitgate.audit.chain import verify_database
from jitgate.audit.checkpoint import open_signed
from jitgate.audit.merkle import check_consistency, check_inclusion
from jitgate.audit.record import format_time
from jitgate.audit.servicer import ACL, AuditServicer, allowed_kind
from jitgate.audit.store import SqliteStore, iter_records
from jitgate.audit.writer import Writer
from jitgate.common import tls
from jitgate.common.errors import InvalidArgument, PermissionDenied
from jitgate.common.status import from_rpc_error
from jitgate.devstack import pki
from jitgate.v1 import audit_pb2, audit_pb2_grpc, types_pb2
from tests.support import channel, running

from .factory import ORIGIN, SIGNER, T0, VERIFIER, raw

pytestmark = pytest.mark.integration


@dataclass(frozen=True, kw_only=True)
class Audit:
    port: int
    path: Path
    writer: Writer
    dev: pki.DevPki

    def records(self) -> list[tuple[int, str, str]]:
        store = SqliteStore.open(self.path, read_only=True)
        try:
            return [(r.index, r.caller, r.kind) for r in iter_records(store)]
        finally:
            store.close()


@pytest.fixture
async def audit(tmp_path: Path, dev_pki: pki.DevPki) -> AsyncIterator[Audit]:
    path = tmp_path / "audit.db"
    writer = Writer(
        signer=SIGNER, origin=ORIGIN, open_store=lambda: SqliteStore.open(path), clock=lambda: T0
    )
    await writer.start()
    servicer = AuditServicer(
        writer=writer, open_reader=lambda: SqliteStore.open(path, read_only=True)
    )

    def register(server: grpc.aio.Server) -> None:
        audit_pb2_grpc.add_AuditServicer_to_server(servicer, server)

    try:
        async with running(dev_pki, "audit", register, ACL, ("jitgate.v1.Audit",)) as port:
            yield Audit(port=port, path=path, writer=writer, dev=dev_pki)
    finally:
        await writer.close()


@asynccontextmanager
async def stub(audit: Audit, who: str) -> AsyncIterator[audit_pb2_grpc.AuditAsyncStub]:
    chan = channel(audit.dev, who, audit.port, "audit")
    try:
        yield audit_pb2_grpc.AuditStub(chan)
    finally:
        await chan.close(grace=None)


def decision(**fields: Any) -> audit_pb2.AuditEvent:
    identity = types_pb2.Identity(subject="agent-7", groups=["platform"])
    inner = audit_pb2.DecisionRecorded(
        connection="orders-replica", allowed=True, identity=identity, **fields
    )
    return audit_pb2.AuditEvent(decision=inner)


REJECTED = audit_pb2.AuditEvent(
    token_rejected=audit_pb2.TokenRejected(reason="audience", claimed_subject="zoë")
)
REVOKED = audit_pb2.AuditEvent(revocation=audit_pb2.GrantRevoked(grant_id="ab" * 16))
REDEEMED = audit_pb2.AuditEvent(
    redemption=audit_pb2.GrantRedeemed(grant_id="ab" * 16, session_id="s1", subject="agent-7")
)
CLOSED = audit_pb2.AuditEvent(
    session_closed=audit_pb2.SessionClosed(grant_id="ab" * 16, session_id="s1", reason="expired")
)


async def append(audit: Audit, who: str, event: audit_pb2.AuditEvent) -> audit_pb2.AppendResponse:
    async with stub(audit, who) as audit_stub:
        response: audit_pb2.AppendResponse = await audit_stub.Append(
            audit_pb2.AppendRequest(event=event), timeout=5
        )
        return response


async def refused(audit: Audit, who: str, event: audit_pb2.AuditEvent) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await append(audit, who, event)
    return caught.value


async def raw_append(audit: Audit, who: str, data: bytes) -> grpc.aio.AioRpcError:
    chan = channel(audit.dev, who, audit.port, "audit")
    try:
        # No serializers: the bytes go on the wire exactly as given.
        call = chan.unary_unary(
            "/jitgate.v1.Audit/Append", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(data, timeout=5)
        return caught.value
    finally:
        await chan.close(grace=None)


async def read(audit: Audit, who: str, from_index: int = 0) -> list[audit_pb2.AuditRecord]:
    async with stub(audit, who) as audit_stub:
        call = audit_stub.Read(audit_pb2.ReadRequest(from_index=from_index), timeout=5)
        return [item async for item in call]


# Append: accepted.


async def test_policy_appends_under_its_certificate_identity(audit: Audit) -> None:
    response = await append(audit, "policy", decision(grant_id="cd" * 16))
    assert response.index == 0
    assert audit.records() == [(0, "spiffe://jitgate/policy", "decision")]
    store = SqliteStore.open(audit.path, read_only=True)
    try:
        (stored,) = store.read(0, 1)
    finally:
        store.close()
    assert response.record_hash == hashlib.sha256(stored.canonical).digest()
    assert b'"caller":"spiffe://jitgate/policy"' in stored.canonical
    assert verify_database(audit.path).intact


async def test_each_core_service_appends_its_own_kinds(audit: Audit) -> None:
    assert (await append(audit, "verifier", REJECTED)).index == 0
    assert (await append(audit, "policy", REVOKED)).index == 1
    assert (await append(audit, "policy", decision())).index == 2
    assert (await append(audit, "policy", REDEEMED)).index == 3
    assert (await append(audit, "policy", CLOSED)).index == 4
    assert audit.records() == [
        (0, "spiffe://jitgate/verifier", "token_rejected"),
        (1, "spiffe://jitgate/policy", "revocation"),
        (2, "spiffe://jitgate/policy", "decision"),
        (3, "spiffe://jitgate/policy", "redemption"),
        (4, "spiffe://jitgate/policy", "session_closed"),
    ]


async def test_a_receipt_names_a_signed_durable_checkpoint_that_covers_it(audit: Audit) -> None:
    receipts = [await append(audit, "policy", decision()) for _ in range(3)]
    async with stub(audit, "policy") as audit_stub:
        latest = await audit_stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5)
        for receipt in receipts:
            assert receipt.index < receipt.checkpoint_size <= latest.size
            proof = await audit_stub.GetInclusionProof(
                audit_pb2.InclusionProofRequest(
                    index=receipt.index, tree_size=receipt.checkpoint_size
                ),
                timeout=5,
            )
            assert proof.leaf_hash == receipt.leaf_hash
    # The auditor checks it all against nothing but the log's public key.
    async with stub(audit, "auditor") as audit_stub:
        notes = [c async for c in audit_stub.ListCheckpoints(audit_pb2.ListCheckpointsRequest())]
    by_size = {c.size: c for c in notes}
    assert sorted(by_size) == [0, 1, 2, 3]  # one at start, then one per batch
    for receipt in receipts:
        signed = open_signed(by_size[receipt.checkpoint_size].note, [VERIFIER])
        assert signed.root == by_size[receipt.checkpoint_size].root_hash
        async with stub(audit, "policy") as audit_stub:
            proof = await audit_stub.GetInclusionProof(
                audit_pb2.InclusionProofRequest(
                    index=receipt.index, tree_size=receipt.checkpoint_size
                ),
                timeout=5,
            )
        check_inclusion(
            receipt.leaf_hash, receipt.index, signed.size, list(proof.hashes), signed.root
        )
    async with stub(audit, "verifier") as audit_stub:
        consistency = await audit_stub.GetConsistencyProof(
            audit_pb2.ConsistencyProofRequest(old_size=1, new_size=3), timeout=5
        )
    check_consistency(1, 3, by_size[1].root_hash, by_size[3].root_hash, list(consistency.hashes))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (audit_pb2.InclusionProofRequest(index=0, tree_size=0), "index"),
        (audit_pb2.InclusionProofRequest(index=5, tree_size=2), "index"),
        (audit_pb2.InclusionProofRequest(index=0, tree_size=99), "tree_size"),
        (audit_pb2.InclusionProofRequest(index=2**64 - 2, tree_size=2**64 - 1), "tree_size"),
        (audit_pb2.ConsistencyProofRequest(old_size=0, new_size=1), "old_size"),
        (audit_pb2.ConsistencyProofRequest(old_size=2, new_size=1), "old_size"),
        (audit_pb2.ConsistencyProofRequest(old_size=1, new_size=99), "new_size"),
    ],
)
async def test_a_proof_past_the_log_or_out_of_range_is_invalid_argument(
    audit: Audit, request_: Any, field: str
) -> None:
    await append(audit, "policy", decision())
    async with stub(audit, "auditor") as audit_stub:
        method = (
            audit_stub.GetInclusionProof
            if isinstance(request_, audit_pb2.InclusionProofRequest)
            else audit_stub.GetConsistencyProof
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(request_, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    translated = from_rpc_error(caught.value, "audit")
    assert isinstance(translated, InvalidArgument)
    assert translated.field == field


@pytest.mark.parametrize("who", ["issuer", "proxy", "operator"])
async def test_checkpoints_and_proofs_are_not_for_the_edge(audit: Audit, who: str) -> None:
    async with stub(audit, who) as audit_stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await audit_stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("who", ["policy", "verifier", "proxy"])
async def test_only_the_auditor_lists_checkpoints(audit: Audit, who: str) -> None:
    async with stub(audit, who) as audit_stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [c async for c in audit_stub.ListCheckpoints(audit_pb2.ListCheckpointsRequest())]
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_event_of_exactly_the_limit_is_accepted(audit: Audit) -> None:
    event = decision(request_reason="")
    event.decision.request_reason = "x" * (servicer_module.MAX_EVENT_BYTES - event.ByteSize())
    while event.ByteSize() > servicer_module.MAX_EVENT_BYTES:
        event.decision.request_reason = event.decision.request_reason[:-1]
    assert event.ByteSize() == servicer_module.MAX_EVENT_BYTES
    assert (await append(audit, "policy", event)).index == 0


# Append: refused callers (the guard's allow-list), nothing written.


@pytest.mark.parametrize("who", ["issuer", "auditor", "operator"])
async def test_other_workloads_may_not_append(audit: Audit, who: str) -> None:
    error = await refused(audit, who, decision())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert audit.records() == []


@pytest.mark.parametrize("event", [REDEEMED, CLOSED])
async def test_the_proxy_is_edge_and_may_not_append_even_its_own_sessions(
    audit: Audit, event: audit_pb2.AuditEvent
) -> None:
    # Its sessions are recorded by policy (Policy.Redeem, Policy.ReportSession).
    error = await refused(audit, "proxy", event)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "caller not allowed"  # the allow-list, before any kind check
    assert audit.records() == []


# Append: refused kinds (EVENT_KIND_NOT_ALLOWED), nothing written.


@pytest.mark.parametrize(
    ("who", "event", "kind"),
    [
        ("verifier", decision(), "decision"),
        ("verifier", REVOKED, "revocation"),
        ("policy", REJECTED, "token_rejected"),
        ("verifier", REDEEMED, "redemption"),
        ("verifier", CLOSED, "session_closed"),
    ],
)
async def test_a_service_may_not_append_another_services_kind(
    audit: Audit, who: str, event: audit_pb2.AuditEvent, kind: str
) -> None:
    error = await refused(audit, who, event)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    translated = from_rpc_error(error, "audit")
    assert isinstance(translated, PermissionDenied)
    assert translated.reason == "EVENT_KIND_NOT_ALLOWED"
    assert translated.metadata == {"kind": kind}
    assert audit.records() == []


def test_kinds_are_denied_by_default() -> None:
    with pytest.raises(PermissionDenied, match="EVENT_KIND_NOT_ALLOWED"):
        allowed_kind("auditor", "decision")
    for kind in ("redemption", "session_closed"):
        with pytest.raises(PermissionDenied, match="EVENT_KIND_NOT_ALLOWED"):
            allowed_kind("proxy", kind)
    with pytest.raises(PermissionDenied, match="EVENT_KIND_NOT_ALLOWED"):
        allowed_kind("policy", "")


# Append: malformed requests are INVALID_ARGUMENT, never INTERNAL.


async def test_no_event(audit: Audit) -> None:
    error = await refused(audit, "policy", audit_pb2.AuditEvent())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event" in (error.details() or "")
    assert audit.records() == []


async def test_an_event_over_the_limit(audit: Audit) -> None:
    event = decision(request_reason="x" * servicer_module.MAX_EVENT_BYTES)
    error = await refused(audit, "policy", event)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "16384 bytes" in (error.details() or "")
    assert audit.records() == []


async def test_a_timestamp_with_no_json_form(audit: Audit) -> None:
    event = decision(expires_at=timestamp_pb2.Timestamp(seconds=2**62))
    error = await refused(audit, "policy", event)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no JSON form" in (error.details() or "")
    assert audit.records() == []


async def test_garbage_bytes(audit: Audit) -> None:
    error = await raw_append(audit, "policy", b"\xff\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert audit.records() == []


async def test_invalid_utf8_in_a_string(audit: Audit) -> None:
    # AppendRequest{event{decision{connection: b"\xff"}}} on the wire.
    error = await raw_append(audit, "policy", b"\x0a\x05\x12\x03\x0a\x01\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert audit.records() == []


async def test_fields_the_service_does_not_know(audit: Audit) -> None:
    # A decision carrying field 99, which this build would silently drop.
    error = await raw_append(audit, "policy", b"\x0a\x05\x12\x03\x98\x06\x01")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not know" in (error.details() or "")
    assert audit.records() == []


async def test_garbage_from_a_forbidden_caller_is_still_forbidden(audit: Audit) -> None:
    error = await raw_append(audit, "issuer", b"\xff\xff\xff\xff")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


# Append: the store failing is UNAVAILABLE (fail closed).


async def test_a_stopped_writer_is_unavailable(audit: Audit) -> None:
    await audit.writer.close()
    error = await refused(audit, "policy", decision())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert audit.records() == []


async def test_a_failing_store_is_unavailable(audit: Audit) -> None:
    with raw(audit.path) as other:
        other.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON records"
            " BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
    error = await refused(audit, "policy", decision())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "disk" not in (error.details() or "")  # the operator's log has the reason
    assert audit.records() == []


# Read.


async def test_the_auditor_reads_what_was_appended(audit: Audit) -> None:
    receipts = [
        await append(audit, "policy", decision(grant_id="cd" * 16)),
        await append(audit, "verifier", REJECTED),
        await append(audit, "policy", REVOKED),
    ]
    got = await read(audit, "auditor")
    assert [r.index for r in got] == [0, 1, 2]
    assert [r.event for r in got] == [decision(grant_id="cd" * 16), REJECTED, REVOKED]
    assert [r.caller for r in got] == [
        "spiffe://jitgate/policy",
        "spiffe://jitgate/verifier",
        "spiffe://jitgate/policy",
    ]
    assert [r.record_hash for r in got] == [r.record_hash for r in receipts]
    assert got[0].prev_hash == bytes(32)
    for previous, current in itertools.pairwise(got):
        assert current.prev_hash == previous.record_hash
    for item in got:
        assert hashlib.sha256(item.canonical).digest() == item.record_hash
        assert item.time.ToDatetime().isoformat(timespec="microseconds") + "Z" == format_time(T0)
    assert [r.index for r in await read(audit, "auditor", 2)] == [2]
    assert await read(audit, "auditor", 3) == []
    assert await read(audit, "auditor", 2**64 - 1) == []


async def test_read_pages_through_a_long_log(audit: Audit, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servicer_module, "READ_PAGE", 2)
    for _ in range(5):
        await append(audit, "policy", decision())
    assert [r.index for r in await read(audit, "auditor")] == [0, 1, 2, 3, 4]
    assert [r.index for r in await read(audit, "auditor", 1)] == [1, 2, 3, 4]


async def test_read_sends_an_unreadable_record_as_stored(audit: Audit) -> None:
    await append(audit, "policy", decision())
    with raw(audit.path) as other:
        other.execute("DROP TRIGGER records_no_update")
        other.execute("UPDATE records SET canonical = x'7b7d' WHERE idx = 0")
    (item,) = await read(audit, "auditor")
    assert item.canonical == b"{}"
    assert not item.HasField("event")


@pytest.mark.parametrize("who", ["policy", "verifier", "issuer", "operator"])
async def test_only_the_auditor_may_read(audit: Audit, who: str) -> None:
    await append(audit, "policy", decision())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(audit, who)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# The handshake: a certificate from another CA never gets as far as the guard.


async def test_a_client_certificate_from_another_ca(audit: Audit, foreign_pki: pki.DevPki) -> None:
    # Trusts our CA (so the server's certificate is fine) but presents a
    # foreign client certificate carrying the name "policy".
    ca = audit.dev.ca.read_bytes()
    _, cert, key = foreign_pki.files("policy").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    chan = tls.secure_channel(f"127.0.0.1:{audit.port}", credentials, server_name="audit")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await audit_pb2_grpc.AuditStub(chan).Append(
                audit_pb2.AppendRequest(event=decision()), timeout=2
            )
    finally:
        await chan.close(grace=None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert audit.records() == []


async def test_no_client_certificate(audit: Audit) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=audit.dev.ca.read_bytes())
    chan = tls.secure_channel(f"127.0.0.1:{audit.port}", credentials, server_name="audit")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await audit_pb2_grpc.AuditStub(chan).Append(
                audit_pb2.AppendRequest(event=decision()), timeout=2
            )
    finally:
        await chan.close(grace=None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert audit.records() == []
