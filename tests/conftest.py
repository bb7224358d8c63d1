"""Fixtures every test may use: a dev PKI and a foreign CA."""

from __future__ import annotations

import pytest

from jitgate.devstack import pki


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPki:
    """A dev CA with a certificate for every jitgate workload."""
    return pki.init(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPki:
    """Another CA issuing the same names: its certificates must never be accepted."""
    return pki.init(tmp_path_factory.mktemp("foreign-pki"))
