"""`jitgate pki init DIR`: a dev CA and one SPIFFE-named certificate per workload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography import x509

NAMES = ("issuer", "verifier", "policy", "audit", "proxy", "auditor", "operator", "idp")


def test_init_writes_a_ca_and_a_certificate_per_workload(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jitgate", "pki", "init", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    for name in NAMES:
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.pem").read_bytes())
        assert cert.issuer == ca.subject
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://jitgate/{name}"
        ]
        assert (tmp_path / f"{name}.key").stat().st_mode & 0o777 == 0o600
        assert f"spiffe://jitgate/{name}" in done.stdout


def test_init_keeps_what_is_there(tmp_path: Path) -> None:
    for _ in range(2):
        subprocess.run(
            [sys.executable, "-m", "jitgate", "pki", "init", str(tmp_path)], check=True, timeout=60
        )
        if not (tmp_path / "first.pem").exists():
            (tmp_path / "first.pem").write_bytes((tmp_path / "ca.pem").read_bytes())
    assert (tmp_path / "ca.pem").read_bytes() == (tmp_path / "first.pem").read_bytes()
