"""The registry namespace (cluster/namespace.py) on both stores: one suite,
run on the embedded sqlite store and on a real etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from cluster.embedded import EmbeddedKV
from cluster.etcd import EtcdKV
from cluster.kv import KVStore, Put
from cluster.namespace import BlobsGone, ManifestRecord, Namespace
from ocidist.mediatypes import OCI_MANIFEST
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(90)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
L1 = "sha256:" + "a" * 64
REG = "default"


def rec(digest: str, subject: str | None = None, artifact_type: str | None = None):
    return ManifestRecord(
        digest=digest,
        media_type=OCI_MANIFEST,
        size=100,
        blobs=(L1,),
        subject=subject,
        artifact_type=artifact_type,
    )


@pytest.fixture(params=["embedded", "etcd"])
async def make_kv(request, tmp_path: Path) -> AsyncIterator[Callable[[], KVStore]]:
    """A factory of clients of one store (several clients = several nodes)."""
    if request.param == "embedded":
        shared = EmbeddedKV(str(tmp_path / "ns.sqlite"))
        yield lambda: _Shared(shared)
        await shared.close()
    else:
        server = EtcdServer(str(tmp_path / "etcd"))
        await server.astart()
        try:
            yield lambda: EtcdKV(server.endpoints, timeout=5.0)
        finally:
            await asyncio.to_thread(server.cleanup)


class _Shared:
    """One embedded store seen by several Namespaces in one process: start
    once, close once (by the fixture)."""

    def __init__(self, kv: EmbeddedKV) -> None:
        self._kv = kv

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._kv, name)

    async def start(self) -> None:
        if not getattr(self._kv, "_meridian_started", False):
            await self._kv.start()
            self._kv._meridian_started = True  # type: ignore[attr-defined]

    async def close(self) -> None:
        pass


@pytest.fixture
async def namespaces(make_kv) -> AsyncIterator[Callable[..., Namespace]]:
    made: list[Namespace] = []

    async def new(region: str = "eastus", watch: bool = True) -> Namespace:
        ns = Namespace(make_kv(), region)
        if watch:
            await ns.start()
        else:  # a node whose watch is stalled: its cache only knows the load
            await ns.kv.start()
            await ns._reload()
        made.append(ns)
        return ns

    yield new
    for ns in made:
        await ns.close()


async def eventually(cond: Callable[[], bool], limit: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_manifest_tags_and_listing(namespaces) -> None:
    ns = await namespaces()
    await ns.link_blob(REG, "team/app", L1, 10)
    await ns.put_manifest(REG, "team/app", rec(D1), ["v2", "v1", "latest"])
    assert ns.tag(REG, "team/app", "v1") == D1
    assert ns.tags(REG, "team/app") == ["latest", "v1", "v2"]
    assert ns.repos(REG) == ["team/app"]
    assert ns.manifest(REG, "team/app", D1) == rec(D1)
    assert ns.blob_size(REG, "team/app", L1) == 10
    assert ns.placements(REG, D1) == {"eastus": 100}
    assert ns.repos_with_blob(REG, L1) == {"team/app"}
    # other registries are separate namespaces
    assert ns.repos("other") == []
    assert ns.tag("other", "team/app", "v1") is None


async def test_writes_reach_other_nodes_and_survive_reload(namespaces) -> None:
    a = await namespaces("eastus")
    b = await namespaces("westeurope")
    await a.put_manifest(REG, "app", rec(D1), ["v1"])
    await eventually(lambda: b.tag(REG, "app", "v1") == D1)
    await b.delete_tag(REG, "app", "v1")
    await eventually(lambda: a.tag(REG, "app", "v1") is None)
    assert a.manifest(REG, "app", D1) is not None
    c = await namespaces("southeastasia")  # a fresh node loads everything
    assert c.manifest(REG, "app", D1) == rec(D1)
    assert c.tag(REG, "app", "v1") is None


async def test_racing_tag_push_later_write_wins(namespaces) -> None:
    """b's cache has not seen a's push (no watch): b's push is accepted all
    the same and, being later in the store's order, wins everywhere."""
    a = await namespaces("eastus", watch=False)
    b = await namespaces("westeurope", watch=False)
    await a.put_manifest(REG, "app", rec(D1), ["latest"])
    await b.put_manifest(REG, "app", rec(D2), ["latest"])
    fresh = await namespaces("southeastasia")
    assert fresh.tag(REG, "app", "latest") == D2
    # both pushes are whole: each record is there
    assert fresh.manifest(REG, "app", D1) == rec(D1)
    assert fresh.manifest(REG, "app", D2) == rec(D2)


async def test_delete_manifest_removes_its_tags_only(namespaces) -> None:
    ns = await namespaces()
    await ns.put_manifest(REG, "app", rec(D1), ["a", "b"])
    await ns.put_manifest(REG, "app", rec(D2), ["c"])
    assert await ns.delete_manifest(REG, "app", D1)
    assert ns.tags(REG, "app") == ["c"]
    assert ns.manifest(REG, "app", D1) is None
    assert not await ns.delete_manifest(REG, "app", D1)


async def test_delete_repository_writes_its_extra_puts(namespaces) -> None:
    """``extra`` (a repository delete's webhook events) is written with the
    delete, however many there are; never when there is no such repository."""
    ns = await namespaces()
    events = f"/meridian/reg/{REG}/events/eastus/"
    for repo, count in (("few", 3), ("many", 250)):  # 250: more than one transaction holds
        await ns.put_manifest(REG, repo, rec(D1), ["v1", "v2"])
        extra = [Put(f"{events}hook{i}/{repo}", b"{}") for i in range(count)]
        assert await ns.delete_repository(REG, repo, extra)
        entries, _ = await ns.kv.range(events)
        assert {p.key for p in extra} <= {e.key for e in entries}
    assert ns.repos(REG) == []
    assert await ns.delete_repository(REG, "nosuch", [Put(f"{events}x/nosuch", b"{}")]) is None
    assert await ns.kv.get(f"{events}x/nosuch") is None


async def test_referrers_follow_subject(namespaces) -> None:
    ns = await namespaces()
    await ns.put_manifest(REG, "app", rec(D1), ["v1"])
    await ns.put_manifest(REG, "app", rec(D2, subject=D1, artifact_type="x/sig"), [])
    assert [r.digest for r in ns.referrers(REG, "app", D1)] == [D2]
    await ns.delete_manifest(REG, "app", D2)
    assert ns.referrers(REG, "app", D1) == []


async def test_empty_repo_disappears(namespaces) -> None:
    ns = await namespaces()
    await ns.link_blob(REG, "gone", L1, 5)
    assert ns.repo_exists(REG, "gone")
    assert ns.repos(REG) == []  # the catalog lists repositories with manifests
    await ns.unlink_blob(REG, "gone", L1)
    assert not ns.repo_exists(REG, "gone")


# -- online garbage collection of blob links ----------------------------------

L2 = "sha256:" + "b" * 64


async def test_collect_links_removes_only_old_unreferenced_links(namespaces) -> None:
    ns = await namespaces()
    await ns.link_blob(REG, "app", L1, 5)  # referenced by D1 below
    await ns.link_blob(REG, "app", L2, 7)  # uploaded, never used
    await ns.put_manifest(REG, "app", rec(D1), ["v1"], [L1])
    assert await ns.collect_links(grace=3600) == 0  # L2 is young: an upload may need it
    assert ns.blob_size(REG, "app", L2) == 7
    assert await ns.collect_links(grace=0) == 1
    assert ns.blob_size(REG, "app", L2) is None
    assert ns.blob_size(REG, "app", L1) == 5
    # deleting the manifest leaves its layer unreferenced: collected next
    assert await ns.delete_manifest(REG, "app", D1)
    assert await ns.collect_links(grace=0) == 1
    assert ns.blob_size(REG, "app", L1) is None
    fresh = await namespaces("westeurope")
    assert fresh.repo_exists(REG, "app") is False


async def test_push_after_link_collected_is_refused(namespaces) -> None:
    """The push's transaction requires its links: a link collected after
    the API checked it makes the push fail whole (MANIFEST_BLOB_UNKNOWN)."""
    a = await namespaces("eastus", watch=False)  # its cache still has the link
    b = await namespaces("westeurope")
    await b.link_blob(REG, "app", L1, 5)
    await a._reload()
    assert a.blob_size(REG, "app", L1) == 5
    assert await b.collect_links(grace=0) == 1
    with pytest.raises(BlobsGone) as gone:
        await a.put_manifest(REG, "app", rec(D1), ["v1"], [L1])
    assert gone.value.digests == [L1]
    fresh = await namespaces("southeastasia")
    assert fresh.manifest(REG, "app", D1) is None and fresh.tag(REG, "app", "v1") is None


async def test_collection_racing_a_push_keeps_the_link(namespaces) -> None:
    """A push that lands between the collector's read and its removal
    moves the repository's push counter: the removal does not happen."""
    ns = await namespaces()
    pusher = await namespaces("westeurope")
    await ns.link_blob(REG, "app", L1, 5)
    real_range = ns.kv.range

    async def range_then_push(prefix: str):  # noqa: ANN202
        snapshot = await real_range(prefix)
        await pusher.put_manifest(REG, "app", rec(D1), ["v1"], [L1])
        return snapshot

    ns.kv.range = range_then_push  # type: ignore[method-assign]
    try:
        assert await ns.collect_links(grace=0) == 0
    finally:
        ns.kv.range = real_range  # type: ignore[method-assign]
    fresh = await namespaces("southeastasia")
    assert fresh.blob_size(REG, "app", L1) == 5
    assert fresh.tag(REG, "app", "v1") == D1
