"""Run the verifier from JITGATE_* settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, keyfiles, keys, tls
from jitgate.common.clock import Clock, system_clock
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN
from jitgate.common.server import Service
from jitgate.v1 import verifier_pb2_grpc
from jitgate.verifier.oidc import CachePolicy, HttpsGetter, JwksCache, https_url
from jitgate.verifier.servicer import ACL, SERVICE_NAME, VerifierServicer
from jitgate.verifier.tokens import (
    DEFAULT_MAX_LIFETIME,
    MAX_LEEWAY,
    AccessTokenVerifier,
    allowed_algorithms,
)

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:7444"
DEFAULT_AUDIENCE = "api://default"
OKTA_DOMAINS = (".okta.com", ".oktapreview.com", ".okta-emea.com", ".okta-gov.com")


@dataclass(frozen=True, kw_only=True)
class OidcSettings:
    """How the verifier trusts its OIDC issuers, parsed once at start-up."""

    issuers: tuple[str, ...]
    audience: str = DEFAULT_AUDIENCE
    groups_claim: str = "groups"
    algorithms: frozenset[str] = frozenset({"RS256"})
    leeway: float = 30.0
    max_token_lifetime: float = DEFAULT_MAX_LIFETIME
    ca_bundle: Path | None = None
    http_timeout: float = 5.0
    cache: CachePolicy = field(default_factory=CachePolicy)

    @classmethod
    def from_env(cls, env: Env) -> OidcSettings:
        """Return the settings in JITGATE_OIDC_*, or raise ConfigError naming the bad one."""
        issuers = env.names("JITGATE_OIDC_ISSUER", ())
        if not issuers:
            raise ConfigError("JITGATE_OIDC_ISSUER is required: one or more issuer URLs")
        for issuer in issuers:
            # The issuer URL carries all the trust in the keys: plain HTTP would
            # let anyone on the path serve their own JWKS.
            parts = https_url(issuer, "JITGATE_OIDC_ISSUER")
            # Okta's org authorization server issues tokens for Okta's own APIs
            # (iss = aud = the org URL); agents need a custom one (docs/okta.md).
            host = (parts.hostname or "").lower()
            if host.endswith(OKTA_DOMAINS) and "/oauth2/" not in parts.path + "/":
                raise ConfigError(
                    f"JITGATE_OIDC_ISSUER {issuer!r} is an Okta org authorization server;"
                    " use a custom one, e.g. https://<org>/oauth2/<server id>"
                )
        names = env.names("JITGATE_OIDC_ALGORITHMS", ("RS256",))
        try:
            algorithms = allowed_algorithms(names)
        except ValueError as exc:
            raise ConfigError(f"JITGATE_OIDC_ALGORITHMS: {exc}") from exc
        ca_bundle = env.optional("JITGATE_OIDC_CA_BUNDLE")
        default = env.seconds("JITGATE_OIDC_JWKS_REFRESH", 300.0, low=10.0, high=86400.0)
        try:
            cache = CachePolicy(
                default=default,
                floor=env.seconds(
                    "JITGATE_OIDC_JWKS_MIN_AGE", min(60.0, default), low=10.0, high=86400.0
                ),
                ceiling=env.seconds(
                    "JITGATE_OIDC_JWKS_MAX_AGE", max(3600.0, default), low=10.0, high=86400.0
                ),
                max_stale=env.seconds(
                    "JITGATE_OIDC_JWKS_MAX_STALE", 7200.0, low=10.0, high=7 * 86400.0
                ),
                unknown_kid_cooldown=env.seconds(
                    "JITGATE_OIDC_JWKS_COOLDOWN", 30.0, low=1.0, high=3600.0
                ),
            )
        except ConfigError as exc:
            raise ConfigError(
                "JITGATE_OIDC_JWKS_MIN_AGE <= JITGATE_OIDC_JWKS_REFRESH"
                " <= JITGATE_OIDC_JWKS_MAX_AGE <= JITGATE_OIDC_JWKS_MAX_STALE must hold"
            ) from exc
        audience = env.string("JITGATE_OIDC_AUDIENCE", DEFAULT_AUDIENCE)
        if audience in issuers:
            raise ConfigError("JITGATE_OIDC_AUDIENCE must name this API, not an issuer")
        return cls(
            issuers=issuers,
            audience=audience,
            groups_claim=env.string("JITGATE_OIDC_GROUPS_CLAIM", "groups"),
            algorithms=algorithms,
            leeway=env.seconds("JITGATE_OIDC_LEEWAY", 30.0, low=0.0, high=MAX_LEEWAY),
            max_token_lifetime=env.seconds(
                "JITGATE_OIDC_MAX_TOKEN_LIFETIME", DEFAULT_MAX_LIFETIME, low=60.0, high=7 * 86400.0
            ),
            ca_bundle=Path(ca_bundle).expanduser() if ca_bundle else None,
            http_timeout=env.seconds("JITGATE_OIDC_HTTP_TIMEOUT", 5.0, low=0.1, high=30.0),
            cache=cache,
        )


def create(env: Env, *, clock: Clock = system_clock) -> tuple[Service, list[JwksCache]]:
    """Return the verifier service wired from env, and the key caches to keep refreshed.

    Every setting is read and checked before anything is built, so a bad one
    fails start-up with its name and nothing half-made. Call it in the event
    loop that will serve.
    """
    oidc = OidcSettings.from_env(env)
    trust_domain = env.string("JITGATE_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN)
    files = env.tls()
    listen = env.address("JITGATE_LISTEN", DEFAULT_LISTEN)
    audit_addr = env.address("JITGATE_AUDIT_ADDR")
    audit_deadline = env.seconds("JITGATE_AUDIT_DEADLINE", 1.0, low=0.05, high=30.0)
    assertion_ttl = env.seconds("JITGATE_ASSERTION_TTL", 30.0, low=1.0, high=assertion.MAX_LIFETIME)
    # Re-read when the file changes: a key renamed over it signs from then on,
    # with no restart (docs/key-rotation.md).
    signer = keyfiles.WatchedFile(
        env.path("JITGATE_VERIFIER_SIGNING_KEY"),
        lambda path: assertion.signer(keys.load_private(path), trust_domain),
        describe=lambda current: f"kid {current.kid}",
    )
    server_credentials = tls.server_credentials(files, require_client_auth=True)
    channel_credentials = tls.channel_credentials(files)

    getter = HttpsGetter(ca_bundle=oidc.ca_bundle, timeout=oidc.http_timeout)
    caches = [JwksCache(issuer=issuer, getter=getter, policy=oidc.cache) for issuer in oidc.issuers]
    tokens = AccessTokenVerifier(
        issuers={cache.issuer: cache for cache in caches},
        audience=oidc.audience,
        groups_claim=oidc.groups_claim,
        algorithms=oidc.algorithms,
        leeway=oidc.leeway,
        max_lifetime=oidc.max_token_lifetime,
    )
    audit = AuditClient(tls.secure_channel(audit_addr, channel_credentials, server_name="audit"))
    servicer = VerifierServicer(
        tokens=tokens,
        signer=signer.get,
        audit=audit,
        trust_domain=trust_domain,
        assertion_ttl=assertion_ttl,
        audit_deadline=audit_deadline,
        clock=clock,
    )
    log.info(
        "OIDC issuers %s, audience %s, groups claim %s, algorithms %s",
        ", ".join(oidc.issuers),
        oidc.audience,
        oidc.groups_claim,
        ",".join(sorted(oidc.algorithms)),
    )
    service = Service(
        name="verifier",
        listen=listen,
        credentials=server_credentials,
        acl=ACL,
        register=lambda server: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, server),
        service_names=[SERVICE_NAME],
        cleanup=[audit.close],
        trust_domain=trust_domain,
    )
    return service, caches


async def serve(env: Env) -> None:
    """Serve until signalled; keys load in the background, so an IdP outage delays nothing."""
    service, caches = create(env)
    # Until the first fetch succeeds, Verify answers UNAVAILABLE (fail closed)
    # while health reports SERVING: the process is fine, its IdP is not.
    refreshers = [
        asyncio.create_task(cache.run(), name=f"jwks-refresh {cache.issuer}") for cache in caches
    ]
    try:
        await service.run_until_signalled()
    finally:
        for refresher in refreshers:
            refresher.cancel()
        for refresher in refreshers:
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
