"""Fault injection: SIGKILL and SIGSTOP each part of the stack under steady RequestGrant load.

Run: `make bench-faults` (or `.venv/bin/python bench/faults.py [--before S] [--down S]
[--after S] [--rate R]`). The scenarios are those of tests/faults/test_faults.py,
whose checks they share, with longer phases: for each part (audit, verifier,
policy, Redis) and each fault (SIGKILL, SIGSTOP), four agents send RequestGrant
at a fixed rate each (open loop: a stalled part piles requests up), the part is
killed or paused for --down seconds, then restarted with the stack's own
methods (or SIGCONT), and the load goes on for --after seconds past recovery.

Per scenario it prints: requests made while the part was down and how many had
failed with UNAVAILABLE before it was back, the longest of those failures
(promised: under 3 s), grants returned while it was down (must be 0), grants
without a durable allowed decision in the audit log, among those returned and
those in Redis (must be 0), allowed decisions whose grant was never returned
(allowed: a later step failed), the grants in Redis that survive a Redis
SIGKILL, the restart time and the time to recover. At the end the audit log is
exported and verified with the `jitgate audit` CLI, and every grant any agent
received is looked up in the exported bundle. Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

from jitgate.audit import bundle
from jitgate.audit.record import parse
from tests.faults.rig import (
    FAULTS,
    PARTS,
    PROMISED,
    RECOVERY_BOUND,
    Result,
    Rig,
    header,
    running_stack,
)


def _jitgate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitgate", *argv], capture_output=True, text=True, check=False
    )


def _exported_allowed(folder: Path) -> set[str]:
    allowed = set()
    for canonical in bundle.read_records(folder):
        event = parse(canonical).event.get("decision")
        if isinstance(event, dict) and event.get("allowed") is True:
            allowed.add(str(event.get("grant_id", "")))
    return allowed


def main(args: argparse.Namespace) -> int:
    """Run the eight scenarios, print the table and the final export check; return the status."""
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}")
    results: list[Result] = []
    with (
        tempfile.TemporaryDirectory(prefix="jitgate-bench-") as tmp,
        running_stack(Path(tmp) / "stack") as stack,
    ):
        rig = Rig(stack, rate=args.rate)
        print(
            f"load: {rig.load.total_rate:.0f} RequestGrant/s from 4 agents (1 always denied);"
            f" {args.before:g} s before, {args.down:g} s down, {args.after:g} s after recovery\n"
        )
        print(header(), flush=True)
        try:
            for part in PARTS:
                for fault in FAULTS:
                    result = rig.scenario(
                        part, fault, before=args.before, down=args.down, after=args.after
                    )
                    results.append(result)
                    print(result.row(), flush=True)
        finally:
            rig.close()
        for result in results:
            for problem in result.problems[:10]:
                print(f"  {result.part} {result.fault}: {problem}")
        out = Path(tmp) / "export"
        export = _jitgate("audit", "export", "--db", str(stack.audit_db), "--out", str(out))
        verify = _jitgate("audit", "verify", str(out), "--key", str(stack.audit_vkey))
        missing = rig.returned - _exported_allowed(out) if export.returncode == 0 else rig.returned
    print(f"\n`jitgate audit export`: exit {export.returncode}: {export.stdout.strip()}")
    print(f"`jitgate audit verify` of the export: exit {verify.returncode}")
    print("  " + verify.stdout.strip().replace("\n", "\n  "))
    print(
        f"grants returned over all scenarios: {len(rig.returned)}; without an allowed"
        f" decision in the exported log: {len(missing)}"
    )
    slowest = max((r.max_failure for r in results), default=0.0)
    recoveries = [r.recovery for r in results if r.recovery is not None]
    print(
        f"longest failure while a part was down: {slowest:.2f} s (promised < {PROMISED:g} s);"
        f" slowest recovery: {max(recoveries, default=0.0):.2f} s (bound {RECOVERY_BOUND:g} s)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps([vars(r) for r in results], indent=1) + "\n")
    failed = (
        any(r.problems for r in results)
        or len(results) != len(PARTS) * len(FAULTS)
        or export.returncode != 0
        or verify.returncode != 0
        or bool(missing)
    )
    print("FAILED" if failed else "OK: every part failed closed and fast, and came back")
    return 1 if failed else 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", type=float, default=10.0, help="seconds of load before")
    parser.add_argument("--down", type=float, default=5.0, help="seconds the part stays down")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of load after")
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s per agent (4)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main(_arguments()))
