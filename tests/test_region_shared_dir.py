"""Many nodes per region sharing one filesystem data dir (issue 15).

Each node stages its temporary and partial files under its own name (its
``--node-id``), cleans up only its own leftovers at start (others' only
once stale), and an upload session started on one node can be continued on
another; replication into a region whose nodes share the dir lands whole,
each item copied by one of them (claims, node.replication.claims).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from urllib.parse import urlencode, urljoin

import pytest

from node.storage.base import BlobStore
from node.storage.filesystem import STALE_TMP, FilesystemBlobStore
from node.uploads import UploadManager
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.images import Registry, build_image
from tests.test_replication import (
    REPO,
    RegionNode,
    content_digests,
    dump_logs,
    file_digest,
    pull,
    wait_peers,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

etcd = etcd_fixture()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_a_node_starting_keeps_the_other_nodes_temporary_files(tmp_path: Path) -> None:
    a = FilesystemBlobStore(str(tmp_path), node_id="a")
    w = await a.writer()  # anonymous: under tmp/a/
    await w.write([b"in flight"])
    assert Path(w.path).parent == tmp_path / "tmp" / "a"
    mine = tmp_path / "tmp" / "b" / "crashed"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(b"b's own leftover")
    stale = tmp_path / "tmp" / "gone" / "old"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a node that never came back")
    old = time.time() - STALE_TMP - 60
    os.utime(stale, (old, old))
    FilesystemBlobStore(str(tmp_path), node_id="b")
    # a's write survives b's start
    assert await asyncio.to_thread(Path(w.path).read_bytes) == b"in flight"
    assert not mine.exists() and not stale.exists()
    data = b"in flight"
    assert await w.commit(digest_of(data)) == len(data)
    assert await a.read_all(digest_of(data)) == data


async def session_back_and_forth(a: UploadManager, b: UploadManager, store: BlobStore) -> None:
    """One upload session passed between two nodes' managers (``store`` is
    a's): begun on a, continued on b, on a again, finished on b; a sees it
    committed, and b's cancel ends it for both."""

    async def body(data: bytes):
        yield data

    up = await a.create("default", "team/app")
    await a.append(up, body(b"one-"), None)
    on_b = await b.get(up.id, "default", "team/app")
    assert on_b.size == 4
    await b.append(on_b, body(b"two-"), None)
    # Back on a, which still holds the session in memory: it sees b's bytes.
    again = await a.get(up.id, "default", "team/app")
    assert again.size == 8
    await a.append(again, body(b"three"), None)
    data = b"one-two-three"
    on_b = await b.get(up.id, "default", "team/app")
    assert on_b.size == len(data)
    with pytest.raises(Exception, match="BLOB_UPLOAD_UNKNOWN|upload unknown"):
        await b.get(up.id, "default", "other/repo")
    assert await b.finish(on_b, digest_of(data)) == len(data)
    assert await store.read_all(digest_of(data)) == data
    # A retried final PUT on a finds it committed; a cancel on b ends it for both.
    again = await a.get(up.id, "default", "team/app")
    assert again.committed == (digest_of(data), len(data))
    await b.cancel(on_b)
    with pytest.raises(Exception, match="BLOB_UPLOAD_UNKNOWN|upload unknown"):
        await a.get(up.id, "default", "team/app")


async def test_an_upload_continues_on_the_other_node_and_back(tmp_path: Path) -> None:
    a_store = FilesystemBlobStore(str(tmp_path), node_id="a")
    b_store = FilesystemBlobStore(str(tmp_path), node_id="b")
    a = UploadManager(str(tmp_path), a_store)
    b = UploadManager(str(tmp_path), b_store)
    await session_back_and_forth(a, b, a_store)


def shared_pair(base: Path, etcd: EtcdServer) -> tuple[RegionNode, RegionNode]:
    one = RegionNode(base, "eastus", etcd.client_url, extra=["--node-id", "one"])
    two = RegionNode(base, "eastus", etcd.client_url, extra=["--node-id", "two"])
    assert one.data == two.data
    return one, two


def test_two_nodes_share_a_data_dir(etcd: EtcdServer, tmp_path: Path) -> None:
    base = tmp_path / "regions"
    one, two = shared_pair(base, etcd)
    west = RegionNode(base, "westeurope", etcd.client_url)
    nodes = [one, two, west]
    started: list[RegionNode] = []
    try:
        for n in nodes:
            started.append(n.start())
        wait_peers([one, west])
        wait_peers([two, west])
        # Pushed through one, pulled through two.
        image = build_image([300_000, 5000], seed="shared-1")
        one.registry().push(REPO, "v1", image)
        pull(two, image, "v1")

        # An upload started on one, continued and finished on two.
        data = os.urandom(200_000)
        ra, rb = one.registry(), two.registry()
        status, hdrs, body = ra.request("POST", f"/v2/{REPO}/blobs/uploads/")
        assert status == 202, body
        path = hdrs["Location"]
        status, hdrs, body = ra.request(
            "PATCH",
            path,
            data[:120_000],
            {"Content-Type": "application/octet-stream", "Content-Range": "0-119999"},
        )
        assert status == 202, body
        status, hdrs, body = rb.request(
            "PATCH",
            hdrs["Location"],
            data[120_000:],
            {"Content-Type": "application/octet-stream", "Content-Range": "120000-199999"},
        )
        assert status == 202, body
        loc = urljoin(two.url + "/", hdrs["Location"])
        sep = "&" if "?" in loc else "?"
        query = urlencode({"digest": digest_of(data)})
        status, hdrs, body = rb.request("PUT", f"{loc}{sep}{query}")
        assert status == 201, body
        assert ra.get_blob(REPO, digest_of(data)) == data

        # Pushed in another region: both nodes of eastus replicate it into
        # the one dir; it lands whole, and both serve it.
        far = build_image([2 << 20, 700_000], seed="shared-far")
        west.registry().push(REPO, "far", far)
        want = content_digests(far)
        wait_until(lambda: one.has_all(want), "eastus holds the far image", 60)
        for b in far.all_blobs():
            assert file_digest(one.blob_path(b.digest)) == b.digest
        pull(one, far, "far")
        pull(two, far, "far")
        assert one.child is not None and one.child.running()
        assert two.child is not None and two.child.running()
        # Each node staged its parts under its own name, and once both have
        # finished copying none is left over. A node stopped mid-copy keeps
        # its part to resume.
        parts = base / "eastus" / "replicating"
        wait_until(lambda: not list(parts.rglob("*.part")), "both nodes finished copying", 60)
        assert {p.name for p in parts.iterdir()} <= {"one", "two"}
        # Each item was claimed and copied by one of the two nodes, once.
        logs = one.logs() + two.logs()
        copies = {d: logs.count(f'"msg": "fetched {d} ') for d in want}
        assert copies == dict.fromkeys(want, 1), copies
    except BaseException:
        print(dump_logs(started))
        raise
    finally:
        for n in started:
            n.stop()


def test_router_balances_over_a_regions_nodes(etcd: EtcdServer, tmp_path: Path) -> None:
    """Two nodes of one region on one data dir behind a router: requests
    go to both; one killed, the other serves everything (no client error)
    and the region stays in rotation; both gone, the region is out."""
    from tests.procs import NodeProcess
    from tests.test_router import RouterProcess, regions_of

    data = tmp_path / "eastus"
    url = etcd.client_url
    one = NodeProcess(data, region="eastus", etcd=url, extra=("--node-id", "one"))
    two = NodeProcess(data, region="eastus", etcd=url, extra=("--node-id", "two"))
    router = RouterProcess(url, tmp_path)
    started: list[NodeProcess] = []
    try:
        started.append(one.start())
        started.append(two.start())
        router.start()

        def nodes_up(st: dict) -> dict[str, bool]:
            row = regions_of(st).get("eastus") or {}
            return {n["node"]: n["up"] for n in row.get("nodes", [])}

        router.wait_for(lambda st: nodes_up(st) == {"one": True, "two": True}, "both nodes up")
        reg = Registry(router.url)
        image = build_image([100_000, 3000], seed="balance-1")
        reg.push(REPO, "v1", image)
        # Proxied requests (a tag list: the router answers none itself) go
        # to both nodes.
        tags = f"/v2/{REPO}/tags/list"
        served = []
        for _ in range(12):
            status, hdrs, body = reg.request("GET", tags)
            assert status == 200 and b'"v1"' in body
            assert hdrs["X-Meridian-Region"] == "eastus"
            served.append(hdrs["X-Meridian-Node"])
        assert set(served) == {"one", "two"}, served

        two.kill()
        for _ in range(12):  # no error, whatever the router knows yet
            status, hdrs, body = reg.request(
                "GET", f"/v2/{REPO}/manifests/v1", headers={"Accept": image.media_type}
            )
            assert status == 200 and body == image.manifest, (status, body)
            for b in image.all_blobs():
                assert reg.get_blob(REPO, b.digest) == b.data
        st = router.wait_for(lambda st: nodes_up(st).get("two") is not True, "two out")
        assert regions_of(st)["eastus"]["up"] is True
        assert router.status()["nearest"] == ["eastus"]
        for _ in range(4):
            status, hdrs, _ = reg.request("GET", tags)
            assert status == 200 and hdrs["X-Meridian-Node"] == "one"

        one.stop()
        st = router.wait_for(lambda st: not regions_of(st)["eastus"]["up"], "eastus out")
        assert router.status()["nearest"] == []
        status, _, _ = reg.request("GET", tags)
        assert status >= 500
    except BaseException:
        print(router.logs())
        for n in started:
            print(n.logs()[-4000:])
        raise
    finally:
        router.stop()
        for n in started:
            n.stop()
