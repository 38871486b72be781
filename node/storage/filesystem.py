"""The filesystem blob store: one region's blobs on its local disk.

Blobs live under ``<root>/blobs/<alg>/<2 hex>/<hex>``. A blob becomes
visible only when whole: its bytes are staged in a file on the same
filesystem (a writer's name is its path under ``<root>``: ``uploads/<id>/data``,
``replicating/<node>/<alg>-<hex>.part``; anonymous writers use
``tmp/<node>/``), fsynced and digest-verified, then renamed into place and the
directory fsynced. Blob files are only ever replaced whole (rename), so an
open file keeps its bytes and ``sendfile`` can serve it.

A conditional delete (``older_than``) first renames the blob to
``<blob>.reclaim``, so a commit or ``put_bytes`` racing it either lands
before (the renamed file is then new and put back) or after (a new file at
the canonical path, which stays). A crash in between leaves ``.reclaim``
files: ``list_blobs`` puts them back, and the next pass decides again.

A full disk (ENOSPC): a failed write is rolled back and raises
``StorageFull``. The store may hold a ``SpaceReserve``, a preallocated file
in the data dir: it is released at the first ENOSPC, so what else lives on
that filesystem (the embedded namespace: deletes, tag moves) can still
write, and while it is released no new blob bytes are accepted (they would
eat that space) until enough space is free to hold it again.

Several nodes of one region may share a data dir (``node_id``): each
stages anonymous writes under its own ``tmp/<node_id>/``, and at start
empties only that directory, removing other nodes' leftovers only once
they are stale (untouched for ``STALE_TMP`` seconds: a crashed node that
never came back). Named writers (upload sessions, replication parts) are
named by their owner (see ``node.uploads``, ``node.replication.transfer``).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from node.storage.base import (
    READ_CHUNK,
    BlobInfo,
    BlobNotFound,
    BlobReader,
    BlobStore,
    BlobWriter,
    DigestMismatch,
    StorageFull,
    check_name,
    check_span,
    check_truncate,
)
from ocidist.digests import is_digest, parse_digest

log = logging.getLogger("meridian.storage")

TRASH = ".reclaim"
# Another node's temporary file untouched this long is a crash's leftover.
STALE_TMP = 3600.0
_IOV_MAX = 512
_FULL = (errno.ENOSPC, errno.EDQUOT)

T = TypeVar("T")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writev_all(fd: int, chunks: Sequence[bytes]) -> None:
    """Write every chunk (gathered writes, no joining copy)."""
    for i in range(0, len(chunks), _IOV_MAX):
        views = [memoryview(c) for c in chunks[i : i + _IOV_MAX] if c]
        while views:
            n = os.writev(fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]


def _hash_file(path: str, algorithm: str, length: int) -> hashlib._Hash:
    h = hashlib.new(algorithm)
    if length == 0:
        return h
    with open(path, "rb") as f:
        left = length
        while left > 0:
            data = f.read(min(left, 4 << 20))
            if not data:
                raise OSError(f"{path} is shorter than {length} bytes")
            h.update(data)
            left -= len(data)
    return h


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _pread_once(path: str, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def is_full(e: OSError) -> bool:
    return e.errno in _FULL


class SpaceReserve:
    """``size`` bytes of a filesystem held back in a preallocated file.

    ``release`` frees them (at the first ENOSPC, and when the node starts,
    so its namespace can open on a full disk); ``ensure`` takes them again
    when at least twice that much is free. Thread-safe: blob writes call
    ``ensure`` from worker threads."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.held = False
        self._lock = threading.Lock()

    def release(self, *, full: bool = False) -> None:
        with self._lock:
            try:
                os.unlink(self.path)
                if full:
                    log.warning(
                        "storage full: released the %d-byte reserve; new blobs are refused "
                        "until space is free again",
                        self.size,
                        extra={"path": self.path},
                    )
            except FileNotFoundError:
                pass
            self.held = False

    def ensure(self) -> bool:
        """Hold the reserve (again) if space allows; whether it is held."""
        if self.held or self.size <= 0:
            return True
        with self._lock:
            if self.held:
                return True
            st = os.statvfs(os.path.dirname(self.path))
            if st.f_bavail * st.f_frsize < 2 * self.size:
                return False
            # Unique: nodes sharing the data dir may take the reserve at once.
            tmp = f"{self.path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
            except OSError as e:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                if is_full(e):
                    return False
                raise
            self.held = True
            log.info("holding the %d-byte storage reserve", self.size, extra={"path": self.path})
            return True


class FilesystemWriter(BlobWriter):
    def __init__(
        self, store: FilesystemBlobStore, name: str | None, path: str, algorithm: str, size: int
    ) -> None:
        self.store = store
        self.name = name
        self.path = path
        self.algorithm = algorithm
        self.size = size
        self._hasher: hashlib._Hash | None = hashlib.new(algorithm) if size == 0 else None
        self._done = False

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"writer {self.name or self.path} is finished")

    def _catch_up(self) -> hashlib._Hash:
        """The running hash, rebuilt from the staged bytes after a restart or
        a truncation (runs on a worker thread)."""
        if self._hasher is None:
            self._hasher = _hash_file(self.path, self.algorithm, self.size)
        return self._hasher

    def _write_sync(self, chunks: Sequence[bytes]) -> None:
        self.store.check_space()
        hasher = self._catch_up()
        before = self.size
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                _writev_all(fd, chunks)
            except OSError as e:
                os.ftruncate(fd, before)  # all or nothing
                if is_full(e):
                    self.store.on_full()
                    raise StorageFull(str(e)) from e
                raise
        finally:
            os.close(fd)
        for c in chunks:
            hasher.update(c)
        self.size = before + sum(map(len, chunks))

    async def write(self, chunks: Sequence[bytes]) -> None:
        self._check_open()
        if chunks:
            await self.store._run(self._write_sync, chunks)

    async def read_at(self, offset: int, n: int) -> bytes:
        if self._done:
            raise BlobNotFound(self.name or self.path)
        try:
            return await self.store._run(_pread_once, self.path, offset, n)
        except FileNotFoundError:
            raise BlobNotFound(self.name or self.path) from None

    async def truncate(self, size: int) -> None:
        self._check_open()
        if not check_truncate(self.size, size):
            return
        await self.store._run(os.truncate, self.path, size)
        self.size = size
        self._hasher = hashlib.new(self.algorithm) if size == 0 else None

    def _digest_sync(self, algorithm: str) -> str:
        if algorithm == self.algorithm:
            h = self._catch_up().copy()
        else:
            h = _hash_file(self.path, algorithm, self.size)
        return f"{algorithm}:{h.hexdigest()}"

    async def digest(self, algorithm: str = "sha256") -> str:
        self._check_open()
        return await self.store._run(self._digest_sync, algorithm)

    def _commit_sync(self, digest: str) -> int:
        alg, _ = parse_digest(digest)
        actual = self._digest_sync(alg)
        if actual != digest:
            raise DigestMismatch(digest, actual)
        try:
            if self.size == 0 and not os.path.exists(self.path):
                open(self.path, "wb").close()
            _fsync_file(self.path)
            self.store._rename_into_place(self.path, digest)
        except OSError as e:
            if is_full(e):
                self.store.on_full()
                raise StorageFull(str(e)) from e
            raise
        return self.size

    async def commit(self, digest: str) -> int:
        self._check_open()
        size = await self.store._run(self._commit_sync, digest)
        self._done = True
        return size

    async def abort(self) -> None:
        self._done = True
        try:
            await self.store._run(os.unlink, self.path)
        except FileNotFoundError:
            pass


class FilesystemBlobStore(BlobStore):
    def __init__(
        self, root: str, *, reserve: SpaceReserve | None = None, node_id: str = ""
    ) -> None:
        self.root = os.path.abspath(root)
        self.reserve = reserve
        self.node_id = node_id
        self.blobs = os.path.join(self.root, "blobs")
        tmp_root = os.path.join(self.root, "tmp")
        self.tmp = os.path.join(tmp_root, check_name(node_id)) if node_id else tmp_root
        os.makedirs(self.blobs, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)
        # Called when a write hits ENOSPC (the node releases its reserve).
        self.full_hooks: list[Callable[[], None]] = []
        # Leftovers of a crash are never visible; remove this node's, and
        # other nodes' once stale (they may be writing them right now).
        _clean_tmp(self.tmp, 0.0)
        if self.tmp != tmp_root:
            _clean_tmp(tmp_root, time.time() - STALE_TMP)
        if reserve is not None:
            reserve.ensure()

    # -- paths -----------------------------------------------------------------

    def _path(self, digest: str) -> str:
        alg, enc = parse_digest(digest)
        return os.path.join(self.blobs, alg, enc[:2], enc)

    def staged_path(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def local_path(self, digest: str) -> str | None:
        return self._path(digest)

    def check_space(self) -> None:
        """Refuse new bytes while the reserve is released and cannot be
        held again (worker threads)."""
        if self.reserve is not None and not self.reserve.ensure():
            raise StorageFull("the data dir's filesystem is full")

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def on_full(self) -> None:
        if self.reserve is not None:
            self.reserve.release(full=True)
        for fn in self.full_hooks:
            try:
                fn()
            except Exception:  # noqa: S110 - a hook must not hide the ENOSPC
                pass

    # -- reads -----------------------------------------------------------------

    async def stat(self, digest: str) -> int | None:
        try:
            return os.stat(self._path(digest)).st_size
        except FileNotFoundError:
            return None

    @asynccontextmanager
    async def open(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[BlobReader]:
        path = self._path(digest)
        try:
            fd = await self._run(os.open, path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        try:
            size = os.fstat(fd).st_size
            n = check_span(size, offset, length)
            yield BlobReader(size, offset, n, self._chunks(fd, offset, n))
        finally:
            os.close(fd)

    async def _chunks(self, fd: int, offset: int, n: int) -> AsyncIterator[bytes]:
        end = offset + n
        while offset < end:
            data = await self._run(os.pread, fd, min(READ_CHUNK, end - offset), offset)
            if not data:
                raise OSError("blob file shorter than its size")
            offset += len(data)
            yield data

    async def read_all(self, digest: str) -> bytes:
        try:
            return await self._run(_read_file, self._path(digest))
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    # -- writes ----------------------------------------------------------------

    async def writer(
        self, name: str | None = None, *, resume: bool = False, algorithm: str = "sha256"
    ) -> FilesystemWriter:
        hashlib.new(algorithm)  # an unknown algorithm fails here, not mid-write
        path = (
            self.staged_path(name) if name is not None else os.path.join(self.tmp, uuid.uuid4().hex)
        )
        return await self._run(self._writer_sync, name, path, resume, algorithm)

    def _writer_sync(
        self, name: str | None, path: str, resume: bool, algorithm: str
    ) -> FilesystemWriter:
        size = 0
        try:
            if not resume:
                self.check_space()
            if resume:
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "wb").close()
        except OSError as e:
            if is_full(e):
                self.on_full()
                raise StorageFull(str(e)) from e
            raise
        return FilesystemWriter(self, name, path, algorithm, size)

    async def put_bytes(self, digest: str, data: bytes) -> None:
        alg, _ = parse_digest(digest)
        actual = f"{alg}:{hashlib.new(alg, data).hexdigest()}"
        if actual != digest:
            raise DigestMismatch(digest, actual)
        await self._run(self._put_sync, digest, data)

    def _put_sync(self, digest: str, data: bytes) -> None:
        path = self._path(digest)
        try:
            os.utime(path)  # there already: refresh it (see ``delete``)
            return
        except FileNotFoundError:
            pass
        self.check_space()
        tmp = os.path.join(self.tmp, uuid.uuid4().hex)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._rename_into_place(tmp, digest)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if is_full(e):
                self.on_full()
                raise StorageFull(str(e)) from e
            raise

    def _rename_into_place(self, tmp: str, digest: str) -> None:
        dest = self._path(digest)
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(parent)

    async def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        return await self._run(self._delete_sync, digest, older_than)

    def _delete_sync(self, digest: str, older_than: float | None) -> bool:
        path = self._path(digest)
        if older_than is None:
            try:
                os.unlink(path)
                return True
            except FileNotFoundError:
                return False
        trash = path + TRASH
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        if os.stat(trash).st_mtime >= older_than:
            _restore(trash, path)  # written again meanwhile: keep it
            return False
        os.unlink(trash)
        return True

    # -- listing ---------------------------------------------------------------

    async def list_blobs(self) -> AsyncIterator[BlobInfo]:
        try:
            algs = await self._run(os.listdir, self.blobs)
        except FileNotFoundError:
            return
        for alg in sorted(algs):
            adir = os.path.join(self.blobs, alg)
            try:
                subs = await self._run(os.listdir, adir)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for sub in sorted(subs):
                for info in await self._run(_scan_blob_dir, alg, os.path.join(adir, sub)):
                    yield info

    async def list_staged(self, prefix: str) -> AsyncIterator[BlobInfo]:
        top = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = os.path.join(self.root, top) if top else self.root
        found = await self._run(_walk_files, self.root, base)
        for info in found:
            if info.name.startswith(prefix) and not info.name.startswith(("blobs/", "tmp/")):
                yield info


def _clean_tmp(d: str, before: float) -> None:
    """Remove the files under ``d`` last written before ``before`` (0:
    all). Directories stay: a running node's may be empty just now."""
    for dirpath, _, files in os.walk(d):
        for f in files:
            path = os.path.join(dirpath, f)
            try:
                if not before or os.stat(path).st_mtime < before:
                    os.unlink(path)
            except OSError:
                pass


def _restore(trash: str, path: str) -> None:
    """Put a trashed blob back unless a new copy landed at ``path``."""
    try:
        os.link(trash, path)
    except FileExistsError:
        pass
    os.unlink(trash)


def _scan_blob_dir(alg: str, d: str) -> list[BlobInfo]:
    out = []
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        path = os.path.join(d, name)
        if name.endswith(TRASH):  # a conditional delete cut short by a crash
            try:
                _restore(path, path[: -len(TRASH)])
            except FileNotFoundError:
                continue
            name = name[: -len(TRASH)]
            path = path[: -len(TRASH)]
        digest = f"{alg}:{name}"
        if not is_digest(digest):
            continue  # not a blob this store wrote
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        out.append(BlobInfo(digest, st.st_size, st.st_mtime))
    return out


def _walk_files(root: str, base: str) -> list[BlobInfo]:
    out = []
    for dirpath, _, files in os.walk(base):
        for f in files:
            path = os.path.join(dirpath, f)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            out.append(BlobInfo(os.path.relpath(path, root), st.st_size, st.st_mtime))
    return out
