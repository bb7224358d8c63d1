"""Fixtures shared by the proxy's Kubernetes front-end tests."""

from __future__ import annotations

import pytest

from jitgate.proxy.kube import Limits


@pytest.fixture
def limits(request: pytest.FixtureRequest) -> Limits:
    """The rig's limits: the defaults, or a test's own (parametrize "limits" indirectly)."""
    chosen: Limits = getattr(request, "param", Limits())
    return chosen
