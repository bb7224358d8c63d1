"""`jitgate policy lint`: what makes a policy unusable, and what makes it wider than it needs.

Errors are model.errors (the policy service refuses such a file); warnings are
least-scope smells a reviewer should look at twice:

- broad-group: a group bound to more than N connections.
- broad-connection: a connection reachable by more than N groups.
- unreachable-connection: a connection no binding names (dead config, or a
  binding that was meant to be there).
- production-without-reason: a writable production connection granted without
  require_reason, so nothing records why.
- production-at-ceiling: a writable production connection granted for the whole
  ttl_ceiling: the widest grant the file allows, on the most sensitive target.
- untagged-connection: some connections carry an environment and this one does
  not, so the production checks above cannot see it.
"""

from __future__ import annotations

import re
from collections import defaultdict

from jitgate.common.errors import ConfigError
from jitgate.policy import model
from jitgate.policy.model import Finding, Policy

PRODUCTION = "production"
WHOLE_FILE = "(file)"
"""The path of a finding about the file as a whole (not UTF-8, not TOML)."""
_KEY_PATH = re.compile(r"((?:[A-Za-z0-9._-]+|\[[0-9]+\])+): (.*)", re.DOTALL)
_SEVERITY = {"error": 0, "warning": 1}


def lint(
    data: str | bytes,
    source: str = "policy",
    *,
    max_connections_per_group: int = 3,
    max_groups_per_connection: int = 3,
) -> list[Finding]:
    """Return the findings on the policy in data, errors first, then by path."""
    try:
        policy = model.read(data, source=source)
    except ConfigError as exc:
        return [_invalid(str(exc), source)]
    found = model.errors(policy) + warnings(
        policy,
        max_connections_per_group=max_connections_per_group,
        max_groups_per_connection=max_groups_per_connection,
    )
    return sorted(found, key=_order)


def warnings(
    policy: Policy, *, max_connections_per_group: int = 3, max_groups_per_connection: int = 3
) -> list[Finding]:
    """Return the least-scope warnings on a policy whose shape is right."""
    return (
        _broad_groups(policy, max_connections_per_group)
        + _broad_connections(policy, max_groups_per_connection)
        + _unreachable(policy)
        + _production(policy)
        + _untagged(policy)
    )


def _invalid(message: str, source: str) -> Finding:
    # read names the key path first ("bindings[2].max_ttl: ..."), or the source
    # for what concerns the whole file ("policy.toml: not valid TOML: ...").
    rest = message.removeprefix(f"{source}: ")
    if rest != message and rest.startswith(("not UTF-8", "not valid TOML")):
        return Finding(severity="error", code="invalid", path=WHOLE_FILE, message=rest)
    match = _KEY_PATH.fullmatch(message)
    if match is None:
        return Finding(severity="error", code="invalid", path=WHOLE_FILE, message=message)
    return Finding(severity="error", code="invalid", path=match[1], message=match[2])


def _warning(code: str, path: str, message: str) -> Finding:
    return Finding(severity="warning", code=code, path=path, message=message)


def _broad_groups(policy: Policy, limit: int) -> list[Finding]:
    reached: dict[str, list[str]] = defaultdict(list)
    crossed: dict[str, str] = {}  # group -> the binding that took it over the limit
    for binding in policy.bindings:
        names = reached[binding.group]
        if binding.connection in policy.connections and binding.connection not in names:
            names.append(binding.connection)
            if len(names) == limit + 1:
                crossed[binding.group] = binding.path
    return [
        _warning(
            "broad-group",
            path,
            f"{group!r} reaches {len(reached[group])} connections (more than {limit}):"
            f" {', '.join(reached[group])}; split the group by task",
        )
        for group, path in crossed.items()
    ]


def _broad_connections(policy: Policy, limit: int) -> list[Finding]:
    groups: dict[str, set[str]] = defaultdict(set)
    for binding in policy.bindings:
        groups[binding.connection].add(binding.group)
    return [
        _warning(
            "broad-connection",
            f"connections.{name}",
            f"{len(groups[name])} groups reach it (more than {limit}):"
            f" {', '.join(sorted(groups[name]))}",
        )
        for name in policy.connections
        if len(groups[name]) > limit
    ]


def _unreachable(policy: Policy) -> list[Finding]:
    named = {b.connection for b in policy.bindings}
    return [
        _warning(
            "unreachable-connection",
            f"connections.{name}",
            "no binding names it; remove it, or add the binding that was meant to",
        )
        for name in policy.connections
        if name not in named
    ]


def _production(policy: Policy) -> list[Finding]:
    found = []
    for binding in policy.bindings:
        connection = policy.connections.get(binding.connection)
        if connection is None or connection.environment != PRODUCTION or connection.read_only:
            continue
        if not binding.require_reason:
            found.append(
                _warning(
                    "production-without-reason",
                    binding.path,
                    f"{binding.group!r} may have read-write production {binding.connection!r}"
                    " without saying why; set require_reason = true",
                )
            )
        if binding.max_ttl == policy.ttl_ceiling:
            found.append(
                _warning(
                    "production-at-ceiling",
                    f"{binding.path}.max_ttl",
                    f"{binding.group!r} may have read-write production {binding.connection!r}"
                    f" for the whole ttl_ceiling ({binding.max_ttl}s); would less do?",
                )
            )
    return found


def _untagged(policy: Policy) -> list[Finding]:
    if not any(c.environment for c in policy.connections.values()):
        return []  # a file that tags nothing has made that choice once, not per connection
    return [
        _warning(
            "untagged-connection",
            f"connections.{name}",
            "has no environment while others do; the production checks cannot see it",
        )
        for name, connection in policy.connections.items()
        if not connection.environment
    ]


def _order(finding: Finding) -> tuple[int, list[str | int], str]:
    # bindings[10] after bindings[9]: numbers in a path compare as numbers.
    parts: list[str | int] = [
        int(p) if p.isdigit() else p for p in re.split(r"([0-9]+)", finding.path)
    ]
    return (_SEVERITY.get(finding.severity, 2), parts, finding.code)
