"""`jitgate up`: run the whole stack in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from jitgate.devstack.stack import DEFAULT_PORTS, Stack


def register(verbs: Any) -> None:
    """Add the up verb."""
    cmd = verbs.add_parser(
        "up", help="run redis, postgres, the dev IdP, every service and the proxy locally"
    )
    cmd.add_argument("--state-dir", type=Path, default=Path(".jitgate"))
    cmd.add_argument(
        "--random-ports", action="store_true", help="pick free ports instead of 7443-7449 and 6432"
    )
    cmd.add_argument(
        "--connections",
        type=Path,
        metavar="TOML",
        help="the proxy's connections.toml, for real servers; without it a demo PostgreSQL starts",
    )
    cmd.set_defaults(func=run)


def _usage(stack: Stack) -> str:
    state = stack.state
    token_cmd = (
        f"jitgate dev-idp token deploy-bot --issuer {stack.oidc_issuer}"
        f" --ca {stack.pki.ca} --agents {stack.agents_file}"
    )
    return "\n".join(
        [
            f"jitgate is up; state in {state}, logs in {stack.logs}",
            f"  issuer    {stack.address('issuer')}   agents: TLS, CA {stack.pki.ca}",
            f"  verifier  {stack.address('verifier')}   mTLS",
            f"  policy    {stack.address('policy')}   mTLS, policy {stack.policy_file}",
            f"  audit     {stack.address('audit')}   mTLS, log {stack.audit_db}",
            f"  proxy     {stack.address('proxy')}   PostgreSQL over TLS, grant as password;"
            f" connections {stack.proxy_connections}",
            f"            {stack.address('proxy-ssh')}   SSH, user = connection,"
            f" grant as password; host key in {stack.agent_known_hosts}",
            f"            https://{stack.address('proxy-kube')}   Kubernetes API, grant as"
            " bearer token (jitgate grant kubeconfig), where connections.toml has one",
            f"  dev IdP   {stack.oidc_issuer}",
            "try, in another shell:",
            f"  export JITGATE_ISSUER={stack.address('issuer')} JITGATE_CA={stack.pki.ca}",
            f"  export JITGATE_TOKEN=$({token_cmd})",
            '  jitgate grant request orders-replica --ttl 120 --reason "look at slow queries"',
            f'  psql "host=127.0.0.1 port={stack.ports["proxy"]} sslmode=require'
            ' dbname=orders-replica user=deploy-bot password=<the grant token>"',
            *(_ssh_usage(stack) if stack.upstreams is None else []),
            "Ctrl-C stops everything.",
        ]
    )


def _ssh_usage(stack: Stack) -> list[str]:
    """How to reach the demo sshd through the proxy, as the agent in group sre."""
    return [
        "or, as ops-bot (group sre): its token as above with ops-bot for deploy-bot, then",
        '  jitgate grant request bastion-eu1 --ttl 120 --reason "check the kernel"',
        f"  ssh -p {stack.ports['proxy-ssh']} -o UserKnownHostsFile={stack.agent_known_hosts}"
        " bastion-eu1@127.0.0.1 uptime   # the password: the grant token",
    ]


def run(args: argparse.Namespace) -> int:
    """Start the stack, print how to use it, stop it on a signal or when a part dies."""
    ports = None if args.random_ports else DEFAULT_PORTS
    stack = Stack(
        args.state_dir,
        ports=ports,
        redis_url=os.environ.get("REDIS_URL"),
        upstreams=args.connections,
    )
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stack.start()
    try:
        print(_usage(stack), flush=True)
        while not stopping.wait(0.5):
            for name, process in list(stack.processes.items()):
                if process.poll() is not None:
                    print(f"{name} exited with {process.returncode}:", file=sys.stderr)
                    print(stack.log_tail(name), file=sys.stderr)
                    return 1
    finally:
        stack.stop()
        print("stopped.", flush=True)
    return 0
