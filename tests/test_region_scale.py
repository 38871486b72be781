"""A region of many nodes over shared object storage (issue 15).

- Claims (``node.replication.claims``) on a real KV store: one node holds an
  item, the others are refused until it releases it or its lease goes; a
  node restarted with the same id takes its own claims back; the reclaim
  leader moves to another node when its holder goes; on etcd, a node that
  dies (keep-alives stop) keeps both until its lease lapses, then another
  node takes them.
- Upload sessions kept in the Azure store: a session begun through one
  node's upload manager is continued, finished and cancelled through
  another's (different data dirs, one container on Azurite).
- ``meridian up --nodes-per-region 3 --storage azurite`` (two regions of
  three nodes, Azurite, the WAN emulator, the router), with auth on: an
  upload started on one eastus node is continued and finished on the
  others; pushes through the router land in eastus while one of its nodes
  is SIGKILLed; images pushed in westeurope replicate into eastus while
  another eastus node (one that is copying) is SIGKILLed. Afterwards every
  acknowledged push is whole in the region's container and pullable
  through the router (no error, every digest checked), no item was copied
  into a region twice (each node logs every copy it commits, and the logs
  of killed nodes stay), and skopeo and containerd's ctr pull through the
  router, follow the redirects to Azurite and verify every digest (skopeo
  copies every acknowledged image).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cluster.embedded import EmbeddedKV
from cluster.etcd import EtcdKV
from localcluster.azurite import KEY
from node.replication.claims import Claims, Leader, claim_key
from node.storage.azure import AzureBlobStore
from node.uploads import UploadManager
from tests import images as im
from tests.azurite import Azurite, azurite  # noqa: F401 - the fixture
from tests.containerd import Containerd
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.procs import OWNER_CREDS, free_port, skopeo
from tests.test_region_shared_dir import session_back_and_forth
from tests.test_replication import content_digests, scrape, wait_until
from tests.test_up import Up, meridian, token

pytestmark = pytest.mark.timeout(900)

REPO = "scale/app"
etcd = etcd_fixture()
TOPOLOGY = """
[[region]]
name = "eastus"
rtt_ms = 2

[[region]]
name = "westeurope"
rtt_ms = 60

[[link]]
regions = ["eastus", "westeurope"]
rtt_ms = 40
bandwidth = "4M"
"""


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- claims --------------------------------------------------------------------


async def test_claims_one_holder_taken_over_when_it_goes(tmp_path: Path) -> None:
    kv = EmbeddedKV(str(tmp_path / "ns.sqlite"))
    await kv.start()
    try:
        a, b = Claims(kv, "a"), Claims(kv, "b")
        key = claim_key("eastus", "default", "sha256:" + "ab" * 32)
        assert await a.claim(key) is True
        assert await b.claim(key) is False
        assert await a.claim(key) is True  # already ours
        await a.release(key)
        assert await kv.get(key) is None
        assert await b.claim(key) is True
        assert await a.claim(key) is False
        await b.close()  # its lease goes (as when it dies): its claims with it
        assert await kv.get(key) is None
        assert await a.claim(key) is True
        # A restarted process of node a (a new lease) takes a's claim back;
        # the old process's release no longer deletes it.
        a2 = Claims(kv, "a")
        assert await a2.claim(key) is True
        await a.release(key)
        assert (await kv.get(key)) is not None
        assert await Claims(kv, "c").claim(key) is False

        # The reclaim leader: one node at a time, the next when it goes.
        la, lc = Leader(a2, "eastus", "reclaim"), Leader(Claims(kv, "c"), "eastus", "reclaim")
        assert await la.acquire() is True
        assert await lc.acquire() is False
        assert await la.acquire() is True
        await a2.close()
        assert await lc.acquire() is True
        await a.close()
    finally:
        await kv.close()


async def test_a_dead_nodes_claims_and_leadership_lapse_on_etcd(etcd: EtcdServer) -> None:
    """A node that dies (its client gone without revoking: keep-alives
    stop) holds its claim and the reclaim lead until its lease lapses; then
    another node takes both."""
    kv_a, kv_b = EtcdKV(etcd.endpoints, timeout=5.0), EtcdKV(etcd.endpoints, timeout=5.0)
    await kv_a.start()
    await kv_b.start()
    try:
        a, b = Claims(kv_a, "a", ttl=2), Claims(kv_b, "b", ttl=2)
        key = claim_key("eastus", "default", "sha256:" + "cd" * 32)
        la, lb = Leader(a, "eastus", "reclaim"), Leader(b, "eastus", "reclaim")
        assert await a.claim(key) and await la.acquire()
        await kv_a.close()  # a dies
        assert await b.claim(key) is False and await lb.acquire() is False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not await b.claim(key):
            assert loop.time() < deadline, "a dead node's claim never lapsed"
            await asyncio.sleep(0.2)
        assert await lb.acquire() is True
        await b.close()
    finally:
        await kv_a.close()
        await kv_b.close()


# -- upload sessions on Azure ---------------------------------------------------


async def test_an_upload_session_on_azure_continues_on_another_node(
    tmp_path: Path,
    azurite: Azurite,  # noqa: F811
) -> None:
    container = azurite.new_container()
    stores = [AzureBlobStore.from_connection_string(azurite.connection_string, container)]
    stores.append(AzureBlobStore.from_connection_string(azurite.connection_string, container))
    for s in stores:
        await s.start()
    try:
        # Different data dirs: nothing of the session is on a node's disk.
        a = UploadManager(str(tmp_path / "a"), stores[0])
        b = UploadManager(str(tmp_path / "b"), stores[1])

        await session_back_and_forth(a, b, stores[0])
        left = [i.name async for i in stores[0].list_staged("uploads/")]
        assert left == []
        # An abandoned session started on a is purged by b.

        async def body(data: bytes):
            yield data

        old = await a.create("default", "team/app")
        await a.append(old, body(b"abandoned"), None)
        assert await b.purge_older_than(3600) == 0
        assert await b.purge_older_than(-1) == 1
        with pytest.raises(Exception, match="BLOB_UPLOAD_UNKNOWN|upload unknown"):
            await a.get(old.id, "default", "team/app")
        assert [i.name async for i in stores[0].list_staged("uploads/")] == []
    finally:
        for s in stores:
            await s.close()


# -- a region of three nodes behind the router -----------------------------------


class Scale:
    """What the test reads of a running ``meridian up``."""

    def __init__(self, up: Up) -> None:
        self.up = up
        self.state = up.state()
        self.killed: set[str] = set()

    def nodes(self, region: str) -> list[dict[str, Any]]:
        return self.state["regions"][region]["nodes"]

    def node(self, node_id: str) -> dict[str, Any]:
        region = node_id.rsplit("-", 1)[0]
        return next(n for n in self.nodes(region) if n["id"] == node_id)

    def kill(self, node_id: str) -> None:
        os.kill(self.node(node_id)["pid"], signal.SIGKILL)
        self.killed.add(node_id)

    def live(self, region: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes(region) if n["id"] not in self.killed]

    def logs(self, region: str) -> str:
        out = []
        for name, child in self.state["children"].items():
            if name == f"region {region}" or name.startswith(f"region {region} node "):
                out.append(Path(child["log"]).read_text(errors="replace"))
        return "\n".join(out)

    def copies(self, region: str) -> Counter[str]:
        """How many times each digest was committed into ``region`` after a
        transfer, by any of its nodes (their logs outlive a SIGKILL)."""
        return Counter(re.findall(r'"msg": "fetched (sha256:[0-9a-f]{64}) ', self.logs(region)))

    def store(self, region: str) -> AzureBlobStore:
        conn = (
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};"
            f"BlobEndpoint={self.state['azurite']};"
        )
        return AzureBlobStore.from_connection_string(conn, f"meridian-{region}")

    def held(self, region: str, digests: list[str]) -> set[str]:
        """Which of ``digests`` the region's container holds (whole)."""

        async def look() -> set[str]:
            store = self.store(region)
            try:
                return {d for d in digests if await store.stat(d) is not None}
            finally:
                await store.close()

        return asyncio.run(look())

    def placed(self, region: str, digests: list[str]) -> set[str]:
        """Which of ``digests`` the namespace places in ``region``."""

        async def read() -> set[str]:
            kv = EtcdKV([self.state["etcd"]], timeout=5.0)
            await kv.start()
            try:
                entries, _ = await kv.range("/meridian/reg/default/place/")
            finally:
                await kv.close()
            out = set()
            for e in entries:
                digest, _, where = e.key[len("/meridian/reg/default/place/") :].partition("/")
                if where == region and digest in digests:
                    out.add(digest)
            return out

        return asyncio.run(read())


def push_with_retries(reg: im.Registry, tag: str, img: im.Image, attempts: int = 6) -> bool:
    """A client pushing ``img``: retried (bounded) when a node dies under it."""
    for i in range(attempts):
        try:
            return reg.push(REPO, tag, img) == img.digest
        except Exception:  # a node killed mid-push: the client tries again
            time.sleep(0.5 * (i + 1))
    return False


def pull_all(reg: im.Registry, images: dict[str, im.Image]) -> None:
    """Pull like a client through the router; every answer must be right."""
    for tag, img in images.items():
        body, _, digest = reg.get_manifest(REPO, tag)
        assert digest == img.digest and body == img.manifest, tag
        for b in img.all_blobs():
            assert sha(reg.get_blob(REPO, b.digest)) == b.digest, (tag, b.digest)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def redirect_chain(router: str, digest: str, token: str) -> list[str]:
    """The Locations a blob GET through the router is sent to."""
    opener = urllib.request.build_opener(_NoRedirect)
    url, chain = f"{router}/v2/{REPO}/blobs/{digest}", []
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(4):
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=30) as r:
                assert sha(r.read()) == digest
                return chain
        except urllib.error.HTTPError as e:
            assert e.code == 307, e.code
            url = e.headers["Location"]
            chain.append(url)
            headers = {}  # a client drops Authorization on a cross-host redirect
    raise AssertionError(f"too many redirects: {chain}")


def test_a_region_of_three_nodes_on_azurite(tmp_path: Path) -> None:
    config = tmp_path / "topology.toml"
    config.write_text(TOPOLOGY)
    up = Up(
        tmp_path / "up",
        config,
        free_port(),
        "--nodes-per-region", "3",
        "--storage", "azurite",
    )  # fmt: skip
    try:
        up.wait_ready()
        sc = Scale(up)
        out = up.output
        assert "2 regions of 3 nodes each" in out and "blobs on azurite" in out
        assert [n["id"] for n in sc.nodes("eastus")] == ["eastus-1", "eastus-2", "eastus-3"]
        for n in sc.nodes("eastus") + sc.nodes("westeurope"):
            assert f"region {n['id'].rsplit('-', 1)[0]} {n['id']}" in out
            assert n["advertised"] in out
        # The account key reaches the nodes by environment only.
        for name, child in sc.state["children"].items():
            assert KEY not in " ".join(child["cmd"]), name
        assert KEY not in (tmp_path / "up" / "up.json").read_text()

        def nodes_up(st: dict) -> dict[str, int]:
            return {
                r["region"]: sum(1 for n in r.get("nodes", []) if n["up"]) for r in st["regions"]
            }

        up.wait(
            lambda: nodes_up(up.router_status()) == {"eastus": 3, "westeurope": 3},
            "every node in the router's rotation",
        )
        up.wait(lambda: "(3/3 nodes)" in up.output, "the status line counts each region's nodes")
        router = im.Registry(up.router)

        # An upload begun on eastus-1, continued on eastus-2, finished on
        # eastus-3: one session in the region's container.
        data = os.urandom(300_000)
        regs = [im.Registry(n["node"]) for n in sc.nodes("eastus")]
        status, hdrs, body = regs[0].request("POST", f"/v2/{REPO}/blobs/uploads/")
        assert status == 202, body
        loc = hdrs["Location"]
        for i, (lo, hi) in enumerate(((0, 100_000), (100_000, 200_000), (200_000, 300_000))):
            status, hdrs, body = regs[i].request(
                "PATCH",
                loc,
                data[lo:hi],
                {"Content-Type": "application/octet-stream", "Content-Range": f"{lo}-{hi - 1}"},
            )
            assert status == 202, (i, status, body)
            assert hdrs["Range"] == f"0-{hi - 1}"
            loc = hdrs["Location"]
        sep = "&" if "?" in loc else "?"
        status, _, body = regs[2].request("PUT", f"{loc}{sep}digest={sha(data)}")
        assert status == 201, body
        assert sha(router.get_blob(REPO, sha(data))) == sha(data)

        # Pushes through the router while eastus-2 is SIGKILLed.
        pushed = {f"p{i}": im.build_image([600_000, 90_000], seed=f"scale-{i}") for i in range(8)}
        acked: dict[str, im.Image] = {}
        failed: list[str] = []

        def pusher() -> None:
            for tag, img in pushed.items():
                if push_with_retries(router, tag, img):
                    acked[tag] = img
                else:
                    failed.append(tag)

        t = threading.Thread(target=pusher, daemon=True)
        t.start()
        wait_until(lambda: len(acked) >= 2, "two pushes acknowledged", 120)
        sc.kill("eastus-2")
        t.join(300)
        assert not t.is_alive(), "the pushes never ended"
        assert not failed, f"pushes that failed on every retry: {failed}"
        router_digests = sorted({d for img in acked.values() for d in content_digests(img)})
        assert sc.placed("eastus", router_digests) == set(router_digests)  # they landed there
        assert sc.held("eastus", router_digests) == set(router_digests)
        pull_all(router, acked)  # no error, with eastus-2 dead
        # The router balances (proxied requests) across the region's live nodes.
        served: set[str] = set()
        for _ in range(40):
            status, hdrs, body = router.request("GET", f"/v2/{REPO}/tags/list")
            assert status == 200 and b'"p0"' in body, status
            served.add(hdrs["X-Meridian-Node"])
            if served >= {"eastus-1", "eastus-3"}:
                break
        assert served >= {"eastus-1", "eastus-3"}, served
        up.wait(lambda: "(2/3 nodes)" in up.output, "the status line shows eastus-2 out")

        # Pushed in westeurope: eastus copies them; the eastus node copying
        # first is SIGKILLed mid-transfer, the last one takes its items over.
        west = im.Registry(sc.nodes("westeurope")[0]["node"])
        far = {
            f"w{i}": im.build_image([3 << 20, 2 << 20, 40_000], seed=f"scale-far-{i}")
            for i in range(3)
        }
        for tag, img in far.items():
            assert west.push(REPO, tag, img) == img.digest
        copying: list[str] = []

        def someone_copies() -> bool:
            for n in sc.live("eastus"):
                if scrape(n["node"]).get("meridian_replication_inflight", 0) > 0:
                    copying.append(n["id"])
                    return True
            return False

        wait_until(someone_copies, "an eastus node copying", 120, interval=0.02)
        sc.kill(copying[0])
        pull_all(router, acked)  # content eastus holds: still no error
        far_digests = sorted({d for img in far.values() for d in content_digests(img)})
        copied_into = (("eastus", far_digests), ("westeurope", router_digests))
        for region, digests in copied_into:
            wait_until(
                lambda r=region, ds=digests: sc.placed(r, ds) == set(ds),
                f"{region} holds every image pushed in the other region",
                240,
                interval=0.5,
            )
            assert sc.held(region, digests) == set(digests)

        # Each item copied into each region once at most, whatever died.
        for region, digests in copied_into:
            copies = sc.copies(region)
            twice = {d: n for d, n in copies.items() if n > 1}
            assert not twice, f"copied into {region} more than once: {twice}"
            assert set(copies) <= set(digests) | {sha(data)}
            # Copied by the region's nodes (not read through one by one).
            assert sum(copies[d] for d in digests) >= len(digests) // 2, copies
        live_copies = sum(
            scrape(n["node"]).get('meridian_replication_copies_total{reason="replicate"}', 0)
            for n in sc.live("eastus")
        )
        assert live_copies <= len(far_digests)

        everything = {**acked, **far}
        pull_all(router, everything)

        # Blob GETs through the router: 307 to a node, 307 to Azurite (SAS).
        chain = redirect_chain(up.router, far["w0"].layers[0].digest, token(up.router, REPO))
        assert len(chain) == 2, chain
        assert chain[1].startswith(sc.state["azurite"] + "/meridian-"), chain
        assert "sig=" in chain[1]

        # Real clients through the router follow the redirects and verify:
        # skopeo copies every acknowledged image out of the cluster.
        out_dir = tmp_path / "skopeo-out"
        for tag in everything:
            r = skopeo(
                "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                f"docker://{up.host}/{REPO}:{tag}", f"oci:{out_dir}:{tag}",
                check=False,
            )  # fmt: skip
            assert r.returncode == 0, (tag, r.stderr[-3000:])
        lay = im.read_layout(out_dir)
        for tag, img in everything.items():
            assert lay.ref(tag).digest == img.digest
            for b in img.all_blobs():
                assert lay.blob(b.digest) == b.data
        im.verify_layout(out_dir)
        with Containerd(tmp_path / "containerd") as ctrd:
            ref = f"{up.host}/{REPO}:p0"
            ctrd.pull(ref, "--user", OWNER_CREDS)
            assert ctrd.images()[ref] == (im.OCI_MANIFEST, acked["p0"].digest)
            for b in acked["p0"].all_blobs():
                assert ctrd.content_bytes(b.digest) == b.data
    except BaseException:
        print(up.output[-3000:])
        for log in sorted((tmp_path / "up" / "logs").glob("region-*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        if up.proc.poll() is None:
            up.stop(signal.SIGTERM)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes-per-region", "0"], "must be at least 1"),
        (["--nodes-per-region", "17"], "--nodes-per-region 17: at most 16"),
        (["--storage", "s3"], "s3"),
    ],
)
def test_up_refuses_a_bad_region_shape(tmp_path: Path, args: list[str], message: str) -> None:
    r = meridian(
        "up", "--data", str(tmp_path / "d"), "--port", str(free_port()), *args, cwd=tmp_path
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made
