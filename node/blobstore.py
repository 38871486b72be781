"""The region's content-addressed blob store.

``BlobStore`` is the small storage interface; ``FilesystemBlobStore`` keeps
blobs under ``<data>/blobs/<alg>/<2 hex>/<hex>``. A blob becomes visible only
when whole: bytes go to a temporary file on the same filesystem, are fsynced
and digest-verified, then renamed into place and the directory fsynced. An
object-store driver would implement the same methods (``local_path`` may then
return None and callers stream with ``open_range``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from ocidist.digests import parse_digest

READ_CHUNK = 1 << 20


class BlobStore(Protocol):
    async def stat(self, digest: str) -> int | None: ...

    def local_path(self, digest: str) -> str | None: ...

    def open_range(self, digest: str, offset: int, length: int) -> AsyncIterator[bytes]: ...

    async def read_all(self, digest: str) -> bytes: ...

    async def put_bytes(self, digest: str, data: bytes) -> None: ...

    async def commit_file(self, tmp_path: str, digest: str) -> None: ...

    def temp_path(self) -> str: ...

    async def delete(self, digest: str) -> bool: ...


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str, algorithm: str) -> str:
    with open(path, "rb") as f:
        return f"{algorithm}:{hashlib.file_digest(f, algorithm).hexdigest()}"


class DigestMismatch(Exception):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class FilesystemBlobStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.blobs = os.path.join(self.root, "blobs")
        self.tmp = os.path.join(self.root, "tmp")
        os.makedirs(self.blobs, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)
        # Leftovers of a crash are never visible; remove them.
        for name in os.listdir(self.tmp):
            try:
                os.unlink(os.path.join(self.tmp, name))
            except OSError:
                pass

    def _path(self, digest: str) -> str:
        alg, enc = parse_digest(digest)
        return os.path.join(self.blobs, alg, enc[:2], enc)

    async def stat(self, digest: str) -> int | None:
        return self.stat_sync(digest)

    def stat_sync(self, digest: str) -> int | None:
        try:
            return os.stat(self._path(digest)).st_size
        except FileNotFoundError:
            return None

    def local_path(self, digest: str) -> str | None:
        return self._path(digest)

    async def open_range(self, digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        f = await loop.run_in_executor(None, open, self._path(digest), "rb")
        try:
            f.seek(offset)
            left = length
            while left > 0:
                chunk = await loop.run_in_executor(None, f.read, min(READ_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            f.close()

    async def read_all(self, digest: str) -> bytes:
        path = self._path(digest)
        return await asyncio.get_running_loop().run_in_executor(None, _read_file, path)

    def temp_path(self) -> str:
        return os.path.join(self.tmp, uuid.uuid4().hex)

    async def put_bytes(self, digest: str, data: bytes) -> None:
        alg, _ = parse_digest(digest)
        actual = f"{alg}:{hashlib.new(alg, data).hexdigest()}"
        if actual != digest:
            raise DigestMismatch(digest, actual)
        await asyncio.get_running_loop().run_in_executor(None, self._put_sync, digest, data)

    def _put_sync(self, digest: str, data: bytes) -> None:
        if self.stat_sync(digest) is not None:
            return
        tmp = self.temp_path()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._rename_into_place(tmp, digest)

    async def commit_file(self, tmp_path: str, digest: str, *, verified: bool = False) -> None:
        """Move a complete temporary file into place as ``digest``. Unless
        the caller hashed it while writing (``verified``), hash it now."""
        await asyncio.get_running_loop().run_in_executor(
            None, self._commit_sync, tmp_path, digest, verified
        )

    def _commit_sync(self, tmp_path: str, digest: str, verified: bool) -> None:
        if not verified:
            alg, _ = parse_digest(digest)
            actual = file_digest(tmp_path, alg)
            if actual != digest:
                raise DigestMismatch(digest, actual)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._rename_into_place(tmp_path, digest)

    def _rename_into_place(self, tmp: str, digest: str) -> None:
        dest = self._path(digest)
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(parent)

    async def delete(self, digest: str) -> bool:
        try:
            os.unlink(self._path(digest))
            return True
        except FileNotFoundError:
            return False


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
