"""How core services append to audit: durable within a deadline, or Unavailable."""

from __future__ import annotations

import grpc

from jitgate.common.errors import Unavailable
from jitgate.common.status import from_rpc_error
from jitgate.v1 import audit_pb2, audit_pb2_grpc


class AuditClient:
    """Appends events (core services) or reads them (the auditor) over one mTLS channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub = audit_pb2_grpc.AuditStub(channel)

    async def append(
        self, event: audit_pb2.AuditEvent, *, timeout: float
    ) -> audit_pb2.AppendResponse:
        """Return the receipt once the record is durable; any failure is Unavailable.

        Whatever went wrong (audit down, slow, full, or refusing us), the record
        is not known to be durable, so the caller must fail closed.
        """
        try:
            response: audit_pb2.AppendResponse = await self._stub.Append(
                audit_pb2.AppendRequest(event=event), timeout=timeout
            )
        except grpc.RpcError as exc:
            call: grpc.Call = exc  # type: ignore[assignment]  # aio errors are calls
            raise Unavailable("audit", f"{call.code().name}: {call.details()}") from exc
        return response

    async def read(self, from_index: int = 0, *, timeout: float) -> list[audit_pb2.AuditRecord]:
        """Return the records from from_index to the end of the log (auditor identity only)."""
        try:
            call = self._stub.Read(audit_pb2.ReadRequest(from_index=from_index), timeout=timeout)
            return [record async for record in call]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "audit") from exc

    async def checkpoints(
        self, from_size: int = 0, *, timeout: float
    ) -> list[audit_pb2.Checkpoint]:
        """Return every signed checkpoint from from_size on (auditor identity only)."""
        try:
            call = self._stub.ListCheckpoints(
                audit_pb2.ListCheckpointsRequest(from_size=from_size), timeout=timeout
            )
            return [checkpoint async for checkpoint in call]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "audit") from exc

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(grace=None)
