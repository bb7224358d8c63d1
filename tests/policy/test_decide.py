"""Decisions: deny by default, one binding, and a TTL no longer than anything allows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.common.assertion import Identity
from jitgate.policy import decide as d
from jitgate.policy import model

NOW = 1_800_000_000.0
POLICY = model.parse(
    """
[connections.orders-replica]
kind = "postgres"
[connections.billing-primary]
kind = "postgres"
[[bindings]]
group = "platform"
connection = "orders-replica"
max_ttl = 300
[[bindings]]
group = "sre"
connection = "orders-replica"
max_ttl = 900
"""
)


def _ask(
    connection: str, groups: tuple[str, ...], ttl: int = 0, token_left: float = 3600
) -> d.Decision:
    identity = Identity(
        subject="a", client_id="a", groups=groups, token_expires_at=NOW + token_left, issuer="i"
    )
    request = d.Request(identity=identity, connection=connection, ttl_seconds=ttl)
    return d.decide(POLICY, request, now=NOW)


def test_the_zero_decision_denies() -> None:
    assert d.Decision().allowed is False


def test_a_bound_group_gets_its_connection() -> None:
    decision = _ask("orders-replica", ("platform",), ttl=120)
    assert decision.allowed
    assert decision.ttl_seconds == 120
    assert decision.binding == POLICY.bindings[0]


def test_zero_ttl_asks_for_the_binding_maximum() -> None:
    assert _ask("orders-replica", ("platform",)).ttl_seconds == 300


def test_ttl_is_clipped_to_the_binding() -> None:
    assert _ask("orders-replica", ("platform",), ttl=10_000).ttl_seconds == 300


def test_ttl_is_clipped_to_the_token() -> None:
    assert _ask("orders-replica", ("platform",), ttl=300, token_left=42.7).ttl_seconds == 42


def test_a_token_about_to_expire_gets_nothing() -> None:
    decision = _ask("orders-replica", ("platform",), token_left=0.5)
    assert not decision.allowed
    assert decision.reason_code == d.TOKEN_EXPIRING


def test_the_first_matching_binding_in_file_order_decides() -> None:
    decision = _ask("orders-replica", ("sre", "platform"))
    assert decision.binding == POLICY.bindings[0]


@pytest.mark.parametrize(
    ("connection", "groups", "reason"),
    [
        ("billing-primary", ("platform",), d.NO_BINDING),
        ("orders-replica", (), d.NO_BINDING),
        ("orders-replica", ("Platform",), d.NO_BINDING),
        ("payments", ("platform",), d.CONNECTION_UNKNOWN),
    ],
)
def test_denials(connection: str, groups: tuple[str, ...], reason: str) -> None:
    decision = _ask(connection, groups)
    assert not decision.allowed
    assert decision.reason_code == reason
    assert decision.ttl_seconds == 0


def test_an_empty_policy_denies_everything() -> None:
    identity = Identity(
        subject="a", client_id="a", groups=("platform",), token_expires_at=NOW + 60, issuer="i"
    )
    request = d.Request(identity=identity, connection="orders-replica", ttl_seconds=0)
    assert not d.decide(model.parse(""), request, now=NOW).allowed


# Properties over random policies, identities and requests.

_NAMES = st.sampled_from(["a", "b", "c", "d"])
_GROUPS = st.sampled_from(["g1", "g2", "g3"])


@st.composite
def _policies(draw: st.DrawFn) -> model.Policy:
    ceiling = draw(st.integers(60, 3600))
    names = draw(st.sets(_NAMES, max_size=4))
    connections = {n: model.Connection(name=n, kind="ssh") for n in names}
    pairs = draw(st.sets(st.tuples(_GROUPS, _NAMES), max_size=8))
    bindings = tuple(
        model.Binding(
            group=g,
            connection=c,
            max_ttl=draw(st.integers(1, ceiling)),
            require_reason=draw(st.booleans()),
        )
        for g, c in sorted(pairs)
        if c in names
    )
    return model.Policy(connections=connections, bindings=bindings, ttl_ceiling=ceiling)


@settings(max_examples=400, deadline=None)
@given(
    policy=_policies(),
    groups=st.sets(_GROUPS | st.text(max_size=3), max_size=4),
    connection=_NAMES | st.text(max_size=3),
    ttl=st.integers(0, 100_000),
    token_left=st.floats(-100, 100_000, allow_nan=False),
    reason=st.sampled_from(["", " ", "because"]),
)
def test_no_decision_reaches_beyond_a_binding_its_ceiling_or_the_token(
    policy: model.Policy,
    groups: set[str],
    connection: str,
    ttl: int,
    token_left: float,
    reason: str,
) -> None:
    identity = Identity(
        subject="s",
        client_id="s",
        groups=tuple(sorted(groups)),
        token_expires_at=NOW + token_left,
        issuer="i",
    )
    request = d.Request(identity=identity, connection=connection, ttl_seconds=ttl, reason=reason)
    decision = d.decide(policy, request, now=NOW)
    if not decision.allowed:
        return
    binding = decision.binding
    assert binding is not None
    assert binding.connection == connection
    assert binding.group in groups
    assert binding in policy.bindings
    assert 1 <= decision.ttl_seconds <= min(binding.max_ttl, policy.ttl_ceiling)
    assert decision.ttl_seconds <= token_left
    if ttl:
        assert decision.ttl_seconds <= ttl
    if binding.require_reason:
        assert reason.strip()


@settings(max_examples=200, deadline=None)
@given(
    groups=st.sets(st.text(max_size=5), max_size=5),
    connection=st.text(max_size=8),
    ttl=st.integers(0, 100_000),
)
def test_an_empty_policy_denies_any_request(groups: set[str], connection: str, ttl: int) -> None:
    identity = Identity(
        subject="s", client_id="s", groups=tuple(groups), token_expires_at=NOW + 3600, issuer="i"
    )
    request = d.Request(identity=identity, connection=connection, ttl_seconds=ttl, reason="r")
    assert not d.decide(model.parse(""), request, now=NOW).allowed
