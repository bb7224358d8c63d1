"""`jitgate serve`: which event loop the proxy runs on."""

from __future__ import annotations

import pytest

from jitgate.cli import serve
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError


def test_the_proxy_runs_on_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert serve.event_loop(Env({})) == "uvloop"


def test_asyncio_can_be_chosen() -> None:
    assert serve.event_loop(Env({"JITGATE_EVENT_LOOP": "asyncio"})) == "asyncio"


def test_an_unknown_loop_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="JITGATE_EVENT_LOOP"):
        serve.event_loop(Env({"JITGATE_EVENT_LOOP": "trio"}))


def test_uvloop_asked_for_but_missing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="not installed"):
        serve.event_loop(Env({"JITGATE_EVENT_LOOP": "uvloop"}))
