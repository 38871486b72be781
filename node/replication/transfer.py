"""Fetching bytes this region lacks from a region that has them.

``Fetcher`` is the one transfer engine, used by both the replicator (in the
background) and the read-through store (``node.storage.readthrough``: a
client asks for a blob or manifest the namespace knows but whose bytes are
not here yet).

One transfer per digest at a time (single flight): every caller that wants
the same digest joins the transfer already running. A transfer:

1. stages the bytes in the local store under
   ``replicating/<node>/<alg>-<hex>.part`` -- a resumable writer that
   survives restarts: after a crash, the next transfer continues from the
   staged size (the prefix is re-hashed once). Named by the node (its
   ``--node-id``), so nodes of a region sharing one data dir never write
   the same part; whichever commits first puts the blob in place, and the
   other's commit replaces it with the same bytes;
2. picks the nearest region that holds the bytes (``Peers.ranked``: measured
   RTT, health), streams ``FetchBlob`` from the current offset, checks each
   chunk's offset and CRC-32 before writing it (a corrupted chunk is never
   written: the stream is dropped and re-fetched from the last good offset),
   and falls over to the next region on any error;
3. hashes while writing, and commits the writer under the digest, which
   verifies it: a mismatch drops the staged bytes (never stored);
4. once the bytes are durable in the store, records this region's
   placement in every registry that knows the digest.

Readers of a running transfer (``read_range``) read the staged bytes as
they arrive, then the committed blob: a pull is served while its bytes
arrive, teed into the store. A transfer with a reader is interactive: it
ignores the background bandwidth cap. No HTTP here: the read-through store
hands these bytes to whichever answer needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter

from cluster.namespace import Namespace
from node.grpc_service import MAX_CHUNK, CredentialUnavailable, Peers
from node.storage.base import READ_CHUNK, BlobNotFound, BlobStore, BlobWriter, DigestMismatch
from ocidist.digests import is_digest, parse_digest
from proto import replication_pb2 as pb

log = logging.getLogger("meridian.replication")

PART_PREFIX = "replicating/"
PART_SUFFIX = ".part"

BYTES_COPIED = Counter(
    "meridian_replication_bytes_copied_total",
    "Bytes received from other regions and written locally",
    ["source"],
)
FETCHES = Counter(
    "meridian_replication_fetches_total",
    "Transfers started, by why (replicate, readthrough) and how they ended",
    ["reason", "outcome"],
)
COPIES = Counter(
    "meridian_replication_copies_total",
    "Blobs and manifests this node copied into the region's store (committed after a "
    "transfer), by why; summed over a region's nodes, each item counts once",
    ["reason"],
)
RESUMED = Counter(
    "meridian_replication_resumed_total",
    "Transfers that resumed a partial file from a non-zero offset",
)
RESUMED_BYTES = Counter(
    "meridian_replication_resumed_bytes_total",
    "Bytes already on disk when a transfer resumed (the offsets resumed from)",
)
ERRORS = Counter(
    "meridian_replication_errors_total",
    "Replication errors, by kind",
    ["kind"],
)
READTHROUGH = Counter(
    "meridian_replication_readthrough_total",
    "Pulls served while their bytes were fetched from another region",
    ["kind"],
)


class FetchError(Exception):
    """A transfer could not complete now; it may be retried."""


class NoSource(FetchError):
    """No reachable region holds the bytes."""


class ChunkCorrupt(FetchError):
    """A chunk failed its CRC or arrived at the wrong offset."""


def part_name(digest: str, node: str = "") -> str:
    """The staging name of ``digest``'s transfer in the local store, in
    ``node``'s own directory if given."""
    alg, enc = parse_digest(digest)
    sub = f"{node}/" if node else ""
    return f"{PART_PREFIX}{sub}{alg}-{enc}{PART_SUFFIX}"


def part_digest(name: str) -> str | None:
    """The digest a staging name belongs to (None if it is not a part)."""
    if not name.startswith(PART_PREFIX) or not name.endswith(PART_SUFFIX):
        return None
    base = name[len(PART_PREFIX) : -len(PART_SUFFIX)].rsplit("/", 1)[-1]
    alg, _, enc = base.partition("-")
    digest = f"{alg}:{enc}"
    return digest if is_digest(digest) else None


class Limiter:
    """A token bucket: ``rate`` bytes per second, bursts up to one second's
    worth (at least 2 chunks). ``rate`` 0 means unlimited."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = max(rate, 2 * MAX_CHUNK)
        self.tokens = float(min(self.capacity, max(rate, MAX_CHUNK)))
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


@dataclass(eq=False)
class Transfer:
    digest: str
    size: int
    regs: set[str]
    reason: str
    interactive: bool = False
    # Record the placement when done; the replicator leaves a manifest's to
    # itself, to commit it with the image's replicated events.
    place: bool = True
    writer: BlobWriter | None = None
    written: int = 0  # staged bytes readers may read
    committed: bool = False  # the blob is in the store: read it there
    generation: int = 0  # bumped when the staged bytes are discarded
    resumed_from: int = 0
    source: str = ""
    readers: int = 0
    task: asyncio.Task[None] | None = None
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        ev, self._progress = self._progress, asyncio.Event()
        ev.set()

    async def wait_progress(self) -> None:
        await self._progress.wait()


class Fetcher:
    def __init__(
        self,
        ns: Namespace,
        store: BlobStore,
        peers: Peers,
        *,
        bandwidth: int = 0,
        chunk_size: int = MAX_CHUNK,
        idle_timeout: float = 30.0,
        source_rounds: int = 2,
        node_id: str = "",
    ) -> None:
        self.ns = ns
        self.node_id = node_id  # names this node's parts (a shared data dir)
        self.store = store  # the local store: transfers land here
        self.peers = peers
        self.bandwidth = bandwidth
        self.chunk_size = min(chunk_size, MAX_CHUNK)
        self.idle_timeout = idle_timeout
        self.source_rounds = source_rounds
        self.transfers: dict[str, Transfer] = {}
        self.limiters: dict[str, Limiter] = {}
        # Called with (digest, size) once bytes are committed here.
        self.on_local: list[Callable[[str, int], None]] = []

    def sources(self, digest: str, reg: str | None = None) -> list[str]:
        """Regions holding ``digest`` (in ``reg``, or in any registry), best first."""
        holders: set[str] = set()
        regs = [reg] if reg else list(self.ns.cache.registries)
        for r in regs:
            holders.update(self.ns.placements(r, digest))
        holders.discard(self.ns.region)
        return self.peers.ranked(holders)

    # -- single flight -------------------------------------------------------

    def start(
        self,
        reg: str,
        digest: str,
        size: int,
        *,
        reason: str,
        interactive: bool = False,
        place: bool = True,
    ) -> Transfer:
        t = self.transfers.get(digest)
        if t is not None:
            t.regs.add(reg)
            if interactive:
                t.interactive = True
            t.place = t.place or place
            return t
        t = Transfer(digest, size, {reg}, reason, interactive, place)
        self.transfers[digest] = t
        t.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        t.task = asyncio.get_running_loop().create_task(self._run(t), name=f"fetch-{digest[:19]}")
        return t

    async def fetch(
        self,
        reg: str,
        digest: str,
        size: int,
        *,
        reason: str,
        interactive: bool = False,
        place: bool = True,
    ) -> None:
        """Make ``digest`` local (joining a running transfer if there is one);
        ``place``: record this region's placement of it once it is."""
        if await self.store.stat(digest) is not None:
            return
        t = self.start(reg, digest, size, reason=reason, interactive=interactive, place=place)
        await asyncio.shield(t.done)

    async def close(self) -> None:
        tasks = [t.task for t in self.transfers.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the transfer --------------------------------------------------------

    async def _run(self, t: Transfer) -> None:
        outcome = "error"
        try:
            await self._transfer(t)
            outcome = "ok"
            if not t.done.done():
                t.done.set_result(None)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if not t.done.done():
                t.done.set_exception(FetchError("cancelled"))
            # Stopped because the blob is held here now (a node sharing the
            # data dir fetched it first): the part is of no further use.
            w = t.writer
            if w is not None and not t.committed:
                with contextlib.suppress(Exception):
                    if await self.store.stat(t.digest) is not None:
                        await w.abort()
            raise
        except Exception as e:
            if not t.done.done():
                t.done.set_exception(e if isinstance(e, FetchError) else FetchError(str(e)))
        finally:
            FETCHES.labels(t.reason, outcome).inc()
            if self.transfers.get(t.digest) is t:
                del self.transfers[t.digest]
            t.notify()

    async def _transfer(self, t: Transfer) -> None:
        if await self.store.stat(t.digest) is not None:
            t.written = t.size
            t.committed = True
            await self._record(t)
            return
        alg, _ = parse_digest(t.digest)
        w = await self.store.writer(part_name(t.digest, self.node_id), resume=True, algorithm=alg)
        if w.size > t.size:
            log.warning("discarding oversized partial file of %s", t.digest)
            await w.truncate(0)
        if w.size:
            RESUMED.inc()
            RESUMED_BYTES.inc(w.size)
            log.info(
                "resuming fetch of %s at offset %d of %d",
                t.digest,
                w.size,
                t.size,
                extra={"path": w.name},
            )
        t.writer = w
        t.written = t.resumed_from = w.size
        t.notify()
        await self._copy(t, w)
        try:
            await w.commit(t.digest)
        except DigestMismatch as e:
            ERRORS.labels("digest_mismatch").inc()
            log.error("fetched bytes of %s hash to %s; discarding them", t.digest, e.actual)
            await w.abort()
            t.generation += 1
            t.written = 0
            raise FetchError(f"digest mismatch: expected {t.digest}, got {e.actual}") from None
        t.committed = True
        COPIES.labels(t.reason).inc()
        t.notify()
        log.info(
            "fetched %s (%d bytes) from %s",
            t.digest,
            t.size,
            t.source,
            extra={"path": t.reason},
        )
        for fn in self.on_local:
            try:
                fn(t.digest, t.size)
            except Exception:
                log.exception("on_local hook failed")
        await self._record(t)

    async def _copy(self, t: Transfer, w: BlobWriter) -> None:
        rounds = 0
        last: Exception | None = None
        while t.written < t.size or t.size == 0:
            sources = self.sources(t.digest)
            if not sources:
                ERRORS.labels("no_source").inc()
                raise NoSource(f"no reachable region holds {t.digest}")
            progressed = False
            for src in sources:
                before = t.written
                try:
                    await self._stream_from(t, src, w)
                    self.peers.report_success(src)
                    return
                except ChunkCorrupt as e:
                    ERRORS.labels("corrupt_chunk").inc()
                    log.warning("corrupt chunk of %s from %s: %s; re-fetching", t.digest, src, e)
                    last = e
                except (grpc.aio.AioRpcError, TimeoutError, FetchError) as e:
                    kind = "not_found" if _code(e) == grpc.StatusCode.NOT_FOUND else "transport"
                    ERRORS.labels(kind).inc()
                    log.warning(
                        "fetch of %s from %s stopped at %d/%d: %s",
                        t.digest,
                        src,
                        t.written,
                        t.size,
                        _describe(e),
                    )
                    self.peers.report_failure(src)
                    last = e
                if t.written > before:
                    progressed = True
            if not progressed:
                rounds += 1
                if rounds >= self.source_rounds:
                    raise FetchError(f"{t.digest}: every source failed: {_describe(last)}")
                await asyncio.sleep(0.2 * rounds)

    async def _stream_from(self, t: Transfer, src: str, w: BlobWriter) -> None:
        peer = self.peers.peer(src)
        if peer is None:
            raise FetchError(f"no gRPC endpoint for {src}")
        limiter = self.limiters.get(src)
        if limiter is None:
            limiter = self.limiters[src] = Limiter(self.bandwidth)
        t.source = src
        try:
            metadata = await self.peers.call_metadata()
        except CredentialUnavailable as e:
            raise FetchError(str(e)) from e
        call = peer.stub.FetchBlob(
            pb.FetchRequest(
                registry=self._registry(t),
                digest=t.digest,
                offset=t.written,
                chunk_size=self.chunk_size,
                from_region=self.ns.region,
            ),
            metadata=metadata,
        )
        counter = BYTES_COPIED.labels(src)
        try:
            while True:
                msg = await asyncio.wait_for(call.read(), self.idle_timeout)
                if msg is grpc.aio.EOF:
                    break
                if msg.total_size != t.size:
                    raise FetchError(
                        f"{src} holds {msg.total_size} bytes of {t.digest}, expected {t.size}"
                    )
                if msg.offset != t.written:
                    raise ChunkCorrupt(f"chunk at offset {msg.offset}, expected {t.written}")
                data = msg.data
                if zlib.crc32(data) != msg.crc32:
                    raise ChunkCorrupt(f"CRC mismatch in chunk at offset {msg.offset}")
                if t.written + len(data) > t.size:
                    raise ChunkCorrupt("chunk runs past the end of the blob")
                if not t.interactive:
                    await limiter.take(len(data))
                if data:
                    await w.write([data])
                    t.written = w.size
                    counter.inc(len(data))
                    t.notify()
                if t.written == t.size:
                    break
        finally:
            call.cancel()
        if t.written != t.size:
            raise FetchError(f"{src} ended the stream at {t.written} of {t.size}")

    def _registry(self, t: Transfer) -> str:
        """The registry to ask for ``t`` under: the holder serves only what
        that registry still references, so one of the transfer's that does
        per this region's namespace (a registry may have dropped it since
        the transfer began while another still holds it)."""
        for reg in sorted(t.regs):
            if self.ns.references(reg, t.digest):
                return reg
        for reg in sorted(self.ns.cache.registries):
            if self.ns.references(reg, t.digest):
                return reg
        return min(t.regs)

    async def _record(self, t: Transfer) -> None:
        """Record placement here in every registry that knows the digest."""
        if not t.place:
            return
        regs = set(t.regs)
        for reg, st in self.ns.cache.registries.items():
            if t.digest in st.placements:
                regs.add(reg)
        for reg in sorted(regs):
            try:
                await self.ns.record_placement(reg, t.digest, t.size)
            except Exception as e:  # the replicator's scan records it later
                ERRORS.labels("placement").inc()
                log.warning("cannot record placement of %s in %s yet: %s", t.digest, reg, e)

    # -- readers ---------------------------------------------------------------

    async def read_range(self, t: Transfer, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start..end`` (inclusive) of a transfer, as they arrive."""
        gen = t.generation
        t.readers += 1
        try:
            pos = start
            while pos <= end:
                if t.generation != gen:
                    raise FetchError("the transfer restarted from zero")
                if t.committed:
                    async with self.store.open(t.digest, pos, end + 1 - pos) as reader:
                        async for data in reader:
                            pos += len(data)
                            yield data
                    if pos <= end:
                        raise FetchError("the stored blob is shorter than its size")
                    return
                avail = min(t.written, end + 1)
                if pos < avail and t.writer is not None:
                    try:
                        data = await t.writer.read_at(pos, min(avail - pos, READ_CHUNK))
                    except BlobNotFound:
                        data = None  # committed or discarded meanwhile: look again
                    if data:
                        pos += len(data)
                        yield data
                        continue
                    if data is not None:
                        raise FetchError("partial file shrank")
                    # The staged bytes are gone: committed (read the store)
                    # or discarded (the generation changes). Either ends in
                    # a notify once the transfer has noted it.
                    if not (t.committed or t.generation != gen or t.done.done()):
                        await t.wait_progress()
                    continue
                if t.done.done():
                    exc = t.done.exception()
                    if exc is not None:
                        raise FetchError(str(exc))
                    if not t.committed:
                        raise FetchError("transfer ended early")
                    continue
                await t.wait_progress()
        finally:
            t.readers -= 1

    async def wait_started(self, t: Transfer) -> None:
        """Until the transfer has bytes to read or has ended; raises its error
        if it failed before any byte arrived."""
        while not t.done.done() and t.written == 0 and t.size > 0 and not t.committed:
            await t.wait_progress()
        exc = t.done.exception() if t.done.done() else None
        if exc is not None:
            raise exc


def _code(e: BaseException) -> grpc.StatusCode | None:
    return e.code() if isinstance(e, grpc.aio.AioRpcError) else None


def _describe(e: BaseException | None) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, TimeoutError):
        return "no data within the idle timeout"
    return str(e)
