"""Region membership: a node publishes its region's endpoints and its own
node key (``/meridian/regions/<region>/nodes/<node-id>``) under a lease of
its own while it runs (gone within the TTL when it dies, at once when it
stops cleanly). A region is alive while any of its nodes is."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket

from cluster.namespace import Namespace, RegionInfo

log = logging.getLogger("meridian.membership")

LEASE_TTL = 6
REVOKE_TIMEOUT = 2.0  # a clean stop waits no longer for the store
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def valid_node_id(node: str) -> bool:
    return bool(_NODE_ID.match(node))


def default_node_id(port: int) -> str:
    """``<hostname>-<port>``: stable across restarts and unique per host
    (two nodes sharing a data dir still differ)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname() or "node")[:40].strip("-.")
    return f"{host or 'node'}-{port}"


async def keep_registered(
    ns: Namespace, info: RegionInfo, ttl: int = LEASE_TTL, node: str | None = None
) -> None:
    """Register under a lease of our own at start (keys left by a previous
    process of this node die with that process's lease), then again whenever
    the region's liveness key or this node's key disappears: its lease
    expired while the store was unreachable, or (the liveness key) it
    belonged to another node of this region that stopped. A replaced lease
    is revoked, so leases never pile up; so is the last one when the task is
    cancelled (a clean stop), so this node is gone from that moment rather
    than a TTL later (and the region with it when it was the last)."""
    lease: int | None = None
    try:
        while True:
            try:
                if (
                    lease is None
                    or not await ns.alive_in_store(info.name)
                    or (node is not None and not await ns.node_in_store(info.name, node))
                ):
                    old, lease = lease, await ns.kv.grant_lease(ttl)
                    await ns.register_region(info, lease, node)
                    log.info("region registered", extra={"path": info.http})
                    if old is not None:
                        with contextlib.suppress(Exception):
                            await ns.kv.revoke_lease(old)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store is down: retry soon, pulls keep working
                log.warning("region registration failed: %s", e)
            await asyncio.sleep(max(ttl / 3, 0.5))
    finally:
        if lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ns.kv.revoke_lease(lease), REVOKE_TIMEOUT)
                log.info("region unregistered", extra={"path": info.http})
