"""Time as a parameter: anything with an expiry takes a Clock."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Returns seconds since the Unix epoch, like time.time."""

system_clock: Clock = time.time
