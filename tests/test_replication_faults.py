"""Replication under faults, with real processes: a receiving node SIGKILLed
mid-layer, etcd restarted mid-replication, a cut WAN link, a corrupted
chunk on the wire (through the userspace WAN emulator, localcluster/wan.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.wan import Link, Wan
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.images import build_image
from tests.procs import free_port
from tests.test_replication import (
    REPO,
    RegionNode,
    content_digests,
    dump_logs,
    file_digest,
    placements,
    pull,
    start_regions,
    wait_peers,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)


etcd = etcd_fixture()


@pytest.fixture
def wan() -> Iterator[Wan]:
    w = Wan().start()
    try:
        yield w
    finally:
        w.stop()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_killed_receiver_resumes_from_its_offset(etcd: EtcdServer, tmp_path: Path) -> None:
    """SIGKILL westeurope in the middle of a 64 MiB layer; after restart it
    continues from the partial file (a non-zero offset) and the blob
    verifies."""
    nodes = start_regions(
        tmp_path,
        etcd,
        ["eastus", "westeurope"],
        extra={"westeurope": ["--replication-bandwidth", "8M"]},
    )
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([64 << 20], seed="kill-1")
        layer = image.layers[0]
        east.registry().push(REPO, "big", image)
        part = west.part_path(layer.digest)
        wait_until(lambda: _size(part) >= 12 << 20, "westeurope copied 12 MiB of the layer")
        west.kill()
        at_kill = _size(part)
        assert 0 < at_kill < layer.size, at_kill
        assert not west.has(layer.digest), "a partial blob became visible"
        west.start()
        wait_until(lambda: west.has(layer.digest), "westeurope completes the layer", 120)
        assert file_digest(west.blob_path(layer.digest)) == layer.digest
        assert not part.exists()
        m = west.metrics()
        assert m.get("meridian_replication_resumed_total", 0) >= 1
        assert m.get("meridian_replication_resumed_bytes_total", 0) >= at_kill
        resumed = [
            int(x)
            for x in re.findall(rf"resuming fetch of {layer.digest} at offset (\d+)", west.logs())
        ]
        assert resumed and resumed[0] >= at_kill
        wait_until(lambda: west.has_all(content_digests(image)), "the whole image", 60)
        wait_until(
            lambda: "westeurope" in placements(etcd, image.digest),
            "placement of the manifest recorded",
            30,
        )
        east.stop()
        pull(west, image, "big")
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_replication_survives_an_etcd_restart(etcd: EtcdServer, tmp_path: Path) -> None:
    """etcd dies while westeurope copies; bytes keep flowing between the
    regions, and once etcd is back the placements are recorded and the rest
    of the image follows."""
    nodes = start_regions(
        tmp_path,
        etcd,
        ["eastus", "westeurope"],
        extra={"westeurope": ["--replication-bandwidth", "8M", "--replication-concurrency", "1"]},
    )
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([16 << 20, 16 << 20, 4096], seed="etcd-1")
        east.registry().push(REPO, "v1", image)
        first = west.part_path(image.layers[0].digest)
        second = west.part_path(image.layers[1].digest)
        wait_until(lambda: _size(first) > 0 or _size(second) > 0, "westeurope started copying", 60)
        etcd.kill()
        # While etcd is down, at least one layer completes locally.
        wait_until(
            lambda: any(west.has(b.digest) for b in image.layers),
            "a layer copied while etcd is down",
            90,
        )
        time.sleep(0.5)  # let a placement write fail against the dead etcd
        etcd.start()
        wait_until(lambda: west.has_all(content_digests(image)), "whole image in westeurope", 120)
        wait_until(
            lambda: all("westeurope" in placements(etcd, d) for d in content_digests(image)),
            "every placement recorded after etcd came back",
            60,
        )
        wait_until(
            lambda: west.metrics().get("meridian_replication_images_total", 0) >= 1,
            "westeurope announced the image",
            30,
        )
        east.stop()
        pull(west, image, "v1")
    except BaseException:
        print(dump_logs(nodes))
        print(etcd.log_tail())
        raise
    finally:
        for n in nodes:
            n.stop()


def _wan_regions(
    tmp_path: Path, etcd: EtcdServer, wan: Wan, names: list[str], extra: dict[str, list[str]]
) -> tuple[list[RegionNode], dict[str, Link]]:
    """Regions whose gRPC servers are reached only through WAN links."""
    nodes = []
    links = {}
    for name in names:
        port = free_port()
        link = wan.link(f"127.0.0.1:{port}")
        node = RegionNode(
            tmp_path,
            name,
            etcd.client_url,
            grpc_port=port,
            grpc_advertise=link.address,
            extra=extra.get(name, []),
        )
        nodes.append(node)
        links[name] = link
    started = []
    try:
        for n in nodes:
            started.append(n.start())
    except BaseException:
        for n in started:
            n.stop()
        raise
    return nodes, links


def test_cut_link_heals_and_replication_catches_up(
    etcd: EtcdServer, tmp_path: Path, wan: Wan
) -> None:
    nodes, links = _wan_regions(
        tmp_path,
        etcd,
        wan,
        ["eastus", "westeurope"],
        {"westeurope": ["--replication-bandwidth", "8M"]},
    )
    east, west = nodes
    link = links["eastus"]
    try:
        wait_peers(nodes)
        image = build_image([32 << 20], seed="cut-1")
        layer = image.layers[0]
        east.registry().push(REPO, "v1", image)
        part = west.part_path(layer.digest)
        wait_until(lambda: _size(part) >= 8 << 20, "westeurope copied 8 MiB")
        link.cut()
        cut_at = _size(part)
        wait_until(
            lambda: west.metrics().get('meridian_replication_peer_up{region="eastus"}') == 0,
            "westeurope notices eastus is unreachable",
            60,
        )
        assert not west.has(layer.digest)
        link.heal()
        wait_until(lambda: west.has_all(content_digests(image)), "replication catches up", 120)
        assert file_digest(west.blob_path(layer.digest)) == layer.digest
        m = west.metrics()
        assert m.get('meridian_replication_errors_total{kind="transport"}', 0) >= 1
        # It went on from where the cut stopped it, not from zero.
        assert m.get("meridian_replication_bytes_copied_total", 0) < 2 * layer.size
        assert cut_at > 0
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_read_through_uses_another_region_when_a_link_is_cut(
    etcd: EtcdServer, tmp_path: Path, wan: Wan
) -> None:
    """eastus (origin) is cut off; westeurope (no background replicator)
    still serves a pull, fetching from southeastasia, which has a copy."""
    nodes, links = _wan_regions(
        tmp_path,
        etcd,
        wan,
        ["eastus", "westeurope", "southeastasia"],
        {"westeurope": ["--replication-concurrency", "0"]},
    )
    east, west, sea = nodes
    try:
        wait_peers(nodes)
        image = build_image([2 << 20, 50_000], seed="cut-rt")
        east.registry().push(REPO, "v1", image)
        wait_until(lambda: sea.has_all(content_digests(image)), "southeastasia has the image")
        links["eastus"].cut()
        pull(west, image, "v1")
        m = west.metrics()
        assert m.get('meridian_replication_bytes_copied_total{source="southeastasia"}', 0) > 0
        assert m.get('meridian_replication_bytes_copied_total{source="eastus"}', 0) == 0
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_corrupted_chunk_is_detected_and_refetched(
    etcd: EtcdServer, tmp_path: Path, wan: Wan
) -> None:
    nodes, links = _wan_regions(tmp_path, etcd, wan, ["eastus", "westeurope"], {})
    east, west = nodes
    link = links["eastus"]
    try:
        wait_peers(nodes)
        image = build_image([8 << 20], seed="corrupt-1")
        layer = image.layers[0]
        # Flip one byte some 3.5 MiB into what eastus sends from now on: in
        # the middle of a chunk's data.
        link.corrupt_at(link.bytes_down + (7 << 19) + 12345)
        east.registry().push(REPO, "v1", image)
        wait_until(lambda: west.has_all(content_digests(image)), "westeurope has the image", 90)
        assert link.corruptions == 1
        assert file_digest(west.blob_path(layer.digest)) == layer.digest
        m = west.metrics()
        detected = m.get('meridian_replication_errors_total{kind="corrupt_chunk"}', 0)
        broken = m.get('meridian_replication_errors_total{kind="transport"}', 0)
        # Almost always the CRC catches it; a flip that lands in a frame
        # header breaks the stream instead. Either way nothing bad is stored.
        assert detected + broken >= 1
        assert m.get('meridian_replication_errors_total{kind="digest_mismatch"}', 0) == 0
        pull(west, image, "v1")
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_nearest_region_by_measured_rtt_is_the_source(
    etcd: EtcdServer, tmp_path: Path, wan: Wan
) -> None:
    """Both eastus and southeastasia hold the image; eastus is far (200 ms
    each way on its link), so westeurope reads through from southeastasia."""
    nodes, links = _wan_regions(
        tmp_path,
        etcd,
        wan,
        ["eastus", "westeurope", "southeastasia"],
        {"westeurope": ["--replication-concurrency", "0"]},
    )
    east, west, sea = nodes
    try:
        wait_peers(nodes)
        image = build_image([1 << 20, 1000], seed="rtt-1")
        east.registry().push(REPO, "v1", image)
        wait_until(lambda: sea.has_all(content_digests(image)), "southeastasia has the image")
        links["eastus"].set(latency=0.2)

        def rtt(region: str) -> float:
            return west.metrics().get(
                f'meridian_replication_peer_rtt_seconds{{region="{region}"}}', 0
            )

        wait_until(
            lambda: rtt("eastus") > 4 * rtt("southeastasia") > 0,
            "westeurope measures eastus as farther than southeastasia",
            60,
        )
        pull(west, image, "v1")
        m = west.metrics()
        assert m.get('meridian_replication_bytes_copied_total{source="southeastasia"}', 0) > 0
        assert m.get('meridian_replication_bytes_copied_total{source="eastus"}', 0) == 0
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()
