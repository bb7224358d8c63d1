"""Run the issuer from JITGATE_* settings."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from jitgate.common import redisconn, tls
from jitgate.common.clock import system_clock
from jitgate.common.config import Env
from jitgate.common.server import Service
from jitgate.issuer.servicer import IssuerServicer, IssuerSettings
from jitgate.issuer.store import GrantStore
from jitgate.v1 import issuer_pb2, issuer_pb2_grpc, policy_pb2_grpc, verifier_pb2_grpc

log = logging.getLogger(__name__)


async def serve(env: Env) -> None:
    """Connect to verifier, policy and Redis; serve agents over TLS until signalled."""
    files = env.tls()
    credentials = tls.channel_credentials(files)
    verifier = tls.secure_channel(
        env.address("JITGATE_VERIFIER_ADDR"), credentials, server_name="verifier"
    )
    policy = tls.secure_channel(
        env.address("JITGATE_POLICY_ADDR"), credentials, server_name="policy"
    )
    redis_url = env.string("JITGATE_REDIS_URL")
    store = GrantStore(redis_url)
    log.info("redis %s", redisconn.redacted(redis_url))
    servicer = IssuerServicer(
        verifier=verifier_pb2_grpc.VerifierStub(verifier),
        policy=policy_pb2_grpc.PolicyStub(policy),
        store=store,
        settings=IssuerSettings(
            proxy_endpoint=env.string("JITGATE_PROXY_ENDPOINT", "127.0.0.1:6432"),
            proxy_endpoints={
                "ssh": env.string("JITGATE_PROXY_SSH_ENDPOINT", "127.0.0.1:2222"),
                "kubernetes": env.string("JITGATE_PROXY_KUBE_ENDPOINT", "https://127.0.0.1:6443"),
            },
            deadline=env.seconds("JITGATE_REQUEST_DEADLINE", 2.5, low=0.1, high=60.0),
        ),
        clock=system_clock,
    )

    async def close() -> None:
        await verifier.close(grace=None)
        await policy.close(grace=None)
        await store.close()

    service = Service(
        name="issuer",
        listen=env.address("JITGATE_LISTEN", "127.0.0.1:7443"),
        # Agents authenticate with their OIDC token, not a certificate: the
        # agent port is TLS with server authentication only.
        credentials=tls.server_credentials(files, require_client_auth=False),
        acl=None,
        register=lambda server: _register(servicer, server),
        service_names=[ISSUER],
        cleanup=[close],
    )
    await service.run_until_signalled()


ISSUER = issuer_pb2.DESCRIPTOR.services_by_name["Issuer"].full_name


def _register(servicer: IssuerServicer, server: grpc.aio.Server) -> None:
    """The agent API, and server reflection so grpcurl and IDEs can discover it."""
    issuer_pb2_grpc.add_IssuerServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (ISSUER, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
