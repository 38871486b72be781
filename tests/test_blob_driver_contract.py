"""One contract suite for every blob storage driver (node/storage/base.py).

Every test in the first part runs on each driver:

- ``filesystem``: ``FilesystemBlobStore`` in tmp_path;
- ``readthrough``: ``ReadThroughStore`` wrapping an empty local filesystem
  store, the content being held by a second region ("eastus") whose own
  filesystem store is served by the real gRPC servicer on a loopback port;
  the two regions share an embedded namespace, which places the content in
  eastus. Reads go through the real transfer engine over real gRPC;
- ``azure``: ``AzureBlobStore`` in a container of its own on Azurite
  (tests/azurite.py, one emulator per module), through the real SDK.

"Seeded" content is what the store can serve without having written it
(for the read-through wrapper: held by the other region); "written" content
went through the store's own writer or ``put_bytes``. The last part holds
what only the read-through wrapper can show.

No test asserts a wall-clock threshold.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cluster.embedded import EmbeddedKV
from cluster.namespace import Namespace, RegionInfo
from cluster.runtime import free_port
from node.grpc_service import GrpcServer, Peers
from node.replication.transfer import Fetcher
from node.storage.azure import AzureBlobStore
from node.storage.base import (
    READ_CHUNK,
    BlobNotFound,
    BlobStore,
    BlobUnavailable,
    DigestMismatch,
)
from node.storage.filesystem import FilesystemBlobStore
from node.storage.readthrough import ReadThroughStore
from tests.azurite import Azurite, azurite  # noqa: F401 - the fixture, for the azure harness

pytestmark = pytest.mark.timeout(60)

REG = "default"
SIZES = [0, 1, 1000, 3 * READ_CHUNK + 12345]


def digest_of(data: bytes, alg: str = "sha256") -> str:
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


# -- harnesses -------------------------------------------------------------


class Harness:
    kind: str
    store: BlobStore

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    async def setup(self) -> None:
        raise NotImplementedError

    async def seed(self, data: bytes) -> str:
        """Make ``data`` a blob the store can serve; returns its digest."""
        raise NotImplementedError

    async def teardown(self) -> None:
        await self.store.close()


class FilesystemHarness(Harness):
    kind = "filesystem"

    async def setup(self) -> None:
        self.store = FilesystemBlobStore(str(self.tmp_path / "fs"))

    async def seed(self, data: bytes) -> str:
        d = digest_of(data)
        await self.store.put_bytes(d, data)
        return d


class ReadThroughHarness(Harness):
    """westeurope reads through to eastus, which holds the seeded content."""

    kind = "readthrough"

    async def setup(self) -> None:
        self.kv = EmbeddedKV(str(self.tmp_path / "ns.sqlite"))
        self.ns = Namespace(self.kv, "westeurope")
        await self.ns.start()
        self.east_ns = Namespace(self.kv, "eastus")  # eastus's writes, same store
        self.east_ns.cache = self.ns.cache
        self.east = FilesystemBlobStore(str(self.tmp_path / "east"))
        self.server = GrpcServer(f"127.0.0.1:{free_port()}", self.east_ns, self.east)
        await self.server.start()
        lease = await self.kv.grant_lease(60)
        await self.east_ns.register_region(
            RegionInfo(name="eastus", http="", grpc=f"127.0.0.1:{self.server.port}"), lease
        )
        # westeurope's record: the server accepts only registered regions' credentials
        await self.ns.register_region(RegionInfo(name="westeurope", http=""), lease)
        self.peers = Peers(self.ns, "westeurope")
        self.local = FilesystemBlobStore(str(self.tmp_path / "west"))
        self.fetcher = Fetcher(self.ns, self.local, self.peers)
        self.store = ReadThroughStore(self.local, self.fetcher)

    async def seed(self, data: bytes) -> str:
        d = digest_of(data)
        await self.east.put_bytes(d, data)
        await self.east_ns.link_blob(REG, "app", d, len(data))
        return d

    async def teardown(self) -> None:
        await self.fetcher.close()
        await self.peers.close()
        await self.server.stop()
        await self.ns.close()


class AzureHarness(Harness):
    kind = "azure"

    def __init__(self, tmp_path: Path, emulator: Azurite) -> None:
        super().__init__(tmp_path)
        self.emulator = emulator

    async def setup(self) -> None:
        self.store = AzureBlobStore.from_connection_string(
            self.emulator.connection_string, self.emulator.new_container()
        )
        await self.store.start()

    async def seed(self, data: bytes) -> str:
        d = digest_of(data)
        await self.store.put_bytes(d, data)
        return d

    async def teardown(self) -> None:
        assert isinstance(self.store, AzureBlobStore)
        await self.store.container.delete_container()
        await self.store.close()


@pytest.fixture(params=["filesystem", "readthrough", "azure"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "azure":
        h: Harness = AzureHarness(tmp_path, request.getfixturevalue("azurite"))
    else:
        cls = FilesystemHarness if request.param == "filesystem" else ReadThroughHarness
        h = cls(tmp_path)
    await h.setup()
    try:
        yield h
    finally:
        await h.teardown()


@pytest.fixture
def store(harness: Harness) -> BlobStore:
    return harness.store


async def read(store: BlobStore, digest: str, offset: int = 0, length: int | None = None) -> bytes:
    async with store.open(digest, offset, length) as reader:
        chunks = [c async for c in reader]
    assert all(len(c) <= READ_CHUNK for c in chunks)
    data = b"".join(chunks)
    assert len(data) == reader.length
    return data


async def write_blob(store: BlobStore, data: bytes, name: str | None = None) -> str:
    d = digest_of(data)
    w = await store.writer(name)
    await w.write([data])
    assert await w.commit(d) == len(data)
    return d


async def listed(store: BlobStore) -> dict[str, int]:
    return {i.name: i.size async for i in store.list_blobs()}


# -- stat and reads ------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
async def test_stat_and_whole_reads(harness: Harness, store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    d = await harness.seed(data)
    assert await store.stat(d) == size
    assert await read(store, d) == data
    assert await store.read_all(d) == data


async def test_absent_blob(store: BlobStore) -> None:
    d = digest_of(b"never stored")
    assert await store.stat(d) is None
    with pytest.raises(BlobNotFound):
        await store.read_all(d)
    with pytest.raises(BlobNotFound):
        async with store.open(d):
            pass


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (0, 10),
        (1, None),
        (999, None),  # the last byte
        (999, 1),
        (1000, None),  # at the end: nothing
        (1000, 5),
        (500, 0),  # zero length
        (0, 0),
        (990, 5000),  # past the end: clipped
        (0, None),
        (123, 456),
    ],
)
async def test_ranged_reads(
    harness: Harness, store: BlobStore, offset: int, length: int | None
) -> None:
    data = os.urandom(1000)
    d = await harness.seed(data)
    end = len(data) if length is None else offset + length
    async with store.open(d, offset, length) as reader:
        assert reader.size == len(data)
        assert reader.offset == offset
        got = b"".join([c async for c in reader])
    assert got == data[offset:end]


async def test_ranged_reads_across_chunks(harness: Harness, store: BlobStore) -> None:
    data = os.urandom(3 * READ_CHUNK + 777)
    d = await harness.seed(data)
    for offset, length in [
        (READ_CHUNK - 1, 2),
        (READ_CHUNK, READ_CHUNK),
        (5, 2 * READ_CHUNK + 3),
        (len(data) - 1, None),
        (len(data) - READ_CHUNK - 1, None),
    ]:
        end = len(data) if length is None else offset + length
        assert await read(store, d, offset, length) == data[offset:end], (offset, length)


@pytest.mark.parametrize(("offset", "length"), [(1001, None), (-1, None), (0, -1), (5000, 1)])
async def test_ranged_read_outside_the_blob(
    harness: Harness, store: BlobStore, offset: int, length: int | None
) -> None:
    d = await harness.seed(os.urandom(1000))
    with pytest.raises(ValueError):
        async with store.open(d, offset, length):
            pass


async def test_empty_blob_ranges(harness: Harness, store: BlobStore) -> None:
    d = await harness.seed(b"")
    assert await read(store, d, 0, None) == b""
    assert await read(store, d, 0, 10) == b""
    with pytest.raises(ValueError):
        async with store.open(d, 1):
            pass


async def test_reader_closed_early_releases_the_blob(harness: Harness, store: BlobStore) -> None:
    data = os.urandom(3 * READ_CHUNK)
    d = await harness.seed(data)
    async with store.open(d) as reader:
        async for _ in reader:
            break
    assert await read(store, d, 10, 10) == data[10:20]


async def test_local_path_when_given_holds_the_blob(store: BlobStore) -> None:
    data = os.urandom(5000)
    d = await write_blob(store, data)
    path = store.local_path(d)
    if path is not None:
        assert await asyncio.to_thread(Path(path).read_bytes) == data
    url = await store.redirect_url(d)
    assert url is None or isinstance(url, str)


# -- writers -----------------------------------------------------------------------------


async def test_writer_appends_hashes_and_commits(store: BlobStore) -> None:
    parts = [os.urandom(n) for n in (0, 1, 4096, READ_CHUNK + 5, 3)]
    data = b"".join(parts)
    d = digest_of(data)
    w = await store.writer()
    assert w.size == 0
    for p in parts:
        await w.write([p])
    await w.write([parts[0], b""])  # empty chunks change nothing
    assert w.size == len(data)
    assert await w.digest() == d
    assert await w.digest("sha512") == digest_of(data, "sha512")
    assert await store.stat(d) is None  # nothing visible before commit
    assert await w.commit(d) == len(data)
    assert await store.stat(d) == len(data)
    assert await read(store, d) == data
    assert d in await listed(store)


async def test_writer_gathers_many_chunks(store: BlobStore) -> None:
    chunks = [os.urandom(100) for _ in range(2000)]  # more than one writev's worth
    w = await store.writer()
    await w.write(chunks)
    data = b"".join(chunks)
    assert w.size == len(data)
    d = digest_of(data)
    await w.commit(d)
    assert await store.read_all(d) == data


async def test_commit_under_another_algorithm(store: BlobStore) -> None:
    data = os.urandom(70_000)
    w = await store.writer(algorithm="sha256")
    await w.write([data])
    d = digest_of(data, "sha512")
    assert await w.commit(d) == len(data)
    assert await store.read_all(d) == data


async def test_empty_blob_commit(store: BlobStore) -> None:
    w = await store.writer()
    d = digest_of(b"")
    assert await w.commit(d) == 0
    assert await store.stat(d) == 0
    assert await read(store, d) == b""


async def test_digest_mismatch_leaves_nothing_visible(store: BlobStore) -> None:
    data = os.urandom(10_000)
    wrong = digest_of(b"other bytes")
    w = await store.writer("uploads/mismatch/data")
    await w.write([data])
    with pytest.raises(DigestMismatch) as e:
        await w.commit(wrong)
    assert e.value.expected == wrong and e.value.actual == digest_of(data)
    assert await store.stat(wrong) is None
    assert await store.stat(digest_of(data)) is None
    assert wrong not in await listed(store)
    # The writer is as it was: more bytes, then the right digest, commit.
    await w.write([b"tail"])
    d = digest_of(data + b"tail")
    assert await w.commit(d) == len(data) + 4
    assert await store.read_all(d) == data + b"tail"
    assert [i async for i in store.list_staged("uploads/mismatch/")] == []


async def test_abort_drops_the_staged_bytes(store: BlobStore) -> None:
    data = os.urandom(5000)
    w = await store.writer("replicating/abort-test.part")
    await w.write([data])
    assert [(i.name, i.size) async for i in store.list_staged("replicating/")] == [
        ("replicating/abort-test.part", 5000)
    ]
    await w.abort()
    assert [i async for i in store.list_staged("replicating/")] == []
    assert await store.stat(digest_of(data)) is None
    with pytest.raises(BlobNotFound):
        await w.read_at(0, 10)


async def test_writer_resumes_by_name(store: BlobStore) -> None:
    first, second = os.urandom(300_000), os.urandom(200_000)
    w = await store.writer("uploads/resume/data")
    await w.write([first])
    # A restart: a new writer object on the same name continues.
    w2 = await store.writer("uploads/resume/data", resume=True)
    assert w2.size == len(first)
    assert await w2.read_at(1000, 10) == first[1000:1010]
    await w2.write([second])
    d = digest_of(first + second)
    assert await w2.digest() == d
    assert await w2.commit(d) == len(first) + len(second)
    assert await store.read_all(d) == first + second
    # Without resume, a name starts empty.
    w3 = await store.writer("uploads/resume/data")
    await w3.write([b"x"])
    w4 = await store.writer("uploads/resume/data")
    assert w4.size == 0
    await w4.abort()


async def test_resume_of_nothing_is_empty(store: BlobStore) -> None:
    w = await store.writer("replicating/nothing.part", resume=True)
    assert w.size == 0
    await w.write([b"abc"])
    assert await w.commit(digest_of(b"abc")) == 3


async def test_truncate_rolls_back_an_append(store: BlobStore) -> None:
    keep, drop = os.urandom(10_000), os.urandom(5000)
    w = await store.writer()
    await w.write([keep])
    await w.write([drop])
    await w.truncate(len(keep))
    assert w.size == len(keep)
    assert await w.digest() == digest_of(keep)
    await w.write([b"!"])
    d = digest_of(keep + b"!")
    await w.commit(d)
    assert await store.read_all(d) == keep + b"!"
    with pytest.raises(ValueError):
        await (await store.writer()).truncate(5)


async def test_read_at_returns_what_was_written(store: BlobStore) -> None:
    data = os.urandom(50_000)
    w = await store.writer("replicating/read-at.part")
    await w.write([data[:20_000]])
    assert await w.read_at(0, 100) == data[:100]
    assert await w.read_at(19_990, 100) == data[19_990:20_000]
    await w.write([data[20_000:]])
    assert await w.read_at(19_990, 20) == data[19_990:20_010]
    d = digest_of(data)
    await w.commit(d)
    with pytest.raises(BlobNotFound):
        await w.read_at(0, 10)  # committed: read the blob instead


async def test_invalid_staging_names(store: BlobStore) -> None:
    for name in ["", "/abs", "a//b", "../x", "a/../b", "a/./b", ".hidden", "a b"]:
        with pytest.raises(ValueError):
            await store.writer(name)


async def test_concurrent_writers_of_one_digest(store: BlobStore) -> None:
    data = os.urandom(2 * READ_CHUNK + 99)
    d = digest_of(data)

    async def push(i: int) -> int:
        w = await store.writer(f"uploads/concurrent-{i}/data")
        for off in range(0, len(data), 65536):
            await w.write([data[off : off + 65536]])
            await asyncio.sleep(0)
        return await w.commit(d)

    sizes = await asyncio.gather(*(push(i) for i in range(6)))
    assert sizes == [len(data)] * 6
    assert await store.read_all(d) == data
    assert (await listed(store))[d] == len(data)
    assert [i async for i in store.list_staged("uploads/")] == []


async def test_concurrent_readers_while_a_writer_commits(store: BlobStore) -> None:
    data = os.urandom(READ_CHUNK + 1)
    d = await write_blob(store, data)

    async def reread() -> None:
        for _ in range(5):
            assert await read(store, d) == data

    await asyncio.gather(reread(), reread(), write_blob(store, data), reread())


# -- put_bytes, delete, listing ---------------------------------------------------------------


async def test_put_bytes_is_verified_and_idempotent(store: BlobStore) -> None:
    data = b'{"schemaVersion":2}'
    d = digest_of(data)
    with pytest.raises(DigestMismatch):
        await store.put_bytes(digest_of(b"else"), data)
    assert await store.stat(digest_of(b"else")) is None
    await store.put_bytes(d, data)
    await store.put_bytes(d, data)
    assert await store.read_all(d) == data
    assert list((await listed(store)).items()).count((d, len(data))) == 1


async def test_delete(store: BlobStore) -> None:
    data = os.urandom(4000)
    d = await write_blob(store, data)
    keep = await write_blob(store, os.urandom(10))
    assert await store.delete(d) is True
    assert await store.stat(d) is None
    with pytest.raises(BlobNotFound):
        await store.read_all(d)
    assert await store.delete(d) is False
    assert d not in await listed(store)
    assert await store.stat(keep) == 10
    # Deleted bytes can be stored again.
    assert await write_blob(store, data) == d
    assert await store.read_all(d) == data


async def test_conditional_delete_keeps_what_was_written_since(store: BlobStore) -> None:
    data = os.urandom(3000)
    d = await write_blob(store, data)
    mtime = {i.name: i.mtime async for i in store.list_blobs()}[d]
    assert await store.delete(d, older_than=mtime - 60) is False  # written after: kept
    assert await store.read_all(d) == data
    cutoff = time.time() + 1
    await asyncio.sleep(0.01)
    assert await store.delete(d, older_than=cutoff) is True
    assert await store.stat(d) is None
    # put_bytes of a blob that is there refreshes it: a delete conditioned on
    # a time before that refresh keeps it.
    await store.put_bytes(d, data)
    before = time.time()
    await asyncio.sleep(0.05)
    await store.put_bytes(d, data)
    assert await store.delete(d, older_than=before) is False
    assert await store.read_all(d) == data
    assert await store.delete(digest_of(b"absent"), older_than=cutoff) is False


async def test_listing(store: BlobStore) -> None:
    assert await listed(store) == {}
    start = time.time()
    blobs = {await write_blob(store, os.urandom(n)): n for n in (0, 10, 70_000)}
    big = os.urandom(1000)
    await store.put_bytes(digest_of(big, "sha512"), big)
    blobs[digest_of(big, "sha512")] = 1000
    staged = await store.writer("replicating/sha256-listing.part")
    await staged.write([b"partial"])
    infos = [i async for i in store.list_blobs()]
    assert {i.name: i.size for i in infos} == blobs
    assert all(start - 5 <= i.mtime <= time.time() + 5 for i in infos)
    assert [(i.name, i.size) async for i in store.list_staged("replicating/")] == [
        ("replicating/sha256-listing.part", 7)
    ]
    assert [i async for i in store.list_staged("uploads/")] == []


# -- the read-through wrapper only -----------------------------------------------------


@pytest.fixture
async def rt(tmp_path: Path) -> AsyncIterator[ReadThroughHarness]:
    h = ReadThroughHarness(tmp_path)
    await h.setup()
    try:
        yield h
    finally:
        await h.teardown()


async def test_read_through_tees_into_the_local_store(rt: ReadThroughHarness) -> None:
    data = os.urandom(2 * READ_CHUNK + 5)
    d = await rt.seed(data)
    assert await rt.local.stat(d) is None
    assert await read(rt.store, d, 100, 50) == data[100:150]  # a range fetches it all
    await rt.fetcher.fetch(REG, d, len(data), reason="readthrough")  # joins the transfer
    assert await rt.local.read_all(d) == data
    assert "westeurope" in rt.ns.placements(REG, d)
    assert [i async for i in rt.store.list_staged("replicating/")] == []
    assert d in await listed(rt.store)


async def test_concurrent_readers_share_one_transfer(rt: ReadThroughHarness) -> None:
    data = os.urandom(3 * READ_CHUNK)
    d = await rt.seed(data)
    served = rt.server.service
    before = _served_ok()
    got = await asyncio.gather(*(read(rt.store, d, 0, None) for _ in range(5)))
    assert got == [data] * 5
    assert _served_ok() - before == 1
    assert served.active == 0


async def test_manifest_sized_read_all_is_fetched_whole(rt: ReadThroughHarness) -> None:
    data = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}'
    d = await rt.seed(data)
    assert await rt.store.read_all(d) == data
    assert await rt.local.read_all(d) == data


async def test_unreachable_holder_is_unavailable_not_absent(rt: ReadThroughHarness) -> None:
    data = os.urandom(1000)
    d = await rt.seed(data)
    await rt.server.stop()
    assert await rt.store.stat(d) == 1000  # the namespace still places it in eastus
    with pytest.raises(BlobUnavailable):
        async with rt.store.open(d):
            pass
    with pytest.raises(BlobUnavailable):
        await rt.store.read_all(d)


def _served_ok() -> float:
    from prometheus_client import REGISTRY

    return (
        REGISTRY.get_sample_value("meridian_replication_served_fetches_total", {"outcome": "ok"})
        or 0.0
    )
