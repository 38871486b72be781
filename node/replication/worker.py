"""The replicator of a region: copies what this region lacks.

The plan is the region's backlog (``node.replication.plan``). On start that
scan is the resume point after a crash; afterwards a listener on the
namespace cache marks it dirty on every change and a planner recomputes it
(at the first change, then debounced, and at least every
``rescan_interval`` seconds).

A manifest is placed here only when everything it references is here, so a
manifest placed here by the replicator means the whole image is here.

Workers (``concurrency``) take ready items, fetch through the ``Fetcher``
(nearest source, resumable, verified; placement recorded only after the
bytes are durable), and on failure retry with exponential back-off
(``cluster.backoff``: 0.5 s doubling to 60 s; 5 s when the bytes are here
and only the namespace write failed). Bytes that are here but not recorded
(a placement write failed while etcd was down) are recorded on the next pass.

Removing this region from a registry's replicas stops new work and cancels
background transfers nobody is reading.

Nodes of one region share its store and see the same backlog: before copying
an item a worker claims it (``node.replication.claims``; the claim comes
before the fresh look at the store, so a copy committed by the node that
held it before is seen). An item another node holds is skipped until its
claim goes (released once copied, or with a dead holder's lease); an image
whose layers another node copies waits for them in the plan.

When a manifest and everything it references (recursively) is here, the
replicator emits a ``replicated`` event: a log line, the
``meridian_replication_images_total`` counter, the lag histogram (push time
to fully here), and the in-process ``hooks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from prometheus_client import Counter, Gauge, Histogram

from cluster.backoff import Backoff
from cluster.kv import Op
from cluster.namespace import REG, TXN_BATCH, ManifestRecord, Namespace
from cluster.runtime import cancel_and_wait
from node.replication.claims import Claims, claim_key, claimed_item
from node.replication.plan import BLOB, Item, backlog, find_manifest
from node.replication.transfer import ERRORS, Fetcher
from node.storage.base import BlobStore

log = logging.getLogger("meridian.replication")

# Set by the replicator, which runs in a node's primary process only (the
# other --workers hold 0): the largest live value is the primary's.
PENDING_ITEMS = Gauge(
    "meridian_replication_pending_items",
    "Manifests and blobs this region still lacks",
    multiprocess_mode="livemax",
)
PENDING_BYTES = Gauge(
    "meridian_replication_pending_bytes",
    "Bytes this region still lacks (minus partial files)",
    multiprocess_mode="livemax",
)
INFLIGHT = Gauge(
    "meridian_replication_inflight", "Background transfers running now", multiprocess_mode="livemax"
)
OLDEST = Gauge(
    "meridian_replication_oldest_pending_seconds",
    "Age of the oldest image not yet fully here (0 when none)",
    multiprocess_mode="livemax",
)
IMAGES = Counter(
    "meridian_replication_images_total", "Images (manifest + everything it references) now here"
)
LAG = Histogram(
    "meridian_replication_lag_seconds",
    "From the push of a manifest to it and everything it references being here",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)

RETRY_BASE = 0.5
RETRY_CAP = 60.0
RETRY_CAP_LOCAL = 5.0  # bytes already here only wait for the namespace
DEPS_POLL = 1.0  # a manifest waiting for children another node copies looks again


@dataclass(frozen=True, slots=True)
class ReplicatedEvent:
    registry: str
    digest: str
    repos: tuple[str, ...]
    media_type: str
    bytes: int
    lag: float  # seconds since the push
    # Its durable records (event_ops) were committed with the placement that
    # completed the image: hooks must not write them again.
    committed: bool = False


@dataclass
class Replicator:
    ns: Namespace
    store: BlobStore  # the region's own store (never a read-through one)
    fetcher: Fetcher
    concurrency: int = 4
    rescan_interval: float = 10.0
    debounce: float = 0.05
    hooks: list[Callable[[ReplicatedEvent], None]] = field(default_factory=list)
    # What must be durable about an image arriving (webhook events): committed
    # in the same transaction as the manifest's placement, so a node killed
    # right after the copy cannot lose them.
    event_ops: list[Callable[[ReplicatedEvent], list[Op]]] = field(default_factory=list)
    claims: Claims | None = None  # None: the only node of its region
    plan: list[Item] = field(default_factory=list)
    pending_bytes: int = 0  # of ``plan``, not on disk yet (as PENDING_BYTES)
    inflight: dict[str, Item] = field(default_factory=dict)
    _backoff: dict[tuple[str, str], Backoff] = field(default_factory=dict)
    _announce: set[tuple[str, str]] = field(default_factory=set)
    _presence: dict[str, bool] = field(default_factory=dict)
    _announced: set[tuple[str, str]] = field(default_factory=set)
    _fetched: set[str] = field(default_factory=set)
    # (registry, digest) -> monotonic time to look again: claimed by another node
    _elsewhere: dict[tuple[str, str], float] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _landed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _planned: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def region(self) -> str:
        return self.ns.region

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.ns.cache.listeners.append(self._on_change)
        self.fetcher.on_local.append(self._on_local)
        self._dirty.set()
        self._tasks.append(asyncio.create_task(self._plan_loop(), name="replicator-plan"))
        for i in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"replicator-{i}"))

    async def close(self) -> None:
        try:
            self.ns.cache.listeners.remove(self._on_change)
        except ValueError:
            pass
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    def _on_change(self, key: str, value: bytes | None) -> None:
        # Called inside Cache.apply (possibly on a cache being reloaded): only
        # note that something changed; the planner reads the namespace.
        if key.startswith(REG) and "/_t/" in key:
            return  # tag moves change nothing this region must hold
        item = claimed_item(key, self.region)
        if item is not None:
            if value is None and self._elsewhere.pop(item, None) is not None:
                self._wake.set()  # released, or its holder died: ours to try
            return
        self._dirty.set()

    def _on_local(self, digest: str, size: int) -> None:
        self._presence[digest] = True
        self._fetched.add(digest)
        self._dirty.set()
        self._wake.set()

    # -- planning ----------------------------------------------------------------

    async def _plan_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.rescan_interval)
            except TimeoutError:
                pass
            # Replan at the first change (an idle region starts copying at
            # once); the pause after it coalesces a burst of changes.
            self._dirty.clear()
            try:
                await self.replan()
            except Exception:
                log.exception("replication planning failed")
            await asyncio.sleep(self.debounce)

    async def replan(self) -> None:
        self._presence = {}
        self.plan = backlog(self.ns, self.region)
        wanted = {it.digest for it in self.plan}
        # Stop background transfers nobody needs any more (the region was
        # removed from the registry's replicas, or the content was deleted).
        for d, t in list(self.fetcher.transfers.items()):
            if t.reason == "replicate" and not t.interactive and t.readers == 0:
                if d not in wanted and t.task is not None:
                    log.info("stopping replication of %s: no longer wanted here", d)
                    t.task.cancel()
        for key in [k for k in self._backoff if k[1] not in wanted]:
            del self._backoff[key]
        pending = 0
        oldest = math.inf
        for it in self.plan:
            t = self.fetcher.transfers.get(it.digest)
            pending += max(it.size - (t.written if t else 0), 0)
            oldest = min(oldest, it.created)
        PENDING_ITEMS.set(len(self.plan))
        self.pending_bytes = pending
        PENDING_BYTES.set(pending)
        OLDEST.set(time.time() - oldest if oldest != math.inf else 0)
        now = time.monotonic()
        self._elsewhere = {k: u for k, u in self._elsewhere.items() if k[1] in wanted and u > now}
        self._planned.set()
        self._wake.set()
        await self._check_announcements()

    async def _local(self, digest: str) -> bool:
        return await self.store.stat(digest) is not None

    async def _present(self, digest: str) -> bool:
        """``_local`` through a per-plan cache (bytes only ever arrive while
        a plan is current; a reclaim removes bytes nothing references)."""
        known = self._presence.get(digest)
        if known is None:
            known = self._presence[digest] = await self._local(digest)
        return known

    async def _deps_state(self, it: Item, *, siblings: bool = False) -> str:
        """ "ready" when everything ``it`` references is here, "inflight"
        when the rest is being copied now (by this node; with ``siblings``,
        or by another node of the region), else "blocked"."""
        places = self.ns.cache.registries.get(it.reg)
        state = "ready"
        for d in it.deps:
            if await self._present(d):
                continue
            if places is not None and not places.placements.get(d):
                continue  # held nowhere (e.g. a non-distributable layer)
            if d in self.inflight or (siblings and (it.reg, d) in self._elsewhere):
                state = "inflight"
                continue
            return "blocked"
        return state

    async def _ready(self, it: Item) -> bool:
        # A manifest's bytes may be fetched while its children are still in
        # flight here (saving a round trip); its placement waits for them.
        # Children another node copies keep it waiting in the plan instead
        # (not in a worker, which could copy something else meanwhile).
        if it.rank == BLOB or await self._present(it.digest):
            return True
        return await self._deps_state(it) != "blocked"

    async def _pick(self) -> Item | None:
        now = time.monotonic()
        for it in self.plan:
            if it.digest in self.inflight:
                continue
            until = self._elsewhere.get((it.reg, it.digest))
            if until is not None and until > now:
                continue
            b = self._backoff.get((it.reg, it.digest))
            if b is not None and b.waiting(now):
                continue
            # Another worker may claim it while this one awaits a stat: look
            # again right before returning it (no await in between).
            if await self._ready(it) and it.digest not in self.inflight:
                return it
        return None

    def _next_retry(self) -> float:
        now = time.monotonic()
        waits = [b.until - now for b in self._backoff.values() if b.until > now]
        waits += [u - now for u in self._elsewhere.values() if u > now]
        return max(min(waits, default=self.rescan_interval), 0.05)

    # -- work ------------------------------------------------------------------------

    async def _worker(self) -> None:
        await self._planned.wait()
        # Let the first round of pings finish, so the first source is informed.
        await self.fetcher.peers.wait_measured(2.0)
        while True:
            self._wake.clear()
            it = await self._pick()
            if it is None:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._next_retry())
                except TimeoutError:
                    pass
                continue
            self.inflight[it.digest] = it
            INFLIGHT.set(len(self.inflight))
            key = (it.reg, it.digest)
            claim = claim_key(self.region, it.reg, it.digest) if self.claims else None
            if claim is not None and not await self._claim(it, claim):
                self.inflight.pop(it.digest, None)
                INFLIGHT.set(len(self.inflight))
                continue  # another node of the region copies it
            try:
                await self._replicate(it)
                self._presence[it.digest] = True
                self._backoff.pop(key, None)
                try:
                    self.plan.remove(it)
                except ValueError:
                    pass
            except Exception as e:
                b = self._backoff.get(key)
                if b is None:
                    b = self._backoff[key] = Backoff(base=RETRY_BASE, cap=RETRY_CAP)
                b.cap = RETRY_CAP_LOCAL if await self._local(it.digest) else RETRY_CAP
                delay = b.failed()
                ERRORS.labels("item").inc()
                log.warning(
                    "replication of %s (%s) failed (%d times), retrying in %.1fs: %s",
                    it.digest,
                    it.reg,
                    b.failures,
                    delay,
                    e,
                )
            finally:
                if claim is not None and self.claims is not None:
                    await self.claims.release(claim)
                self.inflight.pop(it.digest, None)
                INFLIGHT.set(len(self.inflight))
                async with self._landed:
                    self._landed.notify_all()
                self._dirty.set()
                self._wake.set()

    async def _claim(self, it: Item, key: str) -> bool:
        """Claim ``it`` for this node; False (and skipped for a while) when
        another node of the region holds it."""
        assert self.claims is not None
        try:
            held = await self.claims.claim(key)
        except Exception as e:  # the store is unreachable: nothing is copied meanwhile
            log.warning("cannot claim %s (%s) now: %s", it.digest, it.reg, e)
            held = False
        if held:
            self._elsewhere.pop((it.reg, it.digest), None)
            return True
        # Looked at again when the claim's deletion is seen, else after a TTL.
        self._elsewhere[(it.reg, it.digest)] = time.monotonic() + self.claims.ttl
        return False

    async def _replicate(self, it: Item) -> None:
        # A fresh look (never the per-plan cache): the node that held the
        # claim before may have committed the bytes to the shared store.
        if not await self._local(it.digest):
            # A manifest's placement is recorded below, with its image's events.
            place = it.rank == BLOB
            await self.fetcher.fetch(it.reg, it.digest, it.size, reason="replicate", place=place)
        if it.rank != BLOB:
            # A placed manifest means the whole image is here: wait for the
            # children copied alongside it (here, or by another node).
            async with self._landed:
                while await self._deps_state(it, siblings=True) == "inflight":
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._landed.wait(), DEPS_POLL)
                    self._presence = {}  # another node's copies land unannounced
            if await self._deps_state(it, siblings=True) == "blocked":
                raise RuntimeError("a referenced blob or manifest is not here yet")
        if self.region not in self.ns.placements(it.reg, it.digest):
            # Bytes are here and verified; the placement write failed or is new.
            if it.rank != BLOB and await self._place_announcing(it):
                return
            await self.ns.record_placement(it.reg, it.digest, it.size)
        if it.rank != BLOB:
            self._announce.add((it.reg, it.digest))

    async def _place_announcing(self, it: Item) -> bool:
        """Place a manifest whose image is whole here (its children were
        checked just before) with its replicated event's durable records in
        the same transaction; False when there are none to write that way."""
        key = (it.reg, it.digest)
        rec, repos = find_manifest(self.ns, it.reg, it.digest)
        if rec is None or key in self._announced or not self.event_ops:
            return False
        ev = self._event(it.reg, rec, repos)
        ops = [op for fn in self.event_ops for op in fn(ev)]
        if not ops or len(ops) >= TXN_BATCH:
            return False  # none, or too many for one transaction: written after
        await self.ns.record_placement(it.reg, it.digest, it.size, extra=ops)
        self._remember(key)
        self._emit(replace(ev, committed=True))
        return True

    # -- replicated events ---------------------------------------------------------------

    async def _complete(self, reg: str, digest: str, depth: int = 0) -> bool:
        if depth > 8 or not await self._local(digest):
            return False
        rec, _ = find_manifest(self.ns, reg, digest)
        if rec is None:
            return False
        st = self.ns.cache.registries.get(reg)
        for b in rec.blobs:
            if st is not None and st.placements.get(b) and not await self._local(b):
                return False
        for c in rec.manifests:
            if not await self._complete(reg, c, depth + 1):
                return False
        return True

    async def _check_announcements(self) -> None:
        # Manifests fetched by read-through: announce them too once whole.
        for d in list(self._fetched):
            self._fetched.discard(d)
            for reg in self.ns.cache.registries:
                if find_manifest(self.ns, reg, d)[0] is not None:
                    self._announce.add((reg, d))
        for reg, d in list(self._announce):
            rec, repos = find_manifest(self.ns, reg, d)
            if rec is None:
                self._announce.discard((reg, d))
                self._announced.discard((reg, d))
                continue
            if (reg, d) in self._announced:
                self._announce.discard((reg, d))
                continue
            if not await self._complete(reg, d):
                continue
            if (reg, d) in self._announced:  # announced while this one awaited
                continue
            self._announce.discard((reg, d))
            self._remember((reg, d))
            self._emit(self._event(reg, rec, repos))

    def _remember(self, key: tuple[str, str]) -> None:
        if len(self._announced) > 100_000:  # only guards against near duplicates
            self._announced.clear()
        self._announced.add(key)

    def _event(self, reg: str, rec: ManifestRecord, repos: list[str]) -> ReplicatedEvent:
        st = self.ns.cache.registries.get(reg)
        total = rec.size
        if st is not None:
            for b in rec.blobs:
                p = st.placements.get(b)
                if p:
                    total += next(iter(p.values()))
        lag = max(time.time() - rec.created, 0.0) if rec.created else 0.0
        return ReplicatedEvent(reg, rec.digest, tuple(repos), rec.media_type, total, lag)

    def _emit(self, ev: ReplicatedEvent) -> None:
        reg, lag, total, repos = ev.registry, ev.lag, ev.bytes, ev.repos
        IMAGES.inc()
        LAG.observe(lag)
        log.info(
            "replicated %s %s (%d bytes) in %s, %.3fs after push",
            reg,
            ev.digest,
            total,
            ",".join(repos),
            lag,
            extra={"path": f"{reg}/{','.join(repos)}@{ev.digest}"},
        )
        for fn in self.hooks:
            try:
                fn(ev)
            except Exception:
                log.exception("replicated hook failed")
