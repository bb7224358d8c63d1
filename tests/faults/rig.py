"""Fault injection on the real stack: steady RequestGrant load, one part killed or paused.

A scenario runs open-loop load from several agents (each sends at a fixed
rate whatever the answers, so a stalled part piles requests up as it would in
production), SIGKILLs or SIGSTOPs one part (audit, verifier, policy or Redis),
brings it back with the stack's own methods (or SIGCONT), waits until grants
are issued again, stops the load and checks:

- every request made while the part was down failed with UNAVAILABLE within
  PROMISED seconds, and none returned a grant;
- every grant returned, and every grant:* or issued:* key in Redis, has a
  durable allowed decision record in the audit log naming it;
- the service recovered without a manual step within RECOVERY_BOUND seconds;
- the audit log still verifies against its checkpoint key.

Allowed decision records whose grant was never returned (a later step
failed) are counted, not refused: the record is written before the grant
exists, so a failure after it leaves exactly that.

`tests/faults/test_faults.py` runs short scenarios; `bench/faults.py` longer ones.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from jitgate import client as sdk
from jitgate.audit.record import parse
from jitgate.audit.store import SqliteStore, iter_records
from jitgate.devstack.stack import EXAMPLES, Stack
from tests.e2e.conftest import verify_audit_log

PARTS = ("audit", "verifier", "policy", "redis")
FAULTS = ("SIGKILL", "SIGSTOP")
PROMISED = 3.0
"""A request made while a part is down fails within this: issuer deadline 2.5 s, audit's 2 s."""
RECOVERY_BOUND = 10.0
"""Grants are issued again at most this long after the part is back, with no manual step."""
CLIENT_TIMEOUT = 10.0
"""The agents' own deadline: longer than PROMISED, so the issuer's deadline is what is measured."""
SETTLED = 1.0
"""Recovered means: every request for this long after the last failure got its grant."""
CONNECTION = "orders-replica"
GRANT_TTL = 60
GRANT_AGENTS = ("deploy-bot", "fault-bot-1", "fault-bot-2")
"""Agents in group platform, which the example policy binds to CONNECTION."""
DENIED_AGENT = "intern-bot"
"""In no bound group: every request it makes is a recorded denial."""
_EXTRA_AGENTS = """
[agents.fault-bot-1]
secret = "fault-bot-1-dev-secret-not-for-production"
groups = ["platform"]

[agents.fault-bot-2]
secret = "fault-bot-2-dev-secret-not-for-production"
groups = ["platform"]
"""
_GRANT_ID_CHARS = frozenset("0123456789abcdef")


def add_agents(state: Path) -> None:
    """Give the dev IdP two more platform agents than the example has, before the stack starts."""
    state.mkdir(parents=True, exist_ok=True)
    text = (EXAMPLES / "agents.toml").read_text()
    (state / "agents.toml").write_text(text + _EXTRA_AGENTS)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One RequestGrant as an agent saw it."""

    agent: str
    started: float
    ended: float
    grant: sdk.Grant | None = None
    error: str = ""
    """Empty for a grant; else the SDK error's class and, for Unavailable, the gRPC code."""

    @property
    def seconds(self) -> float:
        """How long the request took."""
        return self.ended - self.started

    @property
    def wants_grant(self) -> bool:
        """Whether the policy grants this agent's requests."""
        return self.agent != DENIED_AGENT

    @property
    def unavailable(self) -> bool:
        """Whether the issuer itself answered UNAVAILABLE."""
        return self.error == "Unavailable:UNAVAILABLE"


def _describe(error: sdk.GrantError) -> str:
    name = type(error).__name__
    if isinstance(error, sdk.Unavailable):
        # The SDK's message starts with the status code's name.
        return f"{name}:{str(error).split(':', 1)[0]}"
    return name


class Load:
    """Open-loop RequestGrant traffic: each agent sends at a fixed rate, whatever the answers."""

    def __init__(self, stack: Stack, *, rate: float) -> None:
        self.rate = rate
        """Requests per second per agent."""
        self._clients = {
            agent: sdk.IssuerClient(
                stack.address("issuer"),
                token=stack.token(agent),
                ca_file=stack.pki.ca,
                timeout=CLIENT_TIMEOUT,
            )
            for agent in (*GRANT_AGENTS, DENIED_AGENT)
        }
        # Enough threads for every request a stalled part can hold up at once.
        workers = int(rate * len(self._clients) * (PROMISED + 1)) + 8
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent")
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._futures: list[Future[None]] = []
        self._stopping = threading.Event()
        self._pacers: list[threading.Thread] = []

    @property
    def total_rate(self) -> float:
        """Requests per second from all agents together."""
        return self.rate * len(self._clients)

    def outcomes(self) -> list[Outcome]:
        """The requests that have ended so far."""
        with self._lock:
            return list(self._outcomes)

    def start(self) -> None:
        """Start sending; outcomes of an earlier run are forgotten."""
        with self._lock:
            self._outcomes = []
        self._stopping.clear()
        for offset, agent in enumerate(self._clients):
            # Staggered, so the agents' requests interleave rather than arrive together.
            delay = offset / self.total_rate
            pacer = threading.Thread(target=self._pace, args=(agent, delay), daemon=True)
            pacer.start()
            self._pacers.append(pacer)

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for every request in flight, and return all outcomes."""
        self._stopping.set()
        for pacer in self._pacers:
            pacer.join()
        self._pacers = []
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            future.result()
        return self.outcomes()

    def close(self) -> None:
        """Stop, then close every agent's channel."""
        self.stop()
        self._pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()

    def _pace(self, agent: str, delay: float) -> None:
        interval = 1.0 / self.rate
        due = time.monotonic() + delay
        while not self._stopping.wait(max(0.0, due - time.monotonic())):
            future = self._pool.submit(self._request, agent)
            with self._lock:
                self._futures.append(future)
            due += interval

    def _request(self, agent: str) -> None:
        client = self._clients[agent]
        started = time.monotonic()
        try:
            grant = client.request_grant(CONNECTION, ttl_seconds=GRANT_TTL)
        except sdk.GrantError as exc:
            outcome = Outcome(
                agent=agent, started=started, ended=time.monotonic(), error=_describe(exc)
            )
        else:
            outcome = Outcome(agent=agent, started=started, ended=time.monotonic(), grant=grant)
        with self._lock:
            self._outcomes.append(outcome)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """An allowed decision record in the audit log, by what it names."""

    index: int
    grant_id: str
    subject: str
    connection: str


def audit_decisions(stack: Stack) -> tuple[int, dict[str, Decision]]:
    """The audit log's size and its allowed decisions by grant id, read from the stored log."""
    store = SqliteStore.open(stack.audit_db, read_only=True)
    size = 0
    allowed: dict[str, Decision] = {}
    try:
        for stored in iter_records(store):
            size = stored.index + 1
            event: Any = parse(stored.canonical).event.get("decision")
            if isinstance(event, dict) and event.get("allowed") is True:
                grant_id = str(event.get("grant_id", ""))
                allowed[grant_id] = Decision(
                    index=stored.index,
                    grant_id=grant_id,
                    subject=str(event.get("identity", {}).get("subject", "")),
                    connection=str(event.get("connection", "")),
                )
    finally:
        store.close()
    return size, allowed


def _grant_id(key: bytes, prefix: bytes) -> str | None:
    """The grant id in a grant:<id> or issued:<id> key; None for the index keys beside them."""
    rest = key.removeprefix(prefix).decode(errors="replace")
    if len(rest) == 32 and set(rest) <= _GRANT_ID_CHARS:
        return rest
    return None


def redis_grant_ids(stack: Stack) -> set[str]:
    """Ids of every grant in Redis: the issuer's grant:* keys and the policy's issued:* records."""
    client = redis.Redis.from_url(stack.redis_url("admin"), socket_timeout=5)
    try:
        ids = set()
        for prefix in (b"grant:", b"issued:"):
            for key in client.scan_iter(match=prefix + b"*", count=1000):
                grant_id = _grant_id(key, prefix)
                if grant_id is not None:
                    ids.add(grant_id)
        return ids
    finally:
        client.close()


def redis_acl(stack: Stack) -> list[list[str]]:
    """The Redis users and their rules (passwords as hashes), from ACL LIST."""
    client = redis.Redis.from_url(stack.redis_url("admin"), socket_timeout=5)
    try:
        # Each server lists a user's commands in its own order: compare them as sets.
        return sorted(sorted(str(line).split()) for line in client.acl_list())
    finally:
        client.close()


def _process(stack: Stack, part: str) -> Any:
    if part == "redis":
        assert stack.redis is not None
        assert stack.redis.process is not None
        return stack.redis.process
    return stack.processes[part]


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Return once the kernel has stopped pid (state T), so nothing it does after counts."""
    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{pid}/stat")
    while True:
        # The state follows the parenthesised command name, which may hold spaces.
        state = stat.read_text().rpartition(")")[2].split()[0]
        if state in ("T", "t"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} is still in state {state} after SIGSTOP")
        time.sleep(0.001)


def inject(stack: Stack, part: str, fault: str) -> float:
    """SIGKILL or SIGSTOP part; return the moment the fault had taken effect."""
    process = _process(stack, part)
    if fault == "SIGKILL":
        process.kill()
        process.wait()  # reaped: it can no longer answer anything
    else:
        process.send_signal(signal.SIGSTOP)
        _wait_stopped(process.pid)
    return time.monotonic()


def resume(stack: Stack, part: str, fault: str) -> float:
    """Bring part back: start it again (SIGKILL) or SIGCONT it; return how long that took."""
    started = time.monotonic()
    if fault == "SIGSTOP":
        _process(stack, part).send_signal(signal.SIGCONT)
    elif part == "redis":
        # Same port, same ACL file with the same passwords: every service's user is back.
        assert stack.redis is not None
        stack.redis.start()
    else:
        stack.start_service(part)
    return time.monotonic() - started


def heal(stack: Stack, part: str) -> None:
    """Leave part running, whatever a failed scenario left it in."""
    process = _process(stack, part)
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
    elif part == "redis":
        assert stack.redis is not None
        stack.redis.start()
    else:
        stack.start_service(part)


def recovered_at(outcomes: Iterable[Outcome], since: float) -> float | None:
    """Start of the first request from which every grant request started later got its grant."""
    wanted = sorted((o for o in outcomes if o.wants_grant and o.started >= since), key=_start)
    moment = None
    for outcome in wanted:
        if outcome.grant is None:
            moment = None
        elif moment is None:
            moment = outcome.started
    return moment


def _start(outcome: Outcome) -> float:
    return outcome.started


@dataclass(kw_only=True)
class Result:
    """What one scenario showed; problems must be empty."""

    part: str
    fault: str
    rate: float = 0.0
    requests: int = 0
    during: int = 0
    """Requests started while the part was down."""
    failed_during: int = 0
    """Of those, the ones that had failed with UNAVAILABLE before the part came back."""
    max_failure: float = 0.0
    """Longest time to a failure of a request made while the part was down."""
    max_request: float = 0.0
    """Longest time to any answer, over every request of the scenario (not promised)."""
    grants_while_down: int = 0
    grants: int = 0
    unrecorded_returned: int = 0
    """Grants returned without a durable allowed decision naming them: must be 0."""
    unrecorded_in_redis: int = 0
    """Grant ids in Redis without a durable allowed decision naming them: must be 0."""
    in_redis: int = 0
    allowed_not_returned: int = 0
    """Allowed decisions recorded in this scenario whose grant no agent received."""
    stored_not_returned: int = 0
    """Of those, the ones whose grant is in Redis anyway (the answer was lost)."""
    redis_grants_before_kill: int = 0
    redis_grants_kept: int = 0
    """Of the grants in Redis just before its SIGKILL, how many the restarted Redis holds."""
    restart: float = 0.0
    recovery: float | None = None
    """Seconds from the part being back to grants being issued again."""
    records: int = 0
    log_verifies: bool = False
    problems: list[str] = field(default_factory=list)

    def row(self) -> str:
        """One line of the Markdown table of `header()`."""
        recovery = "never" if self.recovery is None else f"{self.recovery:.2f}"
        redis = (
            f"{self.redis_grants_kept}/{self.redis_grants_before_kill}"
            if self.part == "redis" and self.fault == "SIGKILL"
            else "-"
        )
        return (
            f"| {self.part} | {self.fault} | {self.requests} | {self.during} |"
            f" {self.failed_during} | {self.max_failure:.2f} | {self.grants_while_down} |"
            f" {self.grants} | {self.unrecorded_returned} | {self.unrecorded_in_redis} |"
            f" {self.allowed_not_returned} ({self.stored_not_returned}) | {redis} |"
            f" {self.restart:.2f} | {recovery} | {'yes' if self.log_verifies else 'NO'} |"
        )


def header() -> str:
    """The Markdown table head for Result.row()."""
    return (
        "| part | fault | requests | during fault | failed fast | max failure s |"
        " grants while down | grants | without record (returned) |"
        " without record (Redis) | allowed, not returned (in Redis) |"
        " Redis grants kept | restart s | time to recover s | log verifies |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )


class Rig:
    """Runs scenarios one after another on one stack, with one set of agents."""

    def __init__(self, stack: Stack, *, rate: float) -> None:
        self.stack = stack
        self.load = Load(stack, rate=rate)
        self.returned: set[str] = set()
        """Every grant id any agent received, over every scenario so far."""

    def close(self) -> None:
        """Stop the agents."""
        self.load.close()

    def scenario(
        self, part: str, fault: str, *, before: float, down: float, after: float
    ) -> Result:
        """Load for `before` s, fault for `down` s, bring back, load `after` s past recovery."""
        result = Result(part=part, fault=fault, rate=self.load.total_rate)
        first_index, _ = audit_decisions(self.stack)
        acl_before = redis_acl(self.stack) if part == "redis" else []
        back = down_at = 0.0
        before_kill: set[str] = set()
        self.load.start()
        try:
            time.sleep(before)
            if part == "redis" and fault == "SIGKILL":
                before_kill = redis_grant_ids(self.stack)
                result.redis_grants_before_kill = len(before_kill)
            down_at = inject(self.stack, part, fault)
            time.sleep(down)
            back = time.monotonic()
            result.restart = resume(self.stack, part, fault)
            self._wait_recovered(back)
            time.sleep(after)
        finally:
            outcomes = self.load.stop()
            heal(self.stack, part)
        self._check_fault(result, outcomes, down_at, back)
        if part == "redis" and fault == "SIGKILL":
            result.redis_grants_kept = len(before_kill & redis_grant_ids(self.stack))
            if redis_acl(self.stack) != acl_before:
                result.problems.append("the restarted Redis does not have the same ACL users")
        self._check_records(result, outcomes, first_index, before_kill)
        return result

    def _wait_recovered(self, back: float) -> None:
        deadline = back + RECOVERY_BOUND + SETTLED
        while time.monotonic() < deadline:
            moment = recovered_at(self.load.outcomes(), back)
            if moment is not None and time.monotonic() - moment > SETTLED:
                return
            time.sleep(0.1)

    def _check_fault(
        self, result: Result, outcomes: Sequence[Outcome], down_at: float, back: float
    ) -> None:
        problems = result.problems
        result.requests = len(outcomes)
        result.max_request = max((o.seconds for o in outcomes), default=0.0)
        result.grants = sum(o.grant is not None for o in outcomes)
        during = [o for o in outcomes if down_at <= o.started < back]
        result.during = len(during)
        result.max_failure = max((o.seconds for o in during if o.grant is None), default=0.0)
        for outcome in during:
            if outcome.seconds >= PROMISED:
                problems.append(
                    f"a request of {outcome.agent} made while {result.part} was down took"
                    f" {outcome.seconds:.2f}s ({outcome.error or 'grant'}); the promise is"
                    f" {PROMISED}s"
                )
            if outcome.ended >= back:
                continue  # answered after the part was back: any answer is right
            if outcome.grant is not None:
                result.grants_while_down += 1
                problems.append(
                    f"{outcome.agent} got grant {outcome.grant.grant_id} while {result.part}"
                    f" was down ({result.fault})"
                )
            elif outcome.unavailable:
                result.failed_during += 1
            elif not (
                # A denial needs no Redis: it is recorded and answered while Redis is down.
                result.part == "redis" and not outcome.wants_grant and outcome.error == "Denied"
            ):
                problems.append(
                    f"while {result.part} was down {outcome.agent} got {outcome.error},"
                    " not UNAVAILABLE"
                )
        if result.failed_during == 0:
            problems.append(f"no request failed while {result.part} was down: no fault was seen")
        moment = recovered_at(outcomes, back)
        last = max((o.started for o in outcomes if o.wants_grant), default=back)
        if moment is None or last - moment < SETTLED:
            problems.append(
                f"grants were not issued steadily again within {RECOVERY_BOUND}s"
                f" after {result.part} was back"
            )
        else:
            result.recovery = max(0.0, moment - back)
            if result.recovery > RECOVERY_BOUND:
                problems.append(
                    f"grants were issued again only {result.recovery:.1f}s after"
                    f" {result.part} was back"
                )

    def _check_records(
        self, result: Result, outcomes: Sequence[Outcome], first_index: int, seen: set[str]
    ) -> None:
        """Check grants returned, grants in Redis now and those in `seen` against the log."""
        problems = result.problems
        size, allowed = audit_decisions(self.stack)
        result.records = size
        for outcome in outcomes:
            grant = outcome.grant
            if grant is None:
                continue
            self.returned.add(grant.grant_id)
            decision = allowed.get(grant.grant_id)
            if decision is None or (decision.subject, decision.connection) != (
                grant.subject,
                grant.connection,
            ):
                result.unrecorded_returned += 1
                problems.append(
                    f"grant {grant.grant_id} of {grant.subject} was returned with no durable"
                    " allowed decision naming it"
                )
        in_redis = redis_grant_ids(self.stack)
        result.in_redis = len(in_redis)
        for grant_id in sorted((in_redis | seen) - allowed.keys()):
            result.unrecorded_in_redis += 1
            problems.append(f"grant {grant_id} is in Redis with no durable allowed decision")
        for decision in allowed.values():
            if decision.index >= first_index and decision.grant_id not in self.returned:
                result.allowed_not_returned += 1
                result.stored_not_returned += decision.grant_id in in_redis
        report, _ = verify_audit_log(self.stack)
        result.log_verifies = report.ok
        if not report.ok:
            problems.append(f"the audit log does not verify: {report.found}")


@contextlib.contextmanager
def running_stack(state: Path) -> Iterator[Stack]:
    """A started stack with the fault agents; stopped on the way out."""
    add_agents(state)
    stack = Stack(state)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
