"""Grant-signing keys that rotate: states over a fake clock, what is published, bad files."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, grants, keys, redisconn, tls, wire
from jitgate.common.assertion import Identity
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError, Unauthenticated
from jitgate.devstack.pki import DevPki
from jitgate.devstack.redis_server import RedisServer
from jitgate.policy import keyring, model
from jitgate.policy.keyring import (
    MANIFEST,
    Entry,
    RotatingKeys,
    RotationRefused,
    SingleKey,
    State,
    timeline,
)
from jitgate.policy.ledger import Ledger
from jitgate.policy.main import _grant_keys as _grant_keys_from
from jitgate.policy.servicer import ACL, PolicyServicer, PolicySettings
from jitgate.v1 import policy_pb2, policy_pb2_grpc
from tests.support import AUDIT_ACL, RecordingAudit, channel, running, serve_audit

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CEILING = 900.0
MARGIN = 60.0
KEEP_FOR = CEILING + MARGIN
AHEAD = 60.0
AUDIENCE = "spiffe://jitgate/proxy"


class FakeClock:
    """Seconds since the epoch that move only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def directory(tmp_path: Path, clock: FakeClock) -> Path:
    """A key directory made by init at T0."""
    path = tmp_path / "grant-keys"
    keyring.init(path, clock=clock)
    return path


def _ring(directory: Path, clock: FakeClock, ceiling: float = CEILING) -> RotatingKeys:
    return RotatingKeys(
        directory,
        trust_domain="jitgate",
        ttl_ceiling=ceiling,
        margin=MARGIN,
        clock=clock,
        interval=0,
    )


def _states(ring: RotatingKeys) -> dict[str, State]:
    return {s.entry.kid: s.state for s in ring.statuses()}


def _public_keys(published: policy_pb2.GrantKeys) -> list[Ed25519PublicKey]:
    return [Ed25519PublicKey.from_public_bytes(key.public_key) for key in published.keys]


def _grant(ring: RotatingKeys, now: float, lifetime: float = CEILING) -> str:
    """A grant token as the servicer signs it: the longest the policy allows."""
    return ring.signer().sign(
        {
            "aud": AUDIENCE,
            "sub": "deploy-bot",
            "jti": f"g{now}",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
        }
    )


def _check(published: policy_pb2.GrantKeys, token: str, now: float) -> str:
    """Check a grant as a proxy does with the published keys; return its kid."""
    checker = grants.token_checker(
        _public_keys(published), audience=AUDIENCE, trust_domain="jitgate"
    )
    checker.check(token, now)
    return str(jwt.get_unverified_header(token)["kid"])


# Creating a directory --------------------------------------------------------


def test_init_makes_one_signing_key_readable_by_its_owner_only(
    directory: Path, clock: FakeClock
) -> None:
    [entry] = keyring.read_manifest(directory)
    assert entry.created_at == entry.activate_at == T0
    assert entry.retire_at is None
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    key_file = keyring.key_path(directory, entry.kid)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert keys.key_id(keys.load_private(key_file).public_key()) == entry.kid
    ring = _ring(directory, clock)
    assert ring.signer().kid == entry.kid
    [published] = ring.published().keys
    assert (published.kid, published.signing, published.HasField("retire_at")) == (
        entry.kid,
        True,
        False,
    )


def test_init_refuses_a_directory_that_holds_keys(directory: Path, clock: FakeClock) -> None:
    with pytest.raises(RotationRefused, match="already holds grant keys"):
        keyring.init(directory, clock=clock)


def test_a_directory_without_a_manifest_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a grant key directory"):
        RotatingKeys(tmp_path, trust_domain="jitgate", ttl_ceiling=CEILING)


# A rotation over time ------------------------------------------------------


def test_a_key_goes_next_then_active_then_retiring_then_gone(
    directory: Path, clock: FakeClock
) -> None:
    ring = _ring(directory, clock)
    old = ring.signer().kid
    clock.now = T0 + 100
    done = keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    new = done.added.kid
    activate_at = T0 + 100 + AHEAD
    assert done.added.activate_at == activate_at
    assert done.replaced is not None
    assert done.replaced.retire_at == activate_at + KEEP_FOR
    retire_at = activate_at + KEEP_FOR

    # Published ahead: proxies learn the new key, the old one still signs.
    assert _states(ring) == {old: State.ACTIVE, new: State.NEXT}
    assert ring.signer().kid == old
    published = ring.published()
    assert [(k.kid, k.signing) for k in published.keys] == [(old, True), (new, False)]

    clock.now = activate_at - 1
    assert ring.signer().kid == old

    # At activate_at the new key signs with no command run; the old one retires.
    clock.now = activate_at
    assert _states(ring) == {old: State.RETIRING, new: State.ACTIVE}
    assert ring.signer().kid == new
    published = ring.published()
    assert [(k.kid, k.signing) for k in published.keys] == [(new, True), (old, False)]
    assert wire.seconds(published.keys[1].retire_at) == retire_at
    assert not published.keys[0].HasField("retire_at")

    clock.now = retire_at - 1
    assert _states(ring)[old] is State.RETIRING

    clock.now = retire_at
    assert _states(ring) == {old: State.RETIRED, new: State.ACTIVE}
    assert [k.kid for k in ring.published().keys] == [new]


def test_grants_signed_before_a_rotation_verify_until_retire_at_and_not_after(
    directory: Path, clock: FakeClock
) -> None:
    ring = _ring(directory, clock)
    keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    # The last grant the old key signs, one second before the switch, at the ceiling.
    clock.now = T0 + AHEAD - 1
    last_old = _grant(ring, clock.now)
    clock.now = T0 + AHEAD
    first_new = _grant(ring, clock.now)
    assert jwt.get_unverified_header(last_old)["kid"] != jwt.get_unverified_header(first_new)["kid"]
    retire_at = T0 + AHEAD + KEEP_FOR
    # Every moment the old grant is valid, the published keys verify it.
    for now in (T0 + AHEAD, T0 + AHEAD + CEILING - 2):
        clock.now = now
        published = ring.published()
        _check(published, last_old, now)
        _check(published, first_new, now)
    clock.now = retire_at - 1
    assert len(ring.published().keys) == 2
    # From retire_at the old key is no longer published: nothing it signed verifies.
    clock.now = retire_at
    published = ring.published()
    with pytest.raises(Unauthenticated) as refused:
        _check(published, last_old, T0 + AHEAD)  # even at a time its grant was valid
    assert refused.value.check == "key"
    _check(published, first_new, T0 + AHEAD + 1)


def test_hold_publishes_the_key_until_it_is_activated(directory: Path, clock: FakeClock) -> None:
    ring = _ring(directory, clock)
    old = ring.signer().kid
    done = keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=None, clock=clock)
    assert done.replaced is None
    assert done.added.activate_at is None
    clock.now = T0 + 86_400  # a day later it still waits
    assert _states(ring) == {old: State.ACTIVE, done.added.kid: State.NEXT}
    assert [k.signing for k in ring.published().keys] == [True, False]
    [kept] = [e for e in keyring.read_manifest(directory) if e.kid == old]
    assert kept.retire_at is None
    activated = keyring.activate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    assert activated.added.activate_at == clock.now
    assert activated.replaced is not None
    assert activated.replaced.retire_at == clock.now + KEEP_FOR
    assert ring.signer().kid == done.added.kid
    assert _states(ring)[old] is State.RETIRING


def test_activate_refuses_a_key_not_yet_published_long_enough(
    directory: Path, clock: FakeClock
) -> None:
    keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=None, clock=clock)
    clock.now = T0 + AHEAD - 1
    with pytest.raises(RotationRefused, match="may sign from"):
        keyring.activate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    # publish_ahead 0 is the explicit override, e.g. for a leaked key.
    done = keyring.activate(directory, keep_for=KEEP_FOR, publish_ahead=0, clock=clock)
    assert done.added.activate_at == T0 + AHEAD - 1


def test_activate_without_a_next_key_is_refused(directory: Path, clock: FakeClock) -> None:
    with pytest.raises(RotationRefused, match="no key is next"):
        keyring.activate(directory, keep_for=KEEP_FOR, clock=clock)


def test_one_rotation_at_a_time(directory: Path, clock: FakeClock) -> None:
    keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    before = (directory / MANIFEST).read_bytes()
    with pytest.raises(RotationRefused, match="already next"):
        keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    assert (directory / MANIFEST).read_bytes() == before
    assert len(list(directory.glob("*.key"))) == 2


def test_a_rotation_deletes_retired_keys(directory: Path, clock: FakeClock) -> None:
    [first] = keyring.read_manifest(directory)
    keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=0, clock=clock)
    clock.now = T0 + 1 + KEEP_FOR - 1
    done = keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=0, clock=clock)
    assert done.removed == ()  # still retiring
    assert keyring.key_path(directory, first.kid).exists()
    clock.now += 2 * KEEP_FOR
    done = keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=0, clock=clock)
    assert first.kid in done.removed
    assert not keyring.key_path(directory, first.kid).exists()
    assert first.kid not in {e.kid for e in keyring.read_manifest(directory)}


def test_publish_ahead_zero_signs_at_once_in_the_same_second(
    directory: Path, clock: FakeClock
) -> None:
    # The manifest keeps whole seconds; a key made in the second of the one it
    # replaces activates one second later rather than at the same time.
    ring = _ring(directory, clock)
    done = keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=0, clock=clock)
    assert done.added.activate_at == T0 + 1
    clock.now = T0 + 1
    assert ring.signer().kid == done.added.kid


# The service's ceiling wins over a shorter one in the manifest ----------------


def test_a_replaced_key_is_published_for_the_longest_grant_whatever_the_manifest_says(
    directory: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ring = _ring(directory, clock, ceiling=3600)
    old = ring.signer().kid
    # Rotated by someone who thought grants last at most 60 s.
    keyring.rotate(directory, keep_for=60, publish_ahead=0, clock=clock)
    with caplog.at_level(logging.WARNING):
        clock.now = T0 + 1
        published = ring.published()
    [retiring] = [k for k in published.keys if k.kid == old]
    assert wire.seconds(retiring.retire_at) == T0 + 1 + 3600 + MARGIN
    assert "before its last grant could expire" in caplog.text


def test_the_longest_ceiling_seen_is_kept_when_the_policy_lowers_it(
    directory: Path, clock: FakeClock
) -> None:
    ceiling = [3600.0]
    ring = RotatingKeys(
        directory,
        trust_domain="jitgate",
        ttl_ceiling=lambda: ceiling[0],
        margin=MARGIN,
        clock=clock,
        interval=0,
    )
    old = ring.signer().kid
    keyring.rotate(directory, keep_for=60, publish_ahead=0, clock=clock)
    clock.now = T0 + 1
    ring.published()
    ceiling[0] = 60.0  # a policy reload lowers it: grants already signed may still live an hour
    clock.now = T0 + 1 + 3600 + MARGIN - 1
    assert old in {k.kid for k in ring.published().keys}


# Broken files keep the last good keys ----------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        b'{"format": 1, "keys": [{"kid": "',  # half-written
        b"",
        b"\xff\xfe not json",
        b'{"format": 2, "keys": []}',
        b'{"format": 1, "keys": []}',
    ],
)
def test_a_broken_manifest_keeps_the_last_good_keys(
    directory: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, broken: bytes
) -> None:
    ring = _ring(directory, clock)
    keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    good = ring.published()
    signer = ring.signer().kid
    manifest = directory / MANIFEST
    fixed = manifest.read_bytes()
    manifest.write_bytes(broken)
    with caplog.at_level(logging.WARNING):
        assert ring.published() == good
        assert ring.signer().kid == signer
    assert "keeping the last good version" in caplog.text
    # The clock still moves the last good keys on.
    clock.now = T0 + AHEAD
    assert ring.signer().kid != signer
    manifest.write_bytes(fixed + b" ")  # fixed: read again
    assert len(ring.published().keys) == 2


def test_a_manifest_naming_a_missing_key_keeps_the_last_good_keys(
    directory: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ring = _ring(directory, clock)
    done = keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    assert len(ring.published().keys) == 2
    keyring.key_path(directory, done.added.kid).unlink()
    (directory / MANIFEST).write_bytes((directory / MANIFEST).read_bytes() + b"\n")
    with caplog.at_level(logging.WARNING):
        kids = [k.kid for k in ring.published().keys]
    assert done.added.kid in kids  # from before the file went
    assert "keeping the last good version" in caplog.text
    with pytest.raises(ConfigError, match="cannot read signing key"):
        _ring(directory, clock)  # at start-up, the same directory is refused


def test_a_key_file_holding_another_key_is_refused(directory: Path, clock: FakeClock) -> None:
    [entry] = keyring.read_manifest(directory)
    path = keyring.key_path(directory, entry.kid)
    path.unlink()
    keys.write_private(path, Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="holds the key with kid"):
        _ring(directory, clock)


def test_a_key_readable_by_others_is_logged(
    directory: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    [entry] = keyring.read_manifest(directory)
    os.chmod(keyring.key_path(directory, entry.kid), 0o644)
    with caplog.at_level(logging.WARNING):
        _ring(directory, clock)
    assert "should be 0600" in caplog.text


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"format": 1, "keys": [{"kid": "../../etc/passwd", "created_at": "x"}]}, "thumbprint"),
        (
            {"format": 1, "keys": [{"kid": "A" * 43, "created_at": "2026-01-01"}]},
            "is not a time",
        ),
        (
            {"format": 1, "keys": [{"kid": "A" * 43, "created_at": "2026-01-01T00:00:00Z"}]},
            "none could sign",
        ),
        (
            {
                "format": 1,
                "keys": [
                    {"kid": "A" * 43, "created_at": "2026-01-01T00:00:00Z", "owner": "me"},
                ],
            },
            "unknown field",
        ),
        (
            {
                "format": 1,
                "keys": [
                    {
                        "kid": k,
                        "created_at": "2026-01-01T00:00:00Z",
                        "activate_at": "2026-01-01T00:00:00Z",
                    }
                    for k in ("A" * 43, "B" * 43)
                ],
            },
            "same time",
        ),
        (
            {
                "format": 1,
                "keys": [
                    {"kid": "A" * 43, "created_at": "2026-01-01T00:00:00Z"},
                    {"kid": "A" * 43, "created_at": "2026-01-01T00:00:00Z"},
                ],
            },
            "listed twice",
        ),
        (
            {
                "format": 1,
                "keys": [{"kid": "A" * 43, "created_at": "2026-02-30T00:00:00Z"}],
            },
            "not a date",
        ),
    ],
)
def test_parse_manifest_names_what_is_wrong(document: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        keyring.parse_manifest(json.dumps(document).encode(), "m")


# Pure state rules --------------------------------------------------------------


def test_a_clock_set_back_before_every_activation_still_has_one_signer() -> None:
    entries = [
        Entry(kid="a", created_at=T0, activate_at=T0),
        Entry(kid="b", created_at=T0, activate_at=T0 + 10),
    ]
    assert [s.state for s in timeline(entries, T0 - 100)] == [State.ACTIVE, State.NEXT]
    assert [s.state for s in timeline(entries, T0 + 10, keep_for=5)] == [
        State.RETIRING,
        State.ACTIVE,
    ]
    assert [s.state for s in timeline(entries, T0 + 15, keep_for=5)] == [
        State.RETIRED,
        State.ACTIVE,
    ]


def test_the_manifest_round_trips() -> None:
    entries = (
        Entry(kid="A" * 43, created_at=T0, activate_at=T0, retire_at=T0 + 1000),
        Entry(kid="B" * 43, created_at=T0 + 1, activate_at=None),
    )
    assert keyring.parse_manifest(keyring.manifest_json(entries), "m") == entries


# The JWKS ---------------------------------------------------------------------


def test_the_jwks_is_rfc_8037_okp_and_verifies_the_grants(
    directory: Path, clock: FakeClock
) -> None:
    ring = _ring(directory, clock)
    keyring.rotate(directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=clock)
    published = ring.published()
    jwks = json.loads(published.jwks)
    assert [k["kid"] for k in jwks["keys"]] == [k.kid for k in published.keys]
    for jwk, key in zip(jwks["keys"], published.keys, strict=True):
        assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == (
            "OKP",
            "Ed25519",
            "sig",
            "EdDSA",
        )
        assert jwk["x"] == keys.b64url(key.public_key)
    # A proxy that reads only the JWKS, with a stock JOSE library.
    token = _grant(ring, clock.now, lifetime=60)
    kid = jwt.get_unverified_header(token)["kid"]
    [signing] = [k for k in jwks["keys"] if k["kid"] == kid]
    claims = jwt.decode(
        token,
        jwt.PyJWK(signing).key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        options={"verify_exp": False},  # signed at the fake clock's time
    )
    assert claims["sub"] == "deploy-bot"


def test_a_single_key_publishes_itself_with_its_jwks() -> None:
    key = Ed25519PrivateKey.generate()
    signer = grants.token_signer(key, "jitgate")
    published = SingleKey(signer).published()
    [only] = published.keys
    assert (only.kid, only.signing, only.public_key) == (
        signer.kid,
        True,
        key.public_key().public_bytes_raw(),
    )
    [jwk] = json.loads(published.jwks)["keys"]
    assert jwk["kid"] == signer.kid


# Which keys the service uses -------------------------------------------------


def test_the_service_uses_the_key_directory_or_the_one_key(directory: Path, tmp_path: Path) -> None:
    single = tmp_path / "policy-signing.key"
    keys.write_private(single, Ed25519PrivateKey.generate())

    def ceiling() -> float:
        return 900.0

    rotating = _grant_keys_from(
        Env({"JITGATE_POLICY_KEYS_DIR": str(directory)}), "jitgate", ceiling
    )
    assert isinstance(rotating, RotatingKeys)
    [entry] = keyring.read_manifest(directory)
    assert rotating.signer().kid == entry.kid
    fixed = _grant_keys_from(Env({"JITGATE_POLICY_SIGNING_KEY": str(single)}), "jitgate", ceiling)
    assert isinstance(fixed, SingleKey)
    assert fixed.signer().kid == keys.key_id(keys.load_private(single).public_key())
    both = Env(
        {"JITGATE_POLICY_KEYS_DIR": str(directory), "JITGATE_POLICY_SIGNING_KEY": str(single)}
    )
    with pytest.raises(ConfigError, match="not both"):
        _grant_keys_from(both, "jitgate", ceiling)
    with pytest.raises(ConfigError, match="JITGATE_POLICY_SIGNING_KEY is required"):
        _grant_keys_from(Env({}), "jitgate", ceiling)


# The real servicer over mTLS, as the proxy sees it ---------------------------

POLICY = model.parse(
    """
ttl_ceiling = "15m"
[connections.orders-replica]
kind = "postgres"
[[bindings]]
group = "platform"
connection = "orders-replica"
max_ttl = "15m"
"""
)
VERIFIER_KEY = Ed25519PrivateKey.generate()


@dataclass
class Rig:
    port: int
    dev: DevPki
    clock: FakeClock
    directory: Path


@pytest.fixture
async def rig(
    dev_pki: DevPki,
    redis_server: RedisServer,
    redis_admin: redis.Redis,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    """The policy servicer signing with RotatingKeys on a fake clock that starts now."""
    clock = FakeClock(float(int(time.time())))
    directory = tmp_path / "grant-keys"
    keyring.init(directory, clock=clock)
    audit = RecordingAudit()
    async with running(dev_pki, "audit", serve_audit(audit), AUDIT_ACL) as audit_port:
        audit_channel = tls.secure_channel(
            f"127.0.0.1:{audit_port}",
            tls.channel_credentials(dev_pki.files("policy")),
            server_name="audit",
        )
        ledger = Ledger(redisconn.connect(redis_server.url("policy")))
        servicer = PolicyServicer(
            policy=lambda: POLICY,
            assertions=assertion.checker([VERIFIER_KEY.public_key()], "jitgate"),
            grant_keys=RotatingKeys(
                directory,
                trust_domain="jitgate",
                ttl_ceiling=lambda: POLICY.ttl_ceiling,
                margin=MARGIN,
                clock=clock,
                interval=0,
            ),
            audit=AuditClient(audit_channel),
            ledger=ledger,
            settings=PolicySettings(grant_audience=AUDIENCE, audit_deadline=2.0),
            clock=clock,
        )

        def register(server: grpc.aio.Server) -> None:
            policy_pb2_grpc.add_PolicyServicer_to_server(servicer, server)

        async with running(dev_pki, "policy", register, ACL) as port:
            yield Rig(port=port, dev=dev_pki, clock=clock, directory=directory)
        await audit_channel.close()
        await ledger.close()


async def _grant_keys(rig: Rig, caller: str = "proxy") -> policy_pb2.GrantKeys:
    async with channel(rig.dev, caller, rig.port, "policy") as ch:
        return await policy_pb2_grpc.PolicyStub(ch).GetGrantKeys(
            policy_pb2.GetGrantKeysRequest(), timeout=5
        )


async def _decide(rig: Rig) -> str:
    """A grant token for deploy-bot at the rig's time, 15 minutes long."""
    now = rig.clock()
    identity = Identity(
        subject="deploy-bot",
        client_id="deploy-bot",
        groups=("platform",),
        token_expires_at=now + 3600,
        issuer="i",
    )
    signed, _ = assertion.sign(
        assertion.signer(VERIFIER_KEY, "jitgate"),
        identity,
        trust_domain="jitgate",
        now=now,
        lifetime=30,
    )
    request = policy_pb2.DecideRequest(
        assertion=signed, connection="orders-replica", ttl_seconds=900, reason="rotation"
    )
    async with channel(rig.dev, "issuer", rig.port, "policy") as ch:
        decision = await policy_pb2_grpc.PolicyStub(ch).Decide(request, timeout=5)
    return decision.grant_token


@pytest.mark.integration
async def test_the_proxy_follows_a_rotation_through_get_grant_keys(rig: Rig) -> None:
    start = rig.clock()
    published = await _grant_keys(rig)
    [only] = published.keys
    old_grant = await _decide(rig)
    assert _check(published, old_grant, rig.clock()) == only.kid

    # Rotate: the new key is published at once, but the old one still signs.
    done = keyring.rotate(rig.directory, keep_for=KEEP_FOR, publish_ahead=AHEAD, clock=rig.clock)
    rig.clock.now = start + 10
    published = await _grant_keys(rig)
    assert [(k.kid, k.signing) for k in published.keys] == [
        (only.kid, True),
        (done.added.kid, False),
    ]
    assert _check(published, await _decide(rig), rig.clock()) == only.kid
    last_old_grant = await _decide(rig)

    # Past the publish-ahead delay the new key signs; both verify.
    rig.clock.now = start + AHEAD
    published = await _grant_keys(rig)
    assert [(k.kid, k.signing) for k in published.keys] == [
        (done.added.kid, True),
        (only.kid, False),
    ]
    retire_at = wire.seconds(published.keys[1].retire_at)
    assert retire_at == start + AHEAD + CEILING + MARGIN
    new_grant = await _decide(rig)
    assert _check(published, new_grant, rig.clock()) == done.added.kid
    assert _check(published, old_grant, rig.clock()) == only.kid

    # Until retire_at the old key is published: its last grant verifies to its end.
    rig.clock.now = start + 10 + CEILING - 1
    published = await _grant_keys(rig)
    assert _check(published, last_old_grant, rig.clock()) == only.kid
    rig.clock.now = retire_at - 1
    assert len((await _grant_keys(rig)).keys) == 2

    # From retire_at it is gone; the new key's grants still verify.
    rig.clock.now = retire_at
    published = await _grant_keys(rig)
    assert [k.kid for k in published.keys] == [done.added.kid]
    with pytest.raises(Unauthenticated) as refused:
        _check(published, last_old_grant, start + 20)
    assert refused.value.check == "key"
    _check(published, new_grant, start + AHEAD + 1)


@pytest.mark.integration
async def test_only_the_proxy_may_fetch_the_grant_keys(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _grant_keys(rig, caller="issuer")
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
