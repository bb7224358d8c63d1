"""The Gate: one lease per session, ended by expiry or revocation, always reported."""

from __future__ import annotations

import asyncio
import time

import pytest

from jitgate.common.errors import (
    PermissionDenied,
)
from jitgate.proxy.gate import Gate, Lease
from jitgate.proxy.grantcheck import Claims
from jitgate.proxy.session import Redeemed, Registry, Relay

GRANT = "ab" * 16


def gate(reports: list[tuple[str, Relay]], ttl: float = 60.0) -> Gate:
    async def check(token: str, connection: str, kind: str) -> Claims:
        if kind != "ssh":
            raise PermissionDenied("WRONG_CONNECTION", f"{connection} is not a {kind} connection")
        return Claims(grant_id=GRANT, subject="s", connection=connection, kind=kind, expires_at=0.0)

    async def redeem(token: str, connection: str, session_id: str, client: str) -> Redeemed:
        return Redeemed(
            grant_id=GRANT, subject="s", connection=connection, expires_at=time.time() + ttl
        )

    async def report(redeemed: Redeemed, session_id: str, relay: Relay) -> None:
        reports.append((session_id, relay))

    return Gate(check=check, redeem=redeem, report=report, registry=Registry())


async def test_revocation_ends_the_lease_and_the_end_is_reported() -> None:
    reports: list[tuple[str, Relay]] = []
    g = gate(reports)
    redeemed = await g.admit("token", "bastion", "ssh", "s1", "127.0.0.1:1")
    closed: list[str] = []
    async with g.hold(redeemed, "s1", kind="ssh") as (lease, stats):
        lease.on_end(closed.append)
        stats.bytes_to_client = 7
        assert g.registry.revoke(GRANT) == 1
        await asyncio.wait_for(lease.ended.wait(), 1.0)
    assert closed == ["revoked"]
    assert [(sid, r.reason, r.bytes_to_client) for sid, r in reports] == [("s1", "revoked", 7)]
    assert len(g.registry) == 0


async def test_the_lease_ends_at_expiry() -> None:
    reports: list[tuple[str, Relay]] = []
    g = gate(reports, ttl=0.2)
    redeemed = await g.admit("token", "bastion", "ssh", "s2", "127.0.0.1:1")
    async with g.hold(redeemed, "s2", kind="ssh") as (lease, _):
        await asyncio.wait_for(lease.ended.wait(), 1.0)
        assert lease.reason == "expired"
    assert reports[0][1].reason == "expired"


async def test_a_session_that_ends_itself_keeps_its_reason() -> None:
    reports: list[tuple[str, Relay]] = []
    g = gate(reports)
    redeemed = await g.admit("token", "bastion", "ssh", "s3", "127.0.0.1:1")
    async with g.hold(redeemed, "s3", kind="ssh") as (_, stats):
        stats.reason = "server_closed"
    assert reports[0][1].reason == "server_closed"


async def test_a_grant_of_another_kind_is_refused() -> None:
    with pytest.raises(PermissionDenied):
        await gate([]).admit("token", "orders", "postgres", "s4", "127.0.0.1:1")


def test_a_lease_ends_once_and_late_callbacks_run_at_once() -> None:
    lease = Lease(expires_at=0.0)
    seen: list[str] = []
    lease.on_end(seen.append)
    lease.end("revoked")
    lease.end("expired")
    lease.on_end(seen.append)
    assert seen == ["revoked", "revoked"]
    assert lease.reason == "revoked"
