"""Hot reload: a good file takes over once audited; a bad one leaves the old policy answering."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from jitgate.common.errors import Unavailable
from jitgate.policy import model
from jitgate.policy.holder import PolicyHolder
from jitgate.v1 import audit_pb2

OLD = """
[connections.orders-replica]
kind = "postgres"
[[bindings]]
group = "platform"
connection = "orders-replica"
max_ttl = "5m"
"""
NEW = (
    OLD
    + """
[connections.bastion]
kind = "ssh"
[[bindings]]
group = "sre"
connection = "bastion"
max_ttl = "10m"
"""
)
BAD = (
    OLD
    + """
[[bindings]]
group = "sre"
connection = "nowhere"
max_ttl = "10m"
"""
)


class Audit:
    """Records what the holder appends; fails on demand."""

    def __init__(self) -> None:
        self.events: list[audit_pb2.PolicyChanged] = []
        self.down = False

    async def append(self, event: audit_pb2.AuditEvent, *, timeout: float) -> Any:
        if self.down:
            raise Unavailable("audit", "down")
        self.events.append(event.policy_change)
        return None


@pytest.fixture
def audit() -> Audit:
    return Audit()


@pytest.fixture
def holder(tmp_path: Path, audit: Audit) -> PolicyHolder:
    path = tmp_path / "policy.toml"
    path.write_text(OLD)
    return PolicyHolder(path, model.load(path), audit=audit, audit_deadline=1)  # type: ignore[arg-type]


def _file(holder: PolicyHolder, tmp_path: Path, text: str) -> None:
    (tmp_path / "policy.toml").write_text(text)


async def test_an_unchanged_file_is_not_reloaded(holder: PolicyHolder, audit: Audit) -> None:
    before = holder.current()
    assert not await holder.reload("file")
    assert holder.current() is before
    assert audit.events == []


async def test_a_good_change_takes_over_once_audited(
    holder: PolicyHolder, audit: Audit, tmp_path: Path
) -> None:
    old = holder.current()
    _file(holder, tmp_path, NEW)
    assert await holder.reload("signal")
    assert "bastion" in holder.current().connections
    [event] = audit.events
    assert (event.accepted, event.previous_version, event.trigger) == (True, old.version, "signal")
    assert event.version == holder.current().version


async def test_a_bad_file_is_refused_audited_once_and_the_old_policy_stays(
    holder: PolicyHolder, audit: Audit, tmp_path: Path
) -> None:
    old = holder.current()
    _file(holder, tmp_path, BAD)
    for _ in range(3):
        assert not await holder.reload("file")
        assert holder.current() is old
    [event] = audit.events  # one record per bad version, not one per look
    assert not event.accepted
    assert "bindings[1].connection" in event.error
    assert event.previous_version == old.version
    # Fixed: the fixed file takes over.
    _file(holder, tmp_path, NEW)
    assert await holder.reload("file")
    assert [e.accepted for e in audit.events] == [False, True]


async def test_a_change_that_cannot_be_audited_does_not_take_effect(
    holder: PolicyHolder, audit: Audit, tmp_path: Path
) -> None:
    old = holder.current()
    _file(holder, tmp_path, NEW)
    audit.down = True
    assert not await holder.reload("file")
    assert holder.current() is old
    audit.down = False
    assert await holder.reload("file")  # recorded now, so in force now


async def test_a_missing_file_keeps_the_policy(holder: PolicyHolder, tmp_path: Path) -> None:
    old = holder.current()
    (tmp_path / "policy.toml").unlink()
    assert not await holder.reload("signal")
    assert holder.current() is old


async def test_run_picks_up_a_change_and_a_poke(
    holder: PolicyHolder, audit: Audit, tmp_path: Path
) -> None:
    task = asyncio.create_task(holder.run())
    try:
        _file(holder, tmp_path, NEW)
        holder.poke()
        for _ in range(50):
            if audit.events:
                break
            await asyncio.sleep(0.02)
        assert [e.trigger for e in audit.events] == ["signal"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
