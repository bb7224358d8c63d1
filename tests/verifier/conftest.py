"""Fixtures for the verifier's tests: a real dev IdP over HTTPS and a settable clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jitgate.devstack import idp, idp_http, pki

NOW = 1_800_000_000.0
"""The tests' "now": tokens are minted and checked at explicit times, never the wall clock."""


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def idp_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev IdP state directory whose RSA key is made once per test session."""
    state = tmp_path_factory.mktemp("idp-state")
    idp.load_or_create_key(state)
    return state


@pytest.fixture
def idp_server(dev_pki: pki.DevPki, idp_state: Path) -> Iterator[idp_http.IdpServer]:
    """A running dev IdP on a free loopback port, issuing tokens at NOW."""
    files = dev_pki.files("idp")
    with idp_http.IdpServer(
        state_dir=idp_state, tls_cert=files.cert, tls_key=files.key, clock=lambda: NOW
    ) as server:
        yield server
