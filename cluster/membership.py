"""Region membership: a node publishes its region's endpoints and keeps a
leased liveness key while it runs (gone within the TTL when it dies)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cluster.namespace import Namespace, RegionInfo

log = logging.getLogger("meridian.membership")

LEASE_TTL = 6
REVOKE_TIMEOUT = 2.0  # a clean stop waits no longer for the store


async def keep_registered(ns: Namespace, info: RegionInfo, ttl: int = LEASE_TTL) -> None:
    """Register under a lease of our own at start (a key left by a previous
    process of this region dies with that process's lease), then again
    whenever the liveness key disappears: its lease expired while the store
    was unreachable, or it belonged to another node of this region that
    stopped. A replaced lease is revoked, so leases never pile up; so is the
    last one when the task is cancelled (a clean stop), so the region is not
    alive from that moment rather than a TTL later."""
    lease: int | None = None
    try:
        while True:
            try:
                if lease is None or not await ns.alive_in_store(info.name):
                    old, lease = lease, await ns.kv.grant_lease(ttl)
                    await ns.register_region(info, lease)
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
