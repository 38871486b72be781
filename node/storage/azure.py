"""The Azure Blob Storage blob store: one region's blobs in one container.

Uses the official async SDK (``azure.storage.blob.aio``, on aiohttp). The
container (created if missing) holds

- ``blobs/<alg>/<hex>``: whole, verified blobs, each a block blob with its
  last write time in the metadata (``mtime``, epoch seconds, more precise
  than ``Last-Modified``'s whole seconds);
- ``staging/<name>``: the bytes of a staged writer named ``<name>``
  (``uploads/<id>/data``, ``replicating/<alg>-<hex>.part``); anonymous
  writers use ``staging/tmp/<uuid>`` (swept after a day).

**Staged writes.** Each ``write`` stages its bytes as one or more blocks
(``stage_block``) and then commits the staging blob's whole block list,
old blocks plus the new ones, with ``If-Match`` on the etag of the last
commit. So what a writer has written is always a committed, readable blob:
``size`` is its length, ``read_at`` reads it, and a write that fails leaves
it as it was (the new blocks stay uncommitted and are dropped by the next
commit). Block ids are ``<offset:016x><nonce>``: the offset of the block
(the list is self-describing) and a random nonce per writer object, so two
writers racing on one name can never commit each other's blocks; the etag
condition makes the loser's commit fail (``StagingConflict``) instead of
interleaving bytes.

**Resume on any node.** ``writer(name, resume=True)`` reads the staging
blob's committed block list and etag: any node that shares the container
continues where the last one stopped. The running hash does not travel:
the first ``digest``/``commit`` after a resume hashes the staged bytes once
(ranged reads pinned to the etag), then keeps hashing as it writes.

**Commit.** ``commit(digest)`` verifies the staged bytes against the digest
(the running hash, or the staged bytes), then copies the staging blob
server-side into ``blobs/<alg>/<hex>`` (``start_copy_from_url`` within the
account, with ``If-None-Match: *`` on the destination and ``If-Match`` on
the verified etag of the source, so exactly the verified bytes land), waits
for the copy when the service runs it asynchronously, and deletes the
staging blob. Blocks belong to their blob, so they cannot be committed
under the final name before the digest is known; ``stage_block_from_url``
would also work on Azure but is not implemented by Azurite. A blob whose
copy is still pending (or failed) is never served, listed or counted as
present: nothing partial is ever visible under a digest. A blob that is
already there is only refreshed (its ``mtime``), as ``put_bytes`` does.

**Deletes.** ``delete(older_than=)`` reads the blob's time and etag and
deletes with ``If-Match`` on that etag: a commit or ``put_bytes`` that
refreshed it meanwhile changed the etag, and the blob stays.

**Reads.** Ranged GETs of at most ``GET_CHUNK`` each, one read ahead,
without etag conditions (a refresh changes the etag, never the bytes).
``redirect_url`` is a read-only SAS URL for the one blob, valid for
``SAS_TTL`` seconds (None when redirects are off or the connection string
has no account key); ``local_path`` is None.

Errors: a missing blob is ``BlobNotFound``; an unreachable service, a 5xx,
a throttled or refused request ``BlobUnavailable``; a block count or size
limit ``StorageFull``. The connection string never appears in a log line or
an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import (
    BlobBlock,
    BlobProperties,
    BlobSasPermissions,
    BlockState,
    generate_blob_sas,
)
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ExponentialRetry

from node.storage.base import (
    READ_CHUNK,
    BlobInfo,
    BlobNotFound,
    BlobReader,
    BlobStore,
    BlobUnavailable,
    BlobWriter,
    DigestMismatch,
    StorageError,
    StorageFull,
    check_name,
    check_span,
    check_truncate,
)
from ocidist.digests import is_digest, parse_digest

log = logging.getLogger("meridian.storage")

BLOBS = "blobs/"
STAGING = "staging/"
TMP = "tmp/"
MTIME = "mtime"
GET_CHUNK = 4 << 20  # bytes per ranged GET
BLOCK_MAX = 16 << 20  # largest block one write stages
HASH_INLINE = 256 << 10  # smaller writes are hashed on the loop, larger on a thread
SAS_TTL = 300.0  # seconds a redirect URL stays valid
SAS_SKEW = 300.0  # a SAS is valid from this long ago (clock skew between hosts)
TMP_MAX_AGE = 24 * 3600.0  # anonymous staging blobs older than this are swept at start
COPY_WAIT = 600.0  # longest wait for a server-side copy to finish

# Error codes that mean "no room" (a blob's block count or size limit).
_FULL_CODES = frozenset(
    {
        "BlockCountExceedsLimit",
        "BlockListTooLong",
        "ContentLengthLargerThanTierLimit",
        "MaxBlobSizeConditionNotMet",
    }
)

# SDK client options: bounded sockets, and GETs of GET_CHUNK so one request
# never buffers more (retries: ``_retry_policy``, short enough for a request
# path).
CLIENT_OPTIONS: dict[str, Any] = {
    "connection_timeout": 10,
    "read_timeout": 60,
    "max_single_get_size": GET_CHUNK,
    "max_chunk_get_size": GET_CHUNK,
}


def _retry_policy(retries: int) -> ExponentialRetry:
    # Waits about 1.75 s, then 2.5 s (the SDK's own default waits 15 s first).
    return ExponentialRetry(
        initial_backoff=0.25, increment_base=1.5, retry_total=retries, random_jitter_range=0.2
    )


class StagingConflict(BlobUnavailable):
    """The staged bytes under a writer's name changed under it (another
    writer, on this node or another, wrote or truncated them). The writer
    reloaded their state: ``size`` is current; retry from there."""


class CredentialsRefused(BlobUnavailable):
    """The service refused the connection string's credentials."""


def _code(e: HttpResponseError) -> str:
    code = e.error_code
    return str(getattr(code, "value", code) or "")


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """Translate the SDK's errors into the interface's."""
    try:
        yield
    except StorageError:
        raise
    except ResourceNotFoundError:
        raise BlobNotFound(what) from None
    except ClientAuthenticationError as e:
        raise CredentialsRefused(
            f"azure storage refused the credentials ({e.status_code} {_code(e)}) on {what}"
        ) from None
    except HttpResponseError as e:
        code = _code(e)
        if e.status_code in (401, 403):  # AuthenticationFailed, AuthorizationFailure, ...
            raise CredentialsRefused(
                f"azure storage refused the credentials ({e.status_code} {code}) on {what}"
            ) from None
        if code in _FULL_CODES:
            raise StorageFull(f"azure storage: {code} on {what}") from None
        raise BlobUnavailable(f"azure storage answered {e.status_code} {code} on {what}") from None
    except AzureError as e:  # ServiceRequestError, ServiceResponseError, ...
        raise BlobUnavailable(f"azure storage unreachable ({type(e).__name__}) on {what}") from None


def _whole(props: Any) -> bool:
    """A blob that is not the destination of a copy still running (or one
    that failed): only those are served."""
    copy = getattr(props, "copy", None)
    status = getattr(copy, "status", None)
    return status in (None, "success")


def _mtime(props: BlobProperties) -> float:
    """The later of ``mtime`` metadata and ``Last-Modified``."""
    lm = props.last_modified.timestamp() if props.last_modified is not None else 0.0
    try:
        return max(lm, float((props.metadata or {}).get(MTIME, "")))
    except ValueError:
        return lm


def _total(props: Any) -> int:
    """The whole blob's size, from a ranged GET's ``Content-Range``."""
    content_range = getattr(props, "content_range", None)
    if content_range and "/" in content_range:
        return int(content_range.rsplit("/", 1)[1])
    return props.size


def _stamp() -> dict[str, str]:
    return {MTIME: repr(time.time())}


def _digest_of(name: str) -> str | None:
    """``blobs/<alg>/<hex>`` to ``<alg>:<hex>`` (None for other names)."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] + "/" != BLOBS:
        return None
    digest = f"{parts[1]}:{parts[2]}"
    return digest if is_digest(digest) else None


def _split(chunks: Sequence[bytes], limit: int) -> list[bytes]:
    """The chunks' bytes as blocks of at most ``limit`` bytes."""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) <= limit:
        return [bytes(data)]
    return [data[i : i + limit] for i in range(0, len(data), limit)]


def _update(h: hashlib._Hash, chunks: Sequence[bytes]) -> None:
    for c in chunks:
        h.update(c)


async def _hash(h: hashlib._Hash, chunks: Sequence[bytes]) -> None:
    if sum(map(len, chunks)) <= HASH_INLINE:
        _update(h, chunks)
    else:
        await asyncio.to_thread(_update, h, chunks)


def _consume(f: asyncio.Future[Any]) -> None:
    """Retrieve a dropped future's outcome (no "never retrieved" warning)."""
    if not f.cancelled():
        f.exception()


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


class AzureWriter(BlobWriter):
    def __init__(
        self,
        store: AzureBlobStore,
        name: str | None,
        client: BlobClient,
        algorithm: str,
        *,
        blocks: list[tuple[str, int]],
        etag: str | None,
    ) -> None:
        self.store = store
        self.name = name
        self.client = client
        self.algorithm = algorithm
        self._blocks = blocks  # the staging blob's committed blocks: (id, size)
        self._etag = etag  # of the last commit; None: no staging blob yet
        self.size = sum(size for _, size in blocks)
        self._nonce = os.urandom(4).hex()
        self._hasher: hashlib._Hash | None = hashlib.new(algorithm) if self.size == 0 else None
        self._done = False

    @property
    def what(self) -> str:
        return self.name or self.client.blob_name

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"writer {self.what} is finished")

    def _block_id(self, offset: int) -> str:
        # The SDK base64-encodes ids; every id of one blob has the same length.
        return f"{offset:016x}{self._nonce}"

    async def _commit_list(self, blocks: list[tuple[str, int]], new: set[str]) -> str:
        """Commit ``blocks`` as the staging blob (``new`` ids are the blocks
        just staged); returns the new etag. Conditional on the last etag."""
        block_list = [
            BlobBlock(bid, BlockState.UNCOMMITTED if bid in new else BlockState.COMMITTED)
            for bid, _ in blocks
        ]
        cond: dict[str, Any] = (
            {"etag": self._etag, "match_condition": MatchConditions.IfNotModified}
            if self._etag is not None
            else {"match_condition": MatchConditions.IfMissing}
        )
        with _errors(self.what):
            try:
                r = await self.client.commit_block_list(block_list, **cond)
            except (ResourceModifiedError, ResourceExistsError):
                raise await self._conflict() from None
        return r["etag"]

    async def _conflict(self) -> StorageError:
        """The staging blob is not what this writer last committed: gone
        (aborted elsewhere: ``BlobNotFound``) or changed (the writer reloads
        its state: ``StagingConflict``)."""
        state = await self.store._staged_state(self.client, self.what)
        if state is None:
            return BlobNotFound(self.what)
        self._blocks, self._etag = state
        self.size = sum(size for _, size in self._blocks)
        self._hasher = hashlib.new(self.algorithm) if self.size == 0 else None
        return StagingConflict(
            f"the staged bytes of {self.what} changed under this writer; now {self.size} bytes"
        )

    async def write(self, chunks: Sequence[bytes]) -> None:
        self._check_open()
        chunks = [c for c in chunks if c]
        if not chunks:
            return
        hasher = self._hasher.copy() if self._hasher is not None else None
        hashing = asyncio.ensure_future(_hash(hasher, chunks)) if hasher is not None else None
        try:
            new: list[tuple[str, int]] = []
            pos = self.size
            for block in _split(chunks, BLOCK_MAX):
                bid = self._block_id(pos)
                with _errors(self.what):
                    await self.client.stage_block(bid, block, length=len(block))
                new.append((bid, len(block)))
                pos += len(block)
            etag = await self._commit_list(self._blocks + new, {bid for bid, _ in new})
        finally:
            if hashing is not None:
                await hashing
        self._blocks = self._blocks + new
        self._etag = etag
        self.size = pos
        self._hasher = hasher

    async def read_at(self, offset: int, n: int) -> bytes:
        if self._done:
            raise BlobNotFound(self.what)
        n = min(n, self.size - offset)
        if n <= 0 or offset < 0:
            return b""
        return await self.store._read(self.client, offset, n, self.what)

    async def truncate(self, size: int) -> None:
        self._check_open()
        if not check_truncate(self.size, size):
            return
        keep: list[tuple[str, int]] = []
        new: set[str] = set()
        pos = 0
        for bid, bsize in self._blocks:
            if pos + bsize <= size:
                keep.append((bid, bsize))
                pos += bsize
                continue
            if pos < size:  # the block the cut falls in: stage its head again
                head = await self.store._read(self.client, pos, size - pos, self.what)
                nid = self._block_id(pos)
                with _errors(self.what):
                    await self.client.stage_block(nid, head, length=len(head))
                keep.append((nid, len(head)))
                new.add(nid)
            break
        self._etag = await self._commit_list(keep, new)
        self._blocks = keep
        self.size = size
        self._hasher = hashlib.new(self.algorithm) if size == 0 else None

    async def _hash_staged(self, algorithm: str) -> hashlib._Hash:
        h = hashlib.new(algorithm)
        async for data in self.store._ranges(self.client, 0, self.size, self.what, self._etag):
            await _hash(h, [data])
        return h

    async def digest(self, algorithm: str = "sha256") -> str:
        self._check_open()
        if algorithm == self.algorithm and self._hasher is not None:
            return f"{algorithm}:{self._hasher.hexdigest()}"
        h = await self._hash_staged(algorithm)
        if algorithm == self.algorithm:
            self._hasher = h.copy()  # caught up: later writes keep hashing
        return f"{algorithm}:{h.hexdigest()}"

    async def commit(self, digest: str) -> int:
        self._check_open()
        alg, _ = parse_digest(digest)
        actual = await self.digest(alg)
        if actual != digest:
            raise DigestMismatch(digest, actual)
        source = self.client if self.size > 0 else None
        await self.store._install(digest, self.size, source, self._etag)
        self._done = True
        await self.store._delete_quietly(self.client, self.what)
        return self.size

    async def abort(self) -> None:
        self._done = True
        await self.store._delete_quietly(self.client, self.what, strict=True)


class AzureBlobStore(BlobStore):
    """Blobs in one container of an Azure Storage account (see the module
    docstring). ``await store.start()`` creates the container if needed."""

    def __init__(
        self,
        service: BlobServiceClient,
        container: str,
        *,
        redirect: bool = True,
        sas_ttl: float = SAS_TTL,
    ) -> None:
        self.service = service
        self.container_name = container
        self.container = service.get_container_client(container)
        self.redirect = redirect
        self.sas_ttl = sas_ttl
        cred = service.credential
        self._account: str | None = getattr(cred, "account_name", None) or service.account_name
        self._key: str | None = getattr(cred, "account_key", None)
        # The SDK logs every request at INFO; its warnings are enough.
        logging.getLogger("azure").setLevel(logging.WARNING)

    @classmethod
    def from_connection_string(
        cls, connection_string: str, container: str, *, redirect: bool = True, retries: int = 2
    ) -> AzureBlobStore:
        """``retries``: how often the SDK retries a failed request (a
        refused connection, a 5xx, throttling) before it is an error."""
        try:
            service = BlobServiceClient.from_connection_string(
                str(connection_string), retry_policy=_retry_policy(retries), **CLIENT_OPTIONS
            )
        except ValueError:
            # The SDK's message may quote the string: never repeat it.
            raise ValueError("the Azure Storage connection string is malformed") from None
        return cls(service, container, redirect=redirect)

    async def start(self) -> None:
        """Create the container if missing and sweep anonymous staging blobs
        older than a day (left by crashed writers of any node)."""
        with _errors(f"container {self.container_name}"):
            try:
                await self.container.create_container()
            except ResourceExistsError:
                pass
        cutoff = time.time() - TMP_MAX_AGE
        async for info in self._list(STAGING + TMP, metadata=False):
            if info.mtime < cutoff:
                await self._delete_quietly(self._client(info.name), info.name)

    async def close(self) -> None:
        await self.service.close()

    # -- names -------------------------------------------------------------------

    def _client(self, name: str) -> BlobClient:
        return self.container.get_blob_client(name)

    @staticmethod
    def _blob_name(digest: str) -> str:
        alg, enc = parse_digest(digest)
        return f"{BLOBS}{alg}/{enc}"

    # -- reads -------------------------------------------------------------------

    async def _props(self, client: BlobClient, what: str) -> BlobProperties | None:
        with _errors(what):
            try:
                props = await client.get_blob_properties()
            except ResourceNotFoundError:
                return None
        return props if _whole(props) else None

    async def stat(self, digest: str) -> int | None:
        props = await self._props(self._client(self._blob_name(digest)), digest)
        return None if props is None else props.size

    async def _get(
        self, client: BlobClient, offset: int, n: int, what: str, etag: str | None = None
    ) -> tuple[bytes, Any]:
        """One ranged GET of at most ``GET_CHUNK`` bytes: (bytes, properties)."""
        cond: dict[str, Any] = (
            {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        )
        with _errors(what):
            dl = await client.download_blob(offset, min(n, GET_CHUNK), **cond)
            return await dl.readall(), dl.properties

    async def _ranges(
        self,
        client: BlobClient,
        offset: int,
        n: int,
        what: str,
        etag: str | None = None,
        first: bytes | None = None,
    ) -> AsyncIterator[bytes]:
        """Bytes ``offset .. offset+n-1`` in GETs of ``GET_CHUNK``, the next
        one in flight while the current one is consumed (``first``: bytes
        of the first GET already made)."""
        end = offset + n
        pos = offset + (len(first) if first is not None else 0)
        nxt: asyncio.Future[tuple[bytes, Any]] | None = None
        try:
            if pos < end:
                nxt = asyncio.ensure_future(self._get(client, pos, end - pos, what, etag))
            if first:
                yield first
            while nxt is not None:
                data, _ = await nxt
                nxt = None
                if not data:
                    raise BlobUnavailable(f"{what} is shorter than expected")
                pos += len(data)
                if pos < end:
                    nxt = asyncio.ensure_future(self._get(client, pos, end - pos, what, etag))
                yield data
        finally:
            if nxt is not None:  # the reader stopped early: drop the read ahead
                nxt.add_done_callback(_consume)
                nxt.cancel()

    async def _read(self, client: BlobClient, offset: int, n: int, what: str) -> bytes:
        return b"".join([c async for c in self._ranges(client, offset, n, what)])

    @asynccontextmanager
    async def open(
        self, digest: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[BlobReader]:
        client = self._client(self._blob_name(digest))
        first: bytes | None = None
        if length == 0 or offset < 0:
            props = await self._props(client, digest)
            if props is None:
                raise BlobNotFound(digest)
            size = props.size
        else:
            # The first GET also tells the size: one round trip, not two.
            try:
                first, props = await self._get(client, offset, length or GET_CHUNK, digest)
            except BlobUnavailable:
                # 416 for an offset at or past the end: the size decides.
                props = await self._props(client, digest)
                if props is None:
                    raise BlobNotFound(digest) from None
                if offset < props.size:
                    raise
                first = b""
            if not _whole(props):
                raise BlobNotFound(digest)
            size = _total(props)
        n = check_span(size, offset, length)
        if n == 0:
            yield BlobReader(size, offset, 0, _nothing())
            return
        assert first is not None
        chunks = self._ranges(client, offset, n, digest, first=first[:n])
        try:
            yield BlobReader(size, offset, n, _sliced(chunks, digest))
        finally:
            await chunks.aclose()

    async def read_all(self, digest: str) -> bytes:
        async with self.open(digest) as reader:
            return b"".join([c async for c in reader])

    # -- writes ------------------------------------------------------------------

    async def _staged_state(
        self, client: BlobClient, what: str
    ) -> tuple[list[tuple[str, int]], str] | None:
        """(committed blocks, etag) of a staging blob, or None if absent."""
        for _ in range(5):
            with _errors(what):
                try:
                    props = await client.get_blob_properties()
                    committed, _ = await client.get_block_list("committed")
                except ResourceNotFoundError:
                    return None
            blocks = [(b.id, b.size) for b in committed]
            if sum(size for _, size in blocks) == props.size:
                return blocks, props.etag
            await asyncio.sleep(0.05)  # written between the two reads: again
        raise StagingConflict(f"the staged bytes of {what} keep changing")

    async def writer(
        self, name: str | None = None, *, resume: bool = False, algorithm: str = "sha256"
    ) -> AzureWriter:
        hashlib.new(algorithm)  # an unknown algorithm fails here, not mid-write
        if name is None:
            client = self._client(f"{STAGING}{TMP}{uuid.uuid4().hex}")
            return AzureWriter(self, None, client, algorithm, blocks=[], etag=None)
        client = self._client(STAGING + check_name(name))
        if resume:
            state = await self._staged_state(client, name)
            blocks, etag = state if state is not None else ([], None)
            return AzureWriter(self, name, client, algorithm, blocks=blocks, etag=etag)
        with _errors(name):  # start empty: an empty block list replaces what was there
            r = await client.commit_block_list([])
        return AzureWriter(self, name, client, algorithm, blocks=[], etag=r["etag"])

    async def _install(
        self, digest: str, size: int, source: BlobClient | None, source_etag: str | None
    ) -> None:
        """Make the verified bytes blob ``digest``: a server-side copy of
        ``source`` at ``source_etag`` (None: the empty blob), unless the blob
        is there already (then refresh it)."""
        dest = self._client(self._blob_name(digest))
        for _ in range(5):
            with _errors(digest):
                try:
                    if source is None:
                        await dest.upload_blob(b"", overwrite=False, metadata=_stamp())
                        return
                    r = await dest.start_copy_from_url(
                        source.url,
                        metadata=_stamp(),
                        source_etag=source_etag,
                        source_match_condition=MatchConditions.IfNotModified,
                        match_condition=MatchConditions.IfMissing,
                    )
                except ResourceExistsError:
                    if await self._refresh(dest, size, digest):
                        return
                    continue
                except ResourceModifiedError:
                    raise StagingConflict(
                        f"the staged bytes of {digest} changed before they were copied"
                    ) from None
            if await self._settle_copy(dest, r["copy_id"], r["copy_status"], digest):
                return
        raise BlobUnavailable(f"could not store {digest}: its copy kept failing")

    async def _settle_copy(self, dest: BlobClient, copy_id: str, status: str, what: str) -> bool:
        """Wait for a copy to end; True if it succeeded. A failed one is
        removed (so the next attempt can copy again)."""
        deadline = time.monotonic() + COPY_WAIT
        delay = 0.05
        while status == "pending":
            if time.monotonic() > deadline:
                raise BlobUnavailable(f"the copy into {what} is still pending")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            with _errors(what):
                props = await dest.get_blob_properties()
            if props.copy.id != copy_id:  # replaced by another copy meanwhile
                return await self._refresh(dest, None, what)
            status = props.copy.status
        if status == "success":
            return True
        log.warning("copy into %s ended %s; copying again", what, status)
        await self._delete_quietly(dest, what)
        return False

    async def _refresh(self, dest: BlobClient, size: int | None, what: str) -> bool:
        """A blob is there: wait for a copy into it to end, then refresh its
        time (so a conditional delete decided before keeps it). False if it
        is gone or failed (write it again)."""
        with _errors(what):
            try:
                props = await dest.get_blob_properties()
            except ResourceNotFoundError:
                return False
        if props.copy.status == "pending":
            return await self._settle_copy(dest, props.copy.id, "pending", what)
        if not _whole(props):
            await self._delete_quietly(dest, what)
            return False
        if size is not None and props.size != size:
            raise BlobUnavailable(f"{what} is stored with {props.size} bytes, expected {size}")
        with _errors(what):
            try:
                await dest.set_blob_metadata(_stamp())
            except ResourceNotFoundError:
                return False
        return True

    async def put_bytes(self, digest: str, data: bytes) -> None:
        alg, _ = parse_digest(digest)
        actual = f"{alg}:{hashlib.new(alg, data).hexdigest()}"
        if actual != digest:
            raise DigestMismatch(digest, actual)
        dest = self._client(self._blob_name(digest))
        for _ in range(5):
            with _errors(digest):
                try:
                    await dest.upload_blob(data, overwrite=False, metadata=_stamp())
                    return
                except ResourceExistsError:
                    pass
            if await self._refresh(dest, len(data), digest):
                return
        raise BlobUnavailable(f"could not store {digest}")

    async def _delete_quietly(self, client: BlobClient, what: str, *, strict: bool = False) -> None:
        """Delete a blob; absent is fine. ``strict``: an unreachable service
        raises; otherwise it is logged (the blob is left behind)."""
        try:
            with _errors(what):
                try:
                    await client.delete_blob()
                except ResourceNotFoundError:
                    pass
        except BlobUnavailable as e:
            if strict:
                raise
            log.warning("could not delete %s: %s", client.blob_name, e)

    async def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        client = self._client(self._blob_name(digest))
        with _errors(digest):
            try:
                if older_than is None:
                    await client.delete_blob()
                    return True
                props = await client.get_blob_properties()
                if props.copy.status == "pending" or _mtime(props) >= older_than:
                    return False
                await client.delete_blob(
                    etag=props.etag, match_condition=MatchConditions.IfNotModified
                )
                return True
            except (ResourceNotFoundError, ResourceModifiedError):
                return False  # gone already, or written again since it was read

    # -- listing -----------------------------------------------------------------

    async def _list(self, prefix: str, *, metadata: bool) -> AsyncIterator[BlobInfo]:
        """Blobs whose name starts with ``prefix`` (name, size, time), page
        by page; copies that are not whole are left out."""
        # "copy": a copy still pending shows as such (left out) in listings too.
        include = ["metadata", "copy"] if metadata else ["copy"]
        pages = self.container.list_blobs(name_starts_with=prefix, include=include)
        while True:
            with _errors(f"listing {prefix}"):
                try:
                    props = await pages.__anext__()
                except StopAsyncIteration:
                    return
            if _whole(props):
                yield BlobInfo(props.name, props.size, _mtime(props))

    async def list_blobs(self) -> AsyncIterator[BlobInfo]:
        async for info in self._list(BLOBS, metadata=True):
            digest = _digest_of(info.name)
            if digest is not None:
                yield BlobInfo(digest, info.size, info.mtime)

    async def list_staged(self, prefix: str) -> AsyncIterator[BlobInfo]:
        async for info in self._list(STAGING + prefix, metadata=False):
            name = info.name[len(STAGING) :]
            if not name.startswith(TMP):
                yield BlobInfo(name, info.size, info.mtime)

    # -- redirects ---------------------------------------------------------------

    async def redirect_url(self, digest: str, *, method: str = "GET") -> str | None:
        """A read-only SAS URL of the one blob, valid for ``sas_ttl`` seconds.
        It does not check that the blob exists (a caller that does not know,
        such as the read-through store, checks first)."""
        if not self.redirect or self._key is None or self._account is None:
            return None
        name = self._blob_name(digest)
        now = datetime.now(UTC)
        sas = generate_blob_sas(
            self._account,
            self.container_name,
            name,
            account_key=self._key,
            permission=BlobSasPermissions(read=True),
            start=now - timedelta(seconds=SAS_SKEW),
            expiry=now + timedelta(seconds=self.sas_ttl),
        )
        return f"{self._client(name).url}?{sas}"


async def _sliced(chunks: AsyncIterator[bytes], what: str) -> AsyncIterator[bytes]:
    """Chunks of at most ``READ_CHUNK``; a failure mid-stream is
    ``BlobUnavailable`` (the reader's headers may be gone already)."""
    try:
        async for data in chunks:
            for i in range(0, len(data), READ_CHUNK):
                yield data[i : i + READ_CHUNK]
    except BlobNotFound:
        raise BlobUnavailable(f"{what} vanished while it was read") from None


async def connect(
    connection_string: str, container: str, *, redirect: bool = True
) -> AzureBlobStore:
    """The store of a node (``--storage azure``): waits until the service
    answers and the container exists; wrong credentials end the wait."""
    store = AzureBlobStore.from_connection_string(connection_string, container, redirect=redirect)
    delay = 0.5
    while True:
        try:
            await store.start()
            break
        except CredentialsRefused:
            await store.close()
            raise
        except BlobUnavailable as e:
            log.warning("azure storage not reachable yet, retrying: %s", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    log.info(
        "azure blob storage",
        extra={"path": f"{store.service.url.split('?')[0]}{container}"},
    )
    return store


__all__ = ["AzureBlobStore", "AzureWriter", "CredentialsRefused", "StagingConflict", "connect"]
