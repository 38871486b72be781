"""Fast in-process checks of the replication pieces: the backlog's order and
scope, the fetcher against misbehaving sources, ranges, the bandwidth cap
arithmetic. (Real processes: test_replication.py, test_replication_faults.py.)"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from cluster.embedded import EmbeddedKV
from cluster.namespace import ManifestRecord, Namespace, RegionInfo
from node.grpc_service import GrpcServer, Peers, RegionCredential, ReplicationService
from node.ranges import parse_range
from node.replication.plan import BLOB, IMAGE, INDEX, backlog, status_rows
from node.replication.transfer import Fetcher, FetchError
from node.storage.filesystem import FilesystemBlobStore
from ocidist.errors import RegistryError
from ocidist.mediatypes import OCI_MANIFEST
from proto import replication_pb2 as pb

pytestmark = pytest.mark.timeout(60)

REG = "default"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _part_exists(store: FilesystemBlobStore, digest: str) -> bool:
    alg, hexa = digest.split(":", 1)
    return os.path.exists(os.path.join(store.root, "replicating", f"{alg}-{hexa}.part"))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def ns(tmp_path: Path) -> AsyncIterator[Namespace]:
    n = Namespace(EmbeddedKV(str(tmp_path / "ns.sqlite")), "westeurope")
    await n.start()
    try:
        yield n
    finally:
        await n.close()


def rec(digest: str, blobs: tuple[str, ...] = (), manifests: tuple[str, ...] = (), t=1.0):
    return ManifestRecord(
        digest=digest,
        media_type=OCI_MANIFEST,
        size=100,
        blobs=blobs,
        manifests=manifests,
        created=t,
    )


async def test_backlog_orders_children_first_and_respects_replicas(ns: Namespace) -> None:
    east = Namespace(ns.kv, "eastus")  # another region's writes, same store
    east.cache = ns.cache
    layer, config, img, idx = (f"sha256:{c * 64}" for c in "abcd")
    for name in ("eastus", "westeurope"):
        lease = await ns.kv.grant_lease(30)
        await ns.register_region(RegionInfo(name=name, http=""), lease)
    await east.link_blob(REG, "app", layer, 1000)
    await east.link_blob(REG, "app", config, 10)
    await east.put_manifest(REG, "app", rec(img, (config, layer), t=5.0), [])
    await east.put_manifest(REG, "app", rec(idx, (), (img,), t=6.0), ["v1"])
    items = backlog(ns, "westeurope")
    assert [(i.digest, i.rank) for i in items] == [
        (layer, BLOB),
        (config, BLOB),
        (img, IMAGE),
        (idx, INDEX),
    ]
    assert backlog(ns, "eastus") == []
    await ns.set_registry_replicas(REG, ["eastus"])
    assert backlog(ns, "westeurope") == []
    rows = {r["region"]: r for r in status_rows(ns, now=10.0)}
    assert rows["eastus"]["pending_items"] == 0
    await ns.set_registry_replicas(REG, None)
    rows = {r["region"]: r for r in status_rows(ns, now=10.0)}
    assert rows["westeurope"]["pending_items"] == 4
    assert rows["westeurope"]["pending_bytes"] == 1000 + 10 + 100 + 100
    assert rows["westeurope"]["lag_seconds"] == 5.0
    await ns.record_placement(REG, layer, 1000)
    assert layer not in {i.digest for i in backlog(ns, "westeurope")}


class CorruptOnce(ReplicationService):
    """Flips a byte in the second chunk of the first stream it serves."""

    corrupted = 0

    async def FetchBlob(self, request, context):  # noqa: N802
        n = 0
        async for chunk in super().FetchBlob(request, context):
            n += 1
            if n == 2 and not self.corrupted:
                self.corrupted += 1
                data = bytearray(chunk.data)
                data[100] ^= 0x01
                chunk = pb.Chunk(
                    offset=chunk.offset,
                    data=bytes(data),
                    crc32=chunk.crc32,
                    total_size=chunk.total_size,
                )
            yield chunk


class Liar(ReplicationService):
    """Serves other bytes than the digest names (with valid CRCs)."""

    async def FetchBlob(self, request, context):  # noqa: N802
        async for chunk in super().FetchBlob(request, context):
            data = bytes(b ^ 0xFF for b in chunk.data[:16]) + chunk.data[16:]
            import zlib

            yield pb.Chunk(
                offset=chunk.offset,
                data=data,
                crc32=zlib.crc32(data),
                total_size=chunk.total_size,
            )


def eastus_view(ns: Namespace) -> Namespace:
    """eastus's namespace: its writes go to the same store, it reads the same cache."""
    east = Namespace(ns.kv, "eastus")
    east.cache = ns.cache
    return east


async def register(ns: Namespace, name: str, grpc_addr: str = "") -> None:
    """A region record (what the gRPC server checks a caller's credential against)."""
    lease = await ns.kv.grant_lease(30)
    await ns.register_region(RegionInfo(name=name, http="", grpc=grpc_addr), lease)


async def _source(tmp_path: Path, ns: Namespace, service_cls, data: bytes) -> GrpcServer:
    store = FilesystemBlobStore(str(tmp_path / "src"))
    await store.put_bytes(digest_of(data), data)
    east = eastus_view(ns)
    server = GrpcServer("127.0.0.1:0", east, store)
    server.service = service_cls(east, store)
    await server.start()
    await register(ns, "eastus", f"127.0.0.1:{server.port}")
    await register(ns, "westeurope")
    await east.link_blob(REG, "app", digest_of(data), len(data))
    return server


async def test_corrupt_chunk_is_refetched_never_written(ns: Namespace, tmp_path: Path) -> None:
    data = os.urandom(3 << 20 | 12345)
    d = digest_of(data)
    server = await _source(tmp_path, ns, CorruptOnce, data)
    peers = Peers(ns, "westeurope")
    store = FilesystemBlobStore(str(tmp_path / "dst"))
    fetcher = Fetcher(ns, store, peers)
    before = metric("meridian_replication_errors_total", kind="corrupt_chunk")
    try:
        await fetcher.fetch(REG, d, len(data), reason="replicate")
        assert server.service.corrupted == 1
        assert metric("meridian_replication_errors_total", kind="corrupt_chunk") == before + 1
        assert await store.read_all(d) == data
        assert "westeurope" in ns.placements(REG, d)
        assert not _part_exists(store, d)
    finally:
        await peers.close()
        await server.stop()


async def test_bytes_that_do_not_match_the_digest_are_never_stored(
    ns: Namespace, tmp_path: Path
) -> None:
    data = os.urandom(1 << 20)
    d = digest_of(data)
    server = await _source(tmp_path, ns, Liar, data)
    peers = Peers(ns, "westeurope")
    store = FilesystemBlobStore(str(tmp_path / "dst"))
    fetcher = Fetcher(ns, store, peers)
    before = metric("meridian_replication_errors_total", kind="digest_mismatch")
    try:
        with pytest.raises(FetchError, match="digest mismatch"):
            await fetcher.fetch(REG, d, len(data), reason="replicate")
        assert metric("meridian_replication_errors_total", kind="digest_mismatch") == before + 1
        assert await store.stat(d) is None
        assert not _part_exists(store, d)
        assert "westeurope" not in ns.placements(REG, d)
    finally:
        await peers.close()
        await server.stop()


async def test_fetch_blob_rejects_bad_requests(ns: Namespace, tmp_path: Path) -> None:
    store = FilesystemBlobStore(str(tmp_path))
    data = b"x" * 1000
    unlinked = b"y" * 1000  # held here, referenced by no registry
    await store.put_bytes(digest_of(data), data)
    await store.put_bytes(digest_of(unlinked), unlinked)
    east = eastus_view(ns)
    await east.link_blob(REG, "app", digest_of(data), len(data))
    await register(ns, "westeurope")
    server = GrpcServer("127.0.0.1:0", east, store)
    await server.start()
    from node.grpc_service import open_channel
    from proto import replication_pb2_grpc as pb_grpc

    channel = open_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.ReplicationStub(channel)
    md = await RegionCredential(ns, "westeurope").metadata()
    try:
        for req, code in (
            (pb.FetchRequest(registry=REG, digest="nope"), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.FetchRequest(digest=digest_of(data)), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.FetchRequest(registry=REG, digest="sha256:" + "0" * 64), grpc.StatusCode.NOT_FOUND),
            (pb.FetchRequest(registry=REG, digest=digest_of(unlinked)), grpc.StatusCode.NOT_FOUND),
            (pb.FetchRequest(registry="other", digest=digest_of(data)), grpc.StatusCode.NOT_FOUND),
            (
                pb.FetchRequest(registry=REG, digest=digest_of(data), offset=1001),
                grpc.StatusCode.OUT_OF_RANGE,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.FetchBlob(req, metadata=md):
                    pass
            assert e.value.code() == code, req
        req = pb.FetchRequest(registry=REG, digest=digest_of(data))
        chunks = [c async for c in stub.FetchBlob(req, metadata=md)]
        assert b"".join(c.data for c in chunks) == data
        req = pb.FetchRequest(registry=REG, digest=digest_of(data), offset=1000)
        tail = [c async for c in stub.FetchBlob(req, metadata=md)]
        assert [(c.data, c.total_size) for c in tail] == [(b"", 1000)]
        digests = [digest_of(data), "sha256:" + "1" * 64, digest_of(unlinked)]
        stat = await stub.Stat(pb.StatRequest(registry=REG, digests=digests), metadata=md)
        assert [(b.present, b.size) for b in stat.blobs] == [(True, 1000), (False, 0), (False, 0)]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Stat(pb.StatRequest(registry=REG, digests=digests))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
        await server.stop()


def test_range_parsing() -> None:
    def span(value: str | None) -> tuple[int, int] | None:
        r = parse_range(value, 100)
        return None if r is None else (r.start, r.end)

    assert span(None) is None
    assert span("bytes=0-9") == (0, 9)
    assert span("bytes=90-") == (90, 99)
    assert span("bytes=-10") == (90, 99)
    assert span("bytes=50-1000") == (50, 99)
    assert span("items=1-2") is None
    assert span("bytes=0-1,5-6") is None
    with pytest.raises(RegistryError):
        span("bytes=200-")


async def test_fetch_blob_enforces_a_minimum_chunk_size(ns: Namespace, tmp_path: Path) -> None:
    """A tiny ``chunk_size`` (1 byte: a message per byte) is raised to
    ``MIN_CHUNK``; larger requests are honoured up to ``MAX_CHUNK``."""
    from node.grpc_service import MAX_CHUNK, MIN_CHUNK, open_channel
    from proto import replication_pb2_grpc as pb_grpc

    store = FilesystemBlobStore(str(tmp_path))
    data = os.urandom(3 * MIN_CHUNK + 100)
    d = digest_of(data)
    await store.put_bytes(d, data)
    east = eastus_view(ns)
    await east.link_blob(REG, "app", d, len(data))
    await register(ns, "westeurope")
    server = GrpcServer("127.0.0.1:0", east, store)
    await server.start()
    channel = open_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.ReplicationStub(channel)
    md = await RegionCredential(ns, "westeurope").metadata()
    try:
        call = stub.FetchBlob(pb.FetchRequest(registry=REG, digest=d, chunk_size=1), metadata=md)
        first = await call.read()
        call.cancel()
        assert len(first.data) == MIN_CHUNK
        for asked, size in ((1, MIN_CHUNK), (MIN_CHUNK + 1, MIN_CHUNK + 1), (8 << 20, MAX_CHUNK)):
            req = pb.FetchRequest(registry=REG, digest=d, chunk_size=asked)
            chunks = [c async for c in stub.FetchBlob(req, metadata=md)]
            assert b"".join(c.data for c in chunks) == data
            assert all(len(c.data) == size for c in chunks[:-1]), asked
            assert 0 < len(chunks[-1].data) <= size
    finally:
        await channel.close()
        await server.stop()
