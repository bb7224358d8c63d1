"""Run the policy service from JITGATE_* settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, grants, keyfiles, keys, redisconn, telemetry, tls
from jitgate.common.clock import system_clock
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, spiffe_id
from jitgate.common.server import Service
from jitgate.policy import model
from jitgate.policy.gauges import LiveGrants
from jitgate.policy.holder import PolicyHolder
from jitgate.policy.keyring import GrantKeys, RotatingKeys, SingleKey
from jitgate.policy.ledger import Ledger
from jitgate.policy.servicer import ACL, PolicyServicer, PolicySettings
from jitgate.v1 import policy_pb2_grpc

log = logging.getLogger(__name__)


def _grant_keys(env: Env, trust_domain: str, ttl_ceiling: Callable[[], float]) -> GrantKeys:
    """Return JITGATE_POLICY_KEYS_DIR's rotating keys, else JITGATE_POLICY_SIGNING_KEY's one."""
    directory = env.optional("JITGATE_POLICY_KEYS_DIR")
    if directory is None:
        return SingleKey(
            grants.token_signer(
                keys.load_private(env.path("JITGATE_POLICY_SIGNING_KEY")), trust_domain
            )
        )
    if env.optional("JITGATE_POLICY_SIGNING_KEY") is not None:
        raise ConfigError("set JITGATE_POLICY_KEYS_DIR or JITGATE_POLICY_SIGNING_KEY, not both")
    # Rotated by `jitgate keys` without a restart (docs/key-rotation.md).
    return RotatingKeys(
        Path(directory).expanduser(), trust_domain=trust_domain, ttl_ceiling=ttl_ceiling
    )


async def serve(env: Env) -> None:
    """Load the policy and keys, connect to audit and Redis, serve until signalled."""
    trust_domain = env.string("JITGATE_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN)
    files = env.tls()
    policy_file = env.path("JITGATE_POLICY_FILE")
    policy = model.load(policy_file)
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
    redis_url = env.string("JITGATE_REDIS_URL")
    audit_channel = tls.secure_channel(
        env.address("JITGATE_AUDIT_ADDR"), tls.channel_credentials(files), server_name="audit"
    )
    audit = AuditClient(audit_channel)
    audit_deadline = env.seconds("JITGATE_AUDIT_DEADLINE", 2.0, low=0.05, high=30.0)
    # The file is watched, and SIGHUP asks for a reload now; a bad file keeps
    # this policy answering (services/policy/holder.py).
    holder = PolicyHolder(policy_file, policy, audit=audit, audit_deadline=audit_deadline)
    ledger = Ledger(redisconn.connect(redis_url))
    log.info("redis %s", redisconn.redacted(redis_url))
    servicer = PolicyServicer(
        policy=holder.current,
        assertions=assertion.checker(verifier_keys, trust_domain),
        grant_keys=_grant_keys(env, trust_domain, lambda: holder.current().ttl_ceiling),
        audit=audit,
        ledger=ledger,
        settings=PolicySettings(
            grant_audience=env.string("JITGATE_GRANT_AUDIENCE", spiffe_id("proxy", trust_domain)),
            audit_deadline=audit_deadline,
            trust_domain=trust_domain,
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
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, holder.poke)
    tasks = [asyncio.create_task(holder.run(), name="policy-reload")]
    if telemetry.exporting_metrics():
        # Counting costs Redis reads, so only when a gauge is exported at all.
        gauge = LiveGrants(ledger, lambda: holder.current().connections, system_clock)
        tasks.append(asyncio.create_task(gauge.run(), name="live-grants"))
    try:
        await service.run_until_signalled()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
