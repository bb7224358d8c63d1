"""`jitgate pki init DIR`: a development CA and one certificate per workload."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jitgate.devstack import pki


def register(verbs: Any) -> None:
    """Add the pki verb."""
    cmd = verbs.add_parser("pki", help="development certificates")
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="write a dev CA and a certificate per workload into DIR")
    init.add_argument("dir", type=Path)
    init.add_argument("--trust-domain", default="jitgate")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    """Create the CA and the certificates that are missing; print what is there."""
    dev = pki.init(args.dir, trust_domain=args.trust_domain)
    print(f"CA: {dev.ca}")
    for name in (*pki.SERVICES, *pki.CLIENTS, *pki.SERVERS):
        files = dev.files(name)
        print(f"{name}: {files.cert} (spiffe://{args.trust_domain}/{name})")
    return 0
