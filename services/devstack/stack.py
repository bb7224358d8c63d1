"""The whole jitgate stack as separate OS processes on loopback, for `up`, `demo` and tests.

By default every process runs beside the launcher on 127.0.0.1. A Placement
moves one elsewhere: another listening address, and an argv prefix that runs
it there (e.g. `ip netns exec <ns>`, to put each zone in a network namespace).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from jitgate.audit import checkpoint
from jitgate.audit.main import default_origin
from jitgate.client import oauth
from jitgate.common import health, keys
from jitgate.common.errors import ConfigError
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN
from jitgate.devstack import children, idp, pki
from jitgate.devstack.postgres_server import DemoPostgres
from jitgate.devstack.redis_server import RedisServer, free_port, provision
from jitgate.devstack.sshd_server import DemoSshd, ensure_key, public_key
from jitgate.policy import keyring

SERVICES = ("audit", "verifier", "policy", "issuer")
"""In start order: each one's dependencies start before it."""
DEFAULT_PORTS: Mapping[str, int] = {
    "issuer": 7443,
    "verifier": 7444,
    "policy": 7445,
    "audit": 7446,
    "idp": 7447,
    "redis": 7448,
    "proxy": 6432,
    "proxy-ssh": 2222,
    "proxy-kube": 6443,
    "postgres": 7449,
    "sshd": 7450,
}
LISTENERS = {"proxy-ssh": "proxy", "proxy-kube": "proxy"}
"""Ports that are another listener of a process: they go where that process goes."""
PROXIED_CONNECTION = "orders-replica"
"""The example policy's connection the proxy serves, from the demo PostgreSQL."""
SSH_CONNECTION = "bastion-eu1"
"""The example policy's SSH connection the demo uses, served by the demo sshd."""
SSH_CONNECTIONS = (SSH_CONNECTION, "bastion-us1")
"""The example policy's SSH hosts; in the demo both are the one demo sshd."""
EXAMPLES = Path(__file__).parent / "examples"
PLACEABLE = ("issuer", "verifier", "policy", "audit", "proxy", "idp", "redis")
"""The processes a Placement can move; Redis only to another address (no prefix)."""


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one process runs: the host others reach it at, the host it binds, its argv prefix."""

    host: str = "127.0.0.1"
    listen: str | None = None
    """The address it binds (e.g. 0.0.0.0, to be reached on several links); None: host."""
    prefix: Sequence[str] = ()
    """Put before its argv, e.g. ("ip", "netns", "exec", "edge").

    The prefix must exec the process rather than fork it: the stack stops the
    process it spawned, and a jitgate child exits when that one's parent does.
    """

    @property
    def bind(self) -> str:
        """The address the process listens on."""
        return self.listen if self.listen is not None else self.host


LOOPBACK = Placement()


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Stack:
    """Redis, PostgreSQL, an sshd, the dev IdP, audit, verifier, policy, issuer, proxy: processes.

    With oidc_issuer set, the verifier trusts that issuer instead (its TLS
    checked against oidc_ca_bundle, or the system's CAs when that is None) and
    the dev IdP is not started: for trying jitgate against another OIDC provider.
    With upstreams set (a connections.toml), the proxy serves those real
    servers and no demo PostgreSQL or sshd is started.
    With placements set, the named processes run where their Placement says;
    the others on loopback beside the launcher, which must reach them all.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        ports: Mapping[str, int] | None = None,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        oidc_issuer: str | None = None,
        oidc_audience: str | None = None,
        oidc_ca_bundle: Path | None = None,
        upstreams: Path | None = None,
        placements: Mapping[str, Placement] | None = None,
    ) -> None:
        self.state = state_dir.resolve()
        self.ports = dict(ports) if ports is not None else {n: free_port() for n in DEFAULT_PORTS}
        self.external_redis = redis_url
        self.extra_env = dict(env or {})
        self.external_oidc_issuer = oidc_issuer
        self.oidc_audience = oidc_audience
        self.oidc_ca_bundle = oidc_ca_bundle
        self.upstreams = upstreams.resolve() if upstreams is not None else None
        self.placements = dict(placements or {})
        unknown = set(self.placements) - set(PLACEABLE)
        if unknown:
            raise ConfigError(f"cannot place {sorted(unknown)}; only {', '.join(PLACEABLE)}")
        if self.placement("redis").prefix:
            raise ConfigError("Redis runs beside the launcher: its placement takes no prefix")
        self.pki = pki.DevPki(self.state / "pki")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.redis: RedisServer | None = None
        self.redis_users: dict[str, str] = {}
        self.postgres: DemoPostgres | None = None
        self.sshd: DemoSshd | None = None

    # Paths and addresses -------------------------------------------------

    @property
    def logs(self) -> Path:
        """Where each process's output goes."""
        return self.state / "logs"

    @property
    def audit_db(self) -> Path:
        """The audit log's SQLite file."""
        return self.state / "audit" / "audit.db"

    @property
    def audit_vkey(self) -> Path:
        """The verifier key of the audit log's checkpoints, for `jitgate audit verify --key`."""
        return self.state / "keys" / "audit.vkey"

    @property
    def policy_keys(self) -> Path:
        """The policy service's grant-signing key directory, for `jitgate keys`."""
        return self.state / "keys" / "policy-grant"

    @property
    def policy_file(self) -> Path:
        """The policy the policy service loads (copied from the example on first start)."""
        return self.state / "policy.toml"

    @property
    def agents_file(self) -> Path:
        """The dev IdP's agents (copied from the example on first start)."""
        return self.state / "agents.toml"

    @property
    def proxy_connections(self) -> Path:
        """The proxy's connections.toml: the one given, else the demo's, written at each start."""
        return self.upstreams or self.state / "proxy" / "connections.toml"

    @property
    def proxy_ssh_client_key(self) -> Path:
        """The key the proxy logs in to SSH hosts with: it never leaves the proxy."""
        return self.state / "ssh" / "proxy_client_ed25519"

    @property
    def proxy_ssh_host_key(self) -> Path:
        """The host key of the proxy's SSH listener, which agents verify."""
        return self.state / "ssh" / "proxy_host_ed25519"

    @property
    def agent_known_hosts(self) -> Path:
        """A known_hosts file naming the proxy's SSH listener, for agents' ssh clients."""
        return self.state / "ssh" / "known_hosts"

    @property
    def postgres_password_file(self) -> Path:
        """The demo database's read-only role password, which only the proxy reads."""
        return self.state / "postgres" / "jitgate_orders_ro.password"

    def placement(self, name: str) -> Placement:
        """Where a process runs: its Placement, else loopback beside the launcher."""
        return self.placements.get(name, LOOPBACK)

    def address(self, name: str) -> str:
        """host:port others (and the launcher) reach a service at."""
        return host_port(self.placement(LISTENERS.get(name, name)).host, self.ports[name])

    def listen_address(self, name: str) -> str:
        """host:port a service listens on."""
        return host_port(self.placement(LISTENERS.get(name, name)).bind, self.ports[name])

    @property
    def dev_idp(self) -> bool:
        """Whether this stack runs the dev IdP (it does unless given another issuer)."""
        return self.external_oidc_issuer is None

    @property
    def oidc_issuer(self) -> str:
        """The issuer the verifier trusts: by default the dev IdP, as an Okta custom server's."""
        if self.external_oidc_issuer is not None:
            return self.external_oidc_issuer
        return f"https://{self.address('idp')}/oauth2/default"

    def redis_url(self, user: str) -> str:
        """The Redis URL a service (or "admin") connects with."""
        if self.external_redis is not None:
            return self.external_redis if user == "admin" else self.redis_users[user]
        assert self.redis is not None, "redis is not started"
        return self.redis.url(user)

    # Preparation ---------------------------------------------------------

    def prepare(self) -> None:
        """Create what is missing: certificates, signing keys, policy, agents, folders."""
        for folder in (self.state, self.logs, self.audit_db.parent, self.state / "keys"):
            folder.mkdir(parents=True, exist_ok=True)
        pki.init(self.pki.root)
        for name in ("verifier", "audit"):
            private = self.state / "keys" / f"{name}-signing.key"
            if not private.exists():
                keys.create_pair(private, self.state / "keys" / f"{name}-signing.pub")
        # Grant keys in a key directory, as `jitgate keys init` makes it: rotatable.
        if not (self.policy_keys / keyring.MANIFEST).exists():
            keyring.init(self.policy_keys)
        # What an auditor is handed to check checkpoints: the C2SP verifier key.
        if not self.audit_vkey.exists():
            public = keys.load_public_keys(self.state / "keys" / "audit-signing.pub")[0]
            self.audit_vkey.write_text(
                checkpoint.verifier_key_string(default_origin(DEFAULT_TRUST_DOMAIN), public) + "\n"
            )
        self._prepare_ssh()
        for target, example in (
            (self.policy_file, EXAMPLES / "policy.toml"),
            (self.agents_file, EXAMPLES / "agents.toml"),
        ):
            if not target.exists():
                shutil.copyfile(example, target)

    def _prepare_ssh(self) -> None:
        """The proxy's two SSH keys (created once) and the agents' known_hosts for its listener."""
        ensure_key(self.proxy_ssh_client_key, "jitgate-proxy")
        host_key = public_key(ensure_key(self.proxy_ssh_host_key, "jitgate-proxy-ssh"))
        host, port = self.placement("proxy").host, self.ports["proxy-ssh"]
        # ssh(1) names a host on another port than 22 as [host]:port in known_hosts.
        name = host if port == 22 else f"[{host}]:{port}"
        self.agent_known_hosts.write_text(f"{name} {host_key}\n")

    def _env(self, name: str) -> dict[str, str]:
        files = self.pki.files(name)
        env = {
            **os.environ,
            "JITGATE_LISTEN": self.listen_address(name),
            "JITGATE_TLS_CA": str(files.ca),
            "JITGATE_TLS_CERT": str(files.cert),
            "JITGATE_TLS_KEY": str(files.key),
            "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR"),
            "PYTHONUNBUFFERED": "1",
        }
        keys_dir = self.state / "keys"
        if name == "audit":
            env["JITGATE_AUDIT_DB"] = str(self.audit_db)
            env["JITGATE_AUDIT_SIGNING_KEY"] = str(keys_dir / "audit-signing.key")
        elif name == "verifier":
            env |= {
                "JITGATE_OIDC_ISSUER": self.oidc_issuer,
                "JITGATE_VERIFIER_SIGNING_KEY": str(keys_dir / "verifier-signing.key"),
                "JITGATE_AUDIT_ADDR": self.address("audit"),
            }
            if self.dev_idp:
                env["JITGATE_OIDC_CA_BUNDLE"] = str(self.pki.ca)
            elif self.oidc_ca_bundle is not None:
                env["JITGATE_OIDC_CA_BUNDLE"] = str(self.oidc_ca_bundle)
            else:
                env.pop("JITGATE_OIDC_CA_BUNDLE", None)  # the system's CAs
            if self.oidc_audience is not None:
                env["JITGATE_OIDC_AUDIENCE"] = self.oidc_audience
        elif name == "policy":
            env |= {
                "JITGATE_POLICY_FILE": str(self.policy_file),
                "JITGATE_POLICY_KEYS_DIR": str(self.policy_keys),
                "JITGATE_VERIFIER_PUBLIC_KEYS": str(keys_dir / "verifier-signing.pub"),
                "JITGATE_AUDIT_ADDR": self.address("audit"),
                "JITGATE_REDIS_URL": self.redis_url("policy"),
            }
            env.pop("JITGATE_POLICY_SIGNING_KEY", None)  # one source of grant keys
        elif name == "issuer":
            env |= {
                "JITGATE_VERIFIER_ADDR": self.address("verifier"),
                "JITGATE_POLICY_ADDR": self.address("policy"),
                "JITGATE_REDIS_URL": self.redis_url("issuer"),
                "JITGATE_PROXY_ENDPOINT": self.address("proxy"),
                "JITGATE_PROXY_SSH_ENDPOINT": self.address("proxy-ssh"),
                "JITGATE_PROXY_KUBE_ENDPOINT": f"https://{self.address('proxy-kube')}",
            }
        elif name == "proxy":
            env |= {
                "JITGATE_POLICY_ADDR": self.address("policy"),
                "JITGATE_REDIS_URL": self.redis_url("proxy"),
                "JITGATE_PROXY_CONNECTIONS": str(self.proxy_connections),
                "JITGATE_PROXY_SSH_LISTEN": self.listen_address("proxy-ssh"),
                "JITGATE_PROXY_SSH_HOST_KEY": str(self.proxy_ssh_host_key),
                "JITGATE_PROXY_KUBE_LISTEN": self.listen_address("proxy-kube"),
            }
            # Agents are served the proxy's workload certificate, from the dev CA.
            env.pop("JITGATE_PROXY_TLS_CERT", None)
            env.pop("JITGATE_PROXY_TLS_KEY", None)
        return env | self.extra_env

    # Processes -----------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        self.processes[name] = children.spawn(
            [*self.placement(name).prefix, sys.executable, "-m", "jitgate", *argv],
            log=self.logs / f"{name}.log",
            env=env,
        )

    def start_service(self, name: str, *, timeout: float = 30.0) -> None:
        """Start one service process and wait until it reports SERVING."""
        self._spawn(name, ["serve", name], self._env(name))
        self.wait_serving(name, timeout=timeout)

    def start(self, *, timeout: float = 30.0) -> None:
        """Start everything in dependency order; on any failure stop what started."""
        try:
            self.prepare()
            if self.external_redis is None:
                where = self.placement("redis")
                self.redis = RedisServer(
                    workdir=self.state / "redis",
                    port=self.ports["redis"],
                    host=where.host,
                    bind=where.bind,
                )
                self.redis.start()
            else:
                self.redis_users = provision(self.external_redis)
            self._start_postgres()
            self._start_sshd()
            if self.dev_idp:
                self._start_dev_idp(timeout=timeout)
            for name in SERVICES:
                self.start_service(name, timeout=timeout)
            self.start_proxy(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def start_proxy(self, *, timeout: float = 30.0) -> None:
        """Start the proxy and wait until it listens."""
        self._spawn("proxy", ["serve", "proxy"], self._env("proxy"))
        self.wait_listening("proxy", timeout=timeout)

    def _start_postgres(self) -> None:
        if self.upstreams is not None:
            return
        self.proxy_connections.parent.mkdir(parents=True, exist_ok=True)
        self.postgres = DemoPostgres(
            password_file=self.postgres_password_file, port=self.ports.get("postgres")
        )
        self.postgres.start()
        self.proxy_connections.write_text(self.postgres.connections_toml(PROXIED_CONNECTION))

    def _start_sshd(self) -> None:
        """Start the demo sshd and add its connection to the demo connections.toml."""
        if self.upstreams is not None:
            return
        self.sshd = DemoSshd(
            workdir=self.state / "sshd",
            authorized_key=self.proxy_ssh_client_key.with_name(
                self.proxy_ssh_client_key.name + ".pub"
            ).read_text(),
            port=self.ports.get("sshd"),
        )
        self.sshd.start()
        with self.proxy_connections.open("a") as out:
            for name in SSH_CONNECTIONS:
                out.write("\n" + self.sshd.connections_toml(name, self.proxy_ssh_client_key))

    def wait_listening(self, name: str, *, timeout: float) -> None:
        """Wait until name accepts TCP connections (the proxy has no health service)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(name)
            try:
                with socket.create_connection(
                    (self.placement(name).host, self.ports[name]), timeout=0.5
                ):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"{name} not listening after {timeout}s:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def _start_dev_idp(self, *, timeout: float) -> None:
        files = self.pki.files("idp")
        self._spawn(
            "idp",
            [
                "dev-idp",
                "serve",
                "--dir",
                str(self.state / "idp"),
                "--listen",
                self.listen_address("idp"),
                "--tls-cert",
                str(files.cert),
                "--tls-key",
                str(files.key),
                "--agents",
                str(self.agents_file),
            ],
            os.environ,
        )
        self.wait_idp(timeout=timeout)

    def wait_idp(self, *, timeout: float) -> None:
        """Wait until the dev IdP serves its discovery document."""
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        url = f"{self.oidc_issuer}/.well-known/openid-configuration"
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("idp")
            try:
                with urllib.request.urlopen(url, context=context, timeout=1) as reply:  # noqa: S310  # https only
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"dev IdP not ready after {timeout}s; see {self.logs / 'idp.log'}"
                )
            time.sleep(0.05)

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            raise ConfigError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def health(self, name: str, *, timeout: float = 1.0) -> str:
        """The service's grpc.health.v1 status, as the operator identity sees it."""
        try:
            return health.serving_status(
                self.address(name), self.pki.files("operator"), name, timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"

    def wait_serving(self, name: str, *, timeout: float = 30.0) -> None:
        """Wait until name reports SERVING; fail fast if its process died."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(name)
            if self.health(name, timeout=0.5) == "SERVING":
                return
            if time.monotonic() > deadline:
                raise ConfigError(f"{name} not SERVING after {timeout}s:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines a process wrote."""
        path = self.logs / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop_service(self, name: str, *, timeout: float = 10.0) -> None:
        """SIGTERM one process and wait; SIGKILL it if it will not stop."""
        process = self.processes.pop(name, None)
        if process is not None:
            children.stop(process, timeout=timeout)

    def stop(self) -> None:
        """Stop every process, newest first, then PostgreSQL, sshd and Redis."""
        for name in reversed(list(self.processes)):
            self.stop_service(name)
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # For clients ---------------------------------------------------------

    def token(self, agent: str) -> str:
        """An access token for a dev agent, fetched from the dev IdP's token endpoint."""
        if not self.dev_idp:
            raise ConfigError("this stack trusts another OIDC issuer; get tokens from it")
        spec = idp.load_agents(self.agents_file)[agent]
        return oauth.client_credentials_token(
            f"{self.oidc_issuer}/v1/token", spec.client_id, spec.secret, ca_file=self.pki.ca
        )

    def client_env(self) -> dict[str, str]:
        """Environment for `jitgate grant ...` against this stack."""
        return {"JITGATE_ISSUER": self.address("issuer"), "JITGATE_CA": str(self.pki.ca)}
