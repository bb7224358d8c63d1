"""Ask a jitgate service's grpc.health.v1 over mTLS, for the launcher and the container probe."""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitgate.common import tls
from jitgate.common.tls import TlsFiles


def serving_status(address: str, files: TlsFiles, service: str, *, timeout: float) -> str:
    """The overall health status name of service at address; raises grpc.RpcError.

    Each jitgate certificate names its service in a DNS SAN, so the server is
    checked as the services check each other: a swapped certificate fails.
    """
    with tls.blocking_channel(address, files, server_name=service) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
