"""Run the policy service from JITGATE_* settings."""

from __future__ import annotations

import logging

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, grants, keyfiles, keys, redisconn, tls
from jitgate.common.clock import system_clock
from jitgate.common.config import Env
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, spiffe_id
from jitgate.common.server import Service
from jitgate.policy import model
from jitgate.policy.ledger import Ledger
from jitgate.policy.servicer import ACL, PolicyServicer, PolicySettings
from jitgate.v1 import policy_pb2_grpc

log = logging.getLogger(__name__)


async def serve(env: Env) -> None:
    """Load the policy and keys, connect to audit and Redis, serve until signalled."""
    trust_domain = env.string("JITGATE_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN)
    files = env.tls()
    policy = model.load(env.path("JITGATE_POLICY_FILE"))
    log.info(
        "policy %s: %d connections, %d bindings",
        policy.version[:12],
        len(policy.connections),
        len(policy.bindings),
    )
    # Several keys let the verifier's key rotate without a gap; the files are
    # re-read when they change, so adding or removing one needs no restart
    # (docs/key-rotation.md).
    verifier_keys = keyfiles.PublicKeyFiles(env.paths("JITGATE_VERIFIER_PUBLIC_KEYS"))
    signer = grants.token_signer(
        keys.load_private(env.path("JITGATE_POLICY_SIGNING_KEY")), trust_domain
    )
    redis_url = env.string("JITGATE_REDIS_URL")
    audit_channel = tls.secure_channel(
        env.address("JITGATE_AUDIT_ADDR"), tls.channel_credentials(files), server_name="audit"
    )
    audit = AuditClient(audit_channel)
    ledger = Ledger(redisconn.connect(redis_url))
    log.info("redis %s", redisconn.redacted(redis_url))
    servicer = PolicyServicer(
        policy=lambda: policy,
        assertions=assertion.checker(verifier_keys, trust_domain),
        signer=signer,
        audit=audit,
        ledger=ledger,
        settings=PolicySettings(
            grant_audience=env.string("JITGATE_GRANT_AUDIENCE", spiffe_id("proxy", trust_domain)),
            audit_deadline=env.seconds("JITGATE_AUDIT_DEADLINE", 2.0, low=0.05, high=30.0),
        ),
        clock=system_clock,
    )
    service = Service(
        name="policy",
        listen=env.address("JITGATE_LISTEN", "127.0.0.1:7445"),
        credentials=tls.server_credentials(files, require_client_auth=True),
        acl=ACL,
        register=lambda server: policy_pb2_grpc.add_PolicyServicer_to_server(servicer, server),
        service_names=["jitgate.v1.Policy"],
        cleanup=[audit.close, ledger.close],
        trust_domain=trust_domain,
    )
    await service.run_until_signalled()
