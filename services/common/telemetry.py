"""OpenTelemetry: traces and metrics over OTLP when the standard OTEL_* variables ask for it.

With no OTLP endpoint set, nothing is installed: the API's no-op providers
stay, spans cost a few microseconds and nothing leaves the process. With
OTEL_EXPORTER_OTLP_ENDPOINT (or the per-signal _TRACES_/_METRICS_ variants)
set, spans and metrics go over OTLP/gRPC; the exporters read the other
standard variables themselves (headers, certificate, insecure, timeout).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from jitgate.common.errors import ConfigError

log = logging.getLogger(__name__)

SCOPE = "jitgate"
PROPAGATOR = TraceContextTextMapPropagator()
"""W3C trace context only: baggage from a caller is not carried along."""

_SIGNALS = ("TRACES", "METRICS")
_exporting: set[str] = set()


def _endpoint(environ: Mapping[str, str], signal: str) -> str | None:
    if environ.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() == "none":
        return None
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def setup(service: str, environ: Mapping[str, str] | None = None) -> Callable[[], None]:
    """Install OTLP exporters for service if configured; return what flushes them at exit."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return lambda: None
    endpoints = {signal: _endpoint(env, signal) for signal in _SIGNALS}
    if not any(endpoints.values()):
        return lambda: None
    for signal in ("", *(f"_{s}" for s in _SIGNALS)):
        protocol = env.get(f"OTEL_EXPORTER_OTLP{signal}_PROTOCOL", "grpc").strip().lower()
        if protocol != "grpc":
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP{signal}_PROTOCOL={protocol}: jitgate exports OTLP over gRPC"
                " only; set it to grpc and point the endpoint at the collector's gRPC port"
            )
    # Imported only when used: the SDK and exporters are heavy and most runs need neither.
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {"service.namespace": "jitgate"}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = f"jitgate-{service}"
    resource = Resource.create(attributes)
    stops: list[Callable[[], object]] = []
    if endpoints["TRACES"]:
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
        stops.append(tracer_provider.shutdown)
        _exporting.add("TRACES")
    if endpoints["METRICS"]:
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
        stops.append(meter_provider.shutdown)
        _exporting.add("METRICS")
    log.info(
        "OpenTelemetry: traces to %s, metrics to %s",
        endpoints["TRACES"] or "nowhere",
        endpoints["METRICS"] or "nowhere",
    )

    def shutdown() -> None:
        for stop in stops:
            with contextlib.suppress(Exception):  # a collector that is gone loses the tail only
                stop()

    return shutdown


def exporting_traces() -> bool:
    """Whether setup installed a span exporter.

    Without one, callers skip instrumentation that is not free even as a
    no-op: gRPC client interceptors and Redis wrappers cost a measurable part
    of a grant's CPU (bench/RESULTS.md), for spans nobody would see.
    """
    return "TRACES" in _exporting


def exporting_metrics() -> bool:
    """Whether setup installed a metrics exporter (so gauges that cost a query should run)."""
    return "METRICS" in _exporting


def tracer() -> trace.Tracer:
    """jitgate's tracer (a no-op until setup installs a provider)."""
    return trace.get_tracer(SCOPE)


def meter() -> metrics.Meter:
    """jitgate's meter (a no-op until setup installs a provider)."""
    return metrics.get_meter(SCOPE)


def extract(metadata: object) -> Context:
    """The W3C trace context in gRPC metadata (a sequence of key/value pairs), if any."""
    carrier: dict[str, str] = {}
    if metadata:
        for item in metadata:  # type: ignore[attr-defined]
            key, value = item
            if key in ("traceparent", "tracestate") and isinstance(value, str):
                carrier[key] = value
    return PROPAGATOR.extract(carrier)


def inject() -> list[tuple[str, str]]:
    """The current span's W3C trace context, as gRPC metadata pairs."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return list(carrier.items())


def annotate(**attributes: str | int | bool) -> None:
    """Set jitgate.* attributes on the current span: ids and codes, never a secret."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"jitgate.{key}": value for key, value in attributes.items()})


@contextlib.contextmanager
def span(name: str, **attributes: str | int | bool) -> Iterator[trace.Span]:
    """An internal span named name, child of the current one."""
    with tracer().start_as_current_span(
        name, attributes={f"jitgate.{key}": value for key, value in attributes.items()}
    ) as current:
        yield current
