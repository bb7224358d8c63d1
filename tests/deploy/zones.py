"""The trust-zone rules of the deployment files, as checks that list what breaks them.

Each check takes loaded manifests and returns a list of problems, empty when
the rule holds, so that a test can show both that the shipped files obey it
and that a file changed to break it is caught.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.deploy.netpol import Cluster, Endpoint

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
K8S_DIR = ROOT / "deploy" / "k8s"

EDGE = frozenset({"issuer", "proxy"})
GRPC_SERVICES = frozenset({"issuer", "verifier", "policy", "audit"})
SERVICES = EDGE | GRPC_SERVICES
CALLS = frozenset(
    {
        ("issuer", "verifier"),
        ("issuer", "policy"),
        ("proxy", "policy"),
        ("verifier", "audit"),
        ("policy", "audit"),
    }
)
"""Who calls whom over gRPC (DESIGN: trust zones); nothing else may connect."""
REDIS_CLIENTS = frozenset({"issuer", "policy", "proxy"})
NAMESPACES = {"edge": "jitgate-edge", "core": "jitgate-core", "audit": "jitgate-audit"}
ZONE = {"issuer": "edge", "proxy": "edge", "verifier": "core", "policy": "core", "audit": "audit"}

Doc = dict[str, Any]


# Loading --------------------------------------------------------------------


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest, kustomization.yaml aside."""
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_k8s() -> list[Doc]:
    """Every document of every manifest."""
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_script(path: Path) -> ModuleType:
    """Import a script of deploy/ that is not part of the package."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_compose() -> Doc:
    """compose.yaml, its anchors and merge keys resolved."""
    data: Doc = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return data


# Kubernetes --------------------------------------------------------------------


def workloads(docs: list[Doc]) -> dict[str, Doc]:
    """Deployments and StatefulSets by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def pod_spec(workload: Doc) -> Doc:
    """The pod template's spec."""
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc) -> list[Doc]:
    """Init and regular containers of a workload."""
    spec = pod_spec(workload)
    return [*(spec.get("initContainers") or []), *spec["containers"]]


def secret_names(workload: Doc) -> Iterator[str]:
    """Every Secret a workload's pods read, by any route."""
    spec = pod_spec(workload)
    for volume in spec.get("volumes") or []:
        if "secret" in volume:
            yield volume["secret"]["secretName"]
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                yield source["secret"]["name"]
    for container in containers(workload):
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                yield ref["name"]
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                yield source["secretRef"]["name"]


def env_names(workload: Doc) -> Iterator[str]:
    """Every environment variable a workload's containers set."""
    for container in containers(workload):
        for env in container.get("env") or []:
            yield env["name"]


def audit_storage_problems(docs: list[Doc]) -> list[str]:
    """The audit log's volume is claimed in jitgate-audit and mounted by audit only."""
    problems = []
    audit_ns = NAMESPACES["audit"]
    for doc in docs:
        if doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["namespace"] != audit_ns:
            problems.append(f"PVC {doc['metadata']['name']} outside {NAMESPACES['audit']}")
    for name, workload in workloads(docs).items():
        volumes = pod_spec(workload).get("volumes") or []
        templates = workload["spec"].get("volumeClaimTemplates") or []
        claims = [v["name"] for v in volumes if "persistentVolumeClaim" in v]
        claims += [t["metadata"]["name"] for t in templates]
        mounts = {m["name"] for c in containers(workload) for m in c.get("volumeMounts") or []}
        if name != "audit":
            problems += [f"{name} has the volume claim {claim}" for claim in claims]
            if "audit-log" in mounts:
                problems.append(f"{name} mounts audit-log")
        elif workload["metadata"]["namespace"] != NAMESPACES["audit"]:
            problems.append(f"audit runs in {workload['metadata']['namespace']}")
        elif "audit-log" not in claims or "audit-log" not in mounts:
            problems.append("audit does not mount its own audit-log claim")
    return problems


def secret_problems(docs: list[Doc]) -> list[str]:
    """Each workload reads only its own Secrets; the edge reads nothing of audit's."""
    problems = []
    for name, workload in workloads(docs).items():
        namespace = workload["metadata"]["namespace"]
        home = NAMESPACES.get(ZONE.get(name, ""))
        if namespace != home:
            problems.append(f"{name} runs in {namespace}, not {home}")
        for secret in secret_names(workload):
            if not secret.startswith(f"{name}-"):
                problems.append(f"{name} reads the Secret {secret}, not one of its own")
            if name in EDGE and "audit" in secret:
                problems.append(f"{name} (edge) reads the audit Secret {secret}")
        for env in env_names(workload):
            if env.startswith("JITGATE_AUDIT_") and name in EDGE:
                problems.append(f"{name} (edge) sets {env}")
            if env in ("JITGATE_AUDIT_DB", "JITGATE_AUDIT_SIGNING_KEY") and name != "audit":
                problems.append(f"{name} sets {env}, audit's own")
    for doc in docs:
        metadata = doc["metadata"]
        if (
            doc["kind"] == "Secret"
            and metadata["namespace"] == NAMESPACES["edge"]
            and "audit" in metadata["name"]
        ):
            problems.append(f"audit Secret {doc['metadata']['name']} in the edge namespace")
    return problems


def default_deny_problems(docs: list[Doc]) -> list[str]:
    """Every namespace has a policy selecting all pods, isolating both ways, allowing nothing."""
    problems = []
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    if sorted(namespaces) != sorted(NAMESPACES.values()):
        problems.append(f"namespaces are {namespaces}, not {sorted(NAMESPACES.values())}")
    for namespace in namespaces:
        denies = [
            d
            for d in docs
            if d["kind"] == "NetworkPolicy"
            and d["metadata"]["namespace"] == namespace
            and not (d["spec"].get("podSelector") or {}).get("matchLabels")
            and not (d["spec"].get("podSelector") or {}).get("matchExpressions")
            and set(d["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
            and not d["spec"].get("ingress")
            and not d["spec"].get("egress")
        ]
        if not denies:
            problems.append(f"{namespace} has no default-deny policy for ingress and egress")
    return problems


def _namespace_labels(docs: list[Doc]) -> dict[str, dict[str, str]]:
    labels = {d["metadata"]["name"]: d["metadata"].get("labels") or {} for d in docs}
    return {
        **labels,
        # Where the manifests say Redis and the upstream databases are found.
        "redis": {"jitgate.io/redis": "true"},
        "databases": {"jitgate.io/upstreams": "true"},
    }


DNS_PORTS = ((53, "UDP"), (53, "TCP"))


def endpoints(docs: list[Doc]) -> dict[str, Endpoint]:
    """The workloads as pods, and what else is around them: the world, Redis, DNS, strangers."""
    found = {}
    for index, (name, workload) in enumerate(sorted(workloads(docs).items())):
        template = workload["spec"]["template"]
        ports = tuple(
            (p["containerPort"], p.get("protocol", "TCP"))
            for c in containers(workload)
            for p in c.get("ports") or []
        )
        found[name] = Endpoint(
            name=name,
            namespace=workload["metadata"]["namespace"],
            ip=f"10.1.0.{index + 1}",
            labels=template["metadata"]["labels"],
            ports=ports,
        )
    others = [
        Endpoint("agent", None, "203.0.113.7"),
        Endpoint("idp", None, "198.51.100.20", ports=((443, "TCP"),)),
        Endpoint("cloud-metadata", None, "169.254.169.254", ports=((80, "TCP"), (443, "TCP"))),
        Endpoint("redis", "redis", "10.2.0.1", {"app": "redis"}, ((6379, "TCP"),)),
        Endpoint("upstream-db", "databases", "10.2.0.2", {"app": "db"}, ((5432, "TCP"),)),
        Endpoint("upstream-ssh", "databases", "10.2.0.4", {"app": "bastion"}, ((22, "TCP"),)),
        Endpoint("upstream-k8s", "databases", "10.2.0.5", {"app": "api"}, ((6443, "TCP"),)),
        Endpoint("kube-dns", "kube-system", "10.2.0.3", {"k8s-app": "kube-dns"}, DNS_PORTS),
        # A pod elsewhere wearing a jitgate workload's labels, and unlabelled
        # pods in each zone: none of them may borrow a workload's reach.
        Endpoint("stranger", "default", "10.3.0.1", {"app.kubernetes.io/name": "issuer"}),
        *(
            Endpoint(f"{zone}-other", namespace, f"10.4.0.{i}", {"app.kubernetes.io/name": "x"})
            for i, (zone, namespace) in enumerate(NAMESPACES.items())
        ),
    ]
    return found | {e.name: e for e in others}


def expected_reach(every: dict[str, Endpoint]) -> set[tuple[str, str]]:
    """Every connection the NetworkPolicies should allow that involves a jitgate namespace."""
    outside = {e.name for e in every.values() if e.namespace not in NAMESPACES.values()}
    return (
        set(CALLS)
        | {(client, "redis") for client in REDIS_CLIENTS}
        | {("proxy", f"upstream-{kind}") for kind in ("db", "ssh", "k8s")}
        | {("verifier", "idp")}
        # Agents, wherever they are, reach the edge: it is the way in.
        | {(source, edge) for source in outside for edge in EDGE}
        # DNS for every pod of the edge and core zones; the audit zone calls nothing.
        | {(source, "kube-dns") for source in ("issuer", "proxy", "verifier", "policy")}
        | {("edge-other", "kube-dns"), ("core-other", "kube-dns")}
    )


def reachability_problems(docs: list[Doc]) -> list[str]:
    """The allowed connections are exactly the call graph's (expected_reach)."""
    cluster = Cluster(docs, _namespace_labels(docs))
    every = endpoints(docs)
    wanted = expected_reach(every)
    governed = set(NAMESPACES.values())
    problems = []
    for source in every.values():
        for target in every.values():
            if source is target or not ({source.namespace, target.namespace} & governed):
                continue
            allowed = cluster.reaches(source, target)
            expected = (source.name, target.name) in wanted
            if allowed and not expected:
                problems.append(f"{source.name} can reach {target.name}")
            elif expected and not allowed:
                problems.append(f"{source.name} cannot reach {target.name}")
    return problems


def ingress_problems(docs: list[Doc]) -> list[str]:
    """Core and audit workloads let in only their callers, whatever the sources' own policies."""
    cluster = Cluster(docs, _namespace_labels(docs))
    every = endpoints(docs)
    problems = []
    for target in every.values():
        if target.namespace not in (NAMESPACES["core"], NAMESPACES["audit"]):
            continue
        for source in every.values():
            if source is target or (source.name, target.name) in CALLS:
                continue
            if cluster.admits(source, target):
                problems.append(f"{source.name} may enter {target.name}")
    return problems


def edge_to_audit_rule_problems(docs: list[Doc]) -> list[str]:
    """No single rule, on either side, admits edge pods to audit: both sides must refuse."""
    cluster = Cluster(docs, _namespace_labels(docs))
    every = endpoints(docs)
    audit = every["audit"]
    problems = []
    for name in (*sorted(EDGE), "edge-other"):
        edge = every[name]
        for port, protocol in audit.ports:
            for policy in cluster.selecting(edge, "Egress"):
                if cluster.rule_allows(policy, "Egress", audit, port, protocol):
                    problems.append(f"{policy['metadata']['name']} lets {name} out to audit")
            for policy in cluster.selecting(audit, "Ingress"):
                if cluster.rule_allows(policy, "Ingress", edge, port, protocol):
                    problems.append(f"{policy['metadata']['name']} lets {name} into audit")
    return problems


def _probe_problems(name: str, container: Doc) -> list[str]:
    problems = []
    readiness, liveness = container.get("readinessProbe"), container.get("livenessProbe")
    if not readiness or not liveness:
        return [f"{name} lacks a readiness or liveness probe"]
    if name in GRPC_SERVICES:
        # The real grpc.health.v1 status, asked over mTLS from inside the pod.
        if (readiness.get("exec") or {}).get("command") != ["jitgate-healthcheck", name]:
            problems.append(f"{name}'s readiness is not its gRPC health check")
    elif "tcpSocket" not in readiness:
        problems.append(f"{name}'s readiness is not a TCP check")
    if "tcpSocket" not in liveness and "exec" not in liveness:
        problems.append(f"{name}'s liveness neither connects nor checks health")
    return problems


def hardening_problems(docs: list[Doc]) -> list[str]:
    """Service accounts without tokens, locked-down containers, bounded resources, probes."""
    problems = []
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d
        for d in docs
        if d["kind"] == "ServiceAccount"
    }
    found = workloads(docs)
    if set(found) != SERVICES:
        problems.append(f"workloads are {sorted(found)}, not {sorted(SERVICES)}")
    for name, workload in found.items():
        spec = pod_spec(workload)
        account = accounts.get((workload["metadata"]["namespace"], name))
        if spec.get("serviceAccountName") != name or account is None:
            problems.append(f"{name} does not run as its own ServiceAccount")
        elif account.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}'s ServiceAccount mounts its token")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}'s pods mount a ServiceAccount token")
        pod_security = spec.get("securityContext") or {}
        if pod_security.get("runAsNonRoot") is not True:
            problems.append(f"{name}'s pods may run as root")
        if (pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}'s pods lack the RuntimeDefault seccomp profile")
        for container in containers(workload):
            security = container.get("securityContext") or {}
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}'s root filesystem is writable")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name} may escalate privileges")
            if (security.get("capabilities") or {}).get("drop") != ["ALL"]:
                problems.append(f"{name} keeps capabilities")
            if security.get("privileged"):
                problems.append(f"{name} is privileged")
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                if set(resources.get(kind) or {}) < {"cpu", "memory"}:
                    problems.append(f"{name} lacks cpu and memory {kind}")
            problems += _probe_problems(name, container)
        replicas = workload["spec"].get("replicas", 1)
        if name == "audit" and (workload["kind"] != "StatefulSet" or replicas != 1):
            problems.append("audit is not one StatefulSet replica: the log has one writer")
        if name != "audit" and workload["kind"] != "Deployment":
            problems.append(f"{name} is stateless and should be a Deployment")
    return problems


# Compose ------------------------------------------------------------------------


def compose_networks(compose: Doc) -> dict[str, set[str]]:
    """Each service's networks."""
    return {
        name: set(service.get("networks") or ["default"])
        for name, service in compose["services"].items()
    }


def members(compose: Doc, network: str) -> set[str]:
    """The services on one network."""
    return {name for name, nets in compose_networks(compose).items() if network in nets}


def compose_network_problems(compose: Doc) -> list[str]:
    """Networks give exactly the reach of the call graph that Docker can express."""
    problems = []
    nets = compose_networks(compose)
    declared = compose.get("networks") or {}
    expected_members = {
        "agents": EDGE,
        "audit": {"audit", "verifier", "policy"},
        "redis": REDIS_CLIENTS | {"redis"},
        "upstreams": {"proxy"},
        "egress": {"verifier"},
    }
    for network, expected in expected_members.items():
        if members(compose, network) != expected:
            problems.append(f"{network} joins {sorted(members(compose, network))}")
    for network in ("edge", "core", "audit", "redis", "upstreams"):
        if not (declared.get(network) or {}).get("internal"):
            problems.append(f"network {network} is not internal")
    if nets.get("audit") != {"audit"}:
        problems.append(f"audit joins {sorted(nets.get('audit', ()))}, not only audit")

    def share(a: str, b: str) -> bool:
        return bool(nets.get(a, set()) & nets.get(b, set()))

    for caller, callee in CALLS | {(c, "redis") for c in REDIS_CLIENTS}:
        if not share(caller, callee):
            problems.append(f"{caller} cannot reach {callee}")
    for name in nets:
        if name not in ("audit", "verifier", "policy") and share(name, "audit"):
            problems.append(f"{name} shares a network with audit")
        if name not in REDIS_CLIENTS | {"redis"} and share(name, "redis"):
            problems.append(f"{name} shares a network with redis")
    return problems


def _volume_source(volume: str | Doc) -> str:
    if isinstance(volume, str):
        return volume.split(":", 1)[0]
    return str(volume.get("source", ""))


def compose_audit_volume_problems(compose: Doc) -> list[str]:
    """The audit log's volume is mounted into audit and nowhere else."""
    problems = []
    audit_volumes = {_volume_source(v) for v in compose["services"]["audit"].get("volumes") or []}
    if "audit-log" not in audit_volumes:
        problems.append("audit does not mount audit-log")
    for name, service in compose["services"].items():
        if name == "audit":
            continue
        for volume in service.get("volumes") or []:
            source = _volume_source(volume)
            if source == "audit-log" or "audit" in source:
                problems.append(f"{name} mounts {source}")
    return problems


def _secret_files(compose: Doc, service: Doc) -> Iterator[tuple[str, str]]:
    declared = compose.get("secrets") or {}
    for entry in service.get("secrets") or []:
        name = entry if isinstance(entry, str) else entry["source"]
        yield name, str((declared.get(name) or {}).get("file", ""))


def compose_secret_problems(compose: Doc) -> list[str]:
    """Each service mounts only files of its own secrets/<service>/ folder, edge none of audit's."""
    problems = []
    for name, service in compose["services"].items():
        own = f"secrets/{name}/"
        for secret, file in _secret_files(compose, service):
            if not secret.startswith(f"{name}_") or not file.startswith(own):
                problems.append(f"{name} mounts the secret {secret} ({file}), not its own")
        for env_file in service.get("env_file") or []:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            if not path.startswith(own):
                problems.append(f"{name} reads {path}, not its own")
        for volume in service.get("volumes") or []:
            source = _volume_source(volume)
            if "secrets/" in source and not source.removeprefix("./").startswith(own):
                problems.append(f"{name} mounts {source}, not its own")
        environment = service.get("environment") or {}
        if name in EDGE and any(key.startswith("JITGATE_AUDIT_") for key in environment):
            problems.append(f"{name} (edge) is configured with audit's settings")
    return problems


def compose_port_problems(compose: Doc) -> list[str]:
    """Only the agent-facing services publish ports."""
    return [
        f"{name} publishes {service['ports']}"
        for name, service in compose["services"].items()
        if service.get("ports") and name not in EDGE
    ]


def dockerfile_problems(text: str) -> list[str]:
    """The image: the slim Python base, the pinned install, a non-root user, jitgate first."""
    lines = [line.strip() for line in text.splitlines()]
    problems = []
    if "FROM python:3.11-slim" not in lines:
        problems.append("the base is not python:3.11-slim")
    if not any("pip install -c constraints.txt ." in line for line in lines):
        problems.append("the install ignores constraints.txt")
    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image runs as root")
    if 'ENTRYPOINT ["jitgate"]' not in lines:
        problems.append("the entrypoint is not jitgate")
    return problems
