"""A kubeconfig for one Kubernetes grant: the proxy as API server, the grant token as bearer.

It holds no cluster credential: the only secret in it is the grant token,
which works at the jitgate proxy only, for that connection, until the grant
expires or is revoked.
"""

from __future__ import annotations

import base64
import json

from jitgate.client.issuer import Grant


class NotKubernetes(ValueError):
    """The grant is not for a Kubernetes connection."""


def server_url(grant: Grant) -> str:
    """The proxy's URL for the grant's connection: the endpoint plus /connections/<name>."""
    endpoint = grant.proxy_endpoint.rstrip("/")
    if not endpoint.startswith("https://"):
        endpoint = f"https://{endpoint}"
    return f"{endpoint}/connections/{grant.connection}"


def render(grant: Grant, *, ca_pem: bytes | None = None, namespace: str | None = None) -> str:
    """The kubeconfig (YAML) for grant; the context's namespace is the grant's or the given one."""
    if grant.connection_kind != "kubernetes":
        raise NotKubernetes(
            f"grant {grant.grant_id} is for a {grant.connection_kind or 'non-kubernetes'}"
            f" connection ({grant.connection}), not kubernetes"
        )
    if not grant.token:
        raise ValueError(f"grant {grant.grant_id} has no token stored")
    name = f"jitgate-{grant.connection}"
    expires = grant.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")

    def q(value: str) -> str:
        """The value as a YAML scalar."""
        # A JSON string is a valid YAML double-quoted scalar: no escaping of our own.
        return json.dumps(value)

    cluster = [f"    server: {q(server_url(grant))}"]
    if ca_pem is not None:
        cluster.append(f"    certificate-authority-data: {q(base64.b64encode(ca_pem).decode())}")
    context = [f"    cluster: {q(name)}", f"    user: {q(name)}"]
    namespace = namespace or grant.namespace
    if namespace:
        context.append(f"    namespace: {q(namespace)}")
    lines = [
        f"# jitgate grant {grant.grant_id} for {grant.connection}; expires {expires}.",
        "# No cluster credential: the token below is the grant, valid at the jitgate proxy only.",
        "apiVersion: v1",
        "kind: Config",
        "clusters:",
        f"- name: {q(name)}",
        "  cluster:",
        *cluster,
        "    extensions:",
        "    - name: jitgate",
        "      extension:",
        f"        grant_id: {q(grant.grant_id)}",
        f"        connection: {q(grant.connection)}",
        f"        expires_at: {q(expires)}",
        "users:",
        f"- name: {q(name)}",
        "  user:",
        f"    token: {q(grant.token)}",
        "contexts:",
        f"- name: {q(name)}",
        "  context:",
        *context,
        f"current-context: {q(name)}",
        "",
    ]
    return "\n".join(lines)
