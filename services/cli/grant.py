"""`jitgate grant`: the agent's side of the Issuer API; the operator's revocations and listing.

Exit codes tell outcomes apart for scripts: 0 done, 3 denied, 4 token rejected,
5 jitgate unavailable, 6 no such grant, 2 a malformed request or a usage error.
`request` keeps a kubernetes grant, token included, in the private local
store (jitgate.client.store) until it expires; `kubeconfig` reads it from
there. Grants of other kinds are not stored: nothing later needs their token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from jitgate.client import (
    Denied,
    Grant,
    GrantError,
    InvalidRequest,
    IssuerClient,
    NotFound,
    Unauthenticated,
    kubeconfig,
)
from jitgate.client.store import GrantStore
from jitgate.common import tls
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError
from jitgate.common.grants import MAX_LISTED
from jitgate.v1 import policy_pb2, policy_pb2_grpc

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_UNAUTHENTICATED = 4
EXIT_UNAVAILABLE = 5
EXIT_NOT_FOUND = 6


def register(verbs: Any) -> None:
    """Add the grant verb and its actions."""
    cmd = verbs.add_parser("grant", help="request, list, inspect and revoke grants")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--issuer", default=os.environ.get("JITGATE_ISSUER"), help="host:port ($JITGATE_ISSUER)"
    )
    common.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("JITGATE_CA"),
        help="CA bundle for the issuer's certificate ($JITGATE_CA; default: system trust)",
    )
    common.add_argument("--token-file", type=Path, help="file holding the access token")
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--timeout", type=float, default=5.0)
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    request = sub.add_parser(
        "request",
        parents=[common],
        help="ask for a grant to CONNECTION",
        description="Ask for a grant to CONNECTION and print it, token included. A kubernetes"
        " grant is also kept, token included, in $JITGATE_HOME/grants (mode 0600) until it"
        " expires, for `jitgate grant kubeconfig`; grants of other kinds are not stored.",
    )
    request.add_argument("connection")
    request.add_argument("--ttl", type=int, default=0, help="seconds; 0 = the binding's maximum")
    request.add_argument("--reason", default="")
    request.set_defaults(func=run)
    get = sub.add_parser("get", parents=[common], help="show one of your live grants")
    get.add_argument("grant_id")
    get.set_defaults(func=run)
    listing = sub.add_parser("list", parents=[common], help="your live grants")
    listing.set_defaults(func=run)
    revoke = sub.add_parser(
        "revoke",
        parents=[common],
        help="revoke your grant; the operator: any grant, or all of a subject or connection",
        description="An agent revokes its own grant through the issuer with its token. The"
        " operator (JITGATE_TLS_* naming the operator certificate) revokes through the"
        " policy service: one grant with --policy, or every live grant of --subject or"
        " --connection.",
    )
    revoke.add_argument("grant_id", nargs="?")
    target = revoke.add_mutually_exclusive_group()
    target.add_argument("--subject", help="operator: every live grant of this subject")
    target.add_argument("--connection", help="operator: every live grant of this connection")
    revoke.add_argument(
        "--policy",
        default=os.environ.get("JITGATE_POLICY_ADDR"),
        help="operator: the policy service, host:port ($JITGATE_POLICY_ADDR)",
    )
    revoke.add_argument("--reason", default="")
    revoke.set_defaults(func=run)
    live = sub.add_parser(
        "live",
        help="the operator: the live grants of every connection, a subject or a connection",
        description="The operator (JITGATE_TLS_* naming the operator certificate) lists live"
        " grants through the policy service, soonest expiry first: of --subject, of"
        " --connection (any name, also one the policy no longer names), or of every"
        " connection the policy names. Tokens are never shown.",
    )
    scope = live.add_mutually_exclusive_group()
    scope.add_argument("--subject", help="only this subject's grants")
    scope.add_argument("--connection", help="only this connection's grants")
    live.add_argument(
        "--limit", type=int, default=0, help=f"at most this many (default {MAX_LISTED})"
    )
    live.add_argument(
        "--policy",
        default=os.environ.get("JITGATE_POLICY_ADDR"),
        help="the policy service, host:port ($JITGATE_POLICY_ADDR)",
    )
    live.add_argument("--json", action="store_true", help="print JSON")
    live.add_argument("--timeout", type=float, default=5.0)
    live.set_defaults(func=list_live)
    kube = sub.add_parser(
        "kubeconfig",
        help="write a kubeconfig for one of your kubernetes grants",
        description="Write a kubeconfig whose API server is the jitgate proxy and whose bearer"
        " token is the grant (requested with `jitgate grant request` on this machine, which"
        " keeps it in $JITGATE_HOME/grants until it expires). It holds no cluster credential.",
    )
    kube.add_argument("grant_id")
    kube.add_argument("-o", "--output", type=Path, help="file to write (mode 0600); default stdout")
    kube.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("JITGATE_CA"),
        help="CA bundle for the proxy's certificate ($JITGATE_CA; default: system trust)",
    )
    kube.add_argument(
        "-n",
        "--namespace",
        help="the context's namespace (default: the grant's own)",
    )
    kube.set_defaults(func=write_kubeconfig)


def _token(args: argparse.Namespace) -> str:
    """The access token: --token-file, else $JITGATE_TOKEN (never a flag: argv is public)."""
    if args.token_file is not None:
        try:
            token: str = args.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {args.token_file}: {exc.strerror}") from exc
    else:
        token = os.environ.get("JITGATE_TOKEN", "").strip()
    if not token:
        raise ConfigError("no access token: set JITGATE_TOKEN or pass --token-file")
    return token


def _show(grant: Grant, as_json: bool) -> None:
    if as_json:
        print(json.dumps(grant.as_dict()))
        return
    print(f"grant {grant.grant_id}")
    print(f"  connection  {grant.connection} ({grant.connection_kind})")
    if grant.namespace:
        print(f"  namespace   {grant.namespace}")
    print(f"  subject     {grant.subject}")
    print(f"  expires     {grant.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    print(f"  proxy       {grant.proxy_endpoint}")
    if grant.token:
        print(f"  token       {grant.token}")


def _fail(error: GrantError, as_json: bool) -> int:
    if isinstance(error, Denied):
        code, kind = EXIT_DENIED, "denied"
    elif isinstance(error, Unauthenticated):
        code, kind = EXIT_UNAUTHENTICATED, "unauthenticated"
    elif isinstance(error, NotFound):
        code, kind = EXIT_NOT_FOUND, "not_found"
    elif isinstance(error, InvalidRequest):
        code, kind = EXIT_USAGE, "invalid_argument"
    else:
        code, kind = EXIT_UNAVAILABLE, "unavailable"
    if as_json:
        out: dict[str, Any] = {"error": kind, "message": str(error)}
        if isinstance(error, Denied):
            out["reason"] = error.reason
            out["retry_after"] = error.retry_after
        print(json.dumps(out))
    else:
        print(f"jitgate: {kind}: {error}", file=sys.stderr)
    return code


def _act(client: IssuerClient, args: argparse.Namespace) -> None:
    if args.action == "request":
        grant = client.request_grant(args.connection, ttl_seconds=args.ttl, reason=args.reason)
        _keep(grant)
        _show(grant, args.json)
    elif args.action == "get":
        _show(client.get_grant(args.grant_id), args.json)
    elif args.action == "list":
        grants = client.list_grants()
        if args.json:
            print(json.dumps([g.as_dict() for g in grants]))
            return
        for g in grants:
            print(f"{g.grant_id}  {g.connection:<24} expires {g.expires_at:%H:%M:%S} UTC")
    else:
        revoked = client.revoke_grant(args.grant_id, reason=args.reason)
        GrantStore().forget(args.grant_id)
        if args.json:
            print(json.dumps({"grant_id": args.grant_id, "revoked_at": revoked.isoformat()}))
        else:
            print(f"revoked {args.grant_id} at {revoked:%Y-%m-%d %H:%M:%S} UTC")


def _keep(grant: Grant) -> None:
    """Store a kubernetes grant with its token for `kubeconfig`; warn if it cannot be."""
    if grant.connection_kind != "kubernetes":
        return  # no later command needs its token: it is not written to disk
    try:
        GrantStore().save(grant)
    except (OSError, ValueError) as exc:
        print(f"jitgate: warning: grant not stored locally: {exc}", file=sys.stderr)


def write_kubeconfig(args: argparse.Namespace) -> int:
    """Write the kubeconfig of a stored kubernetes grant; 6 if none is live, 2 if not kubernetes."""
    store = GrantStore()
    store.prune()
    try:
        grant = store.load(args.grant_id)
    except ValueError:
        grant = None
    now = datetime.datetime.now(datetime.UTC)
    if grant is None or grant.expires_at <= now:
        print(
            f"jitgate: not_found: no live grant {args.grant_id[:64]} stored here: request one"
            " with `jitgate grant request CONNECTION` (only kubernetes grants are kept, only"
            " where they were requested, until they expire)",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    try:
        ca = args.ca.read_bytes() if args.ca is not None else None
    except OSError as exc:
        raise ConfigError(f"cannot read CA bundle {args.ca}: {exc.strerror}") from exc
    try:
        text = kubeconfig.render(grant, ca_pem=ca, namespace=args.namespace)
    except ValueError as exc:
        print(f"jitgate: invalid_argument: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output is None or str(args.output) == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file is narrowed too: it holds the token
        with os.fdopen(fd, "w") as out:
            out.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.output}: {exc.strerror}") from exc
    print(f"wrote {args.output} (grant {grant.grant_id}, expires {grant.expires_at:%H:%M:%S} UTC)")
    return EXIT_OK


def _operator(args: argparse.Namespace) -> bool:
    """Whether this revoke is the operator's (through policy) rather than an agent's."""
    bulk = bool(getattr(args, "subject", None) or getattr(args, "connection", None))
    if args.action != "revoke":
        return False
    if bulk and args.grant_id:
        raise ConfigError("give a grant id, or --subject, or --connection: one of them")
    if not bulk and not args.grant_id:
        raise ConfigError("revoke what? give a grant id, --subject or --connection")
    return bulk or (
        bool(args.policy) and not args.token_file and not os.environ.get("JITGATE_TOKEN")
    )


def _as_operator(args: argparse.Namespace, method: str, request: Any) -> tuple[Any, int]:
    """Call one operator RPC of the policy service: (response, 0), or (None, exit code) told."""
    if not args.policy:
        raise ConfigError("no policy service: set JITGATE_POLICY_ADDR or pass --policy host:port")
    with tls.blocking_channel(args.policy, Env().tls(), server_name="policy") as channel:
        stub = policy_pb2_grpc.PolicyStub(channel)
        try:
            return getattr(stub, method)(request, timeout=args.timeout), EXIT_OK
        except grpc.RpcError as exc:
            call: grpc.Call = exc  # type: ignore[assignment]  # sync errors are calls
            code = {
                grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
                grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
            }.get(call.code(), EXIT_UNAVAILABLE)
            message = call.details() or call.code().name
            if args.json:
                print(json.dumps({"error": call.code().name.lower(), "message": message}))
            else:
                print(f"jitgate: {call.code().name.lower()}: {message}", file=sys.stderr)
            return None, code


def _revoke_as_operator(args: argparse.Namespace) -> int:
    if args.subject:
        request = policy_pb2.RevokeGrantsRequest(subject=args.subject, reason=args.reason)
    elif args.connection:
        request = policy_pb2.RevokeGrantsRequest(connection=args.connection, reason=args.reason)
    else:
        request = policy_pb2.RevokeGrantsRequest(grant_id=args.grant_id, reason=args.reason)
    response, code = _as_operator(args, "RevokeGrants", request)
    if response is None:
        return code
    revoked = list(response.grant_ids)
    if args.json:
        print(json.dumps({"revoked": revoked, "revoked_at": response.revoked_at.ToJsonString()}))
    else:
        print(f"revoked {len(revoked)} grant(s)" + "".join(f"\n  {g}" for g in revoked))
    return EXIT_OK


def list_live(args: argparse.Namespace) -> int:
    """The operator's listing of live grants; exit 3 for a certificate policy does not admit."""
    if not 0 <= args.limit <= MAX_LISTED:
        raise ConfigError(f"--limit must be between 0 and {MAX_LISTED}")
    # `is not None`: an empty --subject "$UNSET" must be refused, never read as "everything".
    if args.subject is not None:
        request = policy_pb2.ListLiveGrantsRequest(subject=args.subject, limit=args.limit)
    elif args.connection is not None:
        request = policy_pb2.ListLiveGrantsRequest(connection=args.connection, limit=args.limit)
    else:
        request = policy_pb2.ListLiveGrantsRequest(limit=args.limit)
    response, code = _as_operator(args, "ListLiveGrants", request)
    if response is None:
        return code
    rows = [_live_row(g) for g in response.grants]
    if args.json:
        print(json.dumps({"grants": rows, "truncated": response.truncated}))
        return EXIT_OK
    for row in rows:
        where = row["connection"] + (f"/{row['namespace']}" if row["namespace"] else "")
        print(f"{row['grant_id']}  {where:<32} {row['subject']:<24} expires {row['expires_at']}")
    print(
        f"{len(rows)} live grant(s)" + (" (more not shown: --limit)" if response.truncated else "")
    )
    return EXIT_OK


def _live_row(grant: policy_pb2.LiveGrant) -> dict[str, str]:
    """One live grant as text; times in UTC, RFC 3339."""
    return {
        "grant_id": grant.grant_id,
        "subject": grant.subject,
        "client_id": grant.client_id,
        "connection": grant.connection,
        "connection_kind": grant.connection_kind,
        "namespace": grant.namespace,
        "issued_at": grant.issued_at.ToJsonString(),
        "expires_at": grant.expires_at.ToJsonString(),
    }


def run(args: argparse.Namespace) -> int:
    """Perform one grant action and return its exit code."""
    if _operator(args):
        return _revoke_as_operator(args)
    if not args.issuer:
        raise ConfigError("no issuer: set JITGATE_ISSUER or pass --issuer host:port")
    client = IssuerClient(args.issuer, token=_token(args), ca_file=args.ca, timeout=args.timeout)
    try:
        with client:
            _act(client, args)
    except GrantError as error:
        return _fail(error, args.json)
    return EXIT_OK
