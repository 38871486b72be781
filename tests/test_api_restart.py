"""Durability across restarts of a node process: content, tags, deletes,
referrers, and the offset of an upload in progress (resumed after restart)."""

from __future__ import annotations

import pytest

from tests import oci
from tests.oci import Client, assert_error, blob_path, manifest_path
from tests.procs import NodeProcess

MODES = ["clean", "kill"]  # SIGTERM then start, or SIGKILL then start


def _restart(node: NodeProcess, mode: str) -> None:
    if mode == "clean":
        node.stop()
        node.start()
    else:
        node.restart()  # SIGKILL


@pytest.mark.parametrize("mode", MODES)
async def test_content_survives_restart(node: NodeProcess, mode: str) -> None:
    repo, other = "team/app/api", "team/other"
    img = oci.image(2, annotations={"a": "b"}, indent=2)
    lst = oci.index([oci.image(1, media_type=oci.DOCKER_MANIFEST)], media_type=oci.DOCKER_LIST)
    sbom = oci.artifact(img, annotations={"kind": "sbom"})
    gone = oci.image(1)
    b512 = oci.blob_bytes(777)
    async with Client.connect(node.url) as api:
        await api.push(repo, img, "v1")
        await api.put_manifest(repo, "v2", img.body, img.media_type)
        await api.put_manifest(repo, "old", img.body, img.media_type)
        await api.push(repo, lst, "list")
        await api.push(repo, sbom)
        await api.push(other, gone, "gone")
        d512 = await api.push_blob(repo, b512, "sha512")
        d_empty = await api.push_blob(repo, b"")
        d_deleted = await api.push_blob(repo, oci.blob_bytes(10))
        assert (await api.delete(manifest_path(repo, "old"))).status == 202
        assert (await api.delete(manifest_path(other, gone.digest))).status == 202
        assert (await api.delete(blob_path(repo, d_deleted))).status == 202

    _restart(node, mode)

    async with Client.connect(node.url) as api:
        for ref in ("v1", "v2", img.digest):
            r = await api.get(manifest_path(repo, ref))
            assert r.status == 200 and r.body == img.body, r
            assert r.headers["Content-Type"] == img.media_type
            assert r.headers["Docker-Content-Digest"] == img.digest
        r = await api.head(manifest_path(repo, "list"))
        assert r.status == 200 and r.headers["Content-Type"] == oci.DOCKER_LIST, r
        assert int(r.headers["Content-Length"]) == len(lst.body)
        assert (await api.get(manifest_path(repo, "list"))).body == lst.body
        for child in lst.children:
            assert (await api.get(manifest_path(repo, child.digest))).body == child.body
        for b in img.blobs:
            r = await api.get(blob_path(repo, oci.digest(b)))
            assert r.status == 200 and r.body == b, r
        r = await api.get(blob_path(repo, d512))
        assert r.status == 200 and r.body == b512, r
        r = await api.get(blob_path(repo, d_empty))
        assert r.status == 200 and r.body == b"", r
        r = await api.get(f"/v2/{repo}/tags/list")
        assert r.json() == {"name": repo, "tags": ["list", "v1", "v2"]}, r
        r = await api.get(f"/v2/{repo}/referrers/{img.digest}")
        assert [d["digest"] for d in r.json()["manifests"]] == [sbom.digest], r
        assert r.json()["manifests"][0]["annotations"] == {"kind": "sbom"}
        assert repo in (await api.get("/v2/_catalog")).json()["repositories"]
        # What was deleted stays deleted.
        assert_error(await api.get(manifest_path(repo, "old")), 404, "MANIFEST_UNKNOWN")
        r = await api.get(manifest_path(other, gone.digest))
        assert_error(r, 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN")
        assert_error(await api.get(blob_path(repo, d_deleted)), 404, "BLOB_UNKNOWN")
        # And the node keeps accepting pushes.
        new = oci.image(1)
        await api.push(repo, new, "v3")
        assert (await api.get(manifest_path(repo, "v3"))).body == new.body


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ["sha256", "sha512"])
async def test_upload_resumes_after_restart(node: NodeProcess, mode: str, alg: str) -> None:
    repo = "resume/app"
    data = oci.blob_bytes(300_000)
    async with Client.connect(node.url) as api:
        start = await api.start_upload(repo)
        upload_id = start.headers["Docker-Upload-UUID"]
        loc = start.location
        for lo, hi in ((0, 100_000), (100_000, 120_001)):
            r = await api.patch(
                loc,
                data=data[lo:hi],
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{lo}-{hi - 1}",
                },
            )
            assert r.status == 202, r
            loc = r.location
        assert r.headers["Range"] == "0-120000"

    _restart(node, mode)

    async with Client.connect(node.url) as api:
        r = await api.get(loc)
        assert r.status == 204, r
        assert r.headers["Range"] == "0-120000", r
        assert r.headers["Docker-Upload-UUID"] == upload_id
        loc = r.location
        # A chunk that does not continue from the offset is still refused.
        r = await api.patch(
            loc,
            data=data[100_000:120_001],
            headers={"Content-Type": "application/octet-stream", "Content-Range": "100000-120000"},
        )
        assert_error(r, 416, "RANGE_INVALID", "BLOB_UPLOAD_INVALID")
        offset = 120_001
        r = await api.patch(
            loc,
            data=data[offset:],
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{len(data) - 1}",
            },
        )
        assert r.status == 202, r
        assert r.headers["Range"] == f"0-{len(data) - 1}"
        d = oci.digest(data, alg)
        # A wrong digest is refused (the offset-rebuilt hash is checked) ...
        r = await api.put(r.location, params={"digest": oci.digest(data + b"x", alg)})
        assert_error(r, 400, "DIGEST_INVALID")
        # ... and the right one completes the blob.
        r = await api.put(loc, params={"digest": d})
        assert r.status == 201, r
        assert r.headers["Docker-Content-Digest"] == d
        g = await api.get(blob_path(repo, d))
        assert g.status == 200 and g.body == data, g
        assert_error(await api.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_survives_two_restarts(node: NodeProcess) -> None:
    repo = "resume/twice"
    data = oci.blob_bytes(9000)
    async with Client.connect(node.url) as api:
        loc = (await api.start_upload(repo)).location
    for i in range(3):
        async with Client.connect(node.url) as api:
            r = await api.get(loc)
            assert r.status == 204, r
            assert r.headers["Range"] == ("0-0" if i == 0 else f"0-{i * 3000 - 1}"), r
            r = await api.patch(
                loc,
                data=data[i * 3000 : (i + 1) * 3000],
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{i * 3000}-{(i + 1) * 3000 - 1}",
                },
            )
            assert r.status == 202, r
        _restart(node, "clean")
    async with Client.connect(node.url) as api:
        r = await api.put(loc, params={"digest": oci.digest(data)})
        assert r.status == 201, r
        assert (await api.get(blob_path(repo, oci.digest(data)))).body == data


async def test_cancelled_and_finished_uploads_stay_gone(node: NodeProcess) -> None:
    repo = "resume/gone"
    async with Client.connect(node.url) as api:
        cancelled = (await api.start_upload(repo)).location
        await api.patch(cancelled, data=b"abc")
        assert (await api.delete(cancelled)).status == 204
        finished = (await api.start_upload(repo)).location
        assert (
            await api.put(finished, params={"digest": oci.digest(b"z")}, data=b"z")
        ).status == 201
    _restart(node, "clean")
    async with Client.connect(node.url) as api:
        assert_error(await api.get(cancelled), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(await api.get(finished), 404, "BLOB_UPLOAD_UNKNOWN")
        assert (await api.get(blob_path(repo, oci.digest(b"z")))).body == b"z"
