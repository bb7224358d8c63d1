"""Write the files compose.yaml mounts, one folder per service, for a development stack.

    .venv/bin/python deploy/compose/init_secrets.py [--out deploy/compose/secrets]

The same as doing it by hand with `jitgate pki init`, `jitgate keys init` and
`openssl genpkey -algorithm ed25519`, then copying each service's files into
its own folder. Files that exist are kept, so it is safe to run again; delete
a file to have it made anew. Production certificates and keys come from the
deployment's own CA and key management, laid out the same way.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

from jitgate.audit import checkpoint
from jitgate.audit.main import default_origin
from jitgate.common import keys
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN
from jitgate.devstack import pki
from jitgate.devstack.redis_server import ACL_RULES, username
from jitgate.devstack.sshd_server import ensure_key
from jitgate.policy import keyring

SERVICES = ("audit", "verifier", "policy", "issuer", "proxy")
REDIS_CLIENTS = ("issuer", "policy", "proxy")
"""The services that talk to Redis, each as its own ACL user (DESIGN: trust zones)."""
REDIS_ADDRESS = "redis:6379"
UPSTREAM = "orders-replica"
"""The example upstream in the proxy's connections.toml; replace it with real ones."""

CONNECTIONS_TOML = f"""\
# The proxy's upstream databases (docs/proxy.md): replace this example with
# yours. Their containers join the compose network `upstreams`, which only the
# proxy shares; each password is a file mounted into the proxy alone.
[connections.{UPSTREAM}]
host = "{UPSTREAM}"
port = 5432
database = "orders"
user = "jitgate_orders_ro"
password_file = "/run/secrets/{UPSTREAM}.password"
tls = "require"
read_only = true

# An SSH host (docs/ssh.md): the proxy logs in with its own key, mounted into
# the proxy alone, and accepts only the pinned host key. Agents connect to
# port 2222 with the connection's name as the user and the grant as password.
# [connections.bastion-eu1]
# kind = "ssh"
# host = "bastion.internal"
# user = "jitgate"
# key_file = "/run/secrets/bastion-eu1.key"
# host_key = "ssh-ed25519 AAAA... (the host's /etc/ssh/ssh_host_ed25519_key.pub)"

# A Kubernetes namespace (docs/kubernetes.md): requests for this namespace
# only are forwarded on port 6443 with this ServiceAccount's token.
# [connections.payments-staging]
# kind = "kubernetes"
# server = "https://kubernetes.staging.internal:6443"
# namespace = "payments"
# token_file = "/run/secrets/payments-staging.token"
# ca_file = "/run/secrets/staging-ca.crt"
"""


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    """Create path with text unless it exists; never widen who can read a secret."""
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _copy(source: Path, target: Path) -> None:
    if not target.exists():
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o600)


def _tls(out: Path, dev: pki.DevPki) -> None:
    # Names as cert-manager writes them, so the k8s Secrets can be either.
    for service in SERVICES:
        files = dev.files(service)
        _copy(files.ca, out / service / "ca.crt")
        _copy(files.cert, out / service / "tls.crt")
        _copy(files.key, out / service / "tls.key")


def _signing_keys(out: Path, trust_domain: str) -> None:
    verifier_key = out / "verifier" / "signing.key"
    if not verifier_key.exists():
        verifier_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.create_pair(verifier_key, out / "verifier" / "signing.pub")
    # Policy checks identity assertions with the verifier's public key only.
    _copy(out / "verifier" / "signing.pub", out / "policy" / "verifier-signing.pub")
    audit_key = out / "audit" / "signing.key"
    if not audit_key.exists():
        keys.create_pair(audit_key, out / "audit" / "signing.pub")
    # What an auditor is handed to check checkpoints: never mounted anywhere.
    public = keys.load_public_keys(out / "audit" / "signing.pub")[0]
    vkey = checkpoint.verifier_key_string(default_origin(trust_domain), public)
    _write(out / "auditor" / "audit.vkey", vkey + "\n", 0o644)
    grant_keys = out / "policy" / "grant-keys"
    if not (grant_keys / keyring.MANIFEST).exists():
        keyring.init(grant_keys)


def _redis(out: Path) -> None:
    acl = out / "redis" / "users.acl"
    if acl.exists():
        return  # the passwords in the services' files match this file's
    passwords = {service: secrets.token_urlsafe(24) for service in REDIS_CLIENTS}
    for service, password in passwords.items():
        url = f"redis://{username(service)}:{password}@{REDIS_ADDRESS}/0"
        (out / service / "redis.env").unlink(missing_ok=True)
        _write(out / service / "redis.env", f"JITGATE_REDIS_URL={url}\n")
    # No admin user and the default user off: nothing can change the ACL.
    lines = ["user default off resetchannels -@all"]
    lines += [f"user {username(s)} on >{passwords[s]} {ACL_RULES[s]}" for s in REDIS_CLIENTS]
    _write(acl, "\n".join(lines) + "\n")


def _proxy(out: Path) -> None:
    _write(out / "proxy" / "connections.toml", CONNECTIONS_TOML)
    # A placeholder: put the upstream role's real password here.
    _write(out / "proxy" / f"{UPSTREAM}.password", secrets.token_urlsafe(24) + "\n")
    # The proxy's own SSH host key, which agents pin (docs/ssh.md); kept once made.
    ensure_key(out / "proxy" / "ssh_host_ed25519_key", "jitgate-proxy")


def init(out: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
    """Create every file compose.yaml mounts under out that is missing."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The CA's key stays in pki/, which no container mounts.
    dev = pki.init(out / "pki", trust_domain=trust_domain)
    _tls(out, dev)
    _signing_keys(out, trust_domain)
    _redis(out)
    _proxy(out)


def main(argv: list[str]) -> int:
    """Parse arguments and write the files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "secrets")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    args = parser.parse_args(argv)
    init(args.out, args.trust_domain)
    print(f"wrote {args.out}; keep it out of version control (.gitignore there does)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
