"""Helpers for tests that run real gRPC servers in-process with mTLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import grpc

from jitgate.common import tls
from jitgate.common.rpc import ServicerContext, caller
from jitgate.common.server import Service
from jitgate.devstack import pki
from jitgate.v1 import audit_pb2, audit_pb2_grpc


@asynccontextmanager
async def running(
    dev: pki.DevPki,
    name: str,
    register: Callable[[grpc.aio.Server], None],
    acl: Mapping[str, frozenset[str]] | None,
    service_names: tuple[str, ...] = (),
) -> AsyncIterator[int]:
    """Run a real mTLS gRPC server for workload name on a free port; yield the port."""
    service = Service(
        name=name,
        listen="127.0.0.1:0",
        credentials=tls.server_credentials(dev.files(name), require_client_auth=acl is not None),
        acl=acl,
        register=register,
        service_names=service_names,
    )
    port = await service.start()
    try:
        yield port
    finally:
        await service.stop(grace=0.1)


def channel(dev: pki.DevPki, caller: str, port: int, server: str) -> grpc.aio.Channel:
    """An mTLS channel from workload caller to the server named server on port."""
    return tls.secure_channel(
        f"127.0.0.1:{port}", tls.channel_credentials(dev.files(caller)), server_name=server
    )


class RecordingAudit(audit_pb2_grpc.AuditServicer):
    """An Audit stand-in for unit tests of its callers: records, fails or stalls on demand."""

    def __init__(self) -> None:
        self.events: list[tuple[str, audit_pb2.AuditEvent]] = []
        self.mode = "record"  # or "fail", or "stall"

    async def Append(
        self, request: audit_pb2.AppendRequest, context: ServicerContext
    ) -> audit_pb2.AppendResponse:
        if self.mode == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "disk full")
        if self.mode == "stall":
            await asyncio.sleep(30)
        self.events.append((caller.get(), request.event))
        return audit_pb2.AppendResponse(index=len(self.events) - 1)

    def kinds(self) -> list[str]:
        """The kinds of the recorded events, in order."""
        return [str(event.WhichOneof("kind")) for _, event in self.events]


AUDIT_ACL = {"/jitgate.v1.Audit/Append": frozenset({"verifier", "policy"})}


def serve_audit(audit: RecordingAudit) -> Callable[[grpc.aio.Server], None]:
    """A register function for RecordingAudit."""
    return lambda server: audit_pb2_grpc.add_AuditServicer_to_server(audit, server)
