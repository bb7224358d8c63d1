"""A development OIDC issuer shaped like an Okta custom authorization server.

It stands in for Okta on a laptop: HTTPS on loopback, a discovery document, a
JWKS, and a client-credentials token endpoint that mints Okta-shaped RS256
access tokens for the test agents in a TOML file. The verifier reaches it only
through its public URL, exactly as it would reach Okta. Never for production.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
import json
import logging
import os
import secrets
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from jitgate.common.errors import ConfigError
from jitgate.common.keys import b64url

log = logging.getLogger(__name__)

AUDIENCE = "api://default"
"""The audience of Okta's default custom authorization server."""
ISSUER_PATH = "/oauth2/default"
DEFAULT_SCOPES = ("jitgate",)
CLAIMS = ("ver", "jti", "iss", "aud", "iat", "exp", "cid", "uid", "scp", "sub", "groups")
"""The claims of an access token, as Okta's custom authorization servers issue them."""
DEFAULT_TOKEN_LIFETIME = 3600
KEY_FILE = "idp-signing-key.pem"
MAX_BODY_BYTES = 8 * 1024
"""A client-credentials request is a few hundred bytes."""
_AGENT_KEYS = frozenset({"secret", "subject", "groups", "scopes", "uid"})
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
_UID_ALPHABET = string.digits + string.ascii_letters


def example_agents() -> Path:
    """Return the path of the bundled example agents file."""
    resource = importlib.resources.files("jitgate.devstack") / "examples" / "agents.toml"
    return Path(str(resource))


@dataclass(frozen=True, kw_only=True)
class Agent:
    """A test agent: an OAuth client with its own identity and groups."""

    client_id: str
    secret: str = field(repr=False)
    subject: str
    uid: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = DEFAULT_SCOPES


def okta_uid(client_id: str) -> str:
    """Return a stable Okta-like user id ("00u" + 17 characters) for client_id."""
    digest = hashlib.sha256(f"jitgate-dev-idp uid {client_id}".encode()).digest()
    return "00u" + "".join(_UID_ALPHABET[b % len(_UID_ALPHABET)] for b in digest[:17])


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def parse_agents(document: Mapping[str, Any], source: str = "agents") -> dict[str, Agent]:
    """Return the agents in a parsed agents file; unknown keys are errors naming their path."""
    for key in document:
        if key != "agents":
            raise ConfigError(f"{source}: unknown key {key!r}; only [agents.NAME] tables go here")
    table = document.get("agents", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: agents must be a table of [agents.NAME]")
    agents: dict[str, Agent] = {}
    for name, spec in table.items():
        where = f"{source}: agents.{name}"
        if not set(name) <= _NAME_CHARS:
            raise ConfigError(f"{where}: agent names use letters, digits, '.', '_' and '-'")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table")
        for key in spec:
            if key not in _AGENT_KEYS:
                raise ConfigError(
                    f"{where}.{key} is not a known key; use one of {', '.join(sorted(_AGENT_KEYS))}"
                )
        if "secret" not in spec:
            raise ConfigError(f"{where}.secret is required")
        agents[name] = Agent(
            client_id=name,
            secret=_text(spec["secret"], f"{where}.secret"),
            subject=_text(spec.get("subject", name), f"{where}.subject"),
            uid=_text(spec.get("uid", okta_uid(name)), f"{where}.uid"),
            groups=_strings(spec.get("groups", []), f"{where}.groups"),
            scopes=_strings(spec.get("scopes", list(DEFAULT_SCOPES)), f"{where}.scopes"),
        )
    return agents


def load_agents(path: Path | None = None) -> dict[str, Agent]:
    """Return the agents in path (default: the bundled example file)."""
    path = path or example_agents()
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read agents file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_agents(document, str(path))


def rsa_jwk(public: rsa.RSAPublicKey) -> dict[str, str]:
    """Return the public JWK members of an RSA key (RFC 7518, section 6.3.1)."""
    numbers = public.public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "n": b64url(n), "e": b64url(e)}


def rsa_key_id(public: rsa.RSAPublicKey) -> str:
    """Return the RFC 7638 thumbprint of an RSA public key: a kid that survives restarts."""
    members = json.dumps(rsa_jwk(public), sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(members.encode()).digest())


def load_or_create_key(state_dir: Path) -> rsa.RSAPrivateKey:
    """Return the signing key kept in state_dir, creating an RSA-2048 key the first time."""
    path = state_dir / KEY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is not a readable PEM private key: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
            raise ConfigError(f"{path} must hold an RSA key of at least 2048 bits")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def mint(
    claims: Mapping[str, Any],
    *,
    key: rsa.RSAPrivateKey | bytes | None,
    alg: str = "RS256",
    kid: str | None = None,
    headers: Mapping[str, Any] | None = None,
    ascii_only: bool = True,
) -> str:
    """Return a compact JWS over claims, signed however a test asks, good or hostile.

    key is an RSA key for RS*/PS*, raw bytes for HS* (e.g. an RSA public key's
    PEM, for the key-confusion attack), and None for "none" in any spelling.
    headers are added after alg and kid, so a test can override either.
    ascii_only=False writes the claims as raw UTF-8, as some IdPs do.
    """
    header: dict[str, Any] = {"alg": alg}
    if kid is not None:
        header["kid"] = kid
    header.update(headers or {})
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(dict(claims), separators=(",", ":"), ensure_ascii=ascii_only).encode())
    ).encode()
    family, size = alg[:2].upper(), alg[2:]
    if alg.lower() == "none":
        signature = b""
    elif family == "HS" and isinstance(key, bytes) and size in _HASHES:
        signature = hmac.new(key, signing_input, f"sha{size}").digest()
    elif family in ("RS", "PS") and isinstance(key, rsa.RSAPrivateKey) and size in _HASHES:
        digest = _HASHES[size]()
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if family == "RS"
            else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        )
        signature = key.sign(signing_input, pad, digest)
    else:
        raise ValueError(f"cannot sign alg {alg!r} with {type(key).__name__}")
    return f"{signing_input.decode()}.{b64url(signature)}"


@dataclass(frozen=True, kw_only=True)
class Idp:
    """The issuer itself: documents, keys and tokens, without the HTTP around them."""

    issuer: str
    key: rsa.RSAPrivateKey = field(repr=False)
    agents: Mapping[str, Agent]
    token_lifetime: int = DEFAULT_TOKEN_LIFETIME
    audience: str = AUDIENCE
    kid: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kid", rsa_key_id(self.key.public_key()))

    def discovery(self) -> dict[str, Any]:
        """Return the OpenID Provider metadata (OpenID Connect Discovery 1.0, section 3)."""
        scopes = sorted({s for agent in self.agents.values() for s in agent.scopes})
        return {
            "issuer": self.issuer,
            "token_endpoint": f"{self.issuer}/v1/token",
            "jwks_uri": f"{self.issuer}/v1/keys",
            "response_types_supported": ["none"],
            "grant_types_supported": ["client_credentials"],
            "subject_types_supported": ["public"],
            "scopes_supported": scopes,
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "claims_supported": list(CLAIMS),
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        """Return the JSON Web Key Set with the public half of the signing key."""
        jwk = {**rsa_jwk(self.key.public_key()), "kid": self.kid, "alg": "RS256", "use": "sig"}
        return {"keys": [jwk]}

    def claims(self, agent: Agent, *, now: float, scopes: tuple[str, ...]) -> dict[str, Any]:
        """Return the claims of an access token for agent, shaped like Okta's."""
        issued = int(now)
        return {
            "ver": 1,
            "jti": "AT." + secrets.token_urlsafe(32),
            "iss": self.issuer,
            "aud": self.audience,
            "iat": issued,
            "exp": issued + self.token_lifetime,
            "cid": agent.client_id,
            "uid": agent.uid,
            "scp": list(scopes),
            "sub": agent.subject,
            "groups": list(agent.groups),
        }

    def access_token(
        self, agent: Agent | str, *, now: float, scopes: tuple[str, ...] | None = None
    ) -> str:
        """Return a signed access token for agent (an Agent or a client id) issued at now."""
        if isinstance(agent, str):
            agent = self.agents[agent]
        granted = agent.scopes if scopes is None else scopes
        claims = self.claims(agent, now=now, scopes=granted)
        return mint(claims, key=self.key, kid=self.kid)

    def mint(self, claims: Mapping[str, Any], **kw: Any) -> str:
        """Return mint(claims) signed with this issuer's key and kid unless kw says otherwise."""
        kw.setdefault("key", self.key)
        kw.setdefault("kid", self.kid)
        return mint(claims, **kw)

    def authenticate(self, client_id: str, secret: str) -> Agent | None:
        """Return the agent whose credentials these are, comparing in constant time."""
        agent = self.agents.get(client_id)
        # Compare against a throwaway secret for unknown clients too, so the
        # response time does not tell which client ids exist.
        expected = agent.secret if agent is not None else secrets.token_urlsafe(32)
        same = hmac.compare_digest(expected.encode(), secret.encode())
        return agent if agent is not None and same else None
