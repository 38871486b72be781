"""Fetching bytes this region lacks from a region that has them.

``Fetcher`` is the one transfer engine, used by both the replicator (in the
background) and the pull path (read-through: a client asks for a blob or
manifest the namespace knows but whose bytes are not here yet).

One transfer per digest at a time (single flight): every caller that wants
the same digest joins the transfer already running. A transfer:

1. writes into ``<data>/replicating/<alg>-<hex>.part`` -- a resumable place
   that survives restarts: after a crash, the next transfer continues from
   the file's size (the prefix is re-hashed once);
2. picks the nearest region that holds the bytes (``Peers.ranked``: measured
   RTT, health), streams ``FetchBlob`` from the current offset, checks each
   chunk's offset and CRC-32 before writing it (a corrupted chunk is never
   written: the stream is dropped and re-fetched from the last good offset),
   and falls over to the next region on any error;
3. hashes while writing, and when the file is whole compares the digest;
   a mismatch deletes the partial file (never stored);
4. moves the file into the blob store (fsync, rename, fsync dir: a blob is
   visible only when whole) and records this region's placement in every
   registry that knows the digest -- only after the bytes are verified and
   durable.

Readers of a running transfer (``read_range``) stream from the partial file
as it grows: a pull is served while its bytes arrive, teed into the store.
A transfer with a reader is interactive: it ignores the background bandwidth
cap. ``serve_blob`` is the HTTP side of that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from prometheus_client import Counter

from cluster.namespace import Namespace
from node.blobstore import FilesystemBlobStore
from node.grpc_service import MAX_CHUNK, Peers
from node.sendfile import BlobFileResponse
from ocidist.digests import parse_digest
from ocidist.errors import Code, RegistryError, unavailable
from proto import replication_pb2 as pb

log = logging.getLogger("meridian.replication")

PART_DIR = "replicating"
READ_CHUNK = 1 << 20

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
    path: str
    regs: set[str]
    reason: str
    interactive: bool = False
    written: int = 0  # bytes in the partial file readers may read
    generation: int = 0  # bumped when the partial file is discarded
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


def _write_and_hash(fd: int, data: bytes, hasher: hashlib._Hash) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    hasher.update(data)


def _hash_prefix(path: str, length: int, hasher: hashlib._Hash) -> None:
    with open(path, "rb") as f:
        left = length
        while left > 0:
            data = f.read(min(left, 4 << 20))
            if not data:
                raise OSError(f"{path} is shorter than {length}")
            hasher.update(data)
            left -= len(data)


class Fetcher:
    def __init__(
        self,
        ns: Namespace,
        store: FilesystemBlobStore,
        peers: Peers,
        data_dir: str,
        *,
        bandwidth: int = 0,
        chunk_size: int = MAX_CHUNK,
        idle_timeout: float = 30.0,
        source_rounds: int = 2,
    ) -> None:
        self.ns = ns
        self.store = store
        self.peers = peers
        self.parts = os.path.join(os.path.abspath(data_dir), PART_DIR)
        os.makedirs(self.parts, exist_ok=True)
        self.bandwidth = bandwidth
        self.chunk_size = min(chunk_size, MAX_CHUNK)
        self.idle_timeout = idle_timeout
        self.source_rounds = source_rounds
        self.transfers: dict[str, Transfer] = {}
        self.limiters: dict[str, Limiter] = {}
        # Called with (digest, size) once bytes are committed here.
        self.on_local: list[Callable[[str, int], None]] = []

    # -- naming --------------------------------------------------------------

    def part_path(self, digest: str) -> str:
        alg, enc = parse_digest(digest)
        return os.path.join(self.parts, f"{alg}-{enc}.part")

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
        self, reg: str, digest: str, size: int, *, reason: str, interactive: bool = False
    ) -> Transfer:
        t = self.transfers.get(digest)
        if t is not None:
            t.regs.add(reg)
            if interactive:
                t.interactive = True
            return t
        t = Transfer(digest, size, self.part_path(digest), {reg}, reason, interactive)
        self.transfers[digest] = t
        t.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        t.task = asyncio.get_running_loop().create_task(self._run(t), name=f"fetch-{digest[:19]}")
        return t

    async def fetch(
        self, reg: str, digest: str, size: int, *, reason: str, interactive: bool = False
    ) -> None:
        """Make ``digest`` local (joining a running transfer if there is one)."""
        if self.store.stat_sync(digest) is not None:
            return
        t = self.start(reg, digest, size, reason=reason, interactive=interactive)
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
        loop = asyncio.get_running_loop()
        if self.store.stat_sync(t.digest) is not None:
            t.written = t.size
            await self._record(t)
            return
        alg, _ = parse_digest(t.digest)
        fd = os.open(t.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            offset = os.fstat(fd).st_size
            hasher = hashlib.new(alg)
            if offset > t.size:
                log.warning("discarding oversized partial file %s", t.path)
                os.ftruncate(fd, 0)
                offset = 0
            if offset:
                try:
                    await loop.run_in_executor(None, _hash_prefix, t.path, offset, hasher)
                except OSError:
                    os.ftruncate(fd, 0)
                    offset = 0
                    hasher = hashlib.new(alg)
                if offset:
                    RESUMED.inc()
                    RESUMED_BYTES.inc(offset)
                    log.info(
                        "resuming fetch of %s at offset %d of %d",
                        t.digest,
                        offset,
                        t.size,
                        extra={"path": t.path},
                    )
            t.written = t.resumed_from = offset
            t.notify()
            await self._copy(t, fd, hasher)
            actual = f"{alg}:{hasher.hexdigest()}"
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if actual != t.digest:
            ERRORS.labels("digest_mismatch").inc()
            log.error("fetched bytes of %s hash to %s; discarding them", t.digest, actual)
            os.unlink(t.path)
            t.generation += 1
            t.written = 0
            raise FetchError(f"digest mismatch: expected {t.digest}, got {actual}")
        await self.store.commit_file(t.path, t.digest, verified=True)
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

    async def _copy(self, t: Transfer, fd: int, hasher: hashlib._Hash) -> None:
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
                    await self._stream_from(t, src, fd, hasher)
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

    async def _stream_from(self, t: Transfer, src: str, fd: int, hasher: hashlib._Hash) -> None:
        peer = self.peers.peer(src)
        if peer is None:
            raise FetchError(f"no gRPC endpoint for {src}")
        loop = asyncio.get_running_loop()
        limiter = self.limiters.get(src)
        if limiter is None:
            limiter = self.limiters[src] = Limiter(self.bandwidth)
        t.source = src
        call = peer.stub.FetchBlob(
            pb.FetchRequest(
                registry=next(iter(t.regs)),
                digest=t.digest,
                offset=t.written,
                chunk_size=self.chunk_size,
                from_region=self.ns.region,
            )
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
                    await loop.run_in_executor(None, _write_and_hash, fd, data, hasher)
                    t.written += len(data)
                    counter.inc(len(data))
                    t.notify()
                if t.written == t.size:
                    break
        finally:
            call.cancel()
        if t.written != t.size:
            raise FetchError(f"{src} ended the stream at {t.written} of {t.size}")

    async def _record(self, t: Transfer) -> None:
        """Record placement here in every registry that knows the digest."""
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
        loop = asyncio.get_running_loop()
        gen = t.generation
        fd = await self._open_for_read(t)
        t.readers += 1
        try:
            pos = start
            while pos <= end:
                if t.generation != gen:
                    raise FetchError("the transfer restarted from zero")
                avail = min(t.written, end + 1)
                if pos < avail:
                    n = min(avail - pos, READ_CHUNK)
                    data = await loop.run_in_executor(None, os.pread, fd, n, pos)
                    if not data:
                        raise FetchError("partial file shrank")
                    pos += len(data)
                    yield data
                    continue
                if t.done.done():
                    if t.done.exception() is not None:
                        raise FetchError(str(t.done.exception()))
                    if t.written <= pos:
                        raise FetchError("transfer ended early")
                    continue
                await t.wait_progress()
        finally:
            t.readers -= 1
            os.close(fd)

    async def _open_for_read(self, t: Transfer) -> int:
        while True:
            try:
                return os.open(t.path, os.O_RDONLY)
            except FileNotFoundError:
                pass
            if t.done.done():
                if t.done.exception() is not None:
                    raise FetchError(str(t.done.exception()))
                path = self.store.local_path(t.digest)
                assert path is not None
                return os.open(path, os.O_RDONLY)
            await t.wait_progress()

    async def wait_started(self, t: Transfer) -> None:
        """Until the transfer has bytes to read or has ended; raises its error
        if it failed before any byte arrived."""
        while not t.done.done() and t.written == 0 and t.size > 0:
            await t.wait_progress()
        if t.done.done() and t.done.exception() is not None:
            raise t.done.exception()  # type: ignore[misc]

    # -- the pull path -----------------------------------------------------------

    async def fetch_bytes(self, digest: str, size: int, reg: str | None = None) -> bytes:
        """A small object (a manifest), fetched here whole, then read."""
        regs = (
            [reg]
            if reg
            else [r for r, st in self.ns.cache.registries.items() if digest in st.placements]
        )
        if not regs:
            raise NoSource(f"no registry knows {digest}")
        READTHROUGH.labels("manifest").inc()
        await self.fetch(regs[0], digest, size, reason="readthrough", interactive=True)
        return await self.store.read_all(digest)

    async def serve_blob(
        self,
        request: web.Request,
        reg: str,
        digest: str,
        size: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Answer a blob GET/HEAD whose bytes are not here: fetch them from
        the nearest region that has them, streaming to the client while they
        are stored."""
        if self.store.stat_sync(digest) is not None:  # arrived meanwhile
            path = self.store.local_path(digest)
            assert path is not None
            return BlobFileResponse(path, headers=headers)
        t = self.start(reg, digest, size, reason="readthrough", interactive=True)
        READTHROUGH.labels("blob").inc()
        try:
            await self.wait_started(t)
        except FetchError as e:
            raise unavailable(f"blob bytes are not in this region and fetching failed: {e}") from e
        rng = _parse_range(request.headers.get("Range"), size)
        if rng is None:
            status, start, end = 200, 0, size - 1
        else:
            status, (start, end) = 206, rng
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = max(end - start + 1, 0)
        await resp.prepare(request)
        if request.method == "HEAD" or end < start:
            await resp.write_eof()
            return resp
        try:
            async for data in self.read_range(t, start, end):
                await resp.write(data)
        except FetchError as e:
            # Headers are gone: the only honest signal left is a short body.
            log.warning("read-through of %s failed mid-stream: %s", digest, e)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range, clamped; None for none or one we cannot
    honour (then the whole blob is sent, which the spec allows)."""
    if not value:
        return None
    m = _RANGE.match(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        start = max(size - int(m.group(2)), 0)
        end = size - 1
    end = min(end, size - 1)
    if start > end:
        raise RegistryError(
            Code.RANGE_INVALID,
            "range not satisfiable",
            detail={"Range": value, "size": size},
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _code(e: BaseException) -> grpc.StatusCode | None:
    return e.code() if isinstance(e, grpc.aio.AioRpcError) else None


def _describe(e: BaseException | None) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, TimeoutError):
        return "no data within the idle timeout"
    return str(e)
