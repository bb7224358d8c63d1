"""`jitgate serve audit`: the audit service, configured from JITGATE_* variables."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import grpc

from jitgate.audit import checkpoint
from jitgate.audit.servicer import ACL, AuditServicer
from jitgate.audit.store import SqliteStore, StoreError
from jitgate.audit.writer import Writer
from jitgate.common import tls
from jitgate.common.clock import system_clock
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN
from jitgate.common.server import Service
from jitgate.v1 import audit_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:7446"
# SPIFFE-ID spec, section 2.1: a trust domain name is lowercase letters,
# digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")


def default_origin(trust_domain: str) -> str:
    """The log's name in its checkpoints unless JITGATE_AUDIT_ORIGIN says otherwise."""
    return f"{trust_domain}/audit"


async def build(env: Env) -> tuple[Service, Writer]:
    """Open the log; return the service, not yet started, whose cleanup closes the writer."""
    listen = env.address("JITGATE_LISTEN", DEFAULT_LISTEN)
    credentials = tls.server_credentials(env.tls(), require_client_auth=True)
    path: Path = env.path("JITGATE_AUDIT_DB")
    trust_domain = env.string("JITGATE_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN)
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ConfigError(
            f"JITGATE_TRUST_DOMAIN={trust_domain!r} is not a trust domain name;"
            " use lowercase letters, digits, '.', '-' and '_'"
        )
    origin = env.string("JITGATE_AUDIT_ORIGIN", default_origin(trust_domain))
    try:
        signer = checkpoint.load_signer(origin, env.path("JITGATE_AUDIT_SIGNING_KEY"))
    except checkpoint.InvalidKey as exc:
        raise ConfigError(f"JITGATE_AUDIT_ORIGIN: {exc}") from exc
    max_bytes = env.integer("JITGATE_AUDIT_MAX_BYTES", 0, low=0, high=2**62)
    writer = Writer(
        open_store=lambda: SqliteStore.open(path, max_bytes=max_bytes or None),
        signer=signer,
        origin=origin,
        clock=system_clock,
    )
    try:
        await writer.start()
    except StoreError as exc:
        raise ConfigError(f"JITGATE_AUDIT_DB: {exc}") from exc
    servicer = AuditServicer(
        writer=writer,
        open_reader=lambda: SqliteStore.open(path, read_only=True),
        trust_domain=trust_domain,
    )

    def register(server: grpc.aio.Server) -> None:
        audit_pb2_grpc.add_AuditServicer_to_server(servicer, server)

    vkey = checkpoint.verifier_key_string(origin, signer.private_key.public_key())
    log.info("audit log at %s; its checkpoints verify with %s", path, vkey)
    service = Service(
        name="audit",
        listen=listen,
        credentials=credentials,
        acl=ACL,
        register=register,
        service_names=["jitgate.v1.Audit"],
        cleanup=[writer.close],
        trust_domain=trust_domain,
    )
    return service, writer


async def serve(env: Env) -> None:
    """Run the audit service until SIGTERM or SIGINT."""
    service, writer = await build(env)
    try:
        await service.run_until_signalled()
    finally:
        await writer.close()  # idempotent; also when the service failed to start
