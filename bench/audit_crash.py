"""Crash loop: SIGKILL the audit process under load, restart it, count what was lost.

Run: `make bench-audit-crash` (or `.venv/bin/python bench/audit_crash.py [ROUNDS]
[VERIFY_EVERY]`, 100 rounds by default). The rounds are those of tests/e2e/test_audit_crash.py,
whose checks they share: concurrent appends from the policy identity over mTLS
into the real `jitgate serve audit` process, SIGKILL at a random moment, a
restart on the same database, then every receipt ever given must name a stored
record holding the event that was sent, the indices must run from 0 without a
gap, the whole log must verify offline, and the restarted service must
continue the log. Verifying the whole log offline costs more as it grows
(mostly one Ed25519 check per stored checkpoint), so it is done every
VERIFY_EVERY rounds (5 by default) and after the last one, then once more
with `jitgate audit verify`; the log is append-only, so a fault a skipped
round made is still there to be found. Every receipt is checked every round.
Exits 1 if anything acknowledged was lost or anything failed.
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

from jitgate.devstack import pki
from tests.e2e.test_audit_crash import CrashRig, RoundResult


def _row(r: RoundResult, verified: bool) -> str:
    verify = f"{r.verify_seconds * 1000:.0f}" if verified else "-"
    return (
        f"| {r.number} | {r.sent} | {r.acknowledged} | {r.present} | {r.lost} |"
        f" {r.durable_unacknowledged} | {r.batches} | {r.kill_after * 1000:.0f} |"
        f" {r.restart_seconds * 1000:.0f} | {verify} | {r.size} |"
    )


async def _run(
    rig: CrashRig, rounds: int, verify_every: int
) -> tuple[list[RoundResult], int | None]:
    results: list[RoundResult] = []
    try:
        first = await rig.start()
        print(f"first start: {first * 1000:.0f} ms\n")
        print(
            "| round | sent | acknowledged | present after restart | lost |"
            " durable, unacknowledged | batches | kill after ms | restart ms |"
            " verify ms | log size |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for number in range(rounds):
            verified = (number + 1) % verify_every == 0 or number == rounds - 1
            result = await rig.crash_round(number, verify_log=verified)
            results.append(result)
            print(_row(result, verified), flush=True)
            for problem in result.problems:
                print(f"  round {number}: {problem}", flush=True)
    finally:
        code = await rig.close()
    return results, code


def main(rounds: int, verify_every: int) -> int:
    """Run the rounds, print a table and the totals; return the exit status."""
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="jitgate-bench-") as tmp:
        root = Path(tmp)
        dev = pki.init(root / "pki")
        (root / "log").mkdir()
        rig = CrashRig(dev, root / "log")
        started = time.perf_counter()
        results, code = asyncio.run(_run(rig, rounds, max(1, verify_every)))
        elapsed = time.perf_counter() - started
        cli = subprocess.run(
            [sys.executable, "-m", "jitgate", "audit", "verify", str(rig.db), "--key", rig.vkey],
            capture_output=True,
            text=True,
            check=False,
        )
    restarts = [r.restart_seconds * 1000 for r in results]
    acknowledged = sum(r.acknowledged for r in results)
    present = sum(r.present for r in results)
    lost = len(rig.lost)  # each round re-checks every receipt given so far
    problems = sum(len(r.problems) for r in results)
    print(
        f"\n{len(results)} rounds in {elapsed:.1f} s: {acknowledged} acknowledged under load,"
        f" {present} present after restart, lost {lost};"
        f" {sum(r.durable_unacknowledged for r in results)} in flight at a kill were stored"
        f" anyway; {sum(r.batches for r in results)} group commits acknowledged"
    )
    if restarts:
        print(
            f"restart to SERVING: p50 {statistics.median(restarts):.0f} ms,"
            f" max {max(restarts):.0f} ms (log of {results[-1].size} records at the end)"
        )
    print(f"`jitgate audit verify DB --key ...` at the end: exit {cli.returncode}")
    print("  " + cli.stdout.strip().replace("\n", "\n  "))
    print(f"graceful stop after the last round: exit {code}")
    failed = (
        lost > 0
        or problems > 0
        or present != acknowledged
        or len(results) != rounds
        or cli.returncode != 0
        or code != 0
    )
    print("FAILED" if failed else "OK: nothing acknowledged was lost")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 100,
            int(sys.argv[2]) if len(sys.argv) > 2 else 5,
        )
    )
