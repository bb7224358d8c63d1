"""One grant, one trace: every process exports over OTLP to a real receiver this test runs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from jitgate import client as sdk
from jitgate.devstack.stack import PROXIED_CONNECTION, Stack
from jitgate.v1 import issuer_pb2, issuer_pb2_grpc

pytestmark = pytest.mark.e2e

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    links: tuple[str, ...]


@dataclass
class Receiver:
    """An OTLP/gRPC receiver: the trace and metrics services a collector serves."""

    spans: list[Span] = field(default_factory=list)
    metrics: dict[str, set[str]] = field(default_factory=dict)  # metric name -> services
    resources: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_spans(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                self.resources.append(resource)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            Span(
                                service=resource.get("service.name", ""),
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in span.attributes},
                                links=tuple(link.trace_id.hex() for link in span.links),
                            )
                        )

    def take_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            for resource_metrics in request.resource_metrics:
                service = next(
                    (
                        _value(a.value)
                        for a in resource_metrics.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        self.metrics.setdefault(metric.name, set()).add(service)

    def wait_for(self, found: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if found():
                    return
            time.sleep(0.1)
        raise AssertionError(f"no {what} after {timeout}s; spans: {self.spans}")


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.take_spans(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.take_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    collected = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(collected), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(collected), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collected, port
    server.stop(grace=None)


@pytest.fixture(scope="module")
def traced(
    receiver: tuple[Receiver, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Receiver]]:
    collected, port = receiver
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export spans promptly for the test
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "JITGATE_LOG_FORMAT": "json",
    }
    stack = Stack(tmp_path_factory.mktemp("traced"), env=env)
    stack.start()
    yield stack, collected
    stack.stop()


def _one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_one_request_grant_is_one_trace_across_every_service(
    traced: tuple[Stack, Receiver],
) -> None:
    stack, collected = traced
    token = stack.token("deploy-bot")
    agent = sdk.IssuerClient(stack.address("issuer"), token=token, ca_file=stack.pki.ca)
    grant = agent.request_grant(PROXIED_CONNECTION, ttl_seconds=60, reason="trace me")
    agent.close()

    def root() -> list[Span]:
        return [
            s
            for s in collected.spans
            if s.name == "jitgate.v1.Issuer/RequestGrant"
            and s.attributes.get("jitgate.grant_id") == grant.grant_id
        ]

    collected.wait_for(lambda: bool(root()), "RequestGrant span")
    trace_id = root()[0].trace_id

    def in_trace() -> list[Span]:
        return [s for s in collected.spans if s.trace_id == trace_id]

    wanted = {"jitgate-issuer", "jitgate-verifier", "jitgate-policy", "jitgate-audit"}
    collected.wait_for(
        lambda: (
            wanted <= {s.service for s in in_trace()}
            and any(s.name == "jitgate.v1.Audit/Append" and s.kind == SERVER for s in in_trace())
        ),
        "spans from every service in one trace",
    )
    spans = in_trace()
    issued = _one(spans, service="jitgate-issuer", kind=SERVER)
    assert issued.parent_id == ""  # the trace starts at the agent-facing edge
    assert issued.attributes["jitgate.connection"] == PROXIED_CONNECTION
    assert issued.attributes["rpc.grpc.status_code"] == 0
    # issuer -> verifier
    verify_call = _one(spans, service="jitgate-issuer", name="jitgate.v1.Verifier/Verify")
    assert verify_call.kind == CLIENT
    assert verify_call.parent_id == issued.span_id
    verified = _one(spans, service="jitgate-verifier", name="jitgate.v1.Verifier/Verify")
    assert verified.kind == SERVER
    assert verified.parent_id == verify_call.span_id
    assert verified.attributes["jitgate.subject"] == "deploy-bot"
    # issuer -> policy -> audit
    decide_call = _one(spans, service="jitgate-issuer", name="jitgate.v1.Policy/Decide")
    assert decide_call.parent_id == issued.span_id
    decided = _one(spans, service="jitgate-policy", name="jitgate.v1.Policy/Decide")
    assert decided.parent_id == decide_call.span_id
    assert decided.attributes["jitgate.decision"] == "allow"
    assert decided.attributes["jitgate.reason_code"] == "ALLOWED"
    assert decided.attributes["jitgate.grant_id"] == grant.grant_id
    append_call = _one(spans, service="jitgate-policy", name="jitgate.v1.Audit/Append")
    assert append_call.parent_id == decided.span_id
    appended = _one(spans, service="jitgate-audit", name="jitgate.v1.Audit/Append")
    assert appended.parent_id == append_call.span_id
    assert appended.attributes["jitgate.event"] == "decision"
    # Redis calls of the issuer (storing the grant) and of policy (its ledger)
    redis_spans = [s for s in spans if s.attributes.get("db.system") == "redis"]
    assert {s.service for s in redis_spans} >= {"jitgate-issuer", "jitgate-policy"}
    for span in redis_spans:
        assert span.kind == CLIENT
        assert span.parent_id in {issued.span_id, decided.span_id}

    # The issuer's JSON log line for this grant carries the same trace id.
    lines = (stack.logs / "issuer.log").read_text().splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(
        entry.get("trace_id") == trace_id and grant.grant_id in entry["message"] for entry in logged
    )


def test_the_proxys_redemption_and_session_are_one_trace(traced: tuple[Stack, Receiver]) -> None:
    stack, collected = traced
    agent = sdk.IssuerClient(
        stack.address("issuer"), token=stack.token("deploy-bot"), ca_file=stack.pki.ca
    )
    grant = agent.request_grant(PROXIED_CONNECTION, ttl_seconds=60)
    agent.close()
    host, _, port = stack.address("proxy").rpartition(":")
    with psycopg.connect(
        host=host,
        port=int(port),
        dbname=PROXIED_CONNECTION,
        user="deploy-bot",
        password=grant.token,
        sslmode="require",
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    def session() -> list[Span]:
        return [
            s
            for s in collected.spans
            if s.name == "proxy session" and s.attributes.get("jitgate.grant_id") == grant.grant_id
        ]

    collected.wait_for(lambda: bool(session()), "proxy session span")
    opened = session()[0]
    assert opened.kind == SERVER
    assert opened.attributes["jitgate.end_reason"] == "client_closed"
    assert opened.attributes["jitgate.bytes_to_client"] > 0

    def in_trace() -> list[Span]:
        return [s for s in collected.spans if s.trace_id == opened.trace_id]

    collected.wait_for(
        lambda: (
            any(s.name == "jitgate.v1.Policy/Redeem" and s.kind == SERVER for s in in_trace())
            and any(s.service == "jitgate-audit" for s in in_trace())
        ),
        "the redemption in the session's trace",
    )
    spans = in_trace()
    redeem_call = _one(spans, service="jitgate-proxy", name="jitgate.v1.Policy/Redeem")
    assert redeem_call.parent_id == opened.span_id
    redeemed = _one(spans, service="jitgate-policy", name="jitgate.v1.Policy/Redeem")
    assert redeemed.parent_id == redeem_call.span_id
    assert redeemed.attributes["jitgate.grant_id"] == grant.grant_id


def test_an_agents_trace_context_is_linked_not_adopted(traced: tuple[Stack, Receiver]) -> None:
    stack, collected = traced
    theirs = "4bf92f3577b34da6a3ce929d0e0e4736"
    channel = grpc.secure_channel(
        stack.address("issuer"), grpc.ssl_channel_credentials(stack.pki.ca.read_bytes())
    )
    issuer_pb2_grpc.IssuerStub(channel).ListGrants(
        issuer_pb2.ListGrantsRequest(),
        metadata=[
            ("authorization", f"Bearer {stack.token('deploy-bot')}"),
            ("traceparent", f"00-{theirs}-00f067aa0ba902b7-01"),
        ],
        timeout=5,
    )
    channel.close()

    def listed() -> list[Span]:
        return [s for s in collected.spans if theirs in s.links]

    collected.wait_for(lambda: bool(listed()), "the ListGrants span linked to the agent's trace")
    span = listed()[0]
    assert span.name == "jitgate.v1.Issuer/ListGrants"
    assert span.trace_id != theirs
    assert span.parent_id == ""
    assert not [s for s in collected.spans if s.trace_id == theirs]


def test_no_span_or_resource_carries_a_token_or_a_secret(traced: tuple[Stack, Receiver]) -> None:
    stack, collected = traced
    token = stack.token("deploy-bot")
    agent = sdk.IssuerClient(stack.address("issuer"), token=token, ca_file=stack.pki.ca)
    grant = agent.request_grant(PROXIED_CONNECTION, ttl_seconds=60)
    agent.close()
    rejected = sdk.IssuerClient(stack.address("issuer"), token=token + "x", ca_file=stack.pki.ca)
    with pytest.raises(sdk.GrantError):
        rejected.list_grants()
    rejected.close()
    collected.wait_for(
        lambda: any(s.attributes.get("jitgate.token_rejected") for s in collected.spans),
        "the rejected token's span",
    )
    time.sleep(0.5)  # let the last batches of every process arrive
    secrets = [token, grant.token, token.split(".")[2], grant.token.split(".")[2]]
    secrets.append(stack.postgres_password_file.read_text().strip())
    with collected.lock:
        exported = repr(collected.spans) + repr(collected.resources)
    for secret in secrets:
        assert secret not in exported


def test_metrics_reach_the_collector(traced: tuple[Stack, Receiver]) -> None:
    _stack, collected = traced
    wanted = {
        "jitgate.grants.issued": "jitgate-policy",
        "jitgate.grants.live": "jitgate-policy",
        "jitgate.tokens.verified": "jitgate-verifier",
        "jitgate.audit.appends": "jitgate-audit",
        "jitgate.audit.append.duration": "jitgate-audit",
        "jitgate.audit.batch.size": "jitgate-audit",
        "jitgate.proxy.bytes": "jitgate-proxy",
        "rpc.server.duration": "jitgate-issuer",
        "jitgate.jwks.refreshes": "jitgate-verifier",
    }
    collected.wait_for(
        lambda: all(svc in collected.metrics.get(name, set()) for name, svc in wanted.items()),
        "every metric",
    )
