"""SPIFFE IDs are read from exactly one URI SAN of our trust domain, or not at all."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jitgate.common.identity import peer_workload, spiffe_id
from jitgate.devstack.pki import DevPki


def _pem(*uris: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if uris:
        sans = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_dev_certificates_name_their_workload(dev_pki: DevPki) -> None:
    pem = dev_pki.files("policy").cert.read_bytes()
    assert peer_workload({"x509_pem_cert": [pem]}) == "policy"


def test_one_spiffe_uri_is_read() -> None:
    assert peer_workload({"x509_pem_cert": [_pem("spiffe://jitgate/issuer")]}) == "issuer"


def test_two_uri_sans_are_no_identity() -> None:
    pem = _pem("spiffe://jitgate/issuer", "spiffe://jitgate/audit")
    assert peer_workload({"x509_pem_cert": [pem]}) is None


def test_another_trust_domain_is_no_identity() -> None:
    assert peer_workload({"x509_pem_cert": [_pem("spiffe://evil/issuer")]}) is None


def test_a_path_with_more_segments_is_no_identity() -> None:
    assert peer_workload({"x509_pem_cert": [_pem("spiffe://jitgate/issuer/../audit")]}) is None


def test_no_san_and_no_certificate_are_no_identity() -> None:
    assert peer_workload({"x509_pem_cert": [_pem()]}) is None
    assert peer_workload({}) is None
    assert peer_workload({"x509_pem_cert": [b"not a certificate"]}) is None


def test_spiffe_id_rejects_names_that_are_not_one_segment() -> None:
    assert spiffe_id("policy") == "spiffe://jitgate/policy"
    for bad in ("", "a/b", "UP", "x" * 64):
        try:
            spiffe_id(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
