"""The replicator of a region: copies what this region lacks.

Everything it needs to know lives in the namespace; nothing lives in memory
only. The backlog of a region is computed from the watch-fed cache: every
manifest (and every blob a manifest references or a repository links) of a
registry this region replicates, that some region holds (a placement) and
this region does not. On start that scan is the resume point after a crash;
afterwards a listener on the namespace cache marks it dirty on every change
and a planner recomputes it (debounced, and at least every
``rescan_interval`` seconds).

Order: images in the order they were pushed; within one, children before
parents -- blobs (layers, config), then image manifests, then indexes. A
manifest is fetched only when everything it references is here, so a
manifest placed here by the replicator means the whole image is here.

Workers (``concurrency``) take ready items, fetch through the ``Fetcher``
(nearest source, resumable, verified; placement recorded only after the
bytes are durable), and on failure retry with exponential backoff (0.5 s
doubling to 60 s). Bytes that are here but not recorded (a placement write
failed while etcd was down) are recorded on the next pass.

Which regions hold a registry: ``/meridian/reg/<reg>/config`` ->
``{"replicas": [...]}``; unset means every region. Adding this region
backfills (the scan finds everything); removing it stops new work and
cancels background transfers nobody is reading.

When a manifest and everything it references (recursively) is here, the
replicator emits a ``replicated`` event: a log line, the
``meridian_replication_images_total`` counter, the lag histogram (push time
to fully here), and the in-process ``hooks``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from cluster.kv import Entry
from cluster.namespace import REG, ManifestRecord, Namespace
from node.blobstore import FilesystemBlobStore
from node.grpc_service import GrpcServer, Peers
from node.readthrough import ERRORS, Fetcher

log = logging.getLogger("meridian.replication")

PENDING_ITEMS = Gauge(
    "meridian_replication_pending_items", "Manifests and blobs this region still lacks"
)
PENDING_BYTES = Gauge(
    "meridian_replication_pending_bytes", "Bytes this region still lacks (minus partial files)"
)
INFLIGHT = Gauge("meridian_replication_inflight", "Background transfers running now")
OLDEST = Gauge(
    "meridian_replication_oldest_pending_seconds",
    "Age of the oldest image not yet fully here (0 when none)",
)
IMAGES = Counter(
    "meridian_replication_images_total", "Images (manifest + everything it references) now here"
)
LAG = Histogram(
    "meridian_replication_lag_seconds",
    "From the push of a manifest to it and everything it references being here",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)

BLOB, IMAGE, INDEX = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Item:
    reg: str
    digest: str
    size: int
    rank: int  # BLOB, IMAGE (manifest), INDEX
    created: float  # push time of the (oldest) manifest that needs it; inf if none
    deps: tuple[str, ...] = ()  # what a manifest references


@dataclass(frozen=True, slots=True)
class ReplicatedEvent:
    registry: str
    digest: str
    repos: tuple[str, ...]
    media_type: str
    bytes: int
    lag: float  # seconds since the push


def replicates(ns: Namespace, reg: str, region: str) -> bool:
    replicas = ns.registry_replicas(reg)
    return replicas is None or region in replicas


def backlog(ns: Namespace, region: str) -> list[Item]:
    """What ``region`` lacks, in copy order (from the namespace alone)."""
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

    for reg, st in ns.cache.registries.items():
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


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0


@dataclass
class Replicator:
    ns: Namespace
    store: FilesystemBlobStore
    fetcher: Fetcher
    concurrency: int = 4
    rescan_interval: float = 10.0
    debounce: float = 0.05
    hooks: list[Callable[[ReplicatedEvent], None]] = field(default_factory=list)
    plan: list[Item] = field(default_factory=list)
    pending_bytes: int = 0  # of ``plan``, not on disk yet (as PENDING_BYTES)
    inflight: dict[str, Item] = field(default_factory=dict)
    _backoff: dict[tuple[str, str], _Backoff] = field(default_factory=dict)
    _announce: set[tuple[str, str]] = field(default_factory=set)
    _presence: dict[str, bool] = field(default_factory=dict)
    _announced: set[tuple[str, str]] = field(default_factory=set)
    _fetched: set[str] = field(default_factory=set)
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
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _on_change(self, key: str, value: bytes | None) -> None:
        # Called inside Cache.apply (possibly on a cache being reloaded): only
        # note that something changed; the planner reads the namespace.
        if key.startswith(REG) and "/_t/" in key:
            return  # tag moves change nothing this region must hold
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
                self.replan()
            except Exception:
                log.exception("replication planning failed")
            await asyncio.sleep(self.debounce)

    def replan(self) -> None:
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
        self._check_announcements()
        self._planned.set()
        self._wake.set()

    def _local(self, digest: str) -> bool:
        return self.store.stat_sync(digest) is not None

    def _present(self, digest: str) -> bool:
        """``_local`` through a per-plan cache (bytes only ever arrive while
        a plan is current; a reclaim removes bytes nothing references)."""
        known = self._presence.get(digest)
        if known is None:
            known = self._presence[digest] = self._local(digest)
        return known

    def _deps_state(self, it: Item) -> str:
        """ "ready" when everything ``it`` references is here, "inflight"
        when the rest is being copied now, else "blocked"."""
        places = self.ns.cache.registries.get(it.reg)
        state = "ready"
        for d in it.deps:
            if self._present(d):
                continue
            if places is not None and not places.placements.get(d):
                continue  # held nowhere (e.g. a non-distributable layer)
            if d in self.inflight:
                state = "inflight"
                continue
            return "blocked"
        return state

    def _ready(self, it: Item) -> bool:
        # A manifest's bytes may be fetched while its children are still in
        # flight (saving a round trip); its placement waits for them.
        if it.rank == BLOB or self._present(it.digest):
            return True
        return self._deps_state(it) != "blocked"

    def _pick(self) -> Item | None:
        now = time.monotonic()
        for it in self.plan:
            if it.digest in self.inflight:
                continue
            b = self._backoff.get((it.reg, it.digest))
            if b is not None and b.until > now:
                continue
            if self._ready(it):
                return it
        return None

    def _next_retry(self) -> float:
        now = time.monotonic()
        waits = [b.until - now for b in self._backoff.values() if b.until > now]
        return max(min(waits, default=self.rescan_interval), 0.05)

    # -- work ------------------------------------------------------------------------

    async def _worker(self) -> None:
        await self._planned.wait()
        # Let the first round of pings finish, so the first source is informed.
        await self.fetcher.peers.wait_measured(2.0)
        while True:
            self._wake.clear()
            it = self._pick()
            if it is None:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._next_retry())
                except TimeoutError:
                    pass
                continue
            self.inflight[it.digest] = it
            INFLIGHT.set(len(self.inflight))
            key = (it.reg, it.digest)
            try:
                await self._replicate(it)
                self._presence[it.digest] = True
                self._backoff.pop(key, None)
                try:
                    self.plan.remove(it)
                except ValueError:
                    pass
            except Exception as e:
                b = self._backoff.setdefault(key, _Backoff())
                b.failures += 1
                # Bytes already here only wait for the namespace: retry sooner.
                cap = 5.0 if self._local(it.digest) else 60.0
                delay = min(0.5 * 2 ** (b.failures - 1), cap)
                b.until = time.monotonic() + delay
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
                self.inflight.pop(it.digest, None)
                INFLIGHT.set(len(self.inflight))
                async with self._landed:
                    self._landed.notify_all()
                self._dirty.set()
                self._wake.set()

    async def _replicate(self, it: Item) -> None:
        if not self._local(it.digest):
            await self.fetcher.fetch(it.reg, it.digest, it.size, reason="replicate")
        if it.rank != BLOB:
            # A placed manifest means the whole image is here: wait for the
            # children copied alongside it.
            async with self._landed:
                await self._landed.wait_for(lambda: self._deps_state(it) != "inflight")
            if self._deps_state(it) == "blocked":
                raise RuntimeError("a referenced blob or manifest is not here yet")
        if self.region not in self.ns.placements(it.reg, it.digest):
            # Bytes are here and verified; the placement write failed or is new.
            await self.ns.record_placement(it.reg, it.digest, it.size)
        if it.rank != BLOB:
            self._announce.add((it.reg, it.digest))

    # -- replicated events ---------------------------------------------------------------

    def _complete(self, reg: str, digest: str, depth: int = 0) -> bool:
        if depth > 8 or not self._local(digest):
            return False
        rec, _ = find_manifest(self.ns, reg, digest)
        if rec is None:
            return False
        st = self.ns.cache.registries.get(reg)
        for b in rec.blobs:
            if not self._local(b) and st is not None and st.placements.get(b):
                return False
        return all(self._complete(reg, c, depth + 1) for c in rec.manifests)

    def _check_announcements(self) -> None:
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
            if not self._complete(reg, d):
                continue
            self._announce.discard((reg, d))
            if len(self._announced) > 100_000:  # only guards against near duplicates
                self._announced.clear()
            self._announced.add((reg, d))
            self._emit(reg, rec, repos)

    def _emit(self, reg: str, rec: ManifestRecord, repos: list[str]) -> None:
        st = self.ns.cache.registries.get(reg)
        total = rec.size
        if st is not None:
            for b in rec.blobs:
                p = st.placements.get(b)
                if p:
                    total += next(iter(p.values()))
        lag = max(time.time() - rec.created, 0.0) if rec.created else 0.0
        ev = ReplicatedEvent(reg, rec.digest, tuple(repos), rec.media_type, total, lag)
        IMAGES.inc()
        LAG.observe(lag)
        log.info(
            "replicated %s %s (%d bytes) in %s, %.3fs after push",
            reg,
            rec.digest,
            total,
            ",".join(repos),
            lag,
            extra={"path": f"{reg}/{','.join(repos)}@{rec.digest}"},
        )
        for fn in self.hooks:
            try:
                fn(ev)
            except Exception:
                log.exception("replicated hook failed")


def referenced_digests(entries: list[Entry]) -> set[str]:
    """Every digest some registry still references, from a fresh read of
    ``/meridian/reg/``: linked blobs, manifests, and what manifests reference."""
    refs: set[str] = set()
    for e in entries:
        rest = e.key[len(REG) :]
        _, _, rest = rest.partition("/")
        if not rest.startswith("repo/"):
            continue
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
    return refs


TRASH = ".reclaim"


@dataclass
class Reclaimer:
    """Removes local bytes no registry references any more, safely:

    - only while the namespace is in sync, from a fresh (linearizable) read,
      never from the cache;
    - only files older than ``grace`` seconds (an upload commits its blob a
      moment before it links it), and never one being fetched;
    - in two phases: rename to ``<blob>.reclaim`` (no longer served), read
      the namespace again, put back whatever became referenced meanwhile,
      then drop this region's placements of the rest and delete them. A
      crash in between leaves ``.reclaim`` files, which the next pass
      settles the same way.

    Stale partial downloads of unreferenced digests go too."""

    ns: Namespace
    store: FilesystemBlobStore
    fetcher: Fetcher
    interval: float
    grace: float
    _task: asyncio.Task[None] | None = None

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
                await self.reclaim_once()
            except Exception as e:
                log.warning("reclaim pass failed: %s", e)

    def _scan(self, refs: set[str]) -> tuple[list[str], list[str]]:
        """(candidate blob digests, leftover trash digests) on disk."""
        now = time.time()
        candidates: list[str] = []
        trash: list[str] = []
        for alg in os.listdir(self.store.blobs):
            adir = os.path.join(self.store.blobs, alg)
            for sub in os.listdir(adir):
                for name in os.listdir(os.path.join(adir, sub)):
                    path = os.path.join(adir, sub, name)
                    if name.endswith(TRASH):
                        trash.append(f"{alg}:{name[: -len(TRASH)]}")
                        continue
                    digest = f"{alg}:{name}"
                    if digest in refs or digest in self.fetcher.transfers:
                        continue
                    try:
                        if now - os.stat(path).st_mtime < self.grace:
                            continue
                    except FileNotFoundError:
                        continue
                    candidates.append(digest)
        parts = self.fetcher.parts
        for name in os.listdir(parts):
            alg, _, rest = name.partition("-")
            digest = f"{alg}:{rest.removesuffix('.part')}"
            path = os.path.join(parts, name)
            if digest in refs or digest in self.fetcher.transfers:
                continue
            try:
                if now - os.stat(path).st_mtime >= self.grace:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        return candidates, trash

    async def reclaim_once(self) -> int:
        """One pass; returns how many blobs were deleted."""
        refs = referenced_digests(await self.ns.refresh(REG))
        candidates, trash = await asyncio.to_thread(self._scan, refs)
        for d in candidates:
            path = self.store.local_path(d)
            assert path is not None
            try:
                os.rename(path, path + TRASH)
            except FileNotFoundError:
                continue
            trash.append(d)
        if not trash:
            return 0
        refs = referenced_digests(await self.ns.refresh(REG))  # anything new?
        deleted = 0
        for d in trash:
            path = self.store.local_path(d)
            assert path is not None
            if d in refs:
                os.replace(path + TRASH, path)  # referenced again: keep it
                continue
            for reg, st in list(self.ns.cache.registries.items()):
                if self.ns.region in st.placements.get(d, {}):
                    await self.ns.remove_placement(reg, d)
            try:
                os.unlink(path + TRASH)
                deleted += 1
            except FileNotFoundError:
                pass
        if deleted:
            RECLAIMED.inc(deleted)
            log.info("reclaimed %d unreferenced blobs", deleted)
        return deleted


RECLAIMED = Counter(
    "meridian_replication_reclaimed_blobs_total", "Local blobs no registry references, removed"
)


class Replication:
    """Everything of one node that spans regions: the gRPC server, the
    peers, the fetcher (read-through) and the replicator."""

    def __init__(
        self,
        ns: Namespace,
        store: FilesystemBlobStore,
        data_dir: str,
        *,
        grpc_listen: str = "",
        concurrency: int = 4,
        bandwidth: int = 0,
        reclaim_interval: float = 0.0,
        reclaim_grace: float = 3600.0,
    ) -> None:
        self.ns = ns
        self.store = store
        self.server = GrpcServer(grpc_listen, ns.region, store) if grpc_listen else None
        self.peers = Peers(ns, ns.region)
        self.fetcher = Fetcher(ns, store, self.peers, data_dir, bandwidth=bandwidth)
        self.replicator = (
            Replicator(ns, store, self.fetcher, concurrency=concurrency)
            if concurrency > 0
            else None
        )
        self.reclaimer = (
            Reclaimer(ns, store, self.fetcher, reclaim_interval, reclaim_grace)
            if reclaim_interval > 0
            else None
        )

    def attach(self, app: web.Application, registry: object) -> None:
        """Wire into the node's HTTP app (before it starts): read-through for
        the v2 API, and ``GET /meridian/v1/replication``."""
        registry.readthrough = self.fetcher  # type: ignore[attr-defined]
        app[NS_KEY] = self.ns
        app.router.add_get("/meridian/v1/replication", status_handler)

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
        self.peers.start()
        if self.replicator is not None:
            self.replicator.start()
        if self.reclaimer is not None:
            self.reclaimer.start()

    async def stop(self) -> None:
        if self.reclaimer is not None:
            await self.reclaimer.close()
        if self.replicator is not None:
            await self.replicator.close()
        await self.fetcher.close()
        if self.server is not None:
            await self.server.stop()
        await self.peers.close()


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


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def replication_main(argv: list[str]) -> int:
    """``meridian replication list``: per region status, items and bytes
    pending, lag -- read from the namespace (``--etcd``) or from a node's
    management API (``--node``)."""
    import argparse
    import json
    import os
    import urllib.request

    p = argparse.ArgumentParser(
        prog="meridian replication", description="replication status of a cluster"
    )
    p.add_argument("verb", choices=["list"], nargs="?", default="list")
    p.add_argument("--etcd", default=os.environ.get("MERIDIAN_ETCD", ""))
    p.add_argument("--node", default=os.environ.get("MERIDIAN_NODE", "http://127.0.0.1:5000"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.etcd:
        from cluster.etcd import EtcdKV

        async def read() -> list[dict]:
            ns = Namespace(EtcdKV.from_flag(args.etcd), "")
            await ns.start()
            try:
                return status_rows(ns)
            finally:
                await ns.close()

        rows = asyncio.run(read())
    else:
        url = args.node.rstrip("/") + "/meridian/v1/replication"
        with urllib.request.urlopen(url, timeout=10) as resp:
            rows = json.loads(resp.read())["regions"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'REGION':<16} {'STATUS':<12} {'ITEMS':>7} {'BYTES':>10} {'LAG':>9}")
    for r in rows:
        print(
            f"{r['region']:<16} {r['status']:<12} {r['pending_items']:>7} "
            f"{_human(r['pending_bytes']):>10} {r['lag_seconds']:>8.1f}s"
        )
    return 0


async def status_handler(request: web.Request) -> web.Response:
    """``GET /meridian/v1/replication``: ``status_rows`` from this node's cache."""
    ns = request.app[NS_KEY]
    return web.json_response({"regions": status_rows(ns)})


NS_KEY = web.AppKey("replication_ns", Namespace)


__all__ = [
    "Item",
    "ReplicatedEvent",
    "Replication",
    "Replicator",
    "backlog",
    "replication_main",
    "status_rows",
]
