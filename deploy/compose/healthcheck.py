#!/usr/bin/env python3
"""Exit 0 when the jitgate service in this container is healthy, 1 when not, 2 on misuse.

`jitgate-healthcheck NAME` asks the service's grpc.health.v1 over mTLS, from
inside its own container, with its own certificate (JITGATE_TLS_*): the
servers accept nothing but TLS, and the verifier, policy and audit demand a
client certificate, so the kubelet's built-in gRPC probe (plaintext, or TLS
with no client certificate) and any check from outside the pod cannot get an
answer. Every jitgate server admits any certificate of its CA to the health
methods, so the workload's own one is enough and no extra identity is needed.

`jitgate-healthcheck proxy` only connects over TCP: the proxy speaks the
PostgreSQL protocol and has no health service.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

GRPC_SERVICES = ("issuer", "verifier", "policy", "audit")
TCP_SERVICES = ("proxy",)
TIMEOUT = 3.0


def _port(env: Mapping[str, str]) -> int:
    # JITGATE_LISTEN is host:port (or [v6]:port); the check always dials loopback.
    return int(env["JITGATE_LISTEN"].rpartition(":")[2])


def check_grpc(name: str, env: Mapping[str, str], timeout: float = TIMEOUT) -> str:
    """Return the service's health status name, or the gRPC error code name."""
    # Imported here so that the TCP check does not pay for loading gRPC.
    import grpc

    from jitgate.common.health import serving_status
    from jitgate.common.tls import TlsFiles

    files = TlsFiles(
        ca=Path(env["JITGATE_TLS_CA"]),
        cert=Path(env["JITGATE_TLS_CERT"]),
        key=Path(env["JITGATE_TLS_KEY"]),
    )
    try:
        return serving_status(f"127.0.0.1:{_port(env)}", files, name, timeout=timeout)
    except grpc.RpcError as exc:
        return str(exc.code().name)


def check_tcp(env: Mapping[str, str], timeout: float = TIMEOUT) -> str:
    """Return LISTENING when the service accepts TCP connections, else the error."""
    try:
        with socket.create_connection(("127.0.0.1", _port(env)), timeout=timeout):
            return "LISTENING"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Check the service named in argv[1]; print its state."""
    if len(argv) != 2 or argv[1] not in (*GRPC_SERVICES, *TCP_SERVICES):
        print(f"usage: jitgate-healthcheck {'|'.join((*GRPC_SERVICES, *TCP_SERVICES))}")
        return 2
    name = argv[1]
    try:
        if name in TCP_SERVICES:
            state = check_tcp(env)
            healthy = state == "LISTENING"
        else:
            state = check_grpc(name, env)
            healthy = state == "SERVING"
    except (KeyError, ValueError, OSError) as exc:
        print(f"{name}: cannot check ({type(exc).__name__}: {exc})")
        return 2
    print(f"{name}: {state}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv, os.environ))
