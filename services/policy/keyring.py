"""The grant-signing keys the policy service signs with and publishes for proxies.

SingleKey is one fixed key. RotatingKeys follows a key directory that only
`jitgate keys` changes: one Ed25519 private key per file, named by its kid (the
RFC 7638 thumbprint), and manifest.json, which gives each key's times. A key's
state follows from those times and the clock, so a scheduled rotation needs no
command and no restart when it happens:

    next      published, not signing: every proxy learns it before any grant uses it
    active    signing: the latest key whose activate_at has passed
    retiring  replaced: still published until retire_at, after every grant it signed expired
    retired   past retire_at: neither; the next `jitgate keys rotate` deletes it

docs/key-rotation.md describes the procedure.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.common import grants, keyfiles, keys, wire
from jitgate.common.clock import Clock, system_clock
from jitgate.common.errors import ConfigError, JitgateError
from jitgate.common.jws import ALGORITHM, Signer
from jitgate.v1 import policy_pb2

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
DEFAULT_PUBLISH_AHEAD = 60.0
"""Seconds a new key is published before it signs: longer than any proxy waits between fetches."""
DEFAULT_MARGIN = 300.0
"""Seconds a replaced key outlives the last grant it could have signed: clock skew and leeway."""

_KID = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url SHA-256 (RFC 7638, RFC 4648 section 5)
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")  # RFC 3339, UTC
_ENTRY_FIELDS = {"kid", "created_at", "activate_at", "retire_at"}


class GrantKeys(Protocol):
    """Which key signs grants now, and which public keys verify them."""

    def signer(self) -> Signer:
        """Return the signer for new grant tokens."""
        ...

    def published(self) -> policy_pb2.GrantKeys:
        """Return every public key a proxy must accept now."""
        ...


class State(StrEnum):
    """Where a key is in its life; see the module's docstring."""

    NEXT = "next"
    ACTIVE = "active"
    RETIRING = "retiring"
    RETIRED = "retired"


PUBLISHED_STATES = (State.ACTIVE, State.NEXT, State.RETIRING)
"""The states a proxy must know, in the order keys are published."""


class RotationRefused(JitgateError):
    """The key directory is not in a state that allows the change asked for."""


# The published set, shared by both kinds of keyring ------------------------


def jwk(public: Ed25519PublicKey) -> dict[str, str]:
    """Return the JWK of an Ed25519 verification key (RFC 7517, RFC 8037 section 2)."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": keys.b64url(public.public_bytes_raw()),
        "kid": keys.key_id(public),
        "use": "sig",  # RFC 7517, section 4.2
        "alg": ALGORITHM,  # RFC 8037, section 3.1
    }


@dataclass(frozen=True, kw_only=True)
class PublishedKey:
    """One public key as proxies are told of it."""

    public: Ed25519PublicKey
    signing: bool
    retire_at: float | None = None


def grant_key_set(published: Sequence[PublishedKey]) -> policy_pb2.GrantKeys:
    """Return the GetGrantKeys answer: each key, and the same keys as a JWKS (RFC 7517, 5)."""
    jwks = json.dumps({"keys": [jwk(key.public) for key in published]}, separators=(",", ":"))
    return policy_pb2.GrantKeys(
        keys=[
            policy_pb2.GrantKey(
                kid=keys.key_id(key.public),
                public_key=key.public.public_bytes_raw(),
                signing=key.signing,
                retire_at=wire.timestamp(key.retire_at) if key.retire_at is not None else None,
            )
            for key in published
        ],
        jwks=jwks,
    )


class SingleKey:
    """One signing key, never rotated."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    def signer(self) -> Signer:
        """Return the one signer."""
        return self._signer

    def published(self) -> policy_pb2.GrantKeys:
        """Return the one public key."""
        return grant_key_set([PublishedKey(public=self._signer.key.public_key(), signing=True)])


# The manifest -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One key of the manifest and its times, in seconds since the epoch."""

    kid: str
    created_at: float
    activate_at: float | None = None
    """When it starts signing; None: published, waiting for `keys rotate --activate`."""
    retire_at: float | None = None
    """When it stops being published, set once a successor's activation time is fixed."""


@dataclass(frozen=True, kw_only=True)
class Status:
    """A key's state at one moment, with the time it stops being published if replaced."""

    entry: Entry
    state: State
    retire_at: float | None = None


def _activation(entry: Entry) -> float:
    assert entry.activate_at is not None
    return entry.activate_at


def timeline(entries: Sequence[Entry], now: float, *, keep_for: float = 0.0) -> list[Status]:
    """Return each key's state at now, in manifest order; exactly one is active."""
    # A replaced key is published until the later of its manifest retire_at and
    # its successor's activation plus keep_for (the longest grant it could have
    # signed, and a margin): a manifest can keep a key longer, never shorter.
    # When no key has reached its activation (a clock set back), the first one
    # to activate signs.
    activated = sorted((e for e in entries if e.activate_at is not None), key=_activation)
    found: dict[str, Status] = {}
    for index, entry in enumerate(activated):
        after = activated[index + 1] if index + 1 < len(activated) else None
        if index > 0 and _activation(entry) > now:
            found[entry.kid] = Status(entry=entry, state=State.NEXT)
        elif after is None or _activation(after) > now:
            found[entry.kid] = Status(entry=entry, state=State.ACTIVE)
        else:
            replaced_at = _activation(after)
            retire_at = replaced_at + keep_for
            if entry.retire_at is not None:
                retire_at = max(retire_at, entry.retire_at)
            state = State.RETIRING if now < retire_at else State.RETIRED
            found[entry.kid] = Status(entry=entry, state=state, retire_at=retire_at)
    return [found.get(e.kid, Status(entry=e, state=State.NEXT)) for e in entries]


def _active(statuses: Sequence[Status]) -> Entry:
    return next(s.entry for s in statuses if s.state is State.ACTIVE)


def format_time(seconds: float) -> str:
    """Return seconds since the epoch as an RFC 3339 UTC time, to the second."""
    moment = datetime.datetime.fromtimestamp(int(seconds), tz=datetime.UTC)
    return moment.isoformat().removesuffix("+00:00") + "Z"


def _parse_time(value: Any, where: str) -> float:
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise ConfigError(f"{where}: {value!r} is not a time like 2025-01-02T03:04:05Z")
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a date") from None


def _optional_time(item: Mapping[str, Any], key: str, where: str) -> float | None:
    value = item.get(key)
    return None if value is None else _parse_time(value, f"{where}.{key}")


def parse_manifest(data: bytes, source: str) -> tuple[Entry, ...]:
    """Return the keys a manifest lists, or raise ConfigError naming what is wrong."""
    try:
        document = json.loads(data)
    except ValueError as exc:  # also a UnicodeDecodeError
        raise ConfigError(f"{source}: not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(f"{source}: not a grant key manifest of format {FORMAT}")
    raw = document.get("keys")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: keys must be a non-empty list")
    entries: list[Entry] = []
    for index, item in enumerate(raw):
        where = f"{source}: keys[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be an object")
        extra = set(item) - _ENTRY_FIELDS
        if extra:
            raise ConfigError(f"{where}: unknown field {sorted(extra)[0]!r}")
        kid = item.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise ConfigError(f"{where}.kid: {kid!r} is not an RFC 7638 thumbprint")
        entries.append(
            Entry(
                kid=kid,
                created_at=_parse_time(item.get("created_at"), f"{where}.created_at"),
                activate_at=_optional_time(item, "activate_at", where),
                retire_at=_optional_time(item, "retire_at", where),
            )
        )
    kids = [e.kid for e in entries]
    if len(set(kids)) != len(kids):
        raise ConfigError(f"{source}: a kid is listed twice")
    times = [e.activate_at for e in entries if e.activate_at is not None]
    if not times:
        raise ConfigError(f"{source}: no key has an activate_at, so none could sign")
    if len(set(times)) != len(times):
        raise ConfigError(f"{source}: two keys activate at the same time")
    return tuple(entries)


def manifest_json(entries: Sequence[Entry]) -> bytes:
    """Return the manifest listing entries."""

    def when(seconds: float | None) -> str | None:
        return None if seconds is None else format_time(seconds)

    document = {
        "format": FORMAT,
        "keys": [
            {
                "kid": e.kid,
                "created_at": when(e.created_at),
                "activate_at": when(e.activate_at),
                "retire_at": when(e.retire_at),
            }
            for e in entries
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def key_path(directory: Path, kid: str) -> Path:
    """Return where the private key named kid is kept."""
    if not _KID.fullmatch(kid):
        raise ValueError(f"{kid!r} is not a kid")
    return directory / f"{kid}.key"


def read_manifest(directory: Path) -> tuple[Entry, ...]:
    """Return the keys listed in directory's manifest."""
    path = directory / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{directory} is not a grant key directory"
            f" (no {MANIFEST}; `jitgate keys init` makes one)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_manifest(data, str(path))


# The policy service's view -------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    entries: tuple[Entry, ...]
    signers: Mapping[str, Signer]


def _describe(loaded: _Loaded) -> str:
    return "kids " + ", ".join(e.kid for e in loaded.entries)


class RotatingKeys:
    """The keys of a key directory, re-read when its manifest changes; states follow the clock."""

    # The first read happens here and its ConfigError stops start-up. After
    # that a manifest or key that cannot be used keeps the last good keys and
    # is logged (keyfiles.WatchedFile): no request fails because of a bad edit.
    # ttl_ceiling is the policy's longest grant, or a function returning it as
    # the policy is reloaded; the highest value seen is used, since a replaced
    # key may have signed grants under an earlier, longer ceiling.

    def __init__(
        self,
        directory: Path,
        *,
        trust_domain: str,
        ttl_ceiling: float | Callable[[], float],
        margin: float = DEFAULT_MARGIN,
        clock: Clock = system_clock,
        interval: float = keyfiles.DEFAULT_INTERVAL,
    ) -> None:
        self.directory = directory
        self._trust_domain = trust_domain
        self._ceiling = ttl_ceiling if callable(ttl_ceiling) else lambda: ttl_ceiling
        self._longest = 0.0
        self._margin = margin
        self._clock = clock
        self._seen: tuple[str, tuple[str, ...]] | None = None
        self._file = keyfiles.WatchedFile(
            directory / MANIFEST,
            lambda path: self._load(path.parent),
            interval=interval,
            describe=_describe,
        )

    def _keep_for(self) -> float:
        """Return how long a replaced key outlives its replacement: the longest grant, a margin."""
        self._longest = max(self._longest, float(self._ceiling()))
        return self._longest + self._margin

    def _load(self, directory: Path) -> _Loaded:
        entries = read_manifest(directory)
        signers: dict[str, Signer] = {}
        for entry in entries:
            path = key_path(directory, entry.kid)
            signer = grants.token_signer(keys.load_private(path), self._trust_domain)
            if signer.kid != entry.kid:
                raise ConfigError(f"{path} holds the key with kid {signer.kid}, not {entry.kid}")
            if path.stat().st_mode & 0o077:
                log.warning("%s can be read by others than its owner; it should be 0600", path)
            signers[entry.kid] = signer
        for status in timeline(entries, self._clock(), keep_for=self._keep_for()):
            wanted = status.entry.retire_at
            if wanted is not None and status.retire_at is not None and wanted < status.retire_at:
                log.warning(
                    "kid %s: retire_at %s in %s is before its last grant could expire;"
                    " publishing it until %s",
                    status.entry.kid,
                    format_time(wanted),
                    MANIFEST,
                    format_time(math.ceil(status.retire_at)),
                )
        return _Loaded(entries=entries, signers=signers)

    def _current(self) -> tuple[_Loaded, list[Status]]:
        loaded = self._file.get()
        current = timeline(loaded.entries, self._clock(), keep_for=self._keep_for())
        self._note(current)
        return loaded, current

    def statuses(self) -> list[Status]:
        """Return every key's state now, from the last good manifest."""
        return self._current()[1]

    def _note(self, current: Sequence[Status]) -> None:
        """Log when the signing key or the published set changes."""
        active = _active(current).kid
        published = tuple(
            f"{s.entry.kid} ({s.state})" for s in current if s.state in PUBLISHED_STATES
        )
        if (active, published) == self._seen:
            return
        if self._seen is None or self._seen[0] != active:
            log.info("grant tokens are signed with kid %s", active)
        log.info("grant keys published: %s", ", ".join(published))
        self._seen = (active, published)

    def signer(self) -> Signer:
        """Return the active key's signer."""
        loaded, current = self._current()
        return loaded.signers[_active(current).kid]

    def published(self) -> policy_pb2.GrantKeys:
        """Return the active key first, then the next and the retiring ones."""
        loaded, current = self._current()
        return grant_key_set(
            [
                PublishedKey(
                    public=loaded.signers[s.entry.kid].key.public_key(),
                    signing=s.state is State.ACTIVE,
                    retire_at=s.retire_at if s.state is State.RETIRING else None,
                )
                for state in PUBLISHED_STATES
                for s in current
                if s.state is state
            ]
        )


# Changing a key directory: what `jitgate keys` does ------------------------


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write data to path by renaming a complete, synced file over it: never half-written."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _new_key(directory: Path, *, created_at: float, activate_at: float | None) -> Entry:
    key = Ed25519PrivateKey.generate()
    kid = keys.key_id(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(key_path(directory, kid), pem, 0o600)
    return Entry(kid=kid, created_at=created_at, activate_at=activate_at)


def _write_manifest(directory: Path, entries: Sequence[Entry]) -> None:
    data = manifest_json(entries)
    parse_manifest(data, MANIFEST)  # never write what the service would refuse
    _write_new(directory / MANIFEST, data, 0o644)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the directory's lock: one change at a time, whoever runs it."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    try:
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot lock {directory}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _floor(seconds: float) -> float:
    return float(math.floor(seconds))


def _ceil(seconds: float) -> float:
    return float(math.ceil(seconds))


def init(directory: Path, *, clock: Clock = system_clock) -> Entry:
    """Create directory (0700) with its first key, active at once."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {directory}: {exc.strerror}") from exc
    with _locked(directory):
        if (directory / MANIFEST).exists():
            raise RotationRefused(
                f"{directory} already holds grant keys; `jitgate keys rotate` replaces the key"
            )
        now = _floor(clock())
        entry = _new_key(directory, created_at=now, activate_at=now)
        _write_manifest(directory, [entry])
    return entry


@dataclass(frozen=True, kw_only=True)
class Rotation:
    """What a rotation changed."""

    added: Entry
    """The new key (for `activate`: the key that now signs)."""
    replaced: Entry | None
    """The key it replaces, with its retire_at; None while the new key waits for --activate."""
    removed: tuple[str, ...] = ()
    """Kids of retired keys deleted."""


def rotate(
    directory: Path,
    *,
    keep_for: float,
    publish_ahead: float | None = DEFAULT_PUBLISH_AHEAD,
    clock: Clock = system_clock,
) -> Rotation:
    """Add a new key as next, signing after publish_ahead seconds (None: on activate())."""
    # Once its activation time is fixed, the active key's retire_at is that
    # time plus keep_for: the longest grant it could sign and a margin.
    # Retired keys are removed from the manifest and deleted. A key already
    # waiting to sign is refused: one rotation at a time.
    if publish_ahead is not None and publish_ahead < 0:
        raise ValueError("publish_ahead must not be negative")
    with _locked(directory):
        entries = read_manifest(directory)
        now = clock()
        statuses = timeline(entries, now, keep_for=keep_for)
        for status in statuses:
            if status.state is State.NEXT:
                raise RotationRefused(
                    f"kid {status.entry.kid} is already next ({_when_signing(status.entry)});"
                    " activate it with `jitgate keys rotate --activate`, or wait"
                )
        removed = tuple(s.entry.kid for s in statuses if s.state is State.RETIRED)
        kept = [s.entry for s in statuses if s.state is not State.RETIRED]
        active = _active(statuses)
        activate_at = None
        if publish_ahead is not None:
            # Whole seconds in the manifest; never at or before the active key's time.
            activate_at = max(_floor(now + publish_ahead), _activation(active) + 1)
        added = _new_key(directory, created_at=_floor(now), activate_at=activate_at)
        replaced = None
        if activate_at is not None:
            replaced = replace(active, retire_at=_ceil(activate_at + keep_for))
            kept = [replaced if e.kid == active.kid else e for e in kept]
        _write_manifest(directory, [*kept, added])
        for kid in removed:
            key_path(directory, kid).unlink(missing_ok=True)
    return Rotation(added=added, replaced=replaced, removed=removed)


def activate(
    directory: Path,
    *,
    keep_for: float,
    publish_ahead: float = DEFAULT_PUBLISH_AHEAD,
    clock: Clock = system_clock,
) -> Rotation:
    """Make the next key sign now, if published for publish_ahead; the old one retires."""
    with _locked(directory):
        entries = read_manifest(directory)
        now = clock()
        statuses = timeline(entries, now, keep_for=keep_for)
        waiting = [s.entry for s in statuses if s.state is State.NEXT]
        if not waiting:
            raise RotationRefused("no key is next; `jitgate keys rotate` adds one")
        new = waiting[0]
        ready = new.created_at + publish_ahead
        if now < ready:
            raise RotationRefused(
                f"kid {new.kid} has been published only since {format_time(new.created_at)};"
                f" it may sign from {format_time(math.ceil(ready))}, when every proxy has it"
            )
        active = _active(statuses)
        activate_at = max(_floor(now), _activation(active) + 1)
        signing = replace(new, activate_at=activate_at)
        replaced = replace(active, retire_at=_ceil(activate_at + keep_for))
        changed = {signing.kid: signing, replaced.kid: replaced}
        _write_manifest(directory, [changed.get(e.kid, e) for e in entries])
    return Rotation(added=signing, replaced=replaced)


def _when_signing(entry: Entry) -> str:
    if entry.activate_at is None:
        return "waiting for --activate"
    return f"signing from {format_time(entry.activate_at)}"
