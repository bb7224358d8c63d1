"""`jitgate demo`: start the stack, and show an agent get, be denied and lose a grant.

Then a second agent runs a command on an SSH host through the proxy with the
stock ssh client: its grant is its password, the proxy's key stays the proxy's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import jwt
import psycopg
from cryptography.hazmat.primitives.asymmetric import rsa

from jitgate.audit import verify
from jitgate.audit.checkpoint import parse_verifier_key
from jitgate.audit.store import SqliteStore, iter_checkpoints, iter_records
from jitgate.client import Denied, Grant, IssuerClient, Unauthenticated
from jitgate.common import tls
from jitgate.devstack import idp
from jitgate.devstack.stack import SSH_CONNECTION, Stack
from jitgate.v1 import audit_pb2, audit_pb2_grpc, policy_pb2, policy_pb2_grpc

AGENT = "deploy-bot"
SSH_AGENT = "ops-bot"
SSH_COMMAND = 'echo "$(whoami)@$(hostname): $(uname -sr)"'
SUMMARY = "SELECT count(*), sum(total_cents) FROM orders"
Say = Callable[[str], None]


class DemoFailed(Exception):
    """A step did not behave as jitgate promises."""


def _forged_token(real: str) -> str:
    """The real token's claims, re-signed with an attacker's own RSA key under the real kid."""
    header = jwt.get_unverified_header(real)
    claims = jwt.decode(real, options={"verify_signature": False})
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return idp.mint(claims, key=attacker, kid=header.get("kid"))


def _audit_kinds(stack: Stack) -> Counter[str]:
    """Read the whole audit log over gRPC as the auditor identity."""
    files = stack.pki.files("auditor")
    with tls.blocking_channel(stack.address("audit"), files, server_name="audit") as channel:
        records = audit_pb2_grpc.AuditStub(channel).Read(
            audit_pb2.ReadRequest(from_index=0), timeout=5
        )
        return Counter(str(r.event.WhichOneof("kind")) for r in records)


def _operator_view(stack: Stack, connection: str) -> list[policy_pb2.LiveGrant]:
    """The live grants of connection, as the operator lists them (`jitgate grant live`)."""
    files = stack.pki.files("operator")
    with tls.blocking_channel(stack.address("policy"), files, server_name="policy") as channel:
        listed = policy_pb2_grpc.PolicyStub(channel).ListLiveGrants(
            policy_pb2.ListLiveGrantsRequest(connection=connection), timeout=5
        )
        return list(listed.grants)


def _scope(grant: Grant) -> str:
    claims = jwt.decode(grant.token, options={"verify_signature": False})
    return f"sub={claims['sub']} con={claims['con']} aud={claims['aud']} jti={claims['jti'][:8]}…"


def _proxy_session(stack: Stack, grant: Grant) -> psycopg.Connection[tuple[object, ...]]:
    """Connect through the proxy as an agent does: TLS, the grant token as the password."""
    host, _, port = stack.address("proxy").rpartition(":")
    return psycopg.connect(
        host=host,
        port=int(port),
        sslmode="verify-full",
        sslrootcert=str(stack.pki.ca),
        dbname=grant.connection,
        user=AGENT,
        password=grant.token,
        autocommit=True,
        connect_timeout=5,
    )


def _query_through_proxy(conn: psycopg.Connection[tuple[object, ...]], say: Say) -> None:
    count, cents = conn.execute(SUMMARY).fetchone() or (0, 0)
    say(f"      {SUMMARY} -> {count}, {cents}")
    try:
        conn.execute("INSERT INTO orders (customer, total_cents) VALUES ('mallory', 1)")
        raise DemoFailed("an INSERT went through a read-only connection")
    except psycopg.Error as refused:
        say(f"      INSERT -> REFUSED {refused.sqlstate}: {refused.diag.message_primary}")


def _ended_by_revocation(conn: psycopg.Connection[tuple[object, ...]], revoked_at: float) -> str:
    """Query until the proxy ends the session; return what the agent saw, and when."""
    while time.monotonic() - revoked_at < 1.0:
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as ended:
            took = (time.monotonic() - revoked_at) * 1000
            message = ended.diag.message_primary or str(ended).strip().splitlines()[0]
            return f"{message!r} {took:.0f} ms after the revocation"
        time.sleep(0.02)
    raise DemoFailed("the proxy session outlived its grant's revocation by a second")


def _ssh_through_proxy(stack: Stack, grant: Grant, workdir: Path) -> str:
    """Run SSH_COMMAND with the stock ssh client: no key of its own, the grant from SSH_ASKPASS."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise DemoFailed("no ssh client: run `make tools`")
    secret = workdir / "grant-token"
    secret.write_text(grant.token)
    secret.chmod(0o600)
    askpass = workdir / "askpass"
    askpass.write_text(f"#!/bin/sh\nexec cat {secret}\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    env.pop("SSH_AUTH_SOCK", None)
    host, _, port = grant.proxy_endpoint.rpartition(":")
    options = {
        "UserKnownHostsFile": str(stack.agent_known_hosts),
        "StrictHostKeyChecking": "yes",
        "PubkeyAuthentication": "no",
        "IdentityAgent": "none",
        "NumberOfPasswordPrompts": "1",
    }
    done = subprocess.run(
        [
            ssh,
            "-F",
            "none",
            "-p",
            port,
            *(f"-o{name}={value}" for name, value in options.items()),
            f"{grant.connection}@{host}",
            SSH_COMMAND,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise DemoFailed(f"ssh through the proxy failed ({done.returncode}): {done.stderr.strip()}")
    key = stack.proxy_ssh_client_key.read_text().strip().splitlines()
    if "".join(key[1:-1]) in done.stdout + done.stderr:
        raise DemoFailed("the proxy's SSH key reached the agent")
    return done.stdout.strip()


def _ssh_step(stack: Stack, say: Say) -> None:
    """An agent in sre gets a grant for the bastion and runs a command there over SSH."""
    token = stack.token(SSH_AGENT)
    with IssuerClient(stack.address("issuer"), token=token, ca_file=stack.pki.ca) as agent:
        reason = "check the bastion's kernel"
        grant = agent.request_grant(SSH_CONNECTION, ttl_seconds=60, reason=reason)
        say(f'[8/9] {SSH_AGENT} (group sre) asks for {SSH_CONNECTION} for 60 s: "{reason}"')
        say(f"      ALLOWED  grant {grant.grant_id}; the stock ssh client, no key of its own:")
        host, _, port = grant.proxy_endpoint.rpartition(":")
        say(f"      ssh -p {port} {grant.connection}@{host} '{SSH_COMMAND}'")
        with tempfile.TemporaryDirectory(prefix="jitgate-demo-ssh-") as workdir:
            output = _ssh_through_proxy(stack, grant, Path(workdir))
        for line in output.splitlines():
            say(f"      > {line}")
        say("      the grant was the password; the proxy logged in upstream with its own key,")
        say("      checking the host's pinned host key: the SSH key never left the proxy")
        agent.revoke_grant(grant.grant_id, reason="done")


def _steps(stack: Stack, say: Say) -> None:
    token = stack.token(AGENT)
    groups = jwt.decode(token, options={"verify_signature": False}).get("groups")
    say(f"[2/9] {AGENT} authenticates to the IdP (client credentials); groups: {groups}")
    with IssuerClient(stack.address("issuer"), token=token, ca_file=stack.pki.ca) as agent:
        say(f'[3/9] {AGENT} asks for orders-replica for 120 s: "investigate slow order queries"')
        grant = agent.request_grant(
            "orders-replica", ttl_seconds=120, reason="investigate slow order queries"
        )
        left = grant.expires_at.timestamp() - time.time()
        say(f"      ALLOWED  grant {grant.grant_id} for {grant.connection}, {left:.0f} s left")
        say(f"      the grant token names one connection: {_scope(grant)}")
        say(f"[4/9] {AGENT} connects to {grant.proxy_endpoint} (the proxy) over TLS with the")
        say("      grant token as its password; the proxy logs in upstream as a read-only role")
        session = _proxy_session(stack, grant)
        try:
            _query_through_proxy(session, say)
            say(f"[5/9] {AGENT} asks for billing-primary")
            try:
                agent.request_grant("billing-primary", reason="refund a customer")
                raise DemoFailed("billing-primary was granted to a group with no binding for it")
            except Denied as denied:
                say(f"      DENIED   {denied.reason}: {denied.message}")
            say("[6/9] a forged token (attacker's key, the IdP's kid) asks for orders-replica")
            forged = IssuerClient(
                stack.address("issuer"), token=_forged_token(token), ca_file=stack.pki.ca
            )
            with forged:
                try:
                    forged.request_grant("orders-replica")
                    raise DemoFailed("a forged token got a grant")
                except Unauthenticated as rejected:
                    say(f"      REJECTED UNAUTHENTICATED: {rejected}")
            live = agent.list_grants()
            say(f"[7/9] {AGENT} lists its grants: {[g.grant_id for g in live]}")
            if [g.grant_id for g in live] != [grant.grant_id]:
                raise DemoFailed("the live grant is not listed")
            seen = _operator_view(stack, "orders-replica")
            shown = [
                f"{g.grant_id[:8]}… {g.subject} until {g.expires_at.ToJsonString()}" for g in seen
            ]
            say(f"      the operator's view (jitgate grant live): {shown}")
            if [g.grant_id for g in seen] != [grant.grant_id]:
                raise DemoFailed("the operator does not see the live grant")
            agent.revoke_grant(grant.grant_id, reason="done investigating")
            revoked_at = time.monotonic()
            after = agent.list_grants()
            say(f"      revoked {grant.grant_id}; live grants now: {[g.grant_id for g in after]}")
            if after:
                raise DemoFailed("a revoked grant is still listed")
            ended = _ended_by_revocation(session, revoked_at)
            say(f"      the open proxy session's next query fails: {ended}")
        finally:
            session.close()
    _ssh_step(stack, say)
    # The proxy reports a session's end after closing it, through policy:
    # give both records (PostgreSQL's and SSH's) a moment to land before reading the log.
    deadline = time.monotonic() + 3
    kinds = _audit_kinds(stack)
    while kinds["session_closed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        kinds = _audit_kinds(stack)
    say(f"[9/9] the audit log, read as the auditor: {json.dumps(dict(sorted(kinds.items())))}")


def run(say: Say = print) -> int:
    """Run the demo in a temporary directory; 0 when every step behaved as promised."""
    with tempfile.TemporaryDirectory(prefix="jitgate-demo-") as tmp:
        stack = Stack(Path(tmp), redis_url=os.environ.get("REDIS_URL"))
        say("jitgate demo: agents, connections, short-lived grants")
        started = time.monotonic()
        say("[1/9] starting redis, postgres, sshd, the dev IdP, audit, verifier, policy, issuer,")
        say("      proxy")
        try:
            stack.start()
            took = time.monotonic() - started
            say(f"      all SERVING in {took:.1f} s: separate processes, mTLS between them")
            _steps(stack, say)
        except DemoFailed as failed:
            say(f"DEMO FAILED: {failed}")
            return 1
        finally:
            stack.stop()
        report = _verify_offline(stack)
        if not report.ok:
            say(f"DEMO FAILED: the audit log does not verify: {report.failure}: {report.detail}")
            return 1
        root = report.largest.root.hex()[:16] if report.largest else "-"
        say(f"      offline check with only the log's public key: {report.summary()}, root {root}…")
        say("done: everything stopped, nothing left running.")
    return 0


def _verify_offline(stack: Stack) -> verify.Report:
    """What `jitgate audit verify` does, on the stopped stack's log file."""
    verifier = parse_verifier_key(stack.audit_vkey.read_text().strip())
    store = SqliteStore.open(stack.audit_db, read_only=True)
    try:
        return verify.verify(
            (r.canonical for r in iter_records(store)),
            (c.note for c in iter_checkpoints(store)),
            [verifier],
            origin=verifier.name,
        )
    finally:
        store.close()
