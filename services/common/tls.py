"""gRPC credentials from PEM files: mTLS between services, TLS for agents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from jitgate.common import telemetry
from jitgate.common.errors import ConfigError
from jitgate.common.tracing import ClientTracing

# Reconnect quickly once a dependency is back (the default backoff grows to
# two minutes), and notice a silent peer through keepalives; calls themselves
# are bounded by their deadlines.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)
MAX_REQUEST_BYTES = 64 * 1024
"""No jitgate request needs more; larger ones are refused by gRPC itself."""
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """A workload's certificate, its key, and the CA that issued its peers."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Return (ca, cert, key) PEM bytes, or raise ConfigError naming the file."""
        out = []
        for label, path in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read TLS {label} {path}: {exc.strerror}") from exc
        return out[0], out[1], out[2]


def server_credentials(files: TlsFiles, *, require_client_auth: bool) -> grpc.ServerCredentials:
    """Return server credentials; with require_client_auth, peers need a cert from our CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_auth
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Return client credentials presenting our certificate and trusting only our CA."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def blocking_channel(target: str, files: TlsFiles, *, server_name: str) -> grpc.Channel:
    """A blocking channel for a command-line tool, presenting files and checking server_name."""
    options = [("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(target, channel_credentials(files), options=options)


def secure_channel(
    target: str,
    credentials: grpc.ChannelCredentials,
    *,
    server_name: str,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """Return an aio channel to target that accepts only a server certificate for server_name.

    Every jitgate certificate is valid for 127.0.0.1, so the expected service's
    own DNS name is checked instead: the issuer talking to "policy" will not
    accept the verifier's certificate.
    """
    return grpc.aio.secure_channel(
        target,
        credentials,
        options=(*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name), *options),
        interceptors=[ClientTracing(server_name)] if telemetry.exporting_traces() else None,  # type: ignore[list-item]  # partial stubs
    )
