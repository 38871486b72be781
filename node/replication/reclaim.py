"""Removing local bytes no registry references any more.

Each pass first runs the namespace's online garbage collection of blob links
(``Namespace.collect_links``: links no manifest of their repository
references, past the grace period), so the layers of a deleted image stop
counting as referenced; then it removes the local bytes nothing references,
and those only registries this region no longer replicates reference (a
replication deleted) once another of their replica regions holds them
(``kept_digests``: never the last copy; the region's placements of those go
first, so routers stop sending their pulls here).
It runs on every node with ``--reclaim-interval``, standalone or in a
cluster (there every region reclaims its own copy; the link collection is
safe to run in several regions at once: each removal is guarded). Within a
region of several nodes sharing one store, a pass runs only on the node that
holds the region's reclaim leader key (``node.replication.claims.Leader``);
another node takes it over once the holder's lease lapses.

The reclaimer works on the blob store's interface only: it lists the
store's blobs (with their times) and staged transfer parts, and deletes
with the store's conditional delete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter

from cluster.kv import Entry
from cluster.namespace import REG, ManifestRecord, Namespace
from node.replication.claims import Leader
from node.replication.transfer import PART_PREFIX, Fetcher, part_digest
from node.storage.base import BlobStore

log = logging.getLogger("meridian.replication")

RECLAIMED = Counter(
    "meridian_replication_reclaimed_blobs_total", "Local blobs no registry references, removed"
)


@dataclass
class _Scan:
    """A fresh read of ``/meridian/reg/``, per registry: what it references,
    its ``replicas`` (None: every region) and who holds each digest."""

    refs: dict[str, set[str]] = field(default_factory=dict)
    replicas: dict[str, set[str] | None] = field(default_factory=dict)
    holders: dict[tuple[str, str], set[str]] = field(default_factory=dict)


def _scan(entries: list[Entry]) -> _Scan:
    scan = _Scan()
    for e in entries:
        reg, _, rest = e.key[len(REG) :].partition("/")
        if rest == "config":
            try:
                replicas = json.loads(e.value).get("replicas")
            except (ValueError, AttributeError):
                replicas = None
            if isinstance(replicas, list) and replicas:
                scan.replicas[reg] = {str(r) for r in replicas}
            continue
        if rest.startswith("place/"):
            digest, _, region = rest[len("place/") :].partition("/")
            scan.holders.setdefault((reg, digest), set()).add(region)
            continue
        if not rest.startswith("repo/"):
            continue
        refs = scan.refs.setdefault(reg, set())
        head, _, leaf = rest.rpartition("/")
        kind = head.rpartition("/")[2]
        if kind == "_b":
            refs.add(leaf)
        elif kind == "_m":
            refs.add(leaf)
            try:
                rec = ManifestRecord.from_json(e.value)
            except (ValueError, TypeError, KeyError):
                continue
            refs.update(rec.blobs)
            refs.update(rec.manifests)
            if rec.subject:
                refs.add(rec.subject)
    return scan


def referenced_digests(entries: list[Entry]) -> set[str]:
    """Every digest some registry still references, from a fresh read of
    ``/meridian/reg/``: linked blobs, manifests, and what manifests reference."""
    return set().union(*_scan(entries).refs.values())


def kept_digests(entries: list[Entry], region: str) -> tuple[set[str], list[tuple[str, str]]]:
    """What ``region`` keeps, from a fresh read of ``/meridian/reg/``: every
    digest a registry it replicates references; of a registry it no longer
    replicates (a replication deleted), only what no other replica region of
    that registry holds yet -- never the last copy. Also the placements of
    ``region`` to drop: (registry, digest) another replica region holds, so
    routers stop sending that registry's pulls here before the bytes go."""
    scan = _scan(entries)
    keep: set[str] = set()
    drop: list[tuple[str, str]] = []
    for reg, refs in scan.refs.items():
        replicas = scan.replicas.get(reg)
        if replicas is None or region in replicas:
            keep |= refs
            continue
        for d in refs:
            holders = scan.holders.get((reg, d), set())
            if holders & replicas:
                if region in holders:
                    drop.append((reg, d))
            else:
                keep.add(d)
    return keep, drop


@dataclass
class Reclaimer:
    """Removes local bytes no registry references any more, safely:

    - only while the namespace is in sync, from a fresh (linearizable) read,
      never from the cache;
    - only blobs last written more than ``grace`` seconds ago (an upload
      commits its blob a moment before it links it), and never one being
      fetched;
    - candidates are read against the namespace a second time, this region's
      placements of the rest dropped, then each deleted only if it was not
      written again since the listing (the store's conditional delete: a
      push or a manifest put racing the pass keeps its bytes).

    Stale partial downloads of unreferenced digests go too."""

    ns: Namespace
    store: BlobStore  # the region's own store
    fetcher: Fetcher | None  # None on a standalone node (nothing is fetched)
    interval: float
    grace: float
    leader: Leader | None = None  # None: the only node of its region
    _task: asyncio.Task[None] | None = None

    def _in_flight(self, digest: str) -> bool:
        return self.fetcher is not None and digest in self.fetcher.transfers

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reclaimer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.ns.synced.is_set():
                continue
            try:
                if self.leader is not None and not await self.leader.acquire():
                    continue  # another node of the region reclaims
                await self.reclaim_once()
            except Exception as e:
                log.warning("reclaim pass failed: %s", e)

    async def _drop_stale_parts(self, refs: set[str], cutoff: float) -> None:
        async for info in self.store.list_staged(PART_PREFIX):
            digest = part_digest(info.name)
            if digest is None or digest in refs or self._in_flight(digest):
                continue
            if info.mtime < cutoff:
                w = await self.store.writer(info.name, resume=True)
                await w.abort()

    async def reclaim_once(self) -> int:
        """One pass; returns how many blobs were deleted."""
        links = await self.ns.collect_links(self.grace)
        if links:
            log.info("removed %d blob links no manifest references", links)
        refs, leave = kept_digests(await self.ns.refresh(REG), self.ns.region)
        for reg, d in leave:  # a registry this region no longer replicates
            await self.ns.remove_placement(reg, d)
        cutoff = time.time() - self.grace
        candidates = []
        async for info in self.store.list_blobs():
            d = info.name
            if d in refs or self._in_flight(d) or info.mtime >= cutoff:
                continue
            candidates.append(d)
        await self._drop_stale_parts(refs, cutoff)
        if not candidates:
            return 0
        refs, _ = kept_digests(await self.ns.refresh(REG), self.ns.region)  # anything new?
        deleted = 0
        for d in candidates:
            if d in refs or self._in_flight(d):
                continue
            for reg, st in list(self.ns.cache.registries.items()):
                if self.ns.region in st.placements.get(d, {}):
                    await self.ns.remove_placement(reg, d)
            if await self.store.delete(d, older_than=cutoff):
                deleted += 1
        if deleted:
            RECLAIMED.inc(deleted)
            log.info("reclaimed %d unreferenced blobs", deleted)
        return deleted
