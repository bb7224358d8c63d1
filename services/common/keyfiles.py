"""Key files re-read when they change, so signing keys rotate without a restart."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jitgate.common import keys

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_INTERVAL = 1.0
"""Seconds between looks at a file: a rotation is seen within this, at one stat a second."""

Stamp = tuple[int, int, int]


def _stamp(path: Path) -> Stamp:
    # The inode catches a file renamed over the old one (the atomic way to
    # replace it) even when its size and modification time happen to match.
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class WatchedFile(Generic[T]):
    """What `load` makes of a file, made again when the file changes.

    The first load happens here and its ConfigError stops start-up. After that
    a file that is missing or cannot be loaded keeps the last good value and is
    logged once per change: a half-written or mistyped key file must not fail
    requests, nor leave a service with no key at all. Not locked: meant for one
    event loop, where the worst two callers could do is both re-read.
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[Path], T],
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        describe: Callable[[T], str] | None = None,
    ) -> None:
        self.path = path
        self._load = load
        self._interval = interval
        self._clock = clock
        self._describe = describe
        # Stat before reading: a change between the two is then seen next time.
        self._stamp: Stamp | None
        try:
            self._stamp = _stamp(path)
        except OSError:
            self._stamp = None
        self._value = load(path)
        self._checked = clock()
        log.info("loaded %s%s", path, self._about(self._value))

    def get(self) -> T:
        """Return the last good value, looking for a change at most once per interval."""
        now = self._clock()
        if now - self._checked < self._interval:
            return self._value
        self._checked = now
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            if self._stamp is not None:
                log.warning("%s: %s; keeping the last good version", self.path, exc.strerror)
            self._stamp = None
            return self._value
        if stamp == self._stamp:
            return self._value
        self._stamp = stamp
        try:
            value = self._load(self.path)
        except Exception as exc:
            # Whatever is wrong with the new file, requests go on with the
            # last good value; the operator sees this once per change.
            log.warning(
                "%s changed but is not usable (%s); keeping the last good version", self.path, exc
            )
            return self._value
        self._value = value
        log.info("reloaded %s%s", self.path, self._about(value))
        return value

    def _about(self, value: T) -> str:
        return f": {self._describe(value)}" if self._describe is not None else ""


def _kids(found: tuple[Ed25519PublicKey, ...]) -> str:
    return "kids " + ", ".join(keys.key_id(key) for key in found)


class PublicKeyFiles(Mapping[str, Ed25519PublicKey]):
    """The Ed25519 public keys in PEM files, by RFC 7638 thumbprint, as the files are now.

    Each file holds one or more keys (concatenated PEM blocks). A Checker looks
    each token's `kid` up here, so a key added to or removed from a file is
    trusted or refused within `interval` seconds. A file that becomes unusable
    keeps its last good keys, so the set is never empty.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not paths:
            raise ValueError("at least one public key file is needed")
        self._files = tuple(
            WatchedFile(path, keys.load_public_keys, interval=interval, clock=clock, describe=_kids)
            for path in paths
        )
        self._loaded: tuple[tuple[Ed25519PublicKey, ...], ...] = ()
        self._by_kid: dict[str, Ed25519PublicKey] = {}

    def _current(self) -> dict[str, Ed25519PublicKey]:
        loaded = tuple(file.get() for file in self._files)
        if loaded != self._loaded:
            self._loaded = loaded
            self._by_kid = {keys.key_id(key): key for found in loaded for key in found}
        return self._by_kid

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._current()[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())
