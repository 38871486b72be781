"""Garbage collection on a standalone node (issue 10 item 5): with
``--reclaim-interval`` a node without etcd or gRPC frees the bytes of a
deleted image (the layers' upload-time links included) and keeps the rest."""

from __future__ import annotations

from pathlib import Path

from tests.images import Registry, build_image
from tests.procs import NodeProcess
from tests.test_replication import content_digests, wait_until

REPO = "gc/app"


def _stored(data: Path, digest: str) -> bool:
    alg, _, hexpart = digest.partition(":")
    return (data / "blobs" / alg / hexpart[:2] / hexpart).exists()


def test_standalone_node_reclaims_a_deleted_image(tmp_path: Path) -> None:
    data = tmp_path / "data"
    node = NodeProcess(data, extra=["--reclaim-interval", "0.5", "--reclaim-grace", "1"]).start()
    try:
        kept = build_image([40_000], seed="standalone-kept")
        gone = build_image([60_000, 2000], seed="standalone-gone")
        reg = Registry(node.url)
        reg.push(REPO, "kept", kept)
        reg.push(REPO, "gone", gone)
        assert all(_stored(data, d) for d in content_digests(gone))
        status, _, _ = reg.request("DELETE", f"/v2/{REPO}/manifests/{gone.digest}")
        assert status == 202
        wait_until(
            lambda: not any(_stored(data, d) for d in content_digests(gone)),
            "the standalone node frees the deleted image's bytes",
            60,
        )
        for b in gone.blobs():
            status, _, _ = reg.request("GET", f"/v2/{REPO}/blobs/{b.digest}")
            assert status == 404, b.digest
        assert all(_stored(data, d) for d in content_digests(kept))
        status, _, body = reg.request("GET", f"/v2/{REPO}/manifests/kept")
        assert status == 200 and body == kept.manifest
        for b in kept.blobs():
            status, _, body = reg.request("GET", f"/v2/{REPO}/blobs/{b.digest}")
            assert status == 200 and body == b.data
        # A restart keeps what is referenced and does not bring back the rest.
        node.stop()
        node.start()
        status, _, body = Registry(node.url).request("GET", f"/v2/{REPO}/manifests/kept")
        assert status == 200 and body == kept.manifest
        assert not any(_stored(data, d) for d in content_digests(gone))
    finally:
        node.stop()
