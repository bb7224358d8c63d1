"""Key files re-read on change: seen within the interval, a bad change never loses the good keys."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.common import assertion, keys
from jitgate.common.assertion import Identity
from jitgate.common.errors import ConfigError, Unauthenticated
from jitgate.common.keyfiles import PublicKeyFiles, WatchedFile


class Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _public() -> Ed25519PublicKey:
    return Ed25519PrivateKey.generate().public_key()


def _replace(path: Path, data: bytes) -> None:
    """Write a new file and rename it over path, as an operator should."""
    spare = path.with_name(path.name + ".new")
    spare.write_bytes(data)
    os.replace(spare, path)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


def _watch(path: Path, ticks: Ticks) -> WatchedFile[str]:
    def load(p: Path) -> str:
        text = p.read_text()
        if not text.startswith("good"):
            raise ConfigError(f"{p} is not good")
        return text

    return WatchedFile(path, load, interval=1.0, clock=ticks)


def test_a_change_is_seen_after_the_interval_and_not_before(tmp_path: Path, ticks: Ticks) -> None:
    path = tmp_path / "f"
    path.write_text("good 1")
    watched = _watch(path, ticks)
    assert watched.get() == "good 1"
    path.write_text("good 2, longer")
    ticks.advance(0.5)
    assert watched.get() == "good 1"
    ticks.advance(0.5)
    assert watched.get() == "good 2, longer"


def test_the_file_is_only_looked_at_once_per_interval(tmp_path: Path, ticks: Ticks) -> None:
    path = tmp_path / "f"
    path.write_text("good")
    loads: list[Path] = []

    def load(p: Path) -> str:
        loads.append(p)
        return p.read_text()

    watched = WatchedFile(path, load, interval=1.0, clock=ticks)
    for _ in range(5):
        ticks.advance(0.1)
        watched.get()
    ticks.advance(1.0)
    watched.get()  # stat shows no change: no second read
    assert loads == [path]


def test_a_file_renamed_over_is_seen_even_with_the_same_size_and_time(
    tmp_path: Path, ticks: Ticks
) -> None:
    path = tmp_path / "f"
    path.write_text("good A")
    before = path.stat()
    watched = _watch(path, ticks)
    spare = tmp_path / "f.new"
    spare.write_text("good B")
    os.utime(spare, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(spare, path)
    ticks.advance(1.0)
    assert watched.get() == "good B"


def test_a_bad_file_keeps_the_last_good_value_and_warns_once(
    tmp_path: Path, ticks: Ticks, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "f"
    path.write_text("good")
    watched = _watch(path, ticks)
    _replace(path, b"bad")
    with caplog.at_level(logging.WARNING, logger="jitgate.common.keyfiles"):
        for _ in range(3):
            ticks.advance(1.0)
            assert watched.get() == "good"
    assert len(_warnings(caplog)) == 1
    assert "not usable" in _warnings(caplog)[0].getMessage()
    _replace(path, b"good again")
    ticks.advance(1.0)
    assert watched.get() == "good again"


def test_a_removed_file_keeps_the_last_good_value_until_it_is_back(
    tmp_path: Path, ticks: Ticks, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "f"
    path.write_text("good")
    watched = _watch(path, ticks)
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="jitgate.common.keyfiles"):
        for _ in range(3):
            ticks.advance(1.0)
            assert watched.get() == "good"
    assert len(_warnings(caplog)) == 1
    path.write_text("good, back")
    ticks.advance(1.0)
    assert watched.get() == "good, back"


def test_a_bad_file_at_start_up_is_a_config_error(tmp_path: Path, ticks: Ticks) -> None:
    path = tmp_path / "f"
    path.write_text("bad")
    with pytest.raises(ConfigError, match="not good"):
        _watch(path, ticks)
    with pytest.raises(ConfigError, match="cannot read"):
        PublicKeyFiles([tmp_path / "missing.pem"])


def test_one_file_may_hold_several_public_keys(tmp_path: Path) -> None:
    first, second = _public(), _public()
    path = tmp_path / "verifier.pem"
    # RFC 7468 allows text between blocks; an operator may note which key is which.
    path.write_bytes(_pem(first) + b"old key, remove after rotation\n" + _pem(second))
    assert keys.load_public_keys(path) == (first, second)
    assert set(PublicKeyFiles([path])) == {keys.key_id(first), keys.key_id(second)}


def _ec_pem() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize(
    ("after_a_good_key", "message"),
    [
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n", "unterminated"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "key 2 is not a PEM"),
        (None, "key 2 is not an Ed25519"),
    ],
)
def test_a_public_key_file_must_hold_only_good_ed25519_keys(
    tmp_path: Path, after_a_good_key: bytes | None, message: str
) -> None:
    path = tmp_path / "verifier.pem"
    path.write_bytes(_pem(_public()) + (after_a_good_key or _ec_pem()))
    with pytest.raises(ConfigError, match=message):
        keys.load_public_keys(path)


def test_a_public_key_file_with_no_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "verifier.pem"
    path.write_bytes(b"# nothing here yet\n")
    with pytest.raises(ConfigError, match="no PEM public key"):
        keys.load_public_keys(path)


def test_a_private_key_in_a_public_key_file_is_refused(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    path = tmp_path / "verifier.pem"
    path.write_bytes(
        _pem(private.public_key())
        + private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="not a public key"):
        keys.load_public_keys(path)


def test_keys_added_and_removed_are_seen_across_files(tmp_path: Path, ticks: Ticks) -> None:
    old, new, other = _public(), _public(), _public()
    main, extra = tmp_path / "verifier.pem", tmp_path / "extra.pem"
    main.write_bytes(_pem(old))
    extra.write_bytes(_pem(other))
    trusted = PublicKeyFiles([main, extra], interval=1.0, clock=ticks)
    assert set(trusted) == {keys.key_id(old), keys.key_id(other)}
    with main.open("ab") as out:  # step 1 of a rotation: append the new key
        out.write(_pem(new))
    ticks.advance(1.0)
    assert trusted.get(keys.key_id(new)) == new
    assert len(trusted) == 3
    _replace(main, _pem(new))  # step 3: drop the old one
    ticks.advance(1.0)
    assert keys.key_id(old) not in trusted
    assert set(trusted) == {keys.key_id(new), keys.key_id(other)}


def test_an_emptied_key_file_never_leaves_no_keys(tmp_path: Path, ticks: Ticks) -> None:
    key = _public()
    path = tmp_path / "verifier.pem"
    path.write_bytes(_pem(key))
    trusted = PublicKeyFiles([path], interval=1.0, clock=ticks)
    path.write_bytes(b"")
    ticks.advance(1.0)
    assert dict(trusted) == {keys.key_id(key): key}
    path.unlink()
    ticks.advance(1.0)
    assert dict(trusted) == {keys.key_id(key): key}


def test_a_checker_over_key_files_follows_a_rotation(tmp_path: Path, ticks: Ticks) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    path = tmp_path / "verifier.pem"
    path.write_bytes(_pem(old.public_key()))
    checker = assertion.checker(PublicKeyFiles([path], clock=ticks), "jitgate")
    now = time.time()
    identity = Identity(
        subject="s", client_id="c", groups=("g",), token_expires_at=now + 600, issuer="i"
    )

    def signed_by(key: Ed25519PrivateKey) -> str:
        signer = assertion.signer(key, "jitgate")
        return assertion.sign(signer, identity, trust_domain="jitgate", now=now, lifetime=60)[0]

    from_old, from_new = signed_by(old), signed_by(new)
    assert checker.check(from_old, now)["sub"] == "s"
    with pytest.raises(Unauthenticated) as refused:
        checker.check(from_new, now)
    assert refused.value.check == "key"
    with path.open("ab") as out:
        out.write(_pem(new.public_key()))
    ticks.advance(1.0)
    assert checker.check(from_new, now)["sub"] == "s"
    assert checker.check(from_old, now)["sub"] == "s"
    _replace(path, _pem(new.public_key()))
    ticks.advance(1.0)
    with pytest.raises(Unauthenticated) as refused:
        checker.check(from_old, now)
    assert refused.value.check == "key"
    assert checker.check(from_new, now)["sub"] == "s"
