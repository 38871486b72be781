"""A node with ``--storage azure`` against Azurite (tests/azurite.py).

Pushes (monolithic and chunked), pulls with the redirect on (the node
answers 307 to a short-lived SAS URL; the test follows it to Azurite, with
and without a Range) and off (the node streams, Range included), deletes, a
chunked upload resumed on a restarted node after a SIGKILL landed mid-PATCH,
and real clients (skopeo, containerd's ctr) that follow the redirect. Blob
bytes are checked by digest everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from node.storage.azure import AzureBlobStore
from tests import images as im
from tests import oci
from tests.azurite import Azurite, azurite  # noqa: F401 - the fixture
from tests.containerd import Containerd
from tests.procs import OWNER_CREDS, NodeProcess, skopeo

pytestmark = pytest.mark.timeout(240)

MiB = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class AzureNode(NodeProcess):
    """A node storing its blobs in a container of its own on Azurite."""

    def __init__(self, data: Path, emulator: Azurite, *extra: str) -> None:
        self.emulator = emulator
        self.container = emulator.new_container()
        super().__init__(
            data,
            extra=[
                "--storage", "azure",
                "--azure-connection-string", emulator.connection_string,
                "--azure-container", self.container,
                *extra,
            ],
        )  # fmt: skip

    def store(self) -> AzureBlobStore:
        """A store of its own on the node's container (to look inside)."""
        return AzureBlobStore.from_connection_string(
            self.emulator.connection_string, self.container
        )


@pytest.fixture
def redirecting(tmp_path: Path, azurite: Azurite) -> Iterator[AzureNode]:  # noqa: F811
    n = AzureNode(tmp_path / "data", azurite, "--access-log").start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
def streaming(tmp_path: Path, azurite: Azurite) -> Iterator[AzureNode]:  # noqa: F811
    n = AzureNode(tmp_path / "data", azurite, "--no-storage-redirect").start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
async def plain() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with no registry credentials, as one following a redirect."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def chunked_push(c: oci.Client, repo: str, parts: list[bytes]) -> str:
    """POST, one PATCH per part (with Content-Range), PUT ?digest=."""
    r = await c.start_upload(repo)
    loc, off = r.location, 0
    for p in parts:
        r = await c.patch(
            loc,
            data=p,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{off}-{off + len(p) - 1}",
            },
        )
        assert r.status == 202, r
        off += len(p)
        assert r.headers["Range"] == f"0-{off - 1}"
        loc = r.location
    d = sha(b"".join(parts))
    r = await c.put(loc, params={"digest": d})
    assert r.status == 201, r
    return d


async def push_image(c: oci.Client, repo: str) -> tuple[oci.Manifest, bytes, bytes]:
    mono = os.urandom(3 * MiB + 12345)
    chunked = [os.urandom(2 * MiB + 1), os.urandom(5 * MiB + 7), os.urandom(999)]
    assert await c.push_blob(repo, mono) == sha(mono)
    assert await chunked_push(c, repo, chunked) == sha(b"".join(chunked))
    m = oci.image([mono, b"".join(chunked)])
    await c.push_blob(repo, m.blobs[0])  # the config
    r = await c.put_manifest(repo, "v1", m.body, m.media_type)
    assert r.status == 201, r
    return m, mono, b"".join(chunked)


async def stored(node: AzureNode) -> tuple[dict[str, int], list[str]]:
    """(blobs in the node's container, staged names) as the driver lists them."""
    store = node.store()
    try:
        blobs = {i.name: i.size async for i in store.list_blobs()}
        staged = [i.name async for i in store.list_staged("")]
    finally:
        await store.close()
    return blobs, staged


async def test_push_and_pull_through_redirects(
    redirecting: AzureNode, plain: aiohttp.ClientSession
) -> None:
    node = redirecting
    repo = "azure/app"
    async with oci.Client.connect(node.url) as c:
        m, mono, chunked = await push_image(c, repo)
        blobs, staged = await stored(node)
        for data in (mono, chunked):
            assert blobs[sha(data)] == len(data)
        assert staged == []  # committed uploads leave nothing staged

        for data in (mono, chunked):
            d = sha(data)
            r = await c.get(f"/v2/{repo}/blobs/{d}")
            assert r.status == 307, r
            assert r.headers["Docker-Content-Digest"] == d
            assert r.headers["Cache-Control"] == "no-store"
            url = r.headers["Location"]
            assert url.startswith(node.emulator.blob_endpoint + "/" + node.container + "/")
            assert "sig=" in url and "sp=r" in url  # a read-only signature
            async with plain.get(url) as got:
                assert got.status == 200
                assert sha(await got.read()) == d
            # A ranged GET is redirected too (without Content-Range); the
            # client sends its Range to storage.
            r = await c.get(f"/v2/{repo}/blobs/{d}", headers={"Range": "bytes=100-1123"})
            assert r.status == 307 and "Content-Range" not in r.headers, r
            async with plain.get(r.headers["Location"], headers={"Range": "bytes=100-1123"}) as got:
                assert got.status == 206
                assert got.headers["Content-Range"] == f"bytes 100-1123/{len(data)}"
                assert await got.read() == data[100:1124]
            # HEAD is the node's own answer.
            r = await c.head(f"/v2/{repo}/blobs/{d}")
            assert r.status == 200 and r.headers["Content-Length"] == str(len(data)), r

        # The SAS is scoped to its blob and read-only.
        url = (await c.get(f"/v2/{repo}/blobs/{sha(mono)}")).headers["Location"]
        other = url.replace(sha(mono).split(":")[1], sha(chunked).split(":")[1])
        async with plain.get(other) as got:
            assert got.status == 403
        async with plain.put(url, data=b"x", headers={"x-ms-blob-type": "BlockBlob"}) as got:
            assert got.status == 403
        async with plain.delete(url) as got:
            assert got.status == 403

        # Manifests are served by the node.
        r = await c.get(f"/v2/{repo}/manifests/v1", headers={"Accept": m.media_type})
        assert r.status == 200 and r.body == m.body

        # Delete: the repository no longer serves the blob.
        r = await c.delete(f"/v2/{repo}/blobs/{sha(mono)}")
        assert r.status == 202, r
        r = await c.get(f"/v2/{repo}/blobs/{sha(mono)}")
        assert r.status == 404 and r.codes() == ["BLOB_UNKNOWN"], r
    redirects = [
        rec
        for line in node.logs().splitlines()
        if line.startswith("{")
        and (rec := json.loads(line)).get("msg") == "request"
        and rec.get("status") == 307
    ]
    assert redirects and all("/blobs/sha256:" in rec["path"] for rec in redirects)


async def test_streams_when_redirects_are_off(streaming: AzureNode) -> None:
    node = streaming
    repo = "azure/streamed"
    async with oci.Client.connect(node.url) as c:
        _, mono, chunked = await push_image(c, repo)
        for data in (mono, chunked):
            d = sha(data)
            r = await c.get(f"/v2/{repo}/blobs/{d}")
            assert r.status == 200, r
            assert r.body == data and r.headers["Docker-Content-Digest"] == d
            for spec, start, end in [
                ("bytes=0-0", 0, 0),
                (f"bytes={MiB - 5}-{4 * MiB + 5}", MiB - 5, min(4 * MiB + 5, len(data) - 1)),
                ("bytes=-10", len(data) - 10, len(data) - 1),
                (f"bytes={len(data) - 3}-", len(data) - 3, len(data) - 1),
            ]:
                r = await c.get(f"/v2/{repo}/blobs/{d}", headers={"Range": spec})
                assert r.status == 206, (spec, r)
                assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
                assert r.body == data[start : end + 1], spec
            r = await c.get(f"/v2/{repo}/blobs/{d}", headers={"Range": f"bytes={len(data)}-"})
            assert r.status == 416, r
            assert r.headers["Content-Range"] == f"bytes */{len(data)}"
        r = await c.delete(f"/v2/{repo}/blobs/{sha(chunked)}")
        assert r.status == 202, r
        assert (await c.get(f"/v2/{repo}/blobs/{sha(chunked)}")).status == 404


async def test_sigkill_mid_chunked_upload_resumes_on_a_restarted_node(
    tmp_path: Path,
    azurite: Azurite,  # noqa: F811
    plain: aiohttp.ClientSession,
) -> None:
    node = AzureNode(tmp_path / "data", azurite).start()
    try:
        data = os.urandom(12 * MiB + 321)
        d = sha(data)
        repo = "azure/resumed"
        look = node.store()
        try:
            async with oci.Client.connect(node.url) as c:
                r = await c.start_upload(repo)
                loc = r.location
                upload_id = r.headers["Docker-Upload-UUID"]
                name = f"uploads/{upload_id}/data"
                killed = asyncio.Event()

                async def staged_size() -> int:
                    return {i.name: i.size async for i in look.list_staged("uploads/")}.get(name, 0)

                async def body() -> AsyncIterator[bytes]:
                    # Half the blob, then wait until some of it is staged
                    # in Azure while this PATCH is still open, then SIGKILL.
                    for off in range(0, 6 * MiB, MiB):
                        yield data[off : off + MiB]
                    while await staged_size() == 0:  # noqa: ASYNC110 - polls Azurite
                        await asyncio.sleep(0.05)
                    node.kill()
                    killed.set()
                    yield data[6 * MiB : 7 * MiB]

                with pytest.raises(aiohttp.ClientError):
                    await c.session.patch(c.url(loc), data=body())
                assert killed.is_set()

            node.start()  # the same data dir (the session) and container (the bytes)
            async with oci.Client.connect(node.url) as c:
                r = await c.get(loc)
                assert r.status == 204, r
                first, last = r.headers["Range"].split("-")
                offset = int(last) + 1
                assert first == "0" and 0 < offset <= 6 * MiB
                assert offset == await staged_size()
                r = await c.patch(
                    loc,
                    data=data[offset:],
                    headers={"Content-Range": f"{offset}-{len(data) - 1}"},
                )
                assert r.status == 202, r
                r = await c.put(r.location, params={"digest": d})
                assert r.status == 201, r
                r = await c.get(f"/v2/{repo}/blobs/{d}")
                assert r.status == 307, r
                async with plain.get(r.headers["Location"]) as got:
                    assert sha(await got.read()) == d
            assert [i async for i in look.list_staged("uploads/")] == []
        finally:
            await look.close()
    finally:
        node.stop()


# -- real clients follow the redirect ------------------------------------------------


def blob_gets(node: NodeProcess) -> dict[int, int]:
    """Blob GETs the node answered, by status (from its access log)."""
    out: dict[int, int] = {}
    for line in node.logs().splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if (
            rec.get("msg") == "request"
            and rec.get("method") == "GET"
            and "/blobs/sha" in rec.get("path", "")
        ):
            out[rec["status"]] = out.get(rec["status"], 0) + 1
    return out


def test_skopeo_round_trip(redirecting: AzureNode, tmp_path: Path) -> None:
    node = redirecting
    img = im.build_image([2_500_000, 300_000, 70_000], seed="azure-skopeo")
    src = im.write_layout(tmp_path / "src", {"v1": img})
    ref = f"docker://{node.hostport}/azure/skopeo:v1"
    out = tmp_path / "out"
    for args in (
        ["--dest-tls-verify=false", f"oci:{src}:v1", ref],
        ["--src-tls-verify=false", ref, f"oci:{out}:v1"],
    ):
        r = skopeo("--insecure-policy", "copy", "-q", *args, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    lay = im.read_layout(out)
    assert lay.ref("v1").digest == img.digest
    assert lay.blob(img.config.digest) == img.config.data
    for layer in img.layers:
        assert lay.blob(layer.digest) == layer.data
    im.verify_layout(out)
    gets = blob_gets(node)
    assert gets.get(307, 0) >= len(img.layers) + 1 and set(gets) == {307}, gets


def test_containerd_pull(redirecting: AzureNode, tmp_path: Path) -> None:
    node = redirecting
    img = im.build_image([600_000, 64_000], seed="azure-ctr")
    reg = im.Registry(node.url)
    assert reg.push("azure/ctr", "v1", img) == img.digest
    with Containerd(tmp_path / "containerd") as ctrd:
        ref = f"{node.hostport}/azure/ctr:v1"
        ctrd.pull(ref, "--user", OWNER_CREDS)
        assert ctrd.images()[ref] == (im.OCI_MANIFEST, img.digest)
        for b in img.all_blobs():
            assert ctrd.content_bytes(b.digest) == b.data
    gets = blob_gets(node)
    assert gets.get(307, 0) >= len(img.layers) + 1 and set(gets) == {307}, gets
