"""The verifier's settings, and that it serves (fail closed) while its IdP is away."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitgate.common import keys
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError
from jitgate.devstack import idp, pki
from jitgate.devstack.redis_server import free_port
from jitgate.v1 import verifier_pb2, verifier_pb2_grpc
from jitgate.verifier import main
from jitgate.verifier.oidc import CachePolicy
from tests.support import channel

ISSUER = "https://idp.example/oauth2/default"


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _env(dev: pki.DevPki, tmp_path: Path, **extra: str) -> dict[str, str]:
    files = dev.files("verifier")
    private = tmp_path / "verifier-signing.key"
    if not private.exists():
        keys.create_pair(private, tmp_path / "verifier-signing.pub")
    return {
        "JITGATE_OIDC_ISSUER": ISSUER,
        "JITGATE_VERIFIER_SIGNING_KEY": str(private),
        "JITGATE_AUDIT_ADDR": "127.0.0.1:1",
        "JITGATE_TLS_CA": str(files.ca),
        "JITGATE_TLS_CERT": str(files.cert),
        "JITGATE_TLS_KEY": str(files.key),
        **extra,
    }


def test_the_defaults_are_okta_shaped() -> None:
    settings = main.OidcSettings.from_env(Env({"JITGATE_OIDC_ISSUER": ISSUER}))
    assert settings.issuers == (ISSUER,)
    assert settings.audience == "api://default"
    assert settings.groups_claim == "groups"
    assert settings.algorithms == {"RS256"}
    assert settings.leeway == 30
    assert settings.max_token_lifetime == 24 * 3600
    assert settings.ca_bundle is None
    assert settings.cache == CachePolicy(
        default=300, floor=60, ceiling=3600, max_stale=7200, unknown_kid_cooldown=30
    )


def test_every_setting_has_an_environment_form(tmp_path: Path) -> None:
    settings = main.OidcSettings.from_env(
        Env(
            {
                "JITGATE_OIDC_ISSUER": f"{ISSUER}, https://other.example/oauth2/agents",
                "JITGATE_OIDC_AUDIENCE": "api://jitgate",
                "JITGATE_OIDC_GROUPS_CLAIM": "jitgate_groups",
                "JITGATE_OIDC_ALGORITHMS": "RS256, PS256",
                "JITGATE_OIDC_LEEWAY": "10",
                "JITGATE_OIDC_CA_BUNDLE": str(tmp_path / "ca.pem"),
                "JITGATE_OIDC_HTTP_TIMEOUT": "2",
                "JITGATE_OIDC_JWKS_REFRESH": "600",
                "JITGATE_OIDC_JWKS_COOLDOWN": "60",
                "JITGATE_OIDC_JWKS_MIN_AGE": "120",
                "JITGATE_OIDC_JWKS_MAX_AGE": "1800",
                "JITGATE_OIDC_JWKS_MAX_STALE": "3600",
                "JITGATE_OIDC_MAX_TOKEN_LIFETIME": "7200",
            }
        )
    )
    assert settings.audience == "api://jitgate"
    assert settings.groups_claim == "jitgate_groups"
    assert settings.algorithms == {"RS256", "PS256"}
    assert settings.leeway == 10
    assert settings.ca_bundle == tmp_path / "ca.pem"
    assert settings.issuers == (ISSUER, "https://other.example/oauth2/agents")
    assert settings.http_timeout == 2
    assert settings.max_token_lifetime == 7200
    assert settings.cache == CachePolicy(
        default=600, floor=120, ceiling=1800, max_stale=3600, unknown_kid_cooldown=60
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("JITGATE_OIDC_ISSUER", "http://idp.example/oauth2/default", "https"),
        ("JITGATE_OIDC_ISSUER", "https://user:pw@idp.example/", "https"),
        ("JITGATE_OIDC_ALGORITHMS", "HS256", "never allowed"),
        ("JITGATE_OIDC_ALGORITHMS", "RS256,none", "never allowed"),
        ("JITGATE_OIDC_ALGORITHMS", "rs256", "not supported"),
        ("JITGATE_OIDC_LEEWAY", "120", "JITGATE_OIDC_LEEWAY"),
        ("JITGATE_OIDC_ISSUER", " , ", "JITGATE_OIDC_ISSUER"),
        ("JITGATE_OIDC_ISSUER", "https://example.okta.com", "org authorization server"),
        ("JITGATE_OIDC_ISSUER", "https://example.oktapreview.com/", "org authorization server"),
        ("JITGATE_OIDC_AUDIENCE", ISSUER, "not an issuer"),
        ("JITGATE_OIDC_ISSUER", f"{ISSUER},http://plain.example", "https"),
        ("JITGATE_OIDC_JWKS_MAX_STALE", "600", "JITGATE_OIDC_JWKS_MAX_STALE"),
        ("JITGATE_OIDC_JWKS_MIN_AGE", "900", "JITGATE_OIDC_JWKS_MIN_AGE"),
        ("JITGATE_OIDC_MAX_TOKEN_LIFETIME", "30", "JITGATE_OIDC_MAX_TOKEN_LIFETIME"),
    ],
)
def test_bad_settings_are_refused_at_start_up(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        main.OidcSettings.from_env(Env({"JITGATE_OIDC_ISSUER": ISSUER, name: value}))


def test_the_issuer_is_required() -> None:
    with pytest.raises(ConfigError, match="JITGATE_OIDC_ISSUER"):
        main.OidcSettings.from_env(Env({}))


async def test_an_assertion_ttl_over_sixty_seconds_is_refused(
    dev_pki: pki.DevPki, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="JITGATE_ASSERTION_TTL"):
        main.create(Env(_env(dev_pki, tmp_path, JITGATE_ASSERTION_TTL="61")))


async def test_it_serves_while_the_idp_is_unreachable(dev_pki: pki.DevPki, tmp_path: Path) -> None:
    port = free_port()
    env = _env(
        dev_pki,
        tmp_path,
        JITGATE_LISTEN=f"127.0.0.1:{port}",
        JITGATE_OIDC_ISSUER=f"https://127.0.0.1:{free_port()}/oauth2/default",
        JITGATE_OIDC_CA_BUNDLE=str(dev_pki.ca),
    )
    service, (cache,) = main.create(Env(env))
    await service.start()
    try:
        async with channel(dev_pki, "issuer", port, "verifier") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="jitgate.v1.Verifier"), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = verifier_pb2_grpc.VerifierStub(ch)
            # A token that fails before any key is needed is still a rejection;
            # one that needs keys cannot be decided and fails closed.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Verify(verifier_pb2.VerifyRequest(token="a.b.c"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            claims = {"iss": env["JITGATE_OIDC_ISSUER"], "sub": "x"}
            token = idp.mint(claims, key=_rsa_key(), kid="k1")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Verify(verifier_pb2.VerifyRequest(token=token), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert cache.kids == frozenset()
    finally:
        await service.stop(grace=0.1)
