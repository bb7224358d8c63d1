"""Logging set-up for entry points, and fingerprints that keep secrets out of logs."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time

from opentelemetry import trace


def fingerprint(secret: str | bytes) -> str:
    """Return the SHA-256 of a secret, hex: the only form in which one is logged."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()


class JsonLines(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # The trace this line belongs to, so a log search and a trace find each other.
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            out["trace_id"] = format(context.trace_id, "032x")
            out["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(service: str, *, level: str = "INFO", json_lines: bool = False) -> None:
    """Send logs to stderr, as text or JSON lines; only entry points call this."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonLines(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
