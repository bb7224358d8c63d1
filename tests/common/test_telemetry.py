"""OpenTelemetry set-up: silent unless the standard OTEL_* variables ask for OTLP."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from jitgate.common import logs, telemetry
from jitgate.common.errors import ConfigError


def test_nothing_is_installed_without_an_endpoint() -> None:
    before = trace.get_tracer_provider()
    flush = telemetry.setup("issuer", {})
    flush()
    assert trace.get_tracer_provider() is before


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
        },
    ],
)
def test_the_standard_switches_turn_it_off(env: dict[str, str]) -> None:
    before = trace.get_tracer_provider()
    telemetry.setup("issuer", env)()
    assert trace.get_tracer_provider() is before


@pytest.mark.parametrize("variable", ["", "_TRACES", "_METRICS"])
def test_otlp_over_http_is_refused_with_a_clear_error(variable: str) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        f"OTEL_EXPORTER_OTLP{variable}_PROTOCOL": "http/protobuf",
    }
    with pytest.raises(ConfigError, match="gRPC only"):
        telemetry.setup("issuer", env)


def test_trace_context_round_trips_through_grpc_metadata() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        metadata = telemetry.inject()
    assert [key for key, _ in metadata] == ["traceparent"]
    remote = trace.get_current_span(telemetry.extract(metadata)).get_span_context()
    assert remote.trace_id == outer.get_span_context().trace_id
    assert remote.span_id == outer.get_span_context().span_id


def test_only_trace_context_is_taken_from_metadata() -> None:
    metadata = [("authorization", "Bearer x"), ("baggage", "user=alice"), ("traceparent", 7)]
    context = telemetry.extract(metadata)
    assert not trace.get_current_span(context).get_span_context().is_valid


def test_json_log_lines_carry_the_trace_id() -> None:
    formatter = logs.JsonLines("issuer")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(formatter.format(record))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("rpc") as span:
        line = json.loads(formatter.format(record))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")
