"""The running policy service takes a good policy file without a restart and refuses a bad one."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from jitgate import client as sdk
from jitgate.common import tls
from jitgate.devstack.stack import Stack
from jitgate.v1 import audit_pb2, audit_pb2_grpc

pytestmark = pytest.mark.e2e

WIDER = """
[[bindings]]
group = "platform"
connection = "bastion-eu1"
max_ttl = "2m"
"""


def _request(stack: Stack, connection: str) -> sdk.Grant:
    with sdk.IssuerClient(
        stack.address("issuer"), token=stack.token("deploy-bot"), ca_file=stack.pki.ca
    ) as agent:
        return agent.request_grant(connection, ttl_seconds=60, reason="reload test")


def _until_allowed(stack: Stack, connection: str, seconds: float) -> sdk.Grant:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return _request(stack, connection)
        except sdk.Denied:
            assert time.monotonic() < deadline, f"{connection} still denied after {seconds}s"
            time.sleep(0.1)


def _policy_changes(stack: Stack) -> list[audit_pb2.PolicyChanged]:
    credentials = tls.channel_credentials(stack.pki.files("auditor"))
    options = [("grpc.ssl_target_name_override", "audit")]
    with grpc.secure_channel(stack.address("audit"), credentials, options=options) as channel:
        records = audit_pb2_grpc.AuditStub(channel).Read(audit_pb2.ReadRequest(), timeout=5)
        return [r.event.policy_change for r in records if r.event.HasField("policy_change")]


def test_sighup_applies_a_good_policy_and_keeps_serving_through_a_bad_one(stack: Stack) -> None:
    with pytest.raises(sdk.Denied) as denied:
        _request(stack, "bastion-eu1")
    assert denied.value.reason == "NO_BINDING"
    original = stack.policy_file.read_text()
    stack.policy_file.write_text(original + WIDER)
    pid = stack.processes["policy"].pid
    stack.processes["policy"].send_signal(signal.SIGHUP)
    grant = _until_allowed(stack, "bastion-eu1", seconds=2)
    assert grant.expires_at.timestamp() - time.time() <= 120
    assert stack.processes["policy"].pid == pid  # no restart
    # A broken file: refused, logged, audited; the last good policy keeps answering.
    stack.policy_file.write_text(original + "[[bindings]]\ngroup = 'x'\n")
    stack.processes["policy"].send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert _request(stack, "bastion-eu1").grant_id
    changes = _policy_changes(stack)
    assert [c.accepted for c in changes] == [True, False]
    assert "bindings[5]" in changes[1].error  # the appended binding: the example has five
    assert changes[1].previous_version == changes[0].version
    assert "refused" in stack.log_tail("policy", 50)


def test_a_changed_file_is_picked_up_without_a_signal(stack: Stack) -> None:
    text = stack.policy_file.read_text()
    # Undo the widening: within the file check interval, bastion is denied again.
    stack.policy_file.write_text(text.split("[[bindings]]\ngroup = 'x'")[0].replace(WIDER, ""))
    deadline = time.monotonic() + 3
    while True:
        try:
            _request(stack, "bastion-eu1")
        except sdk.Denied:
            break
        assert time.monotonic() < deadline, "the narrowed policy did not take effect"
        time.sleep(0.1)
