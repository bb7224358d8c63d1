"""Which connections a set of Kubernetes NetworkPolicies allows, by their documented semantics.

A connection is allowed when the source's egress policies and the
destination's ingress policies both allow it. A pod that no policy of a given
type selects is not isolated in that direction. Rules in one policy, and
policies selecting one pod, are ORed; namespaceSelector and podSelector in
one peer are ANDed. ipBlocks are matched against every endpoint's address,
pods' too, so that an over-wide CIDR counts as reaching them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace set) or a host outside the cluster (namespace None)."""

    name: str
    namespace: str | None
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[tuple[int, str], ...] = ()
    """(port, protocol) it listens on."""


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector selects labels; an empty selector selects everything."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = set(expression.get("values") or [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def policy_types(policy: Doc) -> set[str]:
    """The directions a policy isolates, with the API's defaults."""
    spec = policy["spec"]
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if "egress" in spec else set())


def _in_block(ip: str, block: Mapping[str, Any]) -> bool:
    address = ipaddress.ip_address(ip)
    if address not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except") or [])


class Cluster:
    """NetworkPolicies plus namespace labels: answers whether a connection is allowed."""

    def __init__(self, policies: Iterable[Doc], namespace_labels: Mapping[str, Mapping[str, str]]):
        self.policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]
        self._namespace_labels = namespace_labels

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        """A namespace's labels, with the one Kubernetes sets on every namespace."""
        labels = dict(self._namespace_labels.get(namespace, {}))
        labels["kubernetes.io/metadata.name"] = namespace
        return labels

    def peer_matches(self, peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
        """Whether one NetworkPolicyPeer describes the other end of the connection."""
        if "ipBlock" in peer:
            return _in_block(other.ip, peer["ipBlock"])
        if other.namespace is None:
            return False
        namespace_selector = peer.get("namespaceSelector")
        if namespace_selector is None:
            in_namespace = other.namespace == policy_namespace
        else:
            in_namespace = selector_matches(
                namespace_selector, self.namespace_labels(other.namespace)
            )
        return in_namespace and selector_matches(peer.get("podSelector"), other.labels)

    @staticmethod
    def port_matches(rule_ports: list[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
        """Whether a rule's ports admit port; no ports admit all. Named ports admit any."""
        if not rule_ports:
            return True
        for entry in rule_ports:
            if entry.get("protocol", "TCP") != protocol:
                continue
            number = entry.get("port")
            if number is None or isinstance(number, str):
                return True
            if number <= port <= entry.get("endPort", number):
                return True
        return False

    def selecting(self, endpoint: Endpoint, direction: str) -> list[Doc]:
        """The policies of the endpoint's namespace that isolate it in direction."""
        if endpoint.namespace is None:
            return []
        return [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == endpoint.namespace
            and selector_matches(p["spec"].get("podSelector"), endpoint.labels)
            and direction in policy_types(p)
        ]

    def rule_allows(
        self, policy: Doc, direction: str, other: Endpoint, port: int, protocol: str
    ) -> bool:
        """Whether some rule of one policy allows the connection with other."""
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            reaches = not peers or any(
                self.peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers
            )
            if reaches and self.port_matches(rule.get("ports"), port, protocol):
                return True
        return False

    def _side(
        self, endpoint: Endpoint, direction: str, other: Endpoint, port: int, protocol: str
    ) -> bool:
        policies = self.selecting(endpoint, direction)
        if not policies:
            return True
        return any(self.rule_allows(p, direction, other, port, protocol) for p in policies)

    def allows(self, source: Endpoint, target: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """Whether source may open a connection to target's port."""
        return self._side(source, "Egress", target, port, protocol) and self._side(
            target, "Ingress", source, port, protocol
        )

    def admits(self, source: Endpoint, target: Endpoint) -> bool:
        """Whether target's ingress policies alone let source in, to any port it listens on."""
        return any(self._side(target, "Ingress", source, p, proto) for p, proto in target.ports)

    def reaches(self, source: Endpoint, target: Endpoint) -> bool:
        """Whether source may connect to any port target listens on."""
        return any(self.allows(source, target, port, proto) for port, proto in target.ports)
