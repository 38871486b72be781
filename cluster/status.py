"""What a node says about itself to the router: ``GET /meridian/v1/status``.

The contract (schema 1): the node answers ``200`` with a JSON object

``schema`` (integer)
    1. Fields are only ever added within a schema; a change of meaning or a
    removal makes it 2. A reader ignores fields it does not know and refuses
    a schema it does not know (``from_json`` raises ``ValueError``).
``region`` (string)
    the node's region, as in its region record.
``peers_rtt_s`` (object: region -> number)
    the smoothed round trip of gRPC ``Ping`` from this node to each other
    region it reaches now, in seconds (positive, finite). A region it
    cannot reach (its last ping failed) or has not measured yet is absent.
``backlog_items`` (integer or null)
    manifests and blobs this region still lacks (its replication backlog);
    null when no replicator runs on the node.
``backlog_bytes`` (integer or null)
    bytes of that backlog not on disk yet (partial transfers count what is
    still missing); null as above.
``namespace_synced`` (boolean)
    whether the node's namespace cache has loaded.

The router reads it every few seconds per region (``cluster.router.table``):
``peers_rtt_s`` for what a read-through from a holder would cost through
that region, the backlog for its status. The values are the ones the
node's ``/metrics`` shows as ``meridian_replication_peer_rtt_seconds`` and
``meridian_replication_pending_*``; ``/metrics`` is for people and
Prometheus, this is for programs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
PATH = "/meridian/v1/status"


@dataclass
class NodeStatus:
    region: str
    peers_rtt_s: dict[str, float] = field(default_factory=dict)
    backlog_items: int | None = None
    backlog_bytes: int | None = None
    namespace_synced: bool = False
    schema: int = SCHEMA

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "schema": self.schema,
                "region": self.region,
                "peers_rtt_s": {k: self.peers_rtt_s[k] for k in sorted(self.peers_rtt_s)},
                "backlog_items": self.backlog_items,
                "backlog_bytes": self.backlog_bytes,
                "namespace_synced": self.namespace_synced,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeStatus:
        """Parse and check a status document; ``ValueError`` when it is not
        one (not JSON, not an object, unknown schema, no region). Values of
        the wrong type are dropped rather than trusted."""
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("status is not a JSON object")
        schema = doc.get("schema")
        if schema != SCHEMA or isinstance(schema, bool):
            raise ValueError(f"unknown status schema {schema!r}")
        region = doc.get("region")
        if not isinstance(region, str) or not region:
            raise ValueError("status names no region")
        peers: dict[str, float] = {}
        raw_peers = doc.get("peers_rtt_s")
        if isinstance(raw_peers, dict):
            for name, v in raw_peers.items():
                if _number(v) and v > 0 and math.isfinite(v):
                    peers[str(name)] = float(v)
        return cls(
            region=region,
            peers_rtt_s=peers,
            backlog_items=_count(doc.get("backlog_items")),
            backlog_bytes=_count(doc.get("backlog_bytes")),
            namespace_synced=doc.get("namespace_synced") is True,
        )


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _count(v: Any) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    return None
