"""A development CA and one SPIFFE-named certificate per jitgate workload.

For a laptop or a test run only: production certificates come from the
deployment's own CA (SPIRE, cert-manager, ...) with the same URI SANs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, spiffe_id
from jitgate.common.tls import TlsFiles

SERVICES = ("issuer", "verifier", "policy", "audit", "proxy")
"""Workloads that serve and call: their certificates are for both ends of TLS."""
CLIENTS = ("auditor", "operator")
"""People's tools: client certificates only."""
SERVERS = ("idp",)
"""The dev OIDC issuer's HTTPS endpoint: a server certificate only."""
VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class DevPki:
    """Where a dev PKI lives on disk."""

    root: Path

    @property
    def ca(self) -> Path:
        """The CA certificate every workload trusts."""
        return self.root / "ca.pem"

    def files(self, name: str) -> TlsFiles:
        """The TLS files of workload name."""
        return TlsFiles(ca=self.ca, cert=self.root / f"{name}.pem", key=self.root / f"{name}.key")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jitgate dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{root / 'ca.key'} is not an EC key")
    return cert, key


def _create_ca(root: Path, now: datetime.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("jitgate dev CA"))
        .issuer_name(_name("jitgate dev CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(root / "ca.key", key)
    (root / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(root: Path, name: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> TlsFiles:
    """Issue name's certificate from the CA in root, with its SPIFFE ID as the only URI SAN."""
    ca_cert, ca_key = _load_ca(root)
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = []
    if name not in CLIENTS:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if name not in SERVERS:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    names: list[x509.GeneralName] = [
        x509.DNSName(name),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.UniformResourceIdentifier(spiffe_id(name, trust_domain)),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = DevPki(root)
    files = pki.files(name)
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def init(
    root: Path,
    names: Iterable[str] = (*SERVICES, *CLIENTS, *SERVERS),
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> DevPki:
    """Create a CA in root (unless one is there) and a certificate for each missing name."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "ca.pem").exists():
        _create_ca(root, datetime.datetime.now(datetime.UTC))
    pki = DevPki(root)
    for name in names:
        if not pki.files(name).cert.exists():
            issue(root, name, trust_domain=trust_domain)
    return pki
