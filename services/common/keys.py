"""Ed25519 signing keys: load, create, and name them by RFC 7638 thumbprint."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.common.errors import ConfigError


def b64url(data: bytes) -> str:
    """Return unpadded base64url (RFC 7515, section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def key_id(public: Ed25519PublicKey) -> str:
    """Return the RFC 7638 JWK thumbprint of an Ed25519 public key (RFC 8037)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # RFC 7638, section 3: required members only, sorted, no whitespace.
    jwk = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}, separators=(",", ":"))
    return b64url(hashlib.sha256(jwk.encode()).digest())


def load_private(path: Path) -> Ed25519PrivateKey:
    """Load a PKCS#8 PEM Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


# RFC 7468, section 2: each block is labelled, and text between blocks (a note
# naming the key, say) is allowed and ignored.
_BEGIN = re.compile(rb"-----BEGIN ([^-\r\n]*)-----")
_PUBLIC_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.DOTALL)


def load_public_keys(path: Path) -> tuple[Ed25519PublicKey, ...]:
    """Load one or more concatenated SubjectPublicKeyInfo PEM Ed25519 public keys.

    Any other kind of block is refused rather than skipped, so a private key
    pasted into a list of public ones is noticed, not silently published.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public keys {path}: {exc.strerror}") from exc
    labels = _BEGIN.findall(data)
    blocks = _PUBLIC_BLOCK.findall(data)
    if not labels:
        raise ConfigError(f"{path} holds no PEM public key")
    if any(label != b"PUBLIC KEY" for label in labels):
        raise ConfigError(f"{path} holds a PEM block that is not a public key")
    if len(blocks) != len(labels):
        raise ConfigError(f"{path} has an unterminated PEM block")
    found = []
    for number, block in enumerate(blocks, start=1):
        try:
            key = serialization.load_pem_public_key(block)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{path}: key {number} is not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path}: key {number} is not an Ed25519 public key")
        found.append(key)
    return tuple(found)


def write_private(path: Path, key: Ed25519PrivateKey) -> None:
    """Write key as PKCS#8 PEM, readable by its owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def write_public(path: Path, key: Ed25519PublicKey) -> None:
    """Write key as SubjectPublicKeyInfo PEM."""
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)


def create_pair(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Generate a new Ed25519 key pair and write both halves."""
    key = Ed25519PrivateKey.generate()
    write_private(private_path, key)
    write_public(public_path, key.public_key())
    return key
