"""`jitgate dev-idp serve|token`: the development OIDC issuer and a token from it."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from jitgate.client.oauth import client_credentials_token
from jitgate.common import logs
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError, Unauthenticated, Unavailable
from jitgate.devstack import idp, idp_http

EXIT_REFUSED = 1
"""The IdP refused the agent's credentials or scope."""
EXIT_UNAVAILABLE = 3
"""The IdP could not be reached or answered nonsense."""


def register(verbs: Any) -> None:
    """Add the dev-idp verb."""
    cmd = verbs.add_parser("dev-idp", help="development OIDC issuer (stands in for Okta)")
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")

    serve = sub.add_parser("serve", help="serve discovery, JWKS and a token endpoint over HTTPS")
    serve.add_argument("--dir", type=Path, required=True, help="state directory (signing key)")
    serve.add_argument("--listen", default="127.0.0.1:0", help="loopback host:port")
    serve.add_argument("--tls-cert", type=Path, required=True)
    serve.add_argument("--tls-key", type=Path, required=True)
    serve.add_argument("--agents", type=Path, help="agents TOML (default: the bundled example)")
    serve.add_argument(
        "--token-lifetime", type=int, default=idp.DEFAULT_TOKEN_LIFETIME, help="seconds"
    )
    serve.set_defaults(func=run_serve)

    token = sub.add_parser(
        "token",
        help="print an access token for AGENT (client credentials)",
        description=f"Exit codes: 0 token printed, {EXIT_REFUSED} refused by the IdP, "
        f"{EXIT_UNAVAILABLE} IdP unavailable, 2 bad arguments.",
    )
    token.add_argument("agent")
    token.add_argument("--issuer", required=True, help="e.g. https://127.0.0.1:PORT/oauth2/default")
    token.add_argument("--ca", type=Path, help="CA bundle for the IdP (default: system trust)")
    token.add_argument("--agents", type=Path, help="agents TOML (default: the bundled example)")
    token.add_argument("--scope", help="space-separated scopes (default: the agent's own)")
    token.set_defaults(func=run_token)


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {value!r} is not host:port")
    return host, int(port)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    env = Env()
    logs.configure("dev-idp", level=env.string("JITGATE_LOG_LEVEL", "INFO"))
    host, port = _listen(args.listen)
    server = idp_http.IdpServer(
        state_dir=args.dir,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        host=host,
        port=port,
        agents=idp.load_agents(args.agents),
        token_lifetime=args.token_lifetime,
    )
    stopping = threading.Event()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    server.start()
    print(f"dev-idp issuer {server.issuer}", flush=True)
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


def run_token(args: argparse.Namespace) -> int:
    """Print only the access token, so `$(jitgate dev-idp token NAME ...)` works."""
    agents = idp.load_agents(args.agents)
    agent = agents.get(args.agent)
    if agent is None:
        raise ConfigError(f"no agent {args.agent!r}; known: {', '.join(sorted(agents)) or 'none'}")
    token_url = args.issuer.rstrip("/") + "/v1/token"
    try:
        token = client_credentials_token(
            token_url, agent.client_id, agent.secret, ca_file=args.ca, scope=args.scope
        )
    except Unauthenticated as exc:
        print(f"jitgate: the IdP refused {agent.client_id}: {exc.detail}", file=sys.stderr)
        return EXIT_REFUSED
    except Unavailable as exc:
        print(f"jitgate: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(token)
    return 0
