"""What re-cutting an API server's WebSocket frames costs, beside the TLS the relay does anyway.

Run: `make bench-wsframes` (or `.venv/bin/python bench/wsframes.py [MEGABYTES]`).
The Kubernetes front end passes every byte of an exec, attach or
port-forward stream through wsframes.Reframer on its way to the agent, so
that a revocation can end the stream with a reason at any moment. Each row
is one frame size, read in the relay's 64 KiB chunks, measured in this
process on one core: the Reframer, and TLS 1.3 encryption plus decryption of
the same bytes in memory (the relay decrypts the API server's bytes and
encrypts them for the agent). The ratio is the Reframer's time over TLS's.
"""

from __future__ import annotations

import contextlib
import os
import platform
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jitgate.devstack import pki
from jitgate.proxy import wsframes
from jitgate.proxy.kubeforward import CHUNK

SIZES = (100, 4_000, 64_000, 1 << 20)
"""Frame payload sizes: a prompt's echo, a terminal line burst, a port-forward read, a dump."""


def stream(size: int, total: int) -> list[bytes]:
    """About total bytes of binary frames of one size, cut into the relay's reads."""
    one = wsframes.frame(wsframes.BINARY, b"\x01" + b"x" * (size - 1))
    data = one * max(1, total // len(one))
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def tls_pair(root: Path) -> Callable[[bytes], None]:
    """A function that sends bytes through an in-memory TLS 1.3 connection, as the relay does."""
    files = pki.issue(root, "bench")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.cert, files.key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(files.ca)
    client_context.check_hostname = False
    bios = [ssl.MemoryBIO() for _ in range(4)]  # client in/out, server in/out
    client = client_context.wrap_bio(bios[0], bios[1])
    server = server_context.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(10):  # the handshake, bytes shuttled by hand
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    server.do_handshake()
    client.do_handshake()

    def send(data: bytes) -> None:
        server.write(data)
        bios[0].write(bios[3].read())
        while client.pending() or bios[0].pending:
            client.read(1 << 20)

    return send


def best(reads: list[bytes], work: Callable[[bytes], object]) -> float:
    """The best of three passes, in seconds."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for data in reads:
            work(data)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    """Print one row per frame size."""
    total = int(float(sys.argv[1]) * 1e6) if len(sys.argv) > 1 else 64_000_000
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}")
    print(f"{os.cpu_count()} cores; {ssl.OPENSSL_VERSION}; {total / 1e6:.0f} MB per row\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki.init(root, names=())
        send = tls_pair(root)
        best(stream(4_000, total // 4), send)  # warm up: the first pass is not any row's
        print("| frame payload | Reframer MB/s | TLS relay MB/s | Reframer / TLS time |")
        print("|---|---|---|---|")
        for size in SIZES:
            reads = stream(size, total)
            volume = sum(map(len, reads))
            reframer = wsframes.Reframer()
            recut = best(reads, reframer.feed)
            tls = best(reads, send)
            print(
                f"| {size:,} B | {volume / recut / 1e6:,.0f} | {volume / tls / 1e6:,.0f}"
                f" | {recut / tls:.2f} |"
            )


if __name__ == "__main__":
    main()
