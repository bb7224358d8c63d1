"""The policy in force, swapped atomically when its file changes or on SIGHUP.

A new file takes effect only once it parses, passes every check, and its
acceptance is durably in the audit log: a policy change is a decision about
every future decision. A file that fails keeps the old policy answering; the
failure is logged and audited once per version of the bad file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from jitgate.audit.client import AuditClient
from jitgate.common.errors import ConfigError, Unavailable
from jitgate.policy import model
from jitgate.policy.model import Policy
from jitgate.v1 import audit_pb2

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
"""Seconds between looks at the file: a change takes effect within about this."""


class PolicyHolder:
    """Holds the current Policy; reload() looks at the file and swaps when it is good."""

    def __init__(
        self, path: Path, policy: Policy, *, audit: AuditClient, audit_deadline: float
    ) -> None:
        self._path = path
        self._policy = policy
        self._audit = audit
        self._audit_deadline = audit_deadline
        self._refused: str | None = None  # the version last refused, not to audit it twice
        self._lock = asyncio.Lock()
        self._poked = asyncio.Event()

    def current(self) -> Policy:
        """Return the policy deciding now."""
        return self._policy

    def poke(self) -> None:
        """Ask for a reload now (the SIGHUP handler)."""
        self._poked.set()

    async def run(self) -> None:
        """Reload on a change of the file or a poke, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._poked.wait(), CHECK_INTERVAL)
                trigger = "signal"
            except TimeoutError:
                trigger = "file"
            self._poked.clear()
            await self.reload(trigger)

    async def reload(self, trigger: str) -> bool:
        """Read the file; swap in its policy if it is new and good. Whether it swapped."""
        async with self._lock:
            try:
                raw = self._path.read_bytes()
            except OSError as exc:
                if trigger == "signal":
                    log.error("policy reload: cannot read %s: %s", self._path, exc.strerror)
                return False
            version = hashlib.sha256(raw).hexdigest()
            if version == self._policy.version or version == self._refused:
                return False  # nothing new (or already refused and recorded)
            try:
                policy = model.parse(raw, source=str(self._path))
            except ConfigError as exc:
                return await self._refuse(version, str(exc), trigger)
            return await self._accept(policy, trigger)

    async def _accept(self, policy: Policy, trigger: str) -> bool:
        event = audit_pb2.PolicyChanged(
            accepted=True,
            version=policy.version,
            previous_version=self._policy.version,
            trigger=trigger,
        )
        try:
            await self._audit.append(
                audit_pb2.AuditEvent(policy_change=event), timeout=self._audit_deadline
            )
        except Unavailable as exc:
            # Not recorded, not in force: the next look tries again.
            log.error(
                "policy %s not applied: its change could not be audited: %s",
                policy.version[:12],
                exc,
            )
            return False
        previous, self._policy, self._refused = self._policy, policy, None
        log.info(
            "policy %s -> %s (%s): %d connections, %d bindings",
            previous.version[:12],
            policy.version[:12],
            trigger,
            len(policy.connections),
            len(policy.bindings),
        )
        return True

    async def _refuse(self, version: str, error: str, trigger: str) -> bool:
        log.error(
            "policy file %s (version %s) refused, policy %s stays: %s",
            self._path,
            version[:12],
            self._policy.version[:12],
            error,
        )
        event = audit_pb2.PolicyChanged(
            accepted=False,
            version=version,
            previous_version=self._policy.version,
            error=error[:2000],
            trigger=trigger,
        )
        try:
            await self._audit.append(
                audit_pb2.AuditEvent(policy_change=event), timeout=self._audit_deadline
            )
        except Unavailable as exc:
            log.error("the refusal of policy %s could not be audited: %s", version[:12], exc)
            return False  # try again next time, so the refusal is recorded
        self._refused = version
        return False
