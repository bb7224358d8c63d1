"""The proxy's own SSH login to a host: its key, held in memory, and the host's pinned key."""

from __future__ import annotations

from pathlib import Path

import asyncssh

from jitgate.common.errors import ConfigError
from jitgate.proxy.config import SshTarget

UPSTREAM_TIMEOUT = 5.0
"""Seconds to reach the host and log in; inside the agent's own login time (HANDSHAKE_TIMEOUT)."""


class HostKeys:
    """A target's parsed keys: the proxy's private key and the host's pinned public key."""

    def __init__(self, target: SshTarget) -> None:
        """Parse target's keys; a ConfigError names the connection, never the key."""
        try:
            self.client = asyncssh.import_private_key(target.private_key)
        except (asyncssh.KeyImportError, ValueError):
            # Name the connection, never the key's content.
            raise ConfigError(
                f"connections.{target.name}.key_file: not an unencrypted OpenSSH private key"
            ) from None
        try:
            self.host = asyncssh.import_public_key(target.host_key)
        except (asyncssh.KeyImportError, ValueError):
            raise ConfigError(f"connections.{target.name}.host_key: not a public key") from None


async def connect(
    target: SshTarget, key: HostKeys, agent_path: Path | None = None
) -> asyncssh.SSHClientConnection:
    """Log in to target as its user with the proxy's key; any host key but the pinned one fails.

    With agent_path, the host's agent requests go to the socket there (the agent's own).
    """
    return await asyncssh.connect(
        target.host,
        target.port,
        username=target.user,
        client_keys=[key.client],
        # Exactly the pinned key, no trust on first use, no CA, no revocation
        # list to consult: (trusted host keys, trusted CA keys, revoked keys).
        known_hosts=([key.host], [], []),
        # Nothing of the proxy's own account: no ~/.ssh/config, agent or certs.
        config=None,
        agent_path=None,
        x509_trusted_certs=None,
        gss_auth=False,
        gss_kex=False,
        preferred_auth="publickey",
        agent_forwarding=str(agent_path) if agent_path is not None else False,
        connect_timeout=UPSTREAM_TIMEOUT,
        login_timeout=UPSTREAM_TIMEOUT,
    )
