"""The Compose file and the Kubernetes manifests keep the trust zones, and each check can fail."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import yaml

from jitgate.policy import model
from tests.deploy import zones

K8S_VERSION = "1.33"
"""A Kubernetes release still widely run; the manifests are checked against the newest too."""
K8S_VERSIONS = (K8S_VERSION, kubernetes_validate.utils.latest_version())

Doc = dict[str, Any]
_K8S = zones.load_k8s()
_COMPOSE = zones.load_compose()


@pytest.fixture
def k8s() -> list[Doc]:
    """A fresh copy of every manifest, for a test to break."""
    return copy.deepcopy(_K8S)


@pytest.fixture
def compose() -> Doc:
    """A fresh copy of compose.yaml, for a test to break."""
    return copy.deepcopy(_COMPOSE)


def find(docs: list[Doc], kind: str, name: str, namespace: str | None = None) -> Doc:
    """The one document of kind and name (in namespace, if given)."""
    (doc,) = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["name"] == name
        and namespace in (None, d["metadata"].get("namespace"))
    ]
    return doc


def container(docs: list[Doc], name: str) -> Doc:
    """The container of workload name."""
    return zones.pod_spec(zones.workloads(docs)[name])["containers"][0]


# Parsing and schemas ------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((zones.K8S_DIR / "kustomization.yaml").read_text())
    listed = {zones.K8S_DIR / path for path in kustomization["resources"]}
    assert listed == set(zones.manifest_files())


def test_every_manifest_names_its_namespace() -> None:
    for doc in _K8S:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] in zones.NAMESPACES.values(), doc["metadata"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    # strict: an unknown field (a typo) is an error, not silently dropped.
    for doc in _K8S:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.usefixtures("offline")
def test_schema_validation_catches_a_misspelt_field(k8s: list[Doc]) -> None:
    security = container(k8s, "issuer")["securityContext"]
    security["readOnlyRootFilesytem"] = security.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFilesytem"):
        kubernetes_validate.validate(find(k8s, "Deployment", "issuer"), K8S_VERSION, strict=True)


def test_the_shipped_policy_loads_and_grants_nothing() -> None:
    configmap = find(_K8S, "ConfigMap", "policy-file")
    policy = model.parse(configmap["data"]["policy.toml"], source="policy-file")
    assert policy.bindings == ()


# Kubernetes zone invariants: hold as shipped ---------------------------------------

K8S_CHECKS = [
    zones.audit_storage_problems,
    zones.secret_problems,
    zones.default_deny_problems,
    zones.reachability_problems,
    zones.ingress_problems,
    zones.edge_to_audit_rule_problems,
    zones.hardening_problems,
]


@pytest.mark.parametrize("check", K8S_CHECKS, ids=lambda check: check.__name__)
def test_k8s_invariant_holds(check: Callable[[list[Doc]], list[str]], k8s: list[Doc]) -> None:
    assert check(k8s) == []


# ...and each one catches the manifest changed to break it.


def test_catches_the_audit_claim_mounted_by_the_issuer(k8s: list[Doc]) -> None:
    spec = zones.pod_spec(find(k8s, "Deployment", "issuer"))
    spec["volumes"].append({"name": "audit-log", "persistentVolumeClaim": {"claimName": "x"}})
    spec["containers"][0]["volumeMounts"].append({"name": "audit-log", "mountPath": "/a"})
    assert zones.audit_storage_problems(k8s) == [
        "issuer has the volume claim audit-log",
        "issuer mounts audit-log",
    ]


def test_catches_a_claim_outside_the_audit_namespace(k8s: list[Doc]) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "audit-copy", "namespace": "jitgate-core"},
        "spec": {"accessModes": ["ReadWriteOnce"]},
    }
    k8s.append(claim)
    assert zones.audit_storage_problems(k8s) == ["PVC audit-copy outside jitgate-audit"]


def test_catches_the_audit_signing_key_in_the_proxy(k8s: list[Doc]) -> None:
    spec = zones.pod_spec(find(k8s, "Deployment", "proxy"))
    spec["volumes"].append({"name": "k", "secret": {"secretName": "audit-signing"}})
    assert zones.secret_problems(k8s) == [
        "proxy reads the Secret audit-signing, not one of its own",
        "proxy (edge) reads the audit Secret audit-signing",
    ]


def test_catches_an_audit_database_credential_in_the_issuer(k8s: list[Doc]) -> None:
    reference = {"secretKeyRef": {"name": "audit-db", "key": "dsn"}}
    container(k8s, "issuer")["env"].append({"name": "JITGATE_AUDIT_DB", "valueFrom": reference})
    assert zones.secret_problems(k8s) == [
        "issuer reads the Secret audit-db, not one of its own",
        "issuer (edge) reads the audit Secret audit-db",
        "issuer (edge) sets JITGATE_AUDIT_DB",
        "issuer sets JITGATE_AUDIT_DB, audit's own",
    ]


def test_catches_an_audit_secret_defined_in_the_edge_namespace(k8s: list[Doc]) -> None:
    k8s.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "audit-signing", "namespace": "jitgate-edge"},
        }
    )
    assert zones.secret_problems(k8s) == ["audit Secret audit-signing in the edge namespace"]


def test_catches_a_default_deny_that_lets_egress_out(k8s: list[Doc]) -> None:
    find(k8s, "NetworkPolicy", "default-deny", "jitgate-core")["spec"]["policyTypes"] = ["Ingress"]
    assert zones.default_deny_problems(k8s) == [
        "jitgate-core has no default-deny policy for ingress and egress"
    ]


def test_catches_a_default_deny_with_a_rule(k8s: list[Doc]) -> None:
    find(k8s, "NetworkPolicy", "default-deny", "jitgate-audit")["spec"]["ingress"] = [{}]
    assert zones.default_deny_problems(k8s) == [
        "jitgate-audit has no default-deny policy for ingress and egress"
    ]


def test_catches_a_missing_default_deny(k8s: list[Doc]) -> None:
    k8s.remove(find(k8s, "NetworkPolicy", "default-deny", "jitgate-edge"))
    assert zones.default_deny_problems(k8s) == [
        "jitgate-edge has no default-deny policy for ingress and egress"
    ]


def test_catches_an_and_peer_split_into_an_or(k8s: list[Doc]) -> None:
    # Two peers instead of one: "any pod of jitgate-core, or policy pods of jitgate-audit".
    rule = find(k8s, "NetworkPolicy", "audit")["spec"]["ingress"][0]
    both = rule["from"][0]
    rule["from"] = [{"namespaceSelector": both["namespaceSelector"]}, rule["from"][1]]
    assert zones.ingress_problems(k8s) == ["core-other may enter audit"]
    # The core namespace's own default-deny still stops that pod on its way out.
    assert zones.reachability_problems(k8s) == []


def test_catches_ingress_to_core_from_any_namespace(k8s: list[Doc]) -> None:
    peer = find(k8s, "NetworkPolicy", "verifier")["spec"]["ingress"][0]["from"][0]
    peer["namespaceSelector"] = {}
    assert zones.ingress_problems(k8s) == ["stranger may enter verifier"]
    assert zones.reachability_problems(k8s) == ["stranger can reach verifier"]


def test_catches_a_lost_call(k8s: list[Doc]) -> None:
    egress = find(k8s, "NetworkPolicy", "policy")["spec"]["egress"]
    egress[:] = [rule for rule in egress if rule["ports"][0]["port"] != 7446]
    assert zones.reachability_problems(k8s) == ["policy cannot reach audit"]


def test_catches_edge_to_audit_on_both_sides(k8s: list[Doc]) -> None:
    to_audit = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "jitgate-audit"}}
    }
    find(k8s, "NetworkPolicy", "proxy")["spec"]["egress"].append({"to": [to_audit]})
    from_edge = {"namespaceSelector": {"matchLabels": {"jitgate.io/zone": "edge"}}}
    find(k8s, "NetworkPolicy", "audit")["spec"]["ingress"][0]["from"].append(from_edge)
    assert sorted(zones.edge_to_audit_rule_problems(k8s)) == [
        "audit lets edge-other into audit",
        "audit lets issuer into audit",
        "audit lets proxy into audit",
        "proxy lets proxy out to audit",
    ]
    assert zones.reachability_problems(k8s) == ["proxy can reach audit"]


def test_catches_one_sided_edge_to_audit_by_ip(k8s: list[Doc]) -> None:
    # Audit's ingress still refuses, but the issuer's side must refuse as well.
    anywhere = {"ipBlock": {"cidr": "0.0.0.0/0"}}
    find(k8s, "NetworkPolicy", "issuer")["spec"]["egress"].append({"to": [anywhere]})
    assert zones.edge_to_audit_rule_problems(k8s) == ["issuer lets issuer out to audit"]


def test_catches_weakened_hardening(k8s: list[Doc]) -> None:
    policy = find(k8s, "Deployment", "policy")
    spec = zones.pod_spec(policy)
    spec["automountServiceAccountToken"] = True
    spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    spec["containers"][0]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    del spec["containers"][0]["resources"]["limits"]
    spec["containers"][0]["readinessProbe"] = {"grpc": {"port": 7445}}
    find(k8s, "ServiceAccount", "verifier")["automountServiceAccountToken"] = True
    find(k8s, "StatefulSet", "audit")["spec"]["replicas"] = 2
    assert sorted(zones.hardening_problems(k8s)) == [
        "audit is not one StatefulSet replica: the log has one writer",
        "policy keeps capabilities",
        "policy lacks cpu and memory limits",
        "policy's pods mount a ServiceAccount token",
        "policy's readiness is not its gRPC health check",
        "policy's root filesystem is writable",
        "verifier's ServiceAccount mounts its token",
    ]


# Compose ---------------------------------------------------------------------------

COMPOSE_CHECKS = [
    zones.compose_network_problems,
    zones.compose_audit_volume_problems,
    zones.compose_secret_problems,
    zones.compose_port_problems,
]


@pytest.mark.parametrize("check", COMPOSE_CHECKS, ids=lambda check: check.__name__)
def test_compose_invariant_holds(check: Callable[[Doc], list[str]], compose: Doc) -> None:
    assert check(compose) == []


def test_compose_runs_every_service_from_the_image(compose: Doc) -> None:
    for name in zones.SERVICES:
        service = compose["services"][name]
        assert service["command"] == ["serve", name]
        assert service["build"]["dockerfile"] == "deploy/compose/Dockerfile"
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]


def test_compose_catches_the_audit_volume_in_the_issuer(compose: Doc) -> None:
    compose["services"]["issuer"]["volumes"] = ["audit-log:/var/lib/jitgate/audit:ro"]
    assert zones.compose_audit_volume_problems(compose) == ["issuer mounts audit-log"]


def test_compose_catches_a_core_service_on_the_agents_network(compose: Doc) -> None:
    compose["services"]["policy"]["networks"].append("agents")
    assert zones.compose_network_problems(compose) == ["agents joins ['issuer', 'policy', 'proxy']"]


def test_compose_catches_the_proxy_on_the_audit_network(compose: Doc) -> None:
    compose["services"]["proxy"]["networks"].append("audit")
    assert zones.compose_network_problems(compose) == [
        "audit joins ['audit', 'policy', 'proxy', 'verifier']",
        "proxy shares a network with audit",
    ]


def test_compose_catches_a_routed_core_network(compose: Doc) -> None:
    compose["networks"]["core"] = {}
    assert zones.compose_network_problems(compose) == ["network core is not internal"]


def test_compose_catches_a_lost_call(compose: Doc) -> None:
    compose["services"]["verifier"]["networks"].remove("audit")
    assert zones.compose_network_problems(compose) == [
        "audit joins ['audit', 'policy']",
        "verifier cannot reach audit",
    ]


def test_compose_catches_audit_key_given_to_the_issuer(compose: Doc) -> None:
    compose["services"]["issuer"]["secrets"].append({"source": "audit_signing_key"})
    assert zones.compose_secret_problems(compose) == [
        "issuer mounts the secret audit_signing_key (secrets/audit/signing.key), not its own"
    ]


def test_compose_catches_another_services_redis_user(compose: Doc) -> None:
    compose["services"]["proxy"]["env_file"] = ["secrets/policy/redis.env"]
    assert zones.compose_secret_problems(compose) == [
        "proxy reads secrets/policy/redis.env, not its own"
    ]


def test_compose_catches_a_published_core_port(compose: Doc) -> None:
    compose["services"]["audit"]["ports"] = ["7446:7446"]
    assert zones.compose_port_problems(compose) == ["audit publishes ['7446:7446']"]


def test_dockerfile() -> None:
    text = (zones.COMPOSE_DIR / "Dockerfile").read_text()
    assert zones.dockerfile_problems(text) == []
    as_root = text.replace("USER ${JITGATE_UID}:${JITGATE_GID}", "USER root")
    assert zones.dockerfile_problems(as_root) == ["the image runs as root"]
