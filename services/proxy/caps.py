"""Caps the proxy's front ends share: counts by key under two limits, and throttled warnings."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

REFUSAL_LOG_INTERVAL = 1.0
"""Seconds between log lines about refusals over a cap (a flood is one line a second)."""


def peer_address(info: object) -> tuple[str, str]:
    """A socket's peer name: (its address, the key caps count by; address:port, for the log)."""
    if isinstance(info, tuple):
        return str(info[0]), f"{info[0]}:{info[1]}"
    text = str(info or "")
    return text, text


class Tally:
    """Things open by key (a client address, a grant), under a total cap and a per-key cap."""

    def __init__(self, *, total: float = math.inf, per_key: float = math.inf) -> None:
        """At most total open at once, and at most per_key for any one key."""
        self._caps = (total, per_key)
        self._open: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """How many are open now."""
        return self._open.total()

    def __getitem__(self, key: str) -> int:
        """How many are open now for key."""
        return self._open[key]

    def take(self, key: str) -> bool:
        """Count one more for key; False, counting nothing, if either cap is reached."""
        total, per_key = self._caps
        if self.total >= total or self._open[key] >= per_key:
            return False
        self._open[key] += 1
        return True

    def give_back(self, key: str) -> None:
        """One for key is over."""
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]


class Throttle:
    """Warnings about refusals over a cap: the first at once, then one an interval at most."""

    def __init__(self, log: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        """Lines to log, at most one each interval seconds."""
        self._log = log
        self._interval = interval
        self._held = 0
        self._last = -interval

    def due(self) -> int | None:
        """Count a refusal; how many since the last line if one is due now, else None."""
        # A flood of refused opens or connections must not become a flood of log lines.
        self._held += 1
        now = time.monotonic()
        if now - self._last < self._interval:
            return None
        held, self._held, self._last = self._held, 0, now
        return held

    def warning(self, message: str, *args: object) -> None:
        """Log message % args with the count, unless a line went out less than an interval ago."""
        held = self.due()
        if held is not None:
            self._log.warning(f"{message} (%d refused since the last line)", *args, held)
