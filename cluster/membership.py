"""Region membership: a node publishes its region's endpoints and keeps a
leased liveness key while it runs (gone within the TTL when it dies)."""

from __future__ import annotations

import asyncio
import logging

from cluster.namespace import Namespace, RegionInfo

log = logging.getLogger("meridian.membership")

LEASE_TTL = 6


async def keep_registered(ns: Namespace, info: RegionInfo, ttl: int = LEASE_TTL) -> None:
    """Register, then re-register whenever the liveness key disappears (its
    lease expired while the store was unreachable). Runs until cancelled."""
    while True:
        try:
            if info.name not in ns.alive_regions() or ns.regions().get(info.name) != info:
                lease = await ns.kv.grant_lease(ttl)
                await ns.register_region(info, lease)
                log.info("region registered", extra={"path": info.http})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the store is down: retry soon, pulls keep working
            log.warning("region registration failed: %s", e)
        await asyncio.sleep(max(ttl / 3, 0.5))
