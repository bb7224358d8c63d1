"""The agent's private store of its own grants, tokens included, until they expire.

The issuer returns a grant's token once, from RequestGrant; `jitgate grant
kubeconfig` runs later and needs it, so `jitgate grant request` keeps its
kubernetes grants (and only those) here. Grants are kept as JSON files in
$JITGATE_HOME/grants (default ~/.jitgate): the directory is 0700 and each
file 0600, created so from the start (no window with wider modes). Expired
grants are removed whenever the store is opened.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
from pathlib import Path

from jitgate.client.issuer import Grant

_GRANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""What a grant id may be to name a file: no separators, no "..", no surprises."""


def home() -> Path:
    """$JITGATE_HOME, else ~/.jitgate."""
    configured = os.environ.get("JITGATE_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".jitgate"


def _valid_id(grant_id: str) -> bool:
    """Whether grant_id can name a file in the store."""
    return bool(_GRANT_ID.fullmatch(grant_id)) and grant_id not in (".", "..")


class GrantStore:
    """Grants by id in one private directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root if root is not None else home()) / "grants"

    def _path(self, grant_id: str) -> Path:
        """The file of grant_id; ValueError if the id could name another file."""
        if not _valid_id(grant_id):
            raise ValueError(f"not a grant id: {grant_id[:40]!r}")
        return self.root / f"{grant_id}.json"

    def save(self, grant: Grant) -> Path:
        """Keep grant (with its token) until it expires; return the file written."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # an existing directory is narrowed too
        path = self._path(grant.grant_id)
        partial = path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(grant.as_dict(), out)
        os.replace(partial, path)
        self.prune()
        return path

    def load(self, grant_id: str) -> Grant | None:
        """The stored grant, or None if there is none (or only a broken file)."""
        try:
            data = json.loads(self._path(grant_id).read_text())
            return Grant(
                grant_id=str(data["grant_id"]),
                connection=str(data["connection"]),
                connection_kind=str(data["connection_kind"]),
                subject=str(data["subject"]),
                issued_at=datetime.datetime.fromisoformat(data["issued_at"]),
                expires_at=datetime.datetime.fromisoformat(data["expires_at"]),
                proxy_endpoint=str(data["proxy_endpoint"]),
                token=str(data.get("token", "")),
                namespace=str(data.get("namespace", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def forget(self, grant_id: str) -> None:
        """Remove a grant (revoked: its token is of no use any more)."""
        with contextlib.suppress(OSError, ValueError):
            self._path(grant_id).unlink()

    def prune(self, now: datetime.datetime | None = None) -> int:
        """Remove expired grants; return how many."""
        now = now or datetime.datetime.now(datetime.UTC)
        removed = 0
        for path in self.root.glob("*.json"):
            grant = self.load(path.stem)
            if grant is None or grant.expires_at <= now:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed
