"""Helpers for tests that run real gRPC servers in-process with mTLS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import grpc

from jitgate.common import tls
from jitgate.common.server import Service
from jitgate.devstack import pki


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
