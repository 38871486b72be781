"""A node whose data dir fills up (ENOSPC), on a real 16 MiB tmpfs.

- a push that meets the full disk gets the OCI JSON error ``507
  STORAGE_FULL``; a PATCH that does rolls its bytes back (the session's
  offset is the one before it);
- deletes still work (the embedded namespace writes into the space the node
  held in reserve and released when the disk filled);
- pulls keep working, also after the node is killed and restarted on the
  full disk.

Needs root (``mount -t tmpfs``, the ``small_fs`` fixture of tests/conftest.py);
fails, never skips, without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import oci
from tests.oci import Client, assert_error, blob_path, manifest_path
from tests.procs import NodeProcess

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20


async def test_full_disk(small_fs: Path) -> None:
    # The data dir is the mount point; the node's log lives beside it, off the tmpfs.
    node = NodeProcess(small_fs, extra=["--storage-reserve", "2M"]).start()
    try:
        repo = "full/disk"
        keep = oci.image([os.urandom(300_000), os.urandom(1000)])
        gone = oci.image([os.urandom(200_000)])
        async with Client.connect(node.url) as api:
            await api.push(repo, keep, "keep")
            await api.push(repo, gone, "gone")
            session = (await api.start_upload(repo)).location
            first = os.urandom(100_000)
            r = await api.patch(session, data=first, headers={"Content-Range": "0-99999"})
            assert r.status == 202, r
            session = r.location

            for _ in range(40):  # 16 MiB fill up long before 40 MiB
                data = os.urandom(MIB)
                r = await api.post(
                    f"/v2/{repo}/blobs/uploads/", params={"digest": oci.digest(data)}, data=data
                )
                if r.status != 201:
                    break
            assert_error(r, 507, "STORAGE_FULL")
            assert "full" in r.json()["errors"][0]["message"]
            # Smaller and smaller pushes, to the last free page if they were let in.
            for size in (256 << 10, 64 << 10, 16 << 10, 4 << 10, 512):
                for _ in range(200):
                    data = os.urandom(size)
                    r = await api.post(
                        f"/v2/{repo}/blobs/uploads/",
                        params={"digest": oci.digest(data)},
                        data=data,
                    )
                    if r.status != 201:
                        assert_error(r, 507, "STORAGE_FULL")
                        break

            rng = f"100000-{100000 + 3 * MIB - 1}"
            r = await api.patch(session, data=os.urandom(3 * MIB), headers={"Content-Range": rng})
            assert_error(r, 507, "STORAGE_FULL")
            r = await api.get(session)
            assert r.status == 204 and r.headers["Range"] == "0-99999", r  # rolled back

            # Deletes work on the full disk.
            assert (await api.delete(manifest_path(repo, "gone"))).status == 202
            assert (await api.delete(manifest_path(repo, gone.digest))).status == 202
            assert (await api.delete(blob_path(repo, oci.digest(gone.blobs[1])))).status == 202
            assert_error(await api.get(manifest_path(repo, "gone")), 404)
            await _pull(api, repo, keep)

        node.restart()  # SIGKILL, then start again on the full disk
        async with Client.connect(node.url) as api:
            await _pull(api, repo, keep)
            assert_error(await api.get(manifest_path(repo, "gone")), 404)
            data = os.urandom(MIB)
            r = await api.post(
                f"/v2/{repo}/blobs/uploads/", params={"digest": oci.digest(data)}, data=data
            )
            assert_error(r, 507, "STORAGE_FULL")
    finally:
        node.stop()


async def _pull(api: Client, repo: str, m: oci.Manifest) -> None:
    r = await api.get(manifest_path(repo, "keep"))
    assert r.status == 200 and r.body == m.body, r
    for b in m.blobs:
        r = await api.get(blob_path(repo, oci.digest(b)))
        assert r.status == 200 and r.body == b, r
