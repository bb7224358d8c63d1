"""What a grant is outside the policy service: its token and its Redis keys.

The policy service signs grant tokens, the issuer stores grants in Redis, and
the proxy checks both; all of them read the layout from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.common.identity import spiffe_id
from jitgate.common.jws import Checker, Signer

MAX_LISTED = 1000
"""Live grants in one Policy.ListLiveGrants answer, at most (under 1 MB)."""

GRANT_TYP = "jitgate-grant+jwt"
REVOCATION_CHANNEL = "jitgate:revocations"
"""Redis pub/sub channel on which the policy service announces revoked grant ids."""


def grant_key(grant_id: str) -> str:
    """The Redis hash of a live grant; it expires with the grant (PEXPIREAT)."""
    return f"grant:{grant_id}"


def issued_key(grant_id: str) -> str:
    """The policy service's own record of a grant it signed; only policy may write it."""
    return f"issued:{grant_id}"


def revoked_key(grant_id: str) -> str:
    """The Redis marker of a revoked grant; only the policy service may write it."""
    return f"revoked:{grant_id}"


def _digest(*parts: str) -> str:
    # Attacker-influenced text (subjects) must not shape key names or ACL
    # patterns; a separator that cannot occur in either part keeps pairs apart.
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def subject_index_key(subject: str) -> str:
    """The policy service's sorted set of a subject's signed grant ids, scored by expiry in ms."""
    return f"issued:by-subject:{_digest(subject)}"


def connection_index_key(connection: str) -> str:
    """The policy service's sorted set of a connection's signed grant ids, by expiry in ms."""
    return f"issued:by-connection:{_digest(connection)}"


def slots_key(subject: str, connection: str) -> str:
    """The live grants of one subject on one connection, counted against max_concurrent."""
    return f"issued:slots:{_digest(subject, connection)}"


def agent_index_key(subject: str) -> str:
    """The Redis sorted set of one agent's grant ids, scored by expiry in ms.

    The subject is hashed: it is attacker-influenced text and must not shape
    key names or ACL patterns.
    """
    return f"agent:{hashlib.sha256(subject.encode()).hexdigest()[:32]}:grants"


def reply_text(value: bytes | str) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, kw_only=True)
class GrantRecord:
    """A live grant as stored in Redis: everything but its token."""

    grant_id: str
    subject: str
    client_id: str
    connection: str
    connection_kind: str
    issued_at: float
    expires_at: float
    proxy_endpoint: str
    namespace: str = ""
    """For a kubernetes connection, its one namespace."""

    def to_hash(self) -> dict[str, str]:
        """Return the Redis hash fields."""
        return {
            "grant_id": self.grant_id,
            "subject": self.subject,
            "client_id": self.client_id,
            "connection": self.connection,
            "connection_kind": self.connection_kind,
            "issued_at": repr(self.issued_at),
            "expires_at": repr(self.expires_at),
            "proxy_endpoint": self.proxy_endpoint,
            "namespace": self.namespace,
        }

    @classmethod
    def from_hash(cls, fields: Mapping[bytes | str, bytes | str]) -> GrantRecord | None:
        """Return the record in a Redis hash, or None if the hash is not a whole record."""
        try:
            text = {reply_text(k): reply_text(v) for k, v in fields.items()}
            return cls(
                grant_id=text["grant_id"],
                subject=text["subject"],
                client_id=text["client_id"],
                connection=text["connection"],
                connection_kind=text["connection_kind"],
                issued_at=float(text["issued_at"]),
                expires_at=float(text["expires_at"]),
                proxy_endpoint=text["proxy_endpoint"],
                namespace=text.get("namespace", ""),  # absent from records stored before it
            )
        except (KeyError, ValueError, UnicodeDecodeError):
            return None


def token_signer(key: Ed25519PrivateKey, trust_domain: str) -> Signer:
    """Return the policy service's grant-token signer."""
    return Signer(key=key, issuer=spiffe_id("policy", trust_domain), typ=GRANT_TYP)


def token_checker(
    keys: list[Ed25519PublicKey], *, audience: str, trust_domain: str, leeway: float = 0.0
) -> Checker:
    """Return the checker a proxy uses: grant tokens signed by one of the policy keys."""
    return Checker.for_keys(
        keys,
        issuer=spiffe_id("policy", trust_domain),
        audience=audience,
        typ=GRANT_TYP,
        leeway=leeway,
    )
