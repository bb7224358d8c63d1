"""Conversions between jitgate's typed core and the protobuf messages servicers send."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from jitgate.common.assertion import Identity
from jitgate.common.validate import printable
from jitgate.v1 import types_pb2


def timestamp(seconds: float) -> Timestamp:
    """Return a Timestamp for seconds since the epoch."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def seconds(stamp: Timestamp) -> float:
    """Return a Timestamp as seconds since the epoch."""
    return stamp.ToNanoseconds() / 1e9


def identity(value: Identity) -> types_pb2.Identity:
    """Return the wire form of a verified identity."""
    return types_pb2.Identity(
        subject=value.subject,
        client_id=value.client_id,
        groups=value.groups,
        token_expires_at=timestamp(value.token_expires_at),
        issuer=value.issuer,
        token_id=value.token_id,
    )


EDGE_CHARS = 256
"""How much of each edge-reported field a record keeps."""


def edge(reported: types_pb2.EdgeContext) -> types_pb2.EdgeContext:
    """Return edge-reported context bounded and stripped of control characters.

    Core services record what the edge reports, never trust it: an agent can
    shape its user agent, and the audit log must not carry terminal escapes.
    """
    return types_pb2.EdgeContext(
        peer=printable(reported.peer, EDGE_CHARS),
        rpc=printable(reported.rpc, EDGE_CHARS),
        user_agent=printable(reported.user_agent, EDGE_CHARS),
    )
