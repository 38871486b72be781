"""A blob store that reads through to the other regions.

``ReadThroughStore`` wraps the region's own store. What that store holds is
served from it; a blob it lacks that the namespace places in another region
is fetched from the nearest holder by the transfer engine
(``node.replication.transfer.Fetcher``: single flight, resumable, verified,
teed into the wrapped store) while its bytes are handed to the reader as
they arrive. Writes, deletes and listings are the wrapped store's.

``stat`` therefore answers for what can be read: a blob held here, or
placed elsewhere (its size is the placement's). Code that must know whether
the bytes are *here* (the replicator, the gRPC service other regions fetch
from) uses the wrapped store itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from node.replication.transfer import READTHROUGH, Fetcher, FetchError
from node.storage.base import (
    BlobInfo,
    BlobNotFound,
    BlobReader,
    BlobStore,
    BlobUnavailable,
    BlobWriter,
    check_span,
)

__all__ = ["ReadThroughStore"]


class ReadThroughStore(BlobStore):
    def __init__(self, local: BlobStore, fetcher: Fetcher) -> None:
        self.local = local
        self.fetcher = fetcher
        self.ns = fetcher.ns

    def _elsewhere(self, digest: str) -> tuple[str, int] | None:
        """(a registry placing ``digest`` in another region, its size)."""
        for reg, st in self.ns.cache.registries.items():
            for region, size in st.placements.get(digest, {}).items():
                if region != self.ns.region:
                    return reg, size
        return None

    # -- reads -----------------------------------------------------------------

    async def stat(self, digest: str) -> int | None:
        size = await self.local.stat(digest)
        if size is not None:
            return size
        where = self._elsewhere(digest)
        return where[1] if where is not None else None

    @asynccontextmanager
    async def open(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[BlobReader]:
        async with AsyncExitStack() as stack:
            try:
                reader = await stack.enter_async_context(self.local.open(digest, offset, length))
            except BlobNotFound:
                reader = await self._fetching(stack, digest, offset, length)
            yield reader

    async def _fetching(
        self, stack: AsyncExitStack, digest: str, offset: int, length: int | None
    ) -> BlobReader:
        where = self._elsewhere(digest)
        if where is None:
            raise BlobNotFound(digest)
        reg, size = where
        n = check_span(size, offset, length)
        if n == 0:
            return BlobReader(size, offset, 0, _nothing())
        t = self.fetcher.start(reg, digest, size, reason="readthrough", interactive=True)
        READTHROUGH.labels("blob").inc()
        try:
            await self.fetcher.wait_started(t)
        except FetchError as e:
            raise BlobUnavailable(
                f"blob bytes are not in this region and fetching failed: {e}"
            ) from e
        chunks = self.fetcher.read_range(t, offset, offset + n - 1)
        stack.push_async_callback(chunks.aclose)
        return BlobReader(size, offset, n, _unavailable_on_error(chunks))

    async def read_all(self, digest: str) -> bytes:
        try:
            return await self.local.read_all(digest)
        except BlobNotFound:
            where = self._elsewhere(digest)
            if where is None:
                raise
        reg, size = where
        READTHROUGH.labels("manifest").inc()
        try:
            await self.fetcher.fetch(reg, digest, size, reason="readthrough", interactive=True)
        except FetchError as e:
            raise BlobUnavailable(f"bytes are not in this region and fetching failed: {e}") from e
        return await self.local.read_all(digest)

    def local_path(self, digest: str) -> str | None:
        return self.local.local_path(digest)

    async def redirect_url(self, digest: str, *, method: str = "GET") -> str | None:
        url = await self.local.redirect_url(digest, method=method)
        if url is None or await self.local.stat(digest) is None:
            return None  # bytes not here yet: served (read through) by this node
        return url

    # -- everything else is the wrapped store's ------------------------------------

    async def writer(
        self, name: str | None = None, *, resume: bool = False, algorithm: str = "sha256"
    ) -> BlobWriter:
        return await self.local.writer(name, resume=resume, algorithm=algorithm)

    async def put_bytes(self, digest: str, data: bytes) -> None:
        await self.local.put_bytes(digest, data)

    async def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        return await self.local.delete(digest, older_than=older_than)

    def list_blobs(self) -> AsyncIterator[BlobInfo]:
        return self.local.list_blobs()

    def list_staged(self, prefix: str) -> AsyncIterator[BlobInfo]:
        return self.local.list_staged(prefix)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


async def _unavailable_on_error(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for data in chunks:
            yield data
    except FetchError as e:
        raise BlobUnavailable(f"fetching from another region failed mid-stream: {e}") from e
