"""Usage accounting per registry and region: what ``meridian usage`` shows.

Counted by the nodes and by the router for the manifests it answers from its
cache (``cluster.router.cache``; it adds to its nearest region's records),
so the module lives in cluster core; ``node.usage`` names the same things.

- **Counters** (``Counters``): every node counts, per registry, the manifest
  pushes (PUTs), pulls (manifest GETs) and bytes served (manifest bodies and
  blob GETs) in memory. The request path does one dictionary lookup and
  integer additions on a list made once per registry: no lock (one event
  loop), nothing allocated per request.
- **Records**: every ``--usage-interval`` seconds (``UsageRecorder``) a node
  takes its counts and adds them to its region's record of the registry,
  ``/meridian/reg/<registry>/usage/<region>``, by compare-and-swap
  (``Namespace.update_usage``), so the nodes of one region add up; a failed
  write puts the counts back for the next flush, and a clean stop flushes,
  so a node that dies loses at most one interval.
- **Storage** is billed as ACR bills it, per GiB per day, in every region
  holding a copy: a record keeps ``stored_bytes`` (what the region held for
  the registry when last integrated: the distinct digests the registry
  references that the region holds, from placements), ``integrated_at`` and
  ``gib_days``. Whenever a flush finds the bytes held or the counts changed,
  it first integrates ``stored_bytes`` over the time since
  ``integrated_at`` -- in the same compare-and-swap, so when two nodes of a
  region flush at once the loser re-reads and integrates only the time since
  the winner did: every second is counted once. Between writes the figure
  is extrapolated (``figures``): the bytes stay stored meanwhile.

The records are under the registry's prefix, so deleting the registry
deletes them. Removing a region closes its records (``close_region``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from cluster.kv import KVUnavailable
from cluster.namespace import Conflict, Namespace
from cluster.registries import DELETING

log = logging.getLogger("meridian.usage")

GIB = 1 << 30
DAY = 86400.0
FIELDS = ("pushes", "pulls", "bytes_served")  # the order of a Counters list


class Counters:
    """This node's counts since its last flush: registry -> [pushes, pulls,
    bytes served]."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}

    def _of(self, reg: str) -> list[int]:
        c = self.counts.get(reg)
        if c is None:
            c = self.counts[reg] = [0, 0, 0]
        return c

    def push(self, reg: str) -> None:
        self._of(reg)[0] += 1

    def pull(self, reg: str, nbytes: int) -> None:
        c = self._of(reg)
        c[1] += 1
        c[2] += nbytes

    def served(self, reg: str, nbytes: int) -> None:
        self._of(reg)[2] += nbytes

    def take(self) -> dict[str, list[int]]:
        """The counts so far; counting starts again from zero."""
        out, self.counts = self.counts, {}
        return out

    def put_back(self, reg: str, counts: list[int]) -> None:
        """Counts a flush could not write, for the next one."""
        c = self._of(reg)
        for i, v in enumerate(counts):
            c[i] += v


def stored_in(ns: Namespace, reg: str, region: str) -> int:
    """Bytes of the distinct digests ``reg`` references that ``region``
    holds (its placements)."""
    st = ns.cache.registries.get(reg)
    if st is None:
        return 0
    return sum(
        places[region]
        for d, places in st.placements.items()
        if region in places and ns.references(reg, d)
    )


def integrate(doc: dict, now: float) -> dict:
    """``doc`` with ``gib_days`` integrated up to ``now`` (``stored_bytes``
    held since ``integrated_at``)."""
    out = dict(doc)
    last = out.get("integrated_at")
    gib_days = float(out.get("gib_days") or 0.0)
    if isinstance(last, int | float) and now > last:
        gib_days += int(out.get("stored_bytes") or 0) / GIB * (now - last) / DAY
    out["gib_days"] = gib_days
    if not isinstance(last, int | float) or now > last:
        out["integrated_at"] = now
    return out


def _adder(counts: list[int], stored: int) -> Callable[[dict], dict]:
    def change(doc: dict) -> dict:
        now = time.time()
        out = integrate(doc, now)
        for name, v in zip(FIELDS, counts, strict=True):
            out[name] = int(out.get(name) or 0) + v
        out["stored_bytes"] = stored
        out["updated"] = now
        return out

    return change


def figures(doc: dict, now: float | None = None) -> dict[str, Any]:
    """A record as the API shows it: GiB-days up to now."""
    rec = integrate(doc, time.time() if now is None else now)
    return {
        "stored_bytes_billed": int(rec.get("stored_bytes") or 0),
        # Significant digits, not decimals: a small registry's first seconds
        # are far below 1e-9 GiB-days and must not read as nothing.
        "gib_days": float(f"{rec['gib_days']:.6g}"),
        **{name: int(rec.get(name) or 0) for name in FIELDS},
        "updated": rec.get("updated"),
    }


class UsageRecorder:
    """Flushes a node's ``Counters`` into its region's usage records."""

    def __init__(
        self,
        ns: Namespace,
        counters: Counters,
        interval: float,
        default_registry: str,
        *,
        region: str | None = None,
        counted_only: bool = False,
    ) -> None:
        self.ns = ns
        self.counters = counters
        self.interval = interval
        self.default_registry = default_registry
        # The region whose records the counts go to (the router sets its
        # nearest); ``counted_only``: write only registries with counts.
        self.region = ns.region if region is None else region
        self.counted_only = counted_only
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="usage")

    async def close(self) -> None:
        """Stop, and flush what was counted (a clean stop loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush_once(), 5.0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush_once()
            except Exception as e:  # noqa: BLE001 - a flush never stops the node
                log.warning("usage flush failed: %s", e)

    def _exists(self, reg: str) -> bool:
        st = self.ns.cache.registries.get(reg)
        if st is not None and st.config.get("state") == DELETING:
            return False  # its records go with it: a write now could outlive the delete
        return reg == self.default_registry or (
            st is not None and bool(st.config or st.repos or st.placements)
        )

    async def flush_once(self) -> int:
        """Write every record whose counts or bytes held changed; returns
        how many were written."""
        region = self.region
        taken = self.counters.take()
        written = 0
        regs = set(taken) if self.counted_only else set(taken) | set(self.ns.cache.registries)
        for reg in sorted(regs):
            counts = taken.get(reg, [0, 0, 0])
            if not self._exists(reg):
                continue  # deleted: its records went with it
            stored = stored_in(self.ns, reg, region)
            old = self.ns.usage_records(reg).get(region)
            if not any(counts) and stored == int((old or {}).get("stored_bytes") or 0):
                continue  # nothing new: GiB-days are extrapolated until it changes
            try:
                await self.ns.update_usage(reg, region, _adder(counts, stored))
            except (Conflict, KVUnavailable, OSError) as e:
                self.counters.put_back(reg, counts)
                log.warning("usage of %s not recorded yet (next flush retries): %s", reg, e)
                continue
            written += 1
        return written


async def close_region(ns: Namespace, region: str) -> None:
    """A removed region's records: integrated up to now, holding nothing
    from now on (its bytes are no longer billed)."""

    def close(doc: dict) -> dict:
        now = time.time()
        return {**integrate(doc, now), "stored_bytes": 0, "updated": now}

    for reg in ns.registries():
        if region in ns.usage_records(reg):
            await ns.update_usage(reg, region, close)


def add_recorder(app: web.Application, ns: Namespace, counters: Counters, **kw: Any) -> None:
    """Run a ``UsageRecorder`` while ``app`` runs (flushed at its cleanup)."""

    async def run(_: web.Application):  # noqa: ANN202 - aiohttp cleanup context
        rec = UsageRecorder(ns, counters, **kw)
        rec.start()
        yield
        await rec.close()

    app.cleanup_ctx.append(run)
