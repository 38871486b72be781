"""What a region lacks, from the namespace alone: its replication backlog.

The backlog of a region is computed from the watch-fed cache: every manifest
(and every blob a manifest references or a repository links) of a registry
this region replicates, that some region holds (a placement) and this region
does not. Nothing lives in memory only, so the same scan is the resume point
after a crash, the replicator's plan (``node.replication.worker``) and the
status of every region (``status_rows``: ``meridian replication list`` and
``GET /meridian/v1/replication``).

Order: images in the order they were pushed; within one, children before
parents -- blobs (layers, config), then image manifests, then indexes.

Which regions hold a registry: ``/meridian/reg/<reg>/config`` ->
``{"replicas": [...]}``; unset means every region.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cluster.namespace import ManifestRecord, Namespace

BLOB, IMAGE, INDEX = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Item:
    reg: str
    digest: str
    size: int
    rank: int  # BLOB, IMAGE (manifest), INDEX
    created: float  # push time of the (oldest) manifest that needs it; inf if none
    deps: tuple[str, ...] = ()  # what a manifest references


def replicates(ns: Namespace, reg: str, region: str) -> bool:
    replicas = ns.registry_replicas(reg)
    return replicas is None or region in replicas


def backlog(ns: Namespace, region: str, registry: str | None = None) -> list[Item]:
    """What ``region`` lacks, in copy order (from the namespace alone); with
    ``registry``, of that registry only."""
    items: dict[tuple[str, str], Item] = {}

    def add(it: Item) -> None:
        key = (it.reg, it.digest)
        old = items.get(key)
        if old is None:
            items[key] = it
        else:
            items[key] = Item(
                it.reg,
                it.digest,
                it.size,
                max(old.rank, it.rank),
                min(old.created, it.created),
                old.deps or it.deps,
            )

    states = ns.cache.registries
    if registry is not None:
        states = {registry: states[registry]} if registry in states else {}
    for reg, st in states.items():
        if not replicates(ns, reg, region):
            continue
        pl = st.placements

        def missing(d: str, pl: dict[str, dict[str, int]] = pl) -> int | None:
            p = pl.get(d)
            if not p or region in p:
                return None
            return next(iter(p.values()))

        for rs in st.repos.values():
            for d, rec in rs.manifests.items():
                size = missing(d)
                if size is not None:
                    add(
                        Item(
                            reg,
                            d,
                            rec.size,
                            INDEX if rec.manifests else IMAGE,
                            rec.created,
                            rec.blobs + rec.manifests,
                        )
                    )
                for b in rec.blobs:
                    size = missing(b)
                    if size is not None:
                        add(Item(reg, b, size, BLOB, rec.created))
            for b in rs.blobs:
                size = missing(b)
                if size is not None:
                    add(Item(reg, b, size, BLOB, math.inf))
    return sorted(items.values(), key=lambda i: (i.created, i.rank, i.reg, i.digest))


def find_manifest(ns: Namespace, reg: str, digest: str) -> tuple[ManifestRecord | None, list[str]]:
    st = ns.cache.registries.get(reg)
    rec = None
    repos = []
    if st is not None:
        for name, rs in st.repos.items():
            r = rs.manifests.get(digest)
            if r is not None:
                rec = r
                repos.append(name)
    return rec, sorted(repos)


def status_rows(ns: Namespace, now: float | None = None) -> list[dict]:
    """Per region: liveness, what it still lacks (items, bytes) and the lag
    (age of the oldest image it has not fully got). From the namespace alone,
    so it works with any region down."""
    now = time.time() if now is None else now
    alive = ns.alive_regions()
    regions = set(ns.regions()) | alive
    for reg in ns.registries():
        regions |= ns.registry_replicas(reg) or set()
    rows = []
    for region in sorted(regions):
        items = backlog(ns, region)
        created = [i.created for i in items if i.created != math.inf]
        lag = max(now - min(created), 0.0) if created else 0.0
        if region not in alive:
            status = "down"
        elif items:
            status = "replicating"
        else:
            status = "in-sync"
        rows.append(
            {
                "region": region,
                "status": status,
                "alive": region in alive,
                "pending_items": len(items),
                "pending_bytes": sum(i.size for i in items),
                "lag_seconds": round(lag, 3),
            }
        )
    return rows
