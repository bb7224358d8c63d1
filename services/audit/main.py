"""`jitgate serve audit`: the audit service, configured from JITGATE_* variables."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import grpc

from jitgate.audit import checkpoint
from jitgate.audit.pgstore import PostgresStore, describe
from jitgate.audit.servicer import ACL, AuditServicer
from jitgate.audit.store import SqliteStore, Store, StoreError
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


def is_postgres(location: str) -> bool:
    """Whether JITGATE_AUDIT_DB names a PostgreSQL database (a URI or key=value conninfo)."""
    return location.startswith(("postgresql://", "postgres://")) or "dbname=" in location


def stores(location: str, max_bytes: int | None) -> tuple[Callable[[], Store], Callable[[], Store]]:
    """Return how to open the writable store and a read-only one at location."""
    if is_postgres(location):
        if max_bytes is not None:
            # PostgreSQL has no per-database size cap; its own disk and
            # tablespace limits turn into refused appends the same way.
            raise ConfigError("JITGATE_AUDIT_MAX_BYTES applies to a SQLite log only")
        return (
            lambda: PostgresStore.open(location),
            lambda: PostgresStore.open(location, read_only=True),
        )
    path = Path(location).expanduser()
    return (
        lambda: SqliteStore.open(path, max_bytes=max_bytes),
        lambda: SqliteStore.open(path, read_only=True),
    )


def default_origin(trust_domain: str) -> str:
    """The log's name in its checkpoints unless JITGATE_AUDIT_ORIGIN says otherwise."""
    return f"{trust_domain}/audit"


async def build(env: Env) -> tuple[Service, Writer]:
    """Open the log; return the service, not yet started, whose cleanup closes the writer."""
    listen = env.address("JITGATE_LISTEN", DEFAULT_LISTEN)
    credentials = tls.server_credentials(env.tls(), require_client_auth=True)
    location = env.string("JITGATE_AUDIT_DB")
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
    open_store, open_reader = stores(location, max_bytes or None)
    writer = Writer(
        open_store=open_store,
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
        open_reader=open_reader,
        trust_domain=trust_domain,
    )

    def register(server: grpc.aio.Server) -> None:
        audit_pb2_grpc.add_AuditServicer_to_server(servicer, server)

    vkey = checkpoint.verifier_key_string(origin, signer.private_key.public_key())
    where = describe(location) if is_postgres(location) else location
    log.info("audit log at %s; its checkpoints verify with %s", where, vkey)
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
