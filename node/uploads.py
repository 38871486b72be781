"""Blob upload sessions of one node.

A session is three staged objects of the blob store, so it lives wherever
the store keeps its staged writers (the data dir, or the region's Azure
container) and every node sharing that store sees it: ``uploads/<id>/data``
(the bytes, a resumable writer), ``uploads/<id>/info.json`` (whose
repository it belongs to) and, once the bytes are in the store,
``uploads/<id>/committed`` (their digest and size). On the filesystem these
are the files of ``<data>/uploads/<id>/``. A session survives a restart:
the offset is the writer's size, and a client resumes with GET (for
``Range``) then PATCH from that offset. Bytes are hashed while
they stream in (by the writer, on a worker thread, while the next batch
arrives); after a restart the running hash is rebuilt from the staged bytes
once.

Sessions open at once are capped per repository and per node (over a cap:
429 TOOMANYREQUESTS); abandoned ones are purged after ``upload_ttl``, and
sessions that never received a byte much sooner (``upload_empty_ttl``).

Nodes of one region share the store (a data dir, an Azure container), and
so the sessions: a session started on one node can be continued on another.
Nothing about a session lives only in memory: a node that holds one in
memory checks it against the store on each request (one listing of
``uploads/<id>/``: still there? committed? the staged size it knows?) and
reloads it when another node moved it on. The caps count the sessions each
node knows of (those in the store when it first needed the count, those it
made or served); a session another node removed stops counting at the next
purge.

A full disk is ``StorageFull`` (507); a PATCH that meets it is rolled back
to the offset it started from, so the session stays resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from node.storage.base import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobWriter,
    DigestMismatch,
    StorageFull,
)
from ocidist.errors import Code, RegistryError, upload_unknown

WRITE_BATCH = 4 << 20
RETRY_AFTER = 60  # seconds a client over a session cap is told to wait


PREFIX = "uploads/"
DATA = "data"
INFO = "info.json"
COMMITTED = "committed"


def session_name(upload_id: str, leaf: str) -> str:
    """The blob store writer name of one object of a session."""
    return f"{PREFIX}{upload_id}/{leaf}"


def data_name(upload_id: str) -> str:
    """The blob store writer name of a session's bytes."""
    return session_name(upload_id, DATA)


@dataclass
class Upload:
    id: str
    registry: str
    repo: str
    started: float
    writer: BlobWriter
    # (digest, size) once the bytes are in the blob store but the namespace
    # has not recorded them yet: a retried final PUT then only records.
    committed: tuple[str, int] | None = None
    cancelled: bool = False
    total: int | None = None  # the blob size a chunk's Content-Range declared
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def size(self) -> int:
        return self.committed[1] if self.committed is not None else self.writer.size


def _valid_id(upload_id: str) -> bool:
    try:
        return str(uuid.UUID(upload_id)) == upload_id
    except ValueError:
        return False  # never let a client-chosen id become a path


class UploadManager:
    def __init__(
        self,
        root: str,
        store: BlobStore,
        max_blob_size: int = 0,
        *,
        max_per_repo: int = 0,
        max_total: int = 0,
    ) -> None:
        # On the filesystem store the sessions' own directory (a crash can
        # leave an empty one there); elsewhere just an empty directory.
        self.root = os.path.join(os.path.abspath(root), "uploads")
        self.store = store
        self.max_blob_size = max_blob_size
        self.max_per_repo = max_per_repo
        self.max_total = max_total
        self._live: dict[str, Upload] = {}
        os.makedirs(self.root, exist_ok=True)
        # Every session in the store (they survive restarts), for the caps;
        # read from the store when first needed.
        self._open: dict[str, tuple[str, str]] = {}
        self._per_repo: Counter[tuple[str, str]] = Counter()
        self._scanned = False
        self._scan_lock = asyncio.Lock()

    # -- the session's objects in the store -------------------------------------

    async def _sessions(self, upload_id: str = "") -> dict[str, dict[str, BlobInfo]]:
        """The staged objects of every session (or of one), by id and leaf."""
        prefix = f"{PREFIX}{upload_id}/" if upload_id else PREFIX
        found: dict[str, dict[str, BlobInfo]] = {}
        async for info in self.store.list_staged(prefix):
            sid, _, leaf = info.name[len(PREFIX) :].partition("/")
            if sid and leaf and "/" not in leaf:
                found.setdefault(sid, {})[leaf] = info
        return found

    async def _files(self, upload_id: str) -> dict[str, BlobInfo]:
        return (await self._sessions(upload_id)).get(upload_id, {})

    async def _read(self, upload_id: str, leaf: str) -> bytes | None:
        w = await self.store.writer(session_name(upload_id, leaf), resume=True)
        if w.size == 0:
            return None
        try:
            return await w.read_at(0, w.size)
        except BlobNotFound:
            return None

    async def _put(self, upload_id: str, leaf: str, doc: dict) -> None:
        w = await self.store.writer(session_name(upload_id, leaf))
        await w.write([json.dumps(doc).encode()])

    async def _remove(self, upload_id: str, leaves: list[str]) -> None:
        for leaf in leaves:
            w = await self.store.writer(session_name(upload_id, leaf), resume=True)
            with contextlib.suppress(BlobNotFound):
                await w.abort()
        await asyncio.to_thread(shutil.rmtree, os.path.join(self.root, upload_id), True)

    async def _read_committed(self, upload_id: str) -> tuple[str, int] | None:
        raw = await self._read(upload_id, COMMITTED)
        try:
            doc = json.loads(raw) if raw else None
            return (doc["digest"], int(doc["size"])) if doc else None
        except (ValueError, KeyError, TypeError):
            return None

    async def _read_info(self, upload_id: str) -> dict | None:
        raw = await self._read(upload_id, INFO)
        try:
            info = json.loads(raw) if raw else None
            if info is not None:
                str(info["registry"]), str(info["repo"]), float(info["started"])
            return info
        except (ValueError, KeyError, TypeError):
            return None  # half-written: the purge removes it

    # -- caps ----------------------------------------------------------------------

    async def _scan(self) -> None:
        if self._scanned:
            return
        async with self._scan_lock:
            if self._scanned:
                return
            for sid, files in (await self._sessions()).items():
                if INFO in files and _valid_id(sid):
                    info = await self._read_info(sid)
                    if info is not None:
                        self._count(sid, (info["registry"], info["repo"]))
            self._scanned = True

    def _count(self, upload_id: str, key: tuple[str, str]) -> None:
        if upload_id not in self._open:
            self._open[upload_id] = key
            self._per_repo[key] += 1

    def _uncount(self, upload_id: str) -> None:
        key = self._open.pop(upload_id, None)
        if key is not None:
            self._per_repo[key] -= 1
            if self._per_repo[key] <= 0:
                del self._per_repo[key]

    def _check_caps(self, key: tuple[str, str]) -> None:
        if self.max_per_repo and self._per_repo[key] >= self.max_per_repo:
            raise RegistryError(
                Code.TOOMANYREQUESTS,
                "too many upload sessions open in this repository; finish or cancel some",
                detail={"limit": self.max_per_repo},
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        if self.max_total and len(self._open) >= self.max_total:
            raise RegistryError(
                Code.TOOMANYREQUESTS,
                "too many upload sessions open on this registry node; retry later",
                detail={"limit": self.max_total},
                headers={"Retry-After": str(RETRY_AFTER)},
            )

    # -- sessions ------------------------------------------------------------------

    async def create(self, registry: str, repo: str) -> Upload:
        key = (registry, repo)
        await self._scan()
        self._check_caps(key)
        upload_id = str(uuid.uuid4())
        self._count(upload_id, key)  # holds the place while the session is made
        started = time.time()
        info = {"registry": registry, "repo": repo, "started": started}
        try:
            await self._put(upload_id, INFO, info)
            writer = await self.store.writer(data_name(upload_id))
        except BaseException:
            self._uncount(upload_id)
            with contextlib.suppress(Exception):
                await self._remove(upload_id, [INFO, DATA])
            raise
        up = Upload(upload_id, registry, repo, started, writer)
        self._live[upload_id] = up
        return up

    async def get(self, upload_id: str, registry: str, repo: str) -> Upload:
        up = self._live.get(upload_id)
        if up is not None and not up.lock.locked():
            up = await self._refresh(up)
        if up is None:
            up = await self._load(upload_id)
        if up is None or up.registry != registry or up.repo != repo:
            raise upload_unknown(upload_id)
        return up

    async def _refresh(self, up: Upload) -> Upload | None:
        """``up`` as the store has it now (another node sharing it may have
        appended to, committed or cancelled it); None if gone. Cheap when
        nothing changed: one listing, and the running hash is kept."""
        files = await self._files(up.id)
        if INFO not in files:
            self._live.pop(up.id, None)
            self._uncount(up.id)
            up.cancelled = True
            return None
        if COMMITTED in files:
            committed = await self._read_committed(up.id)
            if committed is not None:
                up.committed = committed
                return up
        if up.committed is None:
            data = files.get(DATA)
            seen, seen_size = up.writer, up.writer.size
            if (data.size if data is not None else 0) != seen_size:
                fresh = await self.store.writer(data_name(up.id), resume=True)
                # Take the store's view only if this node did not write
                # meanwhile: a request of ours that appended while we looked
                # is newer than what we read (two racing PATCHes must not
                # both start at 0).
                moved = up.writer is not seen or up.writer.size != seen_size
                if fresh.size != seen_size and not moved and not up.lock.locked():
                    up.writer = fresh  # its hash is rebuilt from the bytes, once
        return up

    async def _load(self, upload_id: str) -> Upload | None:
        if not _valid_id(upload_id):
            return None
        files = await self._files(upload_id)
        if INFO not in files:
            return None
        info = await self._read_info(upload_id)
        if info is None:
            return None
        writer = await self.store.writer(data_name(upload_id), resume=True)
        up = Upload(upload_id, info["registry"], info["repo"], info["started"], writer)
        if COMMITTED in files:
            up.committed = await self._read_committed(upload_id)
        self._live[upload_id] = up
        self._count(upload_id, (up.registry, up.repo))
        return up

    async def append(self, up: Upload, chunks: AsyncIterator[bytes], limit: int | None) -> int:
        """Stream ``chunks`` onto the end of the upload, the writer writing
        and hashing one batch on a worker thread while the next is read.
        Returns the number of bytes appended. Bytes written before a
        disconnect stay (the client can resume from the new offset). A
        session cancelled meanwhile (DELETE) ends the append with
        ``BLOB_UPLOAD_UNKNOWN``. A full disk rolls the whole append back."""
        start = up.size
        try:
            return await self._append(up, chunks, limit, start)
        except StorageFull:
            if not up.cancelled:
                await up.writer.truncate(start)
            raise

    async def _append(
        self, up: Upload, chunks: AsyncIterator[bytes], limit: int | None, start: int
    ) -> int:
        pending: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        batched = 0
        total = 0
        try:
            async for chunk in chunks:
                total += len(chunk)
                if limit is not None and total > limit:
                    raise RegistryError(Code.SIZE_INVALID, "body longer than declared length")
                if self.max_blob_size and start + total > self.max_blob_size:
                    raise RegistryError(
                        Code.SIZE_INVALID, "blob larger than this registry accepts", status=413
                    )
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(self._write(up, batch))
                    batch, batched = [], 0
        finally:
            if pending is not None:
                await pending
            if batch and not up.cancelled:
                await self._write(up, batch)
        if up.cancelled:
            raise upload_unknown(up.id)
        return total

    async def _write(self, up: Upload, batch: list[bytes]) -> None:
        if up.cancelled:
            raise upload_unknown(up.id)
        try:
            await up.writer.write(batch)
        except (FileNotFoundError, BlobNotFound):
            if up.cancelled:  # the session was deleted under this write
                raise upload_unknown(up.id) from None
            raise

    async def finish(self, up: Upload, digest: str) -> int:
        """Verify the whole upload against ``digest`` and commit it into the
        blob store. Returns the blob size. On mismatch the session is kept,
        so the client may retry or cancel. The session stays (marked
        committed) until the caller ends it with ``cancel`` once the blob is
        recorded, so a final PUT that failed after this point can be retried."""
        if up.committed is not None:
            if up.committed[0] != digest:
                raise RegistryError(
                    Code.DIGEST_INVALID,
                    detail={"expected": digest, "actual": up.committed[0]},
                )
            return up.committed[1]
        if up.cancelled:
            raise upload_unknown(up.id)
        try:
            size = await up.writer.commit(digest)
        except (FileNotFoundError, BlobNotFound):
            if up.cancelled:
                raise upload_unknown(up.id) from None
            raise
        except DigestMismatch as e:
            raise RegistryError(
                Code.DIGEST_INVALID, detail={"expected": digest, "actual": e.actual}
            ) from None
        # (A marker the store had no room for: the session is still whole;
        # the write raised StorageFull and the client retries the PUT.)
        await self._put(up.id, COMMITTED, {"digest": digest, "size": size})
        up.committed = (digest, size)
        return size

    async def cancel(self, up: Upload) -> None:
        up.cancelled = True
        self._live.pop(up.id, None)
        self._uncount(up.id)
        if up.committed is None:
            await up.writer.abort()
        # The record first: every node sees the session gone from then on.
        await self._remove(up.id, [INFO, COMMITTED])

    async def purge_older_than(self, seconds: float, empty_seconds: float | None = None) -> int:
        """Remove sessions idle for ``seconds``, and those that never
        received a byte after ``empty_seconds``; returns how many."""
        await self._scan()
        sessions = await self._sessions()
        now = time.time()
        n = 0
        # A crash can leave a session directory with nothing in it on the
        # filesystem store (killed inside create()): its own time tells its age.
        dirs = set(await asyncio.to_thread(os.listdir, self.root))
        for gone in set(self._open) - set(sessions) - dirs:  # removed by another node
            self._uncount(gone)
            self._live.pop(gone, None)
        for name in sorted(set(sessions) | dirs):
            files = sessions.get(name, {})
            data = files.get(DATA)
            if files:
                # The latest write of any of its objects: a session whose
                # bytes were committed away (killed before the clean-up)
                # ages from its marker or record.
                mtime = max(i.mtime for i in files.values())
            else:
                try:
                    mtime = os.stat(os.path.join(self.root, name)).st_mtime
                except OSError:
                    continue
            ttl = seconds
            empty = data is None or data.size == 0
            if empty_seconds is not None and empty and COMMITTED not in files:
                ttl = min(seconds, empty_seconds)
            if mtime < now - ttl:
                self._uncount(name)
                up = self._live.pop(name, None)
                if up is not None:
                    up.cancelled = True
                if _valid_id(name):
                    await self._remove(name, list(dict.fromkeys([INFO, COMMITTED, DATA, *files])))
                else:
                    await asyncio.to_thread(shutil.rmtree, os.path.join(self.root, name), True)
                n += 1
        return n
