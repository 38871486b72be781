"""The blob storage interface every caller uses.

Small on purpose, like Distribution's storage driver: a content-addressed
store of immutable blobs, plus resumable staged writers through which every
new blob arrives. A blob becomes visible under its digest only when whole and
verified (``BlobWriter.commit``); nothing partial is ever readable by digest.

Drivers: ``node.storage.filesystem.FilesystemBlobStore`` (the region's disk)
and ``node.storage.readthrough.ReadThroughStore`` (wraps another store and
fetches what it lacks from the regions that hold it). An object-storage
driver (e.g. Azure Blob Storage: staged blocks, a committed block list, SAS
URLs) fits the same shape: ``writer`` stages blocks under a name, ``commit``
commits the block list under the digest, ``local_path`` answers None and
``redirect_url`` a signed URL. ``tests/test_blob_driver_contract.py`` is the
contract every driver passes.

Names of staged writers are ``/``-separated relative names such as
``uploads/<uuid>/data`` or ``replicating/<alg>-<hex>.part``; a driver maps
them to its own namespace. Writers are resumable: ``writer(name,
resume=True)`` after a restart continues at the bytes already staged.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

READ_CHUNK = 1 << 20


class StorageError(Exception):
    """Base of the errors a blob store raises."""


class BlobNotFound(StorageError, LookupError):
    """No blob with this digest (or no staged bytes under this name)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")
        self.what = what


class BlobUnavailable(StorageError):
    """The store knows the blob but cannot produce its bytes now (e.g. a
    read-through fetch from another region failed); worth retrying."""


class DigestMismatch(StorageError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class StorageFull(StorageError):
    """The store has no space left (ENOSPC, a quota). Whatever the failed
    call was writing has been rolled back."""


_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str) -> str:
    """A staged writer's name: relative, ``/``-separated, no empty, dot or
    dot-dot parts, nothing a driver would need to escape."""
    parts = name.split("/")
    if not name or not all(_NAME_PART.match(p) for p in parts):
        raise ValueError(f"invalid staging name {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob (``name`` is its digest) or staged bytes (``name`` is
    the writer's name), with its size and the time it was last written
    (epoch seconds)."""

    name: str
    size: int
    mtime: float


class BlobReader:
    """The bytes ``offset .. offset+length-1`` of a blob of ``size`` bytes,
    as an async iterator of chunks (at most ``READ_CHUNK`` each)."""

    def __init__(self, size: int, offset: int, length: int, chunks: AsyncIterator[bytes]) -> None:
        self.size = size
        self.offset = offset
        self.length = length
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks


def check_span(size: int, offset: int, length: int | None) -> int:
    """The number of bytes a read of ``length`` (None: to the end) from
    ``offset`` returns from a blob of ``size`` bytes; a length past the end
    is clipped, an offset outside ``0..size`` is a ``ValueError``."""
    if offset < 0 or offset > size:
        raise ValueError(f"offset {offset} outside 0..{size}")
    if length is not None and length < 0:
        raise ValueError(f"negative length {length}")
    left = size - offset
    return left if length is None else min(length, left)


def check_truncate(staged: int, size: int) -> bool:
    """Whether truncating ``staged`` bytes to ``size`` changes anything; a
    size outside ``0..staged`` is a ``ValueError``."""
    if size > staged or size < 0:
        raise ValueError(f"cannot truncate {staged} bytes to {size}")
    return size != staged


class BlobWriter(ABC):
    """Appends the bytes of one new blob, hashing them as they arrive.

    Nothing is visible under a digest until ``commit`` verified the bytes
    against it. A failed ``write`` (``StorageFull``, any ``OSError``) leaves
    ``size`` and the staged bytes as they were before the call. After
    ``commit`` or ``abort`` the writer is finished."""

    name: str | None
    size: int  # bytes staged so far

    @abstractmethod
    async def write(self, chunks: Sequence[bytes]) -> None:
        """Append ``chunks`` (all or nothing)."""

    @abstractmethod
    async def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` staged bytes from ``offset`` (readers of a transfer
        in progress). ``BlobNotFound`` once committed or aborted."""

    @abstractmethod
    async def truncate(self, size: int) -> None:
        """Drop the staged bytes after ``size`` (roll back an append)."""

    @abstractmethod
    async def digest(self, algorithm: str = "sha256") -> str:
        """The digest of the staged bytes (the running hash when it is
        current, else computed from the staged bytes)."""

    @abstractmethod
    async def commit(self, digest: str) -> int:
        """Verify the staged bytes against ``digest`` and make them the blob
        ``digest``, durably; returns its size. ``DigestMismatch`` leaves the
        writer as it was (the bytes may be completed, or aborted)."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop the staged bytes."""


class BlobStore(ABC):
    """A content-addressed store of whole, immutable blobs."""

    @abstractmethod
    async def stat(self, digest: str) -> int | None:
        """The size of blob ``digest``, or None if the store cannot serve it."""

    @abstractmethod
    def open(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AbstractAsyncContextManager[BlobReader]:
        """``async with store.open(d, offset, length) as r: async for chunk
        in r``. Entering raises ``BlobNotFound`` (or ``BlobUnavailable``)
        before any byte is produced, ``ValueError`` for an offset outside
        ``0..size``; ``length`` None reads to the end, past it is clipped."""

    @abstractmethod
    async def read_all(self, digest: str) -> bytes:
        """A small blob (a manifest) whole; ``BlobNotFound`` if absent."""

    @abstractmethod
    async def writer(
        self, name: str | None = None, *, resume: bool = False, algorithm: str = "sha256"
    ) -> BlobWriter:
        """A writer staging bytes under ``name`` (None: an anonymous one,
        dropped by a restart). ``resume`` continues the bytes already staged
        under ``name``; otherwise they are discarded. ``algorithm`` is the
        running hash's (others are computed at commit)."""

    @abstractmethod
    async def put_bytes(self, digest: str, data: bytes) -> None:
        """Store a small blob whole, verified. Idempotent: storing a blob
        that exists only refreshes its time (so a racing conditional delete
        keeps it)."""

    @abstractmethod
    async def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        """Remove blob ``digest``; with ``older_than`` (epoch seconds) only
        if it was last written before then, atomically with respect to a
        concurrent commit or ``put_bytes`` of the same digest. True if it
        was removed."""

    @abstractmethod
    def list_blobs(self) -> AsyncIterator[BlobInfo]:
        """Every stored blob (``name`` is the digest), in no set order."""

    @abstractmethod
    def list_staged(self, prefix: str) -> AsyncIterator[BlobInfo]:
        """Staged bytes whose writer's name starts with ``prefix``."""

    def local_path(self, digest: str) -> str | None:
        """A file holding blob ``digest`` that the kernel can ``sendfile``,
        if the driver has one (it may vanish: open it and fall back to
        ``open``). None for object storage."""
        return None

    async def redirect_url(self, digest: str, *, method: str = "GET") -> str | None:
        """A URL clients may fetch ``digest`` from directly (e.g. a signed
        object-storage URL), or None to be served by this node."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, background tasks)."""
