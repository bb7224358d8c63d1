"""One real stack for every fault scenario: the faulted part is brought back after each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jitgate.devstack.stack import Stack
from tests.faults.rig import Rig, running_stack

RATE = 8.0
"""Requests per second per agent; four agents make 32 a second."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack, with the fault scenarios' agents, stopped after the module."""
    with running_stack(tmp_path_factory.mktemp("faults")) as running:
        yield running


@pytest.fixture(scope="module")
def rig(stack: Stack) -> Iterator[Rig]:
    """Agents sending steady load to the stack, shared by the scenarios."""
    running = Rig(stack, rate=RATE)
    yield running
    running.close()
