"""init_secrets.py writes every file compose.yaml mounts, each service's in its own folder."""

from __future__ import annotations

import stat
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509

from jitgate.common import keys
from jitgate.common.identity import spiffe_id
from jitgate.devstack.redis_server import ACL_RULES, username
from jitgate.policy import keyring
from jitgate.proxy import config
from tests.deploy import zones

init_secrets = zones.load_script(zones.COMPOSE_DIR / "init_secrets.py")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A secrets folder as init_secrets.py writes it."""
    folder = tmp_path_factory.mktemp("compose") / "secrets"
    init_secrets.init(folder)
    return folder


def mounted_paths() -> list[str]:
    """Every host path under secrets/ that compose.yaml mounts or reads."""
    compose = zones.load_compose()
    paths = [entry["file"] for entry in compose["secrets"].values()]
    for service in compose["services"].values():
        paths += service.get("env_file") or []
        paths += [v["source"] for v in service.get("volumes") or [] if isinstance(v, dict)]
    return [path.removeprefix("./") for path in paths if "secrets/" in path]


def test_every_mounted_file_is_written(out: Path) -> None:
    paths = mounted_paths()
    assert len(paths) > 20
    for path in paths:
        assert (out.parent / path).exists(), path


def test_secrets_are_readable_by_their_owner_only(out: Path) -> None:
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".key", ".env", ".acl", ".password"):
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_each_service_has_its_own_certificate(out: Path) -> None:
    for name in zones.SERVICES:
        cert = x509.load_pem_x509_certificate((out / name / "tls.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id(name)]
        assert name in san.get_values_for_type(x509.DNSName)


def test_redis_users_match_the_services_urls(out: Path) -> None:
    acl = (out / "redis" / "users.acl").read_text().splitlines()
    assert acl[0] == "user default off resetchannels -@all"
    for service, line in zip(sorted(zones.REDIS_CLIENTS), sorted(acl[1:]), strict=True):
        _, user, on, password, rules = line.split(" ", 4)
        assert (user, on, rules) == (username(service), "on", ACL_RULES[service])
        url = (out / service / "redis.env").read_text().strip()
        assert url == f"JITGATE_REDIS_URL=redis://{user}:{password[1:]}@redis:6379/0"


def test_signing_keys(out: Path) -> None:
    verifier = keys.load_private(out / "verifier" / "signing.key")
    published = keys.load_public_keys(out / "policy" / "verifier-signing.pub")
    assert [keys.key_id(k) for k in published] == [keys.key_id(verifier.public_key())]
    assert len(keyring.read_manifest(out / "policy" / "grant-keys")) == 1
    assert (out / "auditor" / "audit.vkey").read_text().startswith("jitgate/audit+")


def test_the_proxys_connections_load(out: Path) -> None:
    text = (out / "proxy" / "connections.toml").read_text()
    local = text.replace("/run/secrets/", f"{out / 'proxy'}/")
    upstreams = config.parse(local, base=out / "proxy")
    assert list(upstreams) == ["orders-replica"]


def test_running_again_keeps_every_file(out: Path) -> None:
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    init_secrets.init(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_proxys_ssh_host_key_is_private_and_loads(out: Path) -> None:
    key = out / "proxy" / "ssh_host_ed25519_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert asyncssh.read_private_key(str(key)).get_algorithm() == "ssh-ed25519"
