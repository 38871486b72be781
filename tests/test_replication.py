"""Geo-replication over gRPC between real node processes on one real etcd.

Also the helpers the other replication test modules share: ``RegionNode``
(a ``NodeProcess`` with a gRPC port), metric scraping, bounded waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.etcd import EtcdKV
from cluster.membership import default_node_id
from cluster.status import PATH as STATUS_PATH
from cluster.status import NodeStatus
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.images import Image, Index, Registry, build_image, build_index
from tests.procs import ROOT, NodeProcess, free_port

pytestmark = pytest.mark.timeout(180)

REPO = "team/app"
REG = "default"


# -- helpers (shared with test_replication_*.py) -------------------------------


class RegionNode(NodeProcess):
    """One region's node: HTTP + gRPC on free loopback ports, on etcd.

    ``grpc_advertise`` is what other regions dial (a WAN emulator's port, to
    put inter-region traffic through it); default the node's own port."""

    def __init__(
        self,
        base: Path,
        region: str,
        etcd: str,
        *,
        grpc_port: int = 0,
        grpc_advertise: str = "",
        extra: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.grpc_port = grpc_port or free_port()
        args = ["--grpc-listen", f"127.0.0.1:{self.grpc_port}", "--log-level", "info"]
        if grpc_advertise:
            args += ["--grpc-advertise", grpc_advertise]
        super().__init__(base / region, region=region, etcd=etcd, extra=[*args, *extra])

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def blob_path(self, digest: str) -> Path:
        alg, hexa = digest.split(":", 1)
        return self.data / "blobs" / alg / hexa[:2] / hexa

    def part_path(self, digest: str) -> Path:
        """Where this node stages a transfer (its default node id: a shared
        data dir keeps each node's parts apart)."""
        alg, hexa = digest.split(":", 1)
        return self.data / "replicating" / default_node_id(self.port) / f"{alg}-{hexa}.part"

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def has_all(self, digests: list[str]) -> bool:
        return all(self.has(d) for d in digests)

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def registry(self) -> Registry:
        """A client logged in as the owner (one per node: its tokens are kept)."""
        if getattr(self, "_registry", None) is None:
            self._registry = Registry(self.url)
        return self._registry

    def status(self) -> NodeStatus:
        """What the node says about itself to the router (``cluster.status``)."""
        with urllib.request.urlopen(self.url + STATUS_PATH, timeout=5) as resp:
            return NodeStatus.from_json(resp.read())


def scrape(base_url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (and summed 'name' totals)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        if labels:
            out[name] = out.get(name, 0.0) + value
    return out


def wait_until(
    cond: Callable[[], bool], what: str, timeout: float = 90.0, interval: float = 0.1
) -> None:
    """Poll ``cond`` until it holds; fail after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:
            pass  # a node restarting: keep polling
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(interval)


def content_digests(item: Image | Index) -> list[str]:
    """Every digest a region must hold for ``item``: blobs and manifests."""
    return [b.digest for b in item.all_blobs()] + [d for d, _, _ in item.manifests()]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def placements(etcd: EtcdServer, digest: str, reg: str = REG) -> set[str]:
    """Regions the namespace says hold ``digest`` (read straight from etcd)."""

    async def read() -> set[str]:
        kv = EtcdKV(etcd.endpoints, timeout=5.0)
        await kv.start()
        try:
            prefix = f"/meridian/reg/{reg}/place/{digest}/"
            entries, _ = await kv.range(prefix)
            return {e.key[len(prefix) :] for e in entries}
        finally:
            await kv.close()

    return asyncio.run(read())


def set_replicas(etcd: EtcdServer, regions: list[str] | None, reg: str = REG) -> None:
    async def write() -> None:
        kv = EtcdKV(etcd.endpoints, timeout=5.0)
        await kv.start()
        try:
            from cluster.kv import Put

            cfg = {} if regions is None else {"replicas": regions}
            await kv.txn([], [Put(f"/meridian/reg/{reg}/config", json.dumps(cfg).encode())])
        finally:
            await kv.close()

    asyncio.run(write())


def pull(node: RegionNode, item: Image | Index, ref: str) -> None:
    """Pull ``item`` from ``node`` like a client: every manifest, every
    blob, and check every byte."""
    reg = node.registry()
    body, _, digest = reg.get_manifest(REPO, ref)
    assert digest == item.digest and body == item.manifest
    for d, mbody, _ in item.manifests():
        got, _, _ = reg.get_manifest(REPO, d)
        assert got == mbody
    for b in item.all_blobs():
        assert reg.get_blob(REPO, b.digest) == b.data, f"blob {b.digest} differs"


def start_regions(
    base: Path, etcd: EtcdServer, names: list[str], extra: dict[str, list[str]] | None = None
) -> list[RegionNode]:
    nodes = [
        RegionNode(base, name, etcd.client_url, extra=(extra or {}).get(name, [])) for name in names
    ]
    started: list[RegionNode] = []
    try:
        for n in nodes:
            started.append(n.start())
    except BaseException:
        for n in started:
            n.stop()
        raise
    return nodes


def wait_peers(nodes: list[RegionNode]) -> None:
    """Until each node has pinged every other one (so sources are known)."""
    for n in nodes:
        others = [o.region for o in nodes if o is not n]
        wait_until(
            lambda n=n, others=others: all(
                n.metrics().get(f'meridian_replication_peer_up{{region="{o}"}}') == 1
                for o in others
            ),
            f"{n.region} sees its peers",
            timeout=30,
        )


etcd = etcd_fixture()


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Path:
    return tmp_path / "regions"


def dump_logs(nodes: list[RegionNode]) -> str:
    return "\n".join(f"--- {n.region}\n{n.logs()[-6000:]}" for n in nodes)


# -- tests ---------------------------------------------------------------------


def test_push_in_one_region_appears_in_the_others(etcd: EtcdServer, cluster_dir: Path) -> None:
    """An image and a multi-arch index pushed to eastus end up, bytes and
    all, in westeurope and southeastasia, which then serve them with
    eastus gone."""
    nodes = start_regions(cluster_dir, etcd, ["eastus", "westeurope", "southeastasia"])
    east, west, sea = nodes
    try:
        wait_peers(nodes)
        image = build_image([1 << 20, 2 << 20, 70_000], seed="push-1")
        index = build_index([300_000, 5000], seed="push-idx")
        east.registry().push(REPO, "v1", image)
        east.registry().push(REPO, "multi", index)
        want = content_digests(image) + content_digests(index)
        for n in (west, sea):
            wait_until(lambda n=n: n.has_all(want), f"{n.region} holds everything", 60)
        for d in want:
            assert {"eastus", "westeurope", "southeastasia"} <= placements(etcd, d)
        # Every image (3: one, two in the index) and the index, announced.
        for n in (west, sea):
            wait_until(
                lambda n=n: n.metrics().get("meridian_replication_images_total", 0) >= 4,
                f"{n.region} announced the replicated images",
                30,
            )
            assert n.logs().count("replicated default") == 4
            assert n.metrics().get("meridian_replication_images_total") == 4
            assert n.metrics().get("meridian_replication_lag_seconds_count") == 4
            assert n.metrics()["meridian_replication_pending_items"] == 0
            st = n.status()
            assert st.region == n.region and st.namespace_synced
            assert (st.backlog_items, st.backlog_bytes) == (0, 0)
            others = {o.region for o in nodes if o is not n}
            assert set(st.peers_rtt_s) == others, st
            assert all(rtt > 0 for rtt in st.peers_rtt_s.values()), st
        for b in image.all_blobs():
            assert file_digest(west.blob_path(b.digest)) == b.digest
        east.stop()
        for n in (west, sea):
            pull(n, image, "v1")
            pull(n, index, "multi")
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_pull_reads_through_from_a_region_that_has_the_bytes(
    etcd: EtcdServer, cluster_dir: Path
) -> None:
    """westeurope runs no background replicator: a pull there still
    succeeds, fetching from eastus while streaming, and the bytes stay."""
    nodes = start_regions(
        cluster_dir,
        etcd,
        ["eastus", "westeurope"],
        extra={"westeurope": ["--replication-concurrency", "0"]},
    )
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([3 << 20, 1 << 20, 10_000], seed="rt-1")
        east.registry().push(REPO, "v1", image)
        assert not any(west.has(d) for d in content_digests(image))
        # Ranges work on bytes that are not here yet (the tail of a layer).
        layer = image.layers[0]
        status, hdrs, body = west.registry().request(
            "GET", f"/v2/{REPO}/blobs/{layer.digest}", headers={"Range": "bytes=1000-"}
        )
        assert status == 206 and body == layer.data[1000:]
        assert hdrs["Content-Range"] == f"bytes 1000-{layer.size - 1}/{layer.size}"
        pull(west, image, "v1")
        # The client may have its last byte a moment before the tee commits.
        wait_until(lambda: west.has_all(content_digests(image)), "westeurope keeps the bytes", 30)
        for d in content_digests(image):
            assert file_digest(west.blob_path(d)) == d
        wait_until(
            lambda: all("westeurope" in placements(etcd, d) for d in content_digests(image)),
            "read-through bytes recorded as placed in westeurope",
            30,
        )
        m = west.metrics()
        st = west.status()
        assert st.backlog_items is None and st.backlog_bytes is None  # no replicator there
        assert set(st.peers_rtt_s) == {"eastus"}
        assert m.get('meridian_replication_readthrough_total{kind="blob"}', 0) >= 1
        assert m.get('meridian_replication_readthrough_total{kind="manifest"}', 0) >= 1
        # Now local: eastus can go, westeurope still serves.
        east.stop()
        pull(west, image, "v1")
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_many_concurrent_pulls_of_a_missing_blob_fetch_it_once(
    etcd: EtcdServer, cluster_dir: Path
) -> None:
    nodes = start_regions(
        cluster_dir,
        etcd,
        ["eastus", "westeurope"],
        extra={"westeurope": ["--replication-concurrency", "0"]},
    )
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([24 << 20], seed="sf-1")
        east.registry().push(REPO, "v1", image)
        layer = image.layers[0]
        served_before = east.metrics().get(
            'meridian_replication_served_fetches_total{outcome="ok"}', 0
        )
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            bodies = list(
                pool.map(lambda _: west.registry().get_blob(REPO, layer.digest), range(16))
            )
        assert all(b == layer.data for b in bodies)
        served = (
            east.metrics().get('meridian_replication_served_fetches_total{outcome="ok"}', 0)
            - served_before
        )
        assert served == 1, f"eastus served {served} fetches for one blob"
        key = 'meridian_replication_fetches_total{outcome="ok",reason="readthrough"}'
        wait_until(lambda: west.metrics().get(key) == 1, "the one transfer is counted", 30)
        assert west.metrics().get("meridian_replication_fetches_total") == 1
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_pull_succeeds_while_replication_is_in_progress(
    etcd: EtcdServer, cluster_dir: Path
) -> None:
    """westeurope replicates slowly (bandwidth cap); a pull there before it
    finished succeeds at once (read-through is not capped), and replication
    then completes."""
    nodes = start_regions(
        cluster_dir,
        etcd,
        ["eastus", "westeurope"],
        extra={"westeurope": ["--replication-bandwidth", "1M", "--replication-concurrency", "1"]},
    )
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([3 << 20, 3 << 20, 3 << 20], seed="lag-1")
        east.registry().push(REPO, "v1", image)
        wait_until(
            lambda: west.metrics().get("meridian_replication_bytes_copied_total", 0) > 0,
            "westeurope started replicating",
            30,
        )
        assert not west.has(image.digest), "replication finished before the pull started"
        pull(west, image, "v1")
        assert west.metrics().get("meridian_replication_readthrough_total", 0) >= 1
        wait_until(lambda: west.has_all(content_digests(image)), "replication completes", 90)
        wait_until(
            lambda: west.metrics().get("meridian_replication_images_total", 0) >= 1,
            "westeurope announced the image",
            30,
        )
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def replication_list(etcd: EtcdServer) -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "replication", "status", "--json"],
        env={**os.environ, "MERIDIAN_ETCD": etcd.client_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {r["region"]: r for r in json.loads(out.stdout)}


def test_registry_replicas_setting_stops_and_backfills(etcd: EtcdServer, cluster_dir: Path) -> None:
    """Only the regions in the registry's ``replicas`` replicate it;
    removing a region stops its transfer, adding it back (or unsetting the
    list: every region) backfills."""
    set_replicas(etcd, ["eastus", "westeurope"])
    nodes = start_regions(
        cluster_dir,
        etcd,
        ["eastus", "westeurope", "southeastasia"],
        extra={"westeurope": ["--replication-bandwidth", "4M"]},
    )
    east, west, sea = nodes
    try:
        wait_peers(nodes)
        image = build_image([24 << 20, 5000], seed="replicas-1")
        big = image.layers[0]
        east.registry().push(REPO, "v1", image)
        wait_until(lambda: west.part_path(big.digest).exists(), "westeurope started copying")
        rows = replication_list(etcd)
        assert rows["westeurope"]["status"] == "replicating"
        assert rows["westeurope"]["pending_items"] >= 1
        assert rows["westeurope"]["pending_bytes"] >= big.size
        assert rows["southeastasia"]["pending_items"] == 0  # not a replica
        assert rows["eastus"]["status"] == "in-sync"
        set_replicas(etcd, ["eastus"])
        wait_until(
            lambda: f"stopping replication of {big.digest}" in west.logs(),
            "westeurope stops its transfer",
            30,
        )
        assert not west.has(big.digest)
        assert not any(sea.has(d) for d in content_digests(image))
        set_replicas(etcd, None)  # every region
        for n in (west, sea):
            wait_until(lambda n=n: n.has_all(content_digests(image)), f"{n.region} backfills")
        wait_until(
            lambda: all(r["pending_items"] == 0 for r in replication_list(etcd).values()),
            "replication status shows every region in sync",
            30,
        )
        rows = replication_list(etcd)
        assert {r["status"] for r in rows.values()} == {"in-sync"}
        # The node's own view agrees.
        with urllib.request.urlopen(west.url + "/meridian/v1/replication", timeout=5) as resp:
            assert {r["region"] for r in json.loads(resp.read())["regions"]} == set(rows)
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_unreferenced_bytes_are_reclaimed_and_the_rest_kept(
    etcd: EtcdServer, cluster_dir: Path
) -> None:
    reclaim = ["--reclaim-interval", "0.5", "--reclaim-grace", "1"]
    nodes = start_regions(
        cluster_dir,
        etcd,
        ["eastus", "westeurope"],
        extra={"eastus": reclaim, "westeurope": reclaim},
    )
    east, west = nodes
    try:
        wait_peers(nodes)
        gone = build_image([300_000, 2000], seed="reclaim-gone")
        kept = build_image([200_000], seed="reclaim-kept")
        reg = east.registry()
        reg.push(REPO, "gone", gone)
        reg.push(REPO, "kept", kept)
        want = content_digests(gone) + content_digests(kept)
        wait_until(lambda: west.has_all(want), "westeurope holds both images")
        status, _, _ = reg.request("DELETE", f"/v2/{REPO}/manifests/{gone.digest}")
        assert status == 202
        for b in gone.blobs():
            status, _, _ = reg.request("DELETE", f"/v2/{REPO}/blobs/{b.digest}")
            assert status == 202
        for n in (east, west):
            wait_until(
                lambda n=n: not any(n.has(d) for d in content_digests(gone)),
                f"{n.region} reclaims the deleted image's bytes",
                60,
            )
        for d in content_digests(gone):
            assert not placements(etcd, d) & {"eastus", "westeurope"}
        assert east.has_all(content_digests(kept)) and west.has_all(content_digests(kept))
        assert west.metrics().get("meridian_replication_reclaimed_blobs_total", 0) >= 3
        east.stop()
        pull(west, kept, "kept")
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_deleted_image_stops_replicating_and_is_reclaimed_everywhere(
    etcd: EtcdServer, cluster_dir: Path
) -> None:
    """Issue 10 item 6: delete a manifest (only: as `skopeo delete` does)
    while another region is still copying its layers. The upload-time blob
    links no longer keep its layers alive: once no manifest references
    them, the links are collected, replication stops, and every region
    reclaims the bytes; another image in the repository is untouched."""
    reclaim = ["--reclaim-interval", "0.5", "--reclaim-grace", "1"]
    slow = [*reclaim, "--replication-bandwidth", "256K"]
    nodes = start_regions(
        cluster_dir,
        etcd,
        ["eastus", "westeurope"],
        extra={"eastus": reclaim, "westeurope": slow},
    )
    east, west = nodes
    try:
        wait_peers(nodes)
        kept = build_image([50_000], seed="gc-kept")
        gone = build_image([2_000_000, 3000], seed="gc-gone")
        reg = east.registry()
        reg.push(REPO, "kept", kept)
        wait_until(lambda: west.has_all(content_digests(kept)), "westeurope holds kept")
        reg.push(REPO, "gone", gone)
        big = max(gone.blobs(), key=lambda b: b.size)
        wait_until(lambda: west.part_path(big.digest).exists(), "westeurope is copying", 30)
        status, _, _ = reg.request("DELETE", f"/v2/{REPO}/manifests/{gone.digest}")
        assert status == 202
        for n in (east, west):
            wait_until(
                lambda n=n: not any(n.has(d) for d in content_digests(gone)),
                f"{n.region} reclaims the deleted image's bytes",
                60,
            )
            wait_until(
                lambda n=n: not n.part_path(big.digest).exists(),
                f"{n.region} drops the partial copy",
                60,
            )
        for d in content_digests(gone):
            assert not placements(etcd, d) & {"eastus", "westeurope"}, d
            status, _, _ = reg.request("HEAD", f"/v2/{REPO}/blobs/{d}")
            assert status == 404, d
        assert east.has_all(content_digests(kept)) and west.has_all(content_digests(kept))
        pull(west, kept, "kept")
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()
