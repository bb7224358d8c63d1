"""Service identities: SPIFFE IDs in mTLS certificates, read per RPC."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

from cryptography import x509

DEFAULT_TRUST_DOMAIN = "jitgate"
# The SPIFFE ID grammar (SPIFFE-ID spec, sections 2.1 and 2.2), restricted to the
# single path segment jitgate uses for a workload name.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def spiffe_id(name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """Return the SPIFFE ID of the jitgate workload called name."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid workload name {name!r}")
    return f"spiffe://{trust_domain}/{name}"


@functools.lru_cache(maxsize=256)
def _workload_from_pem(pem: bytes, trust_domain: str) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    # An X.509-SVID has exactly one URI SAN (X509-SVID spec, section 2); a
    # certificate with several could be made to match more than one identity.
    if len(uris) != 1:
        return None
    prefix = f"spiffe://{trust_domain}/"
    if not uris[0].startswith(prefix):
        return None
    name = uris[0].removeprefix(prefix)
    return name if _NAME.fullmatch(name) else None


def peer_workload(
    auth_context: Mapping[str, Iterable[bytes]], trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> str | None:
    """Return the workload name in the peer's verified client certificate, if any.

    gRPC fills the auth context only after the handshake verified the chain
    against our CA, so the certificate here is one our CA issued.
    """
    pems = list(auth_context.get("x509_pem_cert", ()))
    if len(pems) != 1:
        return None
    return _workload_from_pem(pems[0], trust_domain)
