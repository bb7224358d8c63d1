"""The live-grants gauge: signed grants per connection not yet expired or revoked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from jitgate.common import telemetry
from jitgate.common.clock import Clock
from jitgate.common.errors import Unavailable
from jitgate.policy.ledger import Ledger

log = logging.getLogger(__name__)

INTERVAL = 15.0
"""Seconds between counts: one Redis read per connection each time."""


class LiveGrants:
    """Counts live grants per connection in the ledger; the gauge reports the last count."""

    def __init__(
        self, ledger: Ledger, connections: Callable[[], Iterable[str]], clock: Clock
    ) -> None:
        self._ledger = ledger
        self._connections = connections
        self._clock = clock
        self.counts: dict[str, int] = {}
        telemetry.meter().create_observable_gauge(
            "jitgate.grants.live",
            callbacks=[self._observe],
            unit="{grant}",
            description="Signed grants not yet expired or revoked, by connection",
        )

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"jitgate.connection": c}) for c, n in self.counts.items()]

    async def count(self) -> None:
        """Count once; a Redis failure keeps the last counts (and says so in the log)."""
        counts = {}
        try:
            for connection in self._connections():
                live = await self._ledger.live(connection=connection, now=self._clock())
                counts[connection] = len(live)
        except Unavailable as exc:
            log.warning("cannot count live grants: %s", exc)
            return
        self.counts = counts

    async def run(self, interval: float = INTERVAL) -> None:
        """Count every interval seconds until cancelled."""
        while True:
            await self.count()
            await asyncio.sleep(interval)
