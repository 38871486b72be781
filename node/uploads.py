"""Blob upload sessions of one node.

A session lives in ``<data>/uploads/<id>/`` (``data`` holds the bytes
received so far, ``info.json`` whose repository it belongs to), so it survives
a restart: the offset is the file's size, and a client resumes with GET (for
``Range``) then PATCH from that offset. Bytes are hashed while they stream in;
the running hash lives in memory and is rebuilt from the file only when the
process restarted (or the final digest uses another algorithm).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from node.blobstore import DigestMismatch, FilesystemBlobStore, file_digest
from ocidist.digests import parse_digest
from ocidist.errors import Code, RegistryError, upload_unknown

WRITE_BATCH = 4 << 20


@dataclass
class Upload:
    id: str
    registry: str
    repo: str
    dir: str
    started: float
    size: int = 0
    hasher: hashlib._Hash | None = None
    hashed: int = 0  # bytes fed to ``hasher``; equals size when it is current
    # (digest, size) once the bytes are in the blob store but the namespace
    # has not recorded them yet: a retried final PUT then only records.
    committed: tuple[str, int] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def data_path(self) -> str:
        return os.path.join(self.dir, "data")

    def _write(self, chunks: list[bytes]) -> None:
        """Append ``chunks`` (one gathered write, no joining copy) and feed
        them to the running hash."""
        fd = os.open(self.data_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for i in range(0, len(chunks), _IOV_MAX):
                _writev_all(fd, chunks[i : i + _IOV_MAX])
        finally:
            os.close(fd)
        n = sum(map(len, chunks))
        if self.hasher is not None and self.hashed == self.size:
            for c in chunks:
                self.hasher.update(c)
            self.hashed += n
        self.size += n


_IOV_MAX = 512


def _writev_all(fd: int, chunks: list[bytes]) -> None:
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class UploadManager:
    def __init__(self, root: str, store: FilesystemBlobStore, max_blob_size: int = 0) -> None:
        self.root = os.path.join(os.path.abspath(root), "uploads")
        self.store = store
        self.max_blob_size = max_blob_size
        self._live: dict[str, Upload] = {}
        os.makedirs(self.root, exist_ok=True)

    def create(self, registry: str, repo: str) -> Upload:
        upload_id = str(uuid.uuid4())
        d = os.path.join(self.root, upload_id)
        os.makedirs(d)
        info = {"registry": registry, "repo": repo, "started": time.time()}
        with open(os.path.join(d, "info.json"), "w") as f:
            json.dump(info, f)
        open(os.path.join(d, "data"), "wb").close()
        up = Upload(upload_id, registry, repo, d, info["started"], hasher=hashlib.sha256())
        self._live[upload_id] = up
        return up

    def get(self, upload_id: str, registry: str, repo: str) -> Upload:
        up = self._live.get(upload_id)
        if up is None:
            up = self._load(upload_id)
        if up is None or up.registry != registry or up.repo != repo:
            raise upload_unknown(upload_id)
        return up

    def _load(self, upload_id: str) -> Upload | None:
        try:
            uuid.UUID(upload_id)
        except ValueError:
            return None  # never let a client-chosen id become a path
        d = os.path.join(self.root, upload_id)
        try:
            with open(os.path.join(d, "info.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        committed = _read_committed(d)
        try:
            size = os.stat(os.path.join(d, "data")).st_size
        except OSError:
            if committed is None:
                return None
            size = committed[1]  # the bytes already moved into the blob store
        up = Upload(upload_id, info["registry"], info["repo"], d, info["started"], size=size)
        up.committed = committed
        self._live[upload_id] = up
        return up

    async def append(self, up: Upload, chunks: AsyncIterator[bytes], limit: int | None) -> int:
        """Stream ``chunks`` onto the end of the upload, writing and hashing
        batches on a worker thread while the next batch is read. Returns the
        number of bytes appended. Bytes written before a disconnect stay (the
        client can resume from the new offset)."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        batched = 0
        total = 0
        start = up.size
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
                    pending = loop.run_in_executor(None, up._write, batch)
                    batch, batched = [], 0
        finally:
            if pending is not None:
                await pending
            if batch:
                await loop.run_in_executor(None, up._write, batch)
        return total

    async def finish(self, up: Upload, digest: str) -> int:
        """Verify the whole upload against ``digest`` and move it into the
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
        alg, _ = parse_digest(digest)
        loop = asyncio.get_running_loop()
        if alg == "sha256" and up.hasher is not None and up.hashed == up.size:
            actual = "sha256:" + up.hasher.copy().hexdigest()
        else:
            actual = await loop.run_in_executor(None, file_digest, up.data_path, alg)
        if actual != digest:
            raise RegistryError(Code.DIGEST_INVALID, detail={"expected": digest, "actual": actual})
        try:
            await self.store.commit_file(up.data_path, digest, verified=True)
        except DigestMismatch as e:  # pragma: no cover - verified above
            raise RegistryError(Code.DIGEST_INVALID, detail=str(e)) from e
        size = up.size
        marker = json.dumps({"digest": digest, "size": size})
        await loop.run_in_executor(None, _write_file, os.path.join(up.dir, "committed"), marker)
        up.committed = (digest, size)
        return size

    def cancel(self, up: Upload) -> None:
        self._live.pop(up.id, None)
        shutil.rmtree(up.dir, ignore_errors=True)

    def purge_older_than(self, seconds: float) -> int:
        """Remove abandoned sessions; returns how many."""
        cutoff = time.time() - seconds
        n = 0
        for name in os.listdir(self.root):
            d = os.path.join(self.root, name)
            try:
                # A crash can leave a session without its data file (killed
                # inside create(), or after finish() renamed the bytes away):
                # the directory's own time then tells its age.
                try:
                    mtime = os.stat(os.path.join(d, "data")).st_mtime
                except FileNotFoundError:
                    mtime = os.stat(d).st_mtime
            except OSError:
                continue
            if mtime < cutoff:
                self._live.pop(name, None)
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n


def _read_committed(d: str) -> tuple[str, int] | None:
    try:
        with open(os.path.join(d, "committed")) as f:
            doc = json.load(f)
        return doc["digest"], int(doc["size"])
    except (OSError, ValueError, KeyError):
        return None


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
