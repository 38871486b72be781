"""Blob upload sessions of one node.

A session's bytes are a resumable writer of the blob store, named
``uploads/<id>/data``; the session's own record lives in
``<data>/uploads/<id>/`` (``info.json``: whose repository it belongs to;
``committed``: the digest once the bytes are in the store), so a session
survives a restart: the offset is the writer's size, and a client resumes
with GET (for ``Range``) then PATCH from that offset. Bytes are hashed while
they stream in (by the writer, on a worker thread, while the next batch
arrives); after a restart the running hash is rebuilt from the staged bytes
once.

Sessions open at once are capped per repository and per node (over a cap:
429 TOOMANYREQUESTS); abandoned ones are purged after ``upload_ttl``, and
sessions that never received a byte much sooner (``upload_empty_ttl``).

Nodes of one region may share the data dir (and so the sessions): a
session started on one node can be continued on another. Nothing about a
session lives only in memory: a node that holds one in memory checks it
against the disk on each request (still there? committed? the staged size
it knows?) and reloads it when another node moved it on. The caps count
the sessions each node knows of (those on disk when it started, those it
made or served); a session another node removed stops counting at the next
purge.

A full disk is ``StorageFull`` (507); a PATCH that meets it is rolled back
to the offset it started from, so the session stays resumable.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from node.storage.base import BlobNotFound, BlobStore, BlobWriter, DigestMismatch, StorageFull
from ocidist.errors import Code, RegistryError, upload_unknown

WRITE_BATCH = 4 << 20
RETRY_AFTER = 60  # seconds a client over a session cap is told to wait


def data_name(upload_id: str) -> str:
    """The blob store writer name of a session's bytes."""
    return f"uploads/{upload_id}/data"


@dataclass
class Upload:
    id: str
    registry: str
    repo: str
    dir: str
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
        self.root = os.path.join(os.path.abspath(root), "uploads")
        self.store = store
        self.max_blob_size = max_blob_size
        self.max_per_repo = max_per_repo
        self.max_total = max_total
        self._live: dict[str, Upload] = {}
        os.makedirs(self.root, exist_ok=True)
        # Every session on disk (they survive restarts), for the caps.
        self._open: dict[str, tuple[str, str]] = {}
        self._per_repo: Counter[tuple[str, str]] = Counter()
        for name in os.listdir(self.root):
            try:
                with open(os.path.join(self.root, name, "info.json")) as f:
                    info = json.load(f)
                self._count(name, (info["registry"], info["repo"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-created: the purge removes it

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

    async def create(self, registry: str, repo: str) -> Upload:
        key = (registry, repo)
        self._check_caps(key)
        upload_id = str(uuid.uuid4())
        self._count(upload_id, key)  # holds the place while the session is made
        d = os.path.join(self.root, upload_id)
        started = time.time()
        info = {"registry": registry, "repo": repo, "started": started}
        try:
            await asyncio.to_thread(_create_dir, d, json.dumps(info))
            writer = await self.store.writer(data_name(upload_id))
        except BaseException:
            self._uncount(upload_id)
            shutil.rmtree(d, ignore_errors=True)
            raise
        up = Upload(upload_id, registry, repo, d, started, writer)
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
        """``up`` as the disk has it now (another node sharing the data dir
        may have appended to, committed or cancelled it); None if gone.
        Cheap when nothing changed: the running hash is kept."""
        if not await asyncio.to_thread(os.path.exists, os.path.join(up.dir, "info.json")):
            self._live.pop(up.id, None)
            self._uncount(up.id)
            up.cancelled = True
            return None
        committed = await asyncio.to_thread(_read_committed, up.dir)
        if committed is not None:
            up.committed = committed
            return up
        if up.committed is None:
            seen, seen_size = up.writer, up.writer.size
            fresh = await self.store.writer(data_name(up.id), resume=True)
            # Take the disk's view only if this node did not write meanwhile:
            # a request of ours that appended while we looked is newer than
            # what we read (two racing PATCHes must not both start at 0).
            moved = up.writer is not seen or up.writer.size != seen_size
            if fresh.size != seen_size and not moved and not up.lock.locked():
                up.writer = fresh  # its hash is rebuilt from the bytes, once
        return up

    async def _load(self, upload_id: str) -> Upload | None:
        if not _valid_id(upload_id):
            return None
        d = os.path.join(self.root, upload_id)
        try:
            info = json.loads(await asyncio.to_thread(_read_text, os.path.join(d, "info.json")))
        except (OSError, ValueError):
            return None
        writer = await self.store.writer(data_name(upload_id), resume=True)
        up = Upload(upload_id, info["registry"], info["repo"], d, info["started"], writer)
        up.committed = await asyncio.to_thread(_read_committed, d)
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
        marker = json.dumps({"digest": digest, "size": size})
        await asyncio.to_thread(_write_file, os.path.join(up.dir, "committed"), marker)
        # (A marker the disk had no room for: the session is still whole;
        # _write_file raised StorageFull and the client retries the PUT.)
        up.committed = (digest, size)
        return size

    async def cancel(self, up: Upload) -> None:
        up.cancelled = True
        self._live.pop(up.id, None)
        self._uncount(up.id)
        if up.committed is None:
            await up.writer.abort()
        await asyncio.to_thread(shutil.rmtree, up.dir, True)

    async def purge_older_than(self, seconds: float, empty_seconds: float | None = None) -> int:
        """Remove sessions idle for ``seconds``, and those that never
        received a byte after ``empty_seconds``; returns how many."""
        staged = {i.name: i async for i in self.store.list_staged("uploads/")}
        now = time.time()
        n = 0
        names = await asyncio.to_thread(os.listdir, self.root)
        for gone in set(self._open) - set(names):  # removed by a node sharing the dir
            self._uncount(gone)
            self._live.pop(gone, None)
        for name in names:
            d = os.path.join(self.root, name)
            data = staged.get(data_name(name)) if _valid_id(name) else None
            if data is not None:
                mtime = data.mtime
            else:
                # A crash can leave a session without its bytes (killed
                # inside create(), or after finish() committed them): the
                # directory's own time then tells its age.
                try:
                    mtime = os.stat(d).st_mtime
                except OSError:
                    continue
            ttl = seconds
            if empty_seconds is not None and (data is None or data.size == 0):
                committed = await asyncio.to_thread(os.path.exists, os.path.join(d, "committed"))
                if not committed:
                    ttl = min(seconds, empty_seconds)
            if mtime < now - ttl:
                self._uncount(name)
                up = self._live.pop(name, None)
                if up is not None:
                    up.cancelled = True
                if data is not None:
                    w = await self.store.writer(data_name(name), resume=True)
                    await w.abort()
                await asyncio.to_thread(shutil.rmtree, d, True)
                n += 1
        return n


def _create_dir(d: str, info: str) -> None:
    try:
        os.makedirs(d)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(str(e)) from e
        raise
    _write_file(os.path.join(d, "info.json"), info)


def _read_committed(d: str) -> tuple[str, int] | None:
    try:
        with open(os.path.join(d, "committed")) as f:
            doc = json.load(f)
        return doc["digest"], int(doc["size"])
    except (OSError, ValueError, KeyError):
        return None


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write_file(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(str(e)) from e
        raise
