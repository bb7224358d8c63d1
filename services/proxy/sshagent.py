"""Agent forwarding through the proxy, for the connections that allow it.

The agent's auth-agent-req (OpenSSH's PROTOCOL, section 4.1) is accepted
only on those connections: asyncssh re-reads its server config with the
user name, which is the connection's name. asyncssh then listens on a Unix
socket that reaches back to the agent's ssh-agent; the upstream connection,
opened before that socket exists, forwards the host's agent requests to a
fixed path of the proxy's that is linked to it once it does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import asyncssh


def server_config(workdir: Path, allowed: Iterable[str]) -> Path | None:
    """An asyncssh server config letting only the allowed connections forward an agent."""
    names = sorted(allowed)
    if not names:
        return None
    path = workdir / "agent_forwarding.conf"
    # As in ssh_config, the first value found wins: the allowed names' block
    # comes first, the refusal for everyone else after it. Connection names
    # are DNS-label-like (validate.connection_name): no pattern characters,
    # so each matches itself alone.
    path.write_text(
        f"Match user {','.join(names)}\n"
        "    AllowAgentForwarding yes\n"
        "Match all\n"
        "    AllowAgentForwarding no\n"
    )
    return path


class AgentLink:
    """The fixed path the upstream connection forwards agent requests to, for one session."""

    def __init__(self, workdir: Path) -> None:
        """A fresh private directory under workdir."""
        self._dir = Path(tempfile.mkdtemp(prefix="agent-", dir=workdir))
        self.path = self._dir / "agent"

    def link(self, conn: asyncssh.SSHServerConnection) -> None:
        """Point the path at the agent's forwarded ssh-agent, once the agent has asked for it."""
        forwarded = conn.get_agent_path()
        if forwarded and not self.path.is_symlink():
            os.symlink(forwarded, self.path)

    def close(self) -> None:
        """Remove the path and its directory."""
        shutil.rmtree(self._dir, ignore_errors=True)
