"""caps: counts by key under a total and a per-key cap; warnings throttled to one a second."""

from __future__ import annotations

import logging

import pytest

from jitgate.proxy.caps import Tally, Throttle


def test_a_tally_keeps_both_caps_and_gives_places_back() -> None:
    tally = Tally(total=3, per_key=2)
    assert tally.take("a")
    assert tally.take("a")
    assert not tally.take("a")  # a's own cap
    assert tally.take("b")
    assert not tally.take("c")  # the total cap
    assert (tally.total, tally["a"], tally["c"]) == (3, 2, 0)
    tally.give_back("a")
    assert tally.take("c")
    for key in ("a", "b", "c"):
        tally.give_back(key)
    assert tally.total == 0


def test_a_throttle_logs_the_first_then_counts_until_the_interval_passes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.caps")
    throttle = Throttle(log, interval=3600.0)
    with caplog.at_level(logging.WARNING, logger="test.caps"):
        throttle.warning("refused %s", "x")
        throttle.warning("refused %s", "y")
        assert throttle.due() is None  # still within the interval
    assert [r.getMessage() for r in caplog.records] == ["refused x (1 refused since the last line)"]
    again = Throttle(log, interval=0.0)
    assert again.due() == 1
    assert again.due() == 1
