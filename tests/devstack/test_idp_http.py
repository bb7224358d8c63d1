"""The dev OIDC issuer over real HTTPS: discovery, JWKS, client credentials, Okta-shaped tokens."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import stat
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest

from jitgate.client.oauth import client_credentials_token
from jitgate.common.errors import ConfigError, Unauthenticated, Unavailable
from jitgate.devstack import idp, idp_http, pki

NOW = 1_800_000_000.0
SECRET = "deploy-bot-dev-secret-not-for-production"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idp-state")


@pytest.fixture
def server(dev_pki: pki.DevPki, state: Path) -> Iterator[idp_http.IdpServer]:
    files = dev_pki.files("idp")
    with idp_http.IdpServer(
        state_dir=state,
        tls_cert=files.cert,
        tls_key=files.key,
        token_lifetime=600,
        clock=lambda: NOW,
    ) as running:
        yield running


class Http:
    """Raw HTTPS requests to the dev IdP, trusting the dev CA only."""

    def __init__(self, server: idp_http.IdpServer, ca: Path) -> None:
        self.base = urllib.parse.urlsplit(server.issuer)
        self.context = ssl.create_default_context(cafile=str(ca))

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        connection = http.client.HTTPSConnection(
            self.base.hostname or "", self.base.port, context=self.context, timeout=5
        )
        try:
            connection.request(
                method, self.base.path + path, body=body, headers=dict(headers or {})
            )
            response = connection.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), json.loads(data) if data else None
        finally:
            connection.close()

    def token(
        self, form: Mapping[str, str], *, basic: tuple[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if basic is not None:
            pair = f"{urllib.parse.quote_plus(basic[0])}:{urllib.parse.quote_plus(basic[1])}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        body = urllib.parse.urlencode(form).encode()
        return self.request("POST", "/v1/token", body=body, headers=headers)


@pytest.fixture
def web(server: idp_http.IdpServer, dev_pki: pki.DevPki) -> Http:
    return Http(server, dev_pki.ca)


# Discovery and keys.


def test_the_issuer_is_okta_shaped(server: idp_http.IdpServer) -> None:
    assert server.issuer.startswith("https://127.0.0.1:")
    assert server.issuer.endswith("/oauth2/default")


def test_the_discovery_document(server: idp_http.IdpServer, web: Http) -> None:
    status, headers, document = web.request("GET", "/.well-known/openid-configuration")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert document["issuer"] == server.issuer
    assert document["jwks_uri"] == f"{server.issuer}/v1/keys"
    assert document["token_endpoint"] == f"{server.issuer}/v1/token"
    assert document["grant_types_supported"] == ["client_credentials"]
    assert document["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
    ]
    assert document["id_token_signing_alg_values_supported"] == ["RS256"]


def test_the_jwks_has_one_public_rsa_2048_key(server: idp_http.IdpServer, web: Http) -> None:
    status, _, document = web.request("GET", "/v1/keys")
    assert status == 200
    [key] = document["keys"]
    assert set(key) == {"kty", "kid", "alg", "use", "n", "e"}
    assert (key["kty"], key["alg"], key["use"], key["kid"]) == (
        "RSA",
        "RS256",
        "sig",
        server.idp.kid,
    )
    public = jwt.algorithms.RSAAlgorithm.from_jwk(key)
    assert public.key_size == 2048  # type: ignore[union-attr]


def test_the_signing_key_and_its_kid_survive_a_restart(
    dev_pki: pki.DevPki, server: idp_http.IdpServer, state: Path
) -> None:
    files = dev_pki.files("idp")
    with idp_http.IdpServer(state_dir=state, tls_cert=files.cert, tls_key=files.key) as again:
        assert again.idp.kid == server.idp.kid
    assert stat.S_IMODE((state / idp.KEY_FILE).stat().st_mode) == 0o600


def test_the_kid_is_the_rfc_7638_thumbprint(server: idp_http.IdpServer) -> None:
    assert server.idp.kid == idp.rsa_key_id(server.idp.key.public_key())


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/token", 405),
        ("POST", "/v1/keys", 405),
        ("POST", "/.well-known/openid-configuration", 405),
        ("GET", "/v1/authorize", 404),
        ("GET", "/../oauth2/default/v1/keys/..", 404),
        ("DELETE", "/v1/keys", 405),
        ("PUT", "/nowhere", 404),
    ],
)
def test_anything_else_is_not_found_or_not_allowed(
    web: Http, method: str, path: str, status: int
) -> None:
    got, headers, _ = web.request(method, path, body=b"" if method == "POST" else None)
    assert got == status
    if status == 405:
        assert headers["Allow"] in ("GET", "POST")


def test_a_plain_http_request_does_not_stop_the_server(
    server: idp_http.IdpServer, web: Http
) -> None:
    plain = http.client.HTTPConnection(web.base.hostname or "", web.base.port, timeout=5)
    plain.request("GET", "/oauth2/default/v1/keys")
    with pytest.raises((OSError, http.client.HTTPException)):
        plain.getresponse().read()
    plain.close()
    assert web.request("GET", "/v1/keys")[0] == 200


# The token endpoint.


def _claims(server: idp_http.IdpServer, token: str) -> dict[str, Any]:
    key = jwt.algorithms.RSAAlgorithm.from_jwk(server.idp.jwks()["keys"][0])
    claims: dict[str, Any] = jwt.decode(
        token,
        key,  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience="api://default",
        issuer=server.issuer,
        options={"verify_exp": False, "verify_iat": False},
    )
    return claims


def test_client_credentials_with_basic_auth(server: idp_http.IdpServer, web: Http) -> None:
    status, headers, body = web.token(
        {"grant_type": "client_credentials"}, basic=("deploy-bot", SECRET)
    )
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert body["scope"] == "jitgate"
    header = jwt.get_unverified_header(body["access_token"])
    assert header == {"alg": "RS256", "kid": server.idp.kid}
    claims = _claims(server, body["access_token"])
    assert claims["ver"] == 1
    assert claims["jti"].startswith("AT.")
    assert claims["iss"] == server.issuer
    assert claims["aud"] == "api://default"
    assert claims["iat"] == int(NOW)
    assert claims["exp"] == int(NOW) + 600
    assert claims["cid"] == "deploy-bot"
    assert claims["uid"].startswith("00u")
    assert len(claims["uid"]) == 20
    assert claims["scp"] == ["jitgate"]
    assert claims["sub"] == "deploy-bot"
    assert claims["groups"] == ["platform"]


def test_client_credentials_with_post_auth(server: idp_http.IdpServer, web: Http) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": "intern-bot",
        "client_secret": "intern-bot-dev-secret-not-for-production",
        "scope": "jitgate",
    }
    status, _, body = web.token(form)
    assert status == 200
    claims = _claims(server, body["access_token"])
    assert (claims["sub"], claims["groups"]) == ("intern-bot", ["interns"])


def test_each_token_has_its_own_jti(server: idp_http.IdpServer, web: Http) -> None:
    tokens = [
        web.token({"grant_type": "client_credentials"}, basic=("deploy-bot", SECRET))[2]
        for _ in range(2)
    ]
    jtis = {_claims(server, t["access_token"])["jti"] for t in tokens}
    assert len(jtis) == 2


@pytest.mark.parametrize(
    "basic", [("deploy-bot", "wrong"), ("deploy-bot", ""), ("nobody", SECRET), ("", "")]
)
def test_wrong_client_credentials_are_invalid_client(web: Http, basic: tuple[str, str]) -> None:
    status, headers, body = web.token({"grant_type": "client_credentials"}, basic=basic)
    assert status == 401
    assert body["error"] == "invalid_client"
    assert headers["WWW-Authenticate"].startswith("Basic ")


def test_no_client_authentication_is_invalid_client(web: Http) -> None:
    status, _, body = web.token({"grant_type": "client_credentials"})
    assert (status, body["error"]) == (401, "invalid_client")


def test_two_client_authentication_methods_are_refused(web: Http) -> None:
    form = {"grant_type": "client_credentials", "client_id": "deploy-bot", "client_secret": SECRET}
    status, _, body = web.token(form, basic=("deploy-bot", SECRET))
    assert (status, body["error"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        (
            {"grant_type": "password", "username": "a", "password": "b"},
            400,
            "unsupported_grant_type",
        ),
        ({"grant_type": "authorization_code", "code": "x"}, 400, "unsupported_grant_type"),
        ({}, 400, "invalid_request"),
        ({"grant_type": "client_credentials", "scope": "admin"}, 400, "invalid_scope"),
        ({"grant_type": "client_credentials", "scope": "jitgate admin"}, 400, "invalid_scope"),
    ],
)
def test_requests_the_server_will_not_grant(
    web: Http, form: dict[str, str], status: int, error: str
) -> None:
    got, _, body = web.token(form, basic=("deploy-bot", SECRET))
    assert (got, body["error"]) == (status, error)
    assert body["error_description"]


def test_a_repeated_parameter_is_invalid_request(web: Http) -> None:
    body = b"grant_type=client_credentials&grant_type=password"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": "Basic " + base64.b64encode(f"deploy-bot:{SECRET}".encode()).decode(),
    }
    status, _, answer = web.request("POST", "/v1/token", body=body, headers=headers)
    assert (status, answer["error"]) == (400, "invalid_request")


def test_a_json_body_is_invalid_request(web: Http) -> None:
    headers = {"Content-Type": "application/json"}
    status, _, body = web.request("POST", "/v1/token", body=b"{}", headers=headers)
    assert (status, body["error"]) == (400, "invalid_request")


def test_the_request_body_is_bounded(web: Http) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    big = b"scope=" + b"a" * (idp.MAX_BODY_BYTES + 1)
    status, _, body = web.request("POST", "/v1/token", body=big, headers=headers)
    assert (status, body["error"]) == (413, "invalid_request")


def test_the_server_counts_requests_by_route(server: idp_http.IdpServer, web: Http) -> None:
    web.request("GET", "/v1/keys")
    web.request("GET", "/nowhere")
    assert server.requests["keys"] == 1
    assert server.requests["unknown"] == 1


# The client function, as an agent SDK uses it.


def test_client_credentials_token_gets_a_token(
    server: idp_http.IdpServer, dev_pki: pki.DevPki
) -> None:
    token = client_credentials_token(
        f"{server.issuer}/v1/token", "deploy-bot", SECRET, ca_file=dev_pki.ca, scope="jitgate"
    )
    assert _claims(server, token)["sub"] == "deploy-bot"


def test_client_credentials_token_reports_a_refusal(
    server: idp_http.IdpServer, dev_pki: pki.DevPki
) -> None:
    with pytest.raises(Unauthenticated, match="invalid_client"):
        client_credentials_token(
            f"{server.issuer}/v1/token", "deploy-bot", "wrong", ca_file=dev_pki.ca
        )


def test_client_credentials_token_trusts_only_its_ca(server: idp_http.IdpServer) -> None:
    with pytest.raises(Unavailable):
        client_credentials_token(f"{server.issuer}/v1/token", "deploy-bot", SECRET, ca_file=None)


def test_client_credentials_token_refuses_plain_http(server: idp_http.IdpServer) -> None:
    url = server.issuer.replace("https://", "http://") + "/v1/token"
    with pytest.raises(ConfigError, match="https"):
        client_credentials_token(url, "deploy-bot", SECRET, ca_file=None)
    assert server.requests["token"] == 0


def test_client_credentials_token_reports_an_unreachable_server(dev_pki: pki.DevPki) -> None:
    with pytest.raises(Unavailable):
        client_credentials_token(
            "https://127.0.0.1:1/oauth2/default/v1/token", "a", "b", ca_file=dev_pki.ca, timeout=1
        )


def test_secrets_with_reserved_characters_survive_basic_auth(
    dev_pki: pki.DevPki, state: Path
) -> None:
    agents = idp.parse_agents({"agents": {"odd": {"secret": "a:b%c+d e"}}})
    files = dev_pki.files("idp")
    with idp_http.IdpServer(
        state_dir=state, tls_cert=files.cert, tls_key=files.key, agents=agents
    ) as server:
        token = client_credentials_token(
            f"{server.issuer}/v1/token", "odd", "a:b%c+d e", ca_file=dev_pki.ca
        )
        assert jwt.decode(token, options={"verify_signature": False})["cid"] == "odd"


# Agents, minting and configuration.


def test_the_example_agents() -> None:
    agents = idp.load_agents()
    assert agents["deploy-bot"].groups == ("platform",)
    assert agents["intern-bot"].groups == ("interns",)
    assert agents["deploy-bot"].uid == idp.okta_uid("deploy-bot")
    assert "secret" not in repr(agents["deploy-bot"]).replace("secret=", "")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"agents": {"a": {"secret": "s", "grups": []}}}, "agents.a.grups is not a known key"),
        ({"agent": {}}, "unknown key 'agent'"),
        ({"agents": {"a": {}}}, "agents.a.secret is required"),
        ({"agents": {"a": {"secret": "s", "groups": "platform"}}}, "agents.a.groups must be"),
        ({"agents": {"a": {"secret": ""}}}, "agents.a.secret must be"),
        ({"agents": {"a b": {"secret": "s"}}}, "agent names"),
        ({"agents": {"a": "s"}}, "agents.a must be a table"),
    ],
)
def test_agent_files_are_parsed_strictly(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        idp.parse_agents(document)


def test_a_bad_agents_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text('[agents.x]\nsecret = "s"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match=r"agents\.toml: agents\.x\.colour"):
        idp.load_agents(path)
    path.write_text("[agents\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        idp.load_agents(path)


def test_mint_signs_what_a_test_asks(server: idp_http.IdpServer) -> None:
    token = server.idp.mint({"sub": "x", "aud": "api://elsewhere"}, headers={"typ": "JWT"})
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": server.idp.kid, "typ": "JWT"}
    assert _claims_unverified(token)["aud"] == "api://elsewhere"
    assert idp.mint({"sub": "x"}, key=None, alg="none").endswith(".")
    assert len(idp.mint({"sub": "x"}, key=b"k", alg="HS256").split(".")[2]) == 43
    with pytest.raises(ValueError, match="cannot sign"):
        idp.mint({"sub": "x"}, key=None, alg="RS256")


def _claims_unverified(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def test_the_idp_listens_on_loopback_only(dev_pki: pki.DevPki, state: Path) -> None:
    files = dev_pki.files("idp")
    with pytest.raises(ConfigError, match="loopback"):
        idp_http.IdpServer(state_dir=state, tls_cert=files.cert, tls_key=files.key, host="0.0.0.0")  # noqa: S104  # the point


def test_a_missing_certificate_is_a_config_error(state: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TLS certificate"):
        idp_http.IdpServer(
            state_dir=state, tls_cert=tmp_path / "no.pem", tls_key=tmp_path / "no.key"
        )
