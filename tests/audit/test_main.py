"""The audit service as configured from JITGATE_* variables, in-process and as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitgate.audit.chain import verify_database, verify_store
from jitgate.audit.client import AuditClient
from jitgate.audit.main import build
from jitgate.audit.pgstore import PostgresStore
from jitgate.audit.store import SqliteStore
from jitgate.common import keys
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError, Unavailable
from jitgate.devstack import pki
from jitgate.devstack.redis_server import free_port
from jitgate.v1 import audit_pb2
from tests.conftest import PostgresDatabase
from tests.support import channel

pytestmark = pytest.mark.integration

EVENT = audit_pb2.AuditEvent(decision=audit_pb2.DecisionRecorded(connection="orders-replica"))


def signing_key(dev: pki.DevPki) -> Path:
    """The audit checkpoint key, made once beside the dev PKI."""
    private = dev.root / "audit-signing.key"
    if not private.exists():
        keys.create_pair(private, dev.root / "audit-signing.pub")
    return private


def environ(dev: pki.DevPki, db: Path, port: int, **extra: str) -> dict[str, str]:
    files = dev.files("audit")
    return {
        "JITGATE_AUDIT_SIGNING_KEY": str(signing_key(dev)),
        "JITGATE_LISTEN": f"127.0.0.1:{port}",
        "JITGATE_TLS_CA": str(files.ca),
        "JITGATE_TLS_CERT": str(files.cert),
        "JITGATE_TLS_KEY": str(files.key),
        "JITGATE_AUDIT_DB": str(db),
        **extra,
    }


async def test_build_serves_appends_and_reads(tmp_path: Path, dev_pki: pki.DevPki) -> None:
    db, port = tmp_path / "audit.db", free_port()
    service, writer = await build(Env(environ(dev_pki, db, port)))
    await service.start()
    try:
        policy = AuditClient(channel(dev_pki, "policy", port, "audit"))
        auditor = AuditClient(channel(dev_pki, "auditor", port, "audit"))
        try:
            receipt = await policy.append(EVENT, timeout=5)
            records = await auditor.read(timeout=5)
            with pytest.raises(Unavailable, match="PERMISSION_DENIED"):
                await policy.read(timeout=5)
        finally:
            await policy.close()
            await auditor.close()
    finally:
        await service.stop(grace=0.1)
    assert receipt.index == 0
    assert [(r.index, r.caller, r.event) for r in records] == [
        (0, "spiffe://jitgate/policy", EVENT)
    ]
    with pytest.raises(Exception, match="not running"):
        await writer.append("spiffe://jitgate/policy", {"decision": {}})  # cleanup closed it
    assert verify_database(db).count == 1


async def test_the_client_fails_closed_when_audit_is_down(dev_pki: pki.DevPki) -> None:
    client = AuditClient(channel(dev_pki, "policy", free_port(), "audit"))
    try:
        with pytest.raises(Unavailable):
            await client.append(EVENT, timeout=0.5)
    finally:
        await client.close()


async def test_the_trust_domain_names_the_caller(tmp_path: Path) -> None:
    dev = pki.init(tmp_path / "pki", trust_domain="example.org")
    db, port = tmp_path / "audit.db", free_port()
    service, _ = await build(Env(environ(dev, db, port, JITGATE_TRUST_DOMAIN="example.org")))
    await service.start()
    try:
        client = AuditClient(channel(dev, "policy", port, "audit"))
        try:
            await client.append(EVENT, timeout=5)
        finally:
            await client.close()
    finally:
        await service.stop(grace=0.1)
    store = SqliteStore.open(db, read_only=True)
    try:
        assert [r.caller for r in store.read(0, 10)] == ["spiffe://example.org/policy"]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"JITGATE_AUDIT_DB": ""}, "JITGATE_AUDIT_DB is required"),
        ({"JITGATE_AUDIT_DB": "/nonexistent/dir/audit.db"}, "JITGATE_AUDIT_DB: cannot open"),
        ({"JITGATE_TRUST_DOMAIN": "Not A Domain"}, "JITGATE_TRUST_DOMAIN"),
        ({"JITGATE_LISTEN": "nowhere"}, "JITGATE_LISTEN"),
        ({"JITGATE_TLS_KEY": "/nonexistent/audit.key"}, "cannot read TLS key"),
        ({"JITGATE_AUDIT_SIGNING_KEY": ""}, "JITGATE_AUDIT_SIGNING_KEY is required"),
        ({"JITGATE_AUDIT_SIGNING_KEY": "/nonexistent/key"}, "/nonexistent/key"),
        ({"JITGATE_AUDIT_ORIGIN": "my log"}, "JITGATE_AUDIT_ORIGIN"),
        ({"JITGATE_AUDIT_ORIGIN": "a+b"}, "JITGATE_AUDIT_ORIGIN"),
        ({"JITGATE_AUDIT_MAX_BYTES": "-1"}, "JITGATE_AUDIT_MAX_BYTES"),
    ],
)
async def test_configuration_errors(
    tmp_path: Path, dev_pki: pki.DevPki, changes: dict[str, str], message: str
) -> None:
    env = environ(dev_pki, tmp_path / "audit.db", free_port())
    env.update(changes)
    with pytest.raises(ConfigError, match=message):
        await build(Env(env))


async def _serving(dev: pki.DevPki, port: int) -> bool:
    chan = channel(dev, "auditor", port, "audit")
    try:
        for _ in range(100):
            try:
                reply = await health_pb2_grpc.HealthStub(chan).Check(
                    health_pb2.HealthCheckRequest(service="jitgate.v1.Audit"), timeout=1
                )
                serving: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
                return serving
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        return False
    finally:
        await chan.close(grace=None)


async def test_jitgate_serve_audit_runs_until_sigterm(tmp_path: Path, dev_pki: pki.DevPki) -> None:
    db, port = tmp_path / "audit.db", free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jitgate",
        "serve",
        "audit",
        env={**os.environ, **environ(dev_pki, db, port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert await _serving(dev_pki, port)
        client = AuditClient(channel(dev_pki, "verifier", port, "audit"))
        try:
            rejected = audit_pb2.TokenRejected(reason="signature")
            await client.append(audit_pb2.AuditEvent(token_rejected=rejected), timeout=5)
        finally:
            await client.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert verify_database(db).count == 1


async def test_the_log_can_live_in_postgresql(
    tmp_path: Path, dev_pki: pki.DevPki, postgres: PostgresDatabase
) -> None:
    PostgresStore.provision(postgres.admin, writer_role=postgres.writer_role)
    port = free_port()
    env = environ(dev_pki, tmp_path / "unused.db", port, JITGATE_AUDIT_DB=postgres.writer)
    service, _ = await build(Env(env))
    await service.start()
    try:
        policy = AuditClient(channel(dev_pki, "policy", port, "audit"))
        auditor = AuditClient(channel(dev_pki, "auditor", port, "audit"))
        try:
            receipts = [await policy.append(EVENT, timeout=5) for _ in range(3)]
            records = await auditor.read(timeout=5)
            checkpoints = await auditor.checkpoints(timeout=5)
        finally:
            await policy.close()
            await auditor.close()
    finally:
        await service.stop(grace=0.1)
    assert [r.index for r in receipts] == [0, 1, 2]
    assert [r.index for r in records] == [0, 1, 2]
    assert [c.size for c in checkpoints] == [0, 1, 2, 3]
    store = PostgresStore.open(postgres.writer, read_only=True)
    try:
        verified = verify_store(store)
    finally:
        store.close()
    assert verified.intact
    assert verified.count == 3


async def test_a_size_cap_is_for_sqlite_only(
    tmp_path: Path, dev_pki: pki.DevPki, postgres: PostgresDatabase
) -> None:
    env = environ(
        dev_pki,
        tmp_path / "unused.db",
        free_port(),
        JITGATE_AUDIT_DB=postgres.writer,
        JITGATE_AUDIT_MAX_BYTES="1000000",
    )
    with pytest.raises(ConfigError, match="SQLite log only"):
        await build(Env(env))
