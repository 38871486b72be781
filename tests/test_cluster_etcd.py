"""The registry-wide namespace on etcd, shared by every region.

Real processes only: a real etcd (tests/etcd_server.py) and real ``meridian
node`` subprocesses of several regions pointed at it, driven by real clients
(aiohttp, skopeo, the ``meridian regions`` CLI). A few tests also open the
namespace in-process over the same etcd, where a stalled watch has to be
simulated deterministically.

Manifest and blob *bytes* are not replicated between regions yet, so on a
node other than the one that received a push only namespace-level facts are
asserted (tags/list, _catalog, the tag value); bytes are checked on the node
that holds them.

Every wait is a bounded poll; no test asserts a wall-clock threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from cluster.etcd import EtcdKV
from cluster.kv import Event
from cluster.membership import LEASE_TTL
from cluster.namespace import (
    ALIVE,
    Conflict,
    ManifestRecord,
    Namespace,
    alive_key,
    blob_key,
    manifest_key,
    tag_key,
)
from tests import images as im
from tests import oci
from tests.etcd_server import EtcdServer
from tests.oci import OCI_MANIFEST, Client, assert_error
from tests.procs import ROOT, NodeProcess, require_tool, with_creds

pytestmark = pytest.mark.timeout(120)

REG = "default"  # the registry a node serves when the Host names none
ACCEPT = {"Accept": OCI_MANIFEST}
PROPAGATION = 15.0  # bound on "visible on every node" (the watch takes ms)
LEASE_BOUND = 3 * LEASE_TTL + 10  # bound on "a dead region shows alive=false"
# The node's etcd calls time out after 5 s (EtcdKV default); the client waits
# far longer, so a hang shows as a missing answer, not as a slow one.
CLIENT_TIMEOUT = 60.0

T = TypeVar("T")


# -- processes --------------------------------------------------------------


class Cluster:
    """One etcd and one node per region, all real processes."""

    def __init__(self, base: Path, regions: list[str]) -> None:
        self.base = base
        self.etcd = EtcdServer(str(base / "etcd"))
        self.regions = regions
        self.nodes: dict[str, NodeProcess] = {}

    def start(self) -> Cluster:
        self.etcd.start()
        for r in self.regions:
            self.nodes[r] = NodeProcess(self.base / r / "data", region=r, etcd=self.etcd.client_url)
        start_all(list(self.nodes.values()))
        return self

    def close(self) -> None:
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                if n.proc is not None:
                    os.kill(n.proc.pid, signal.SIGCONT)  # a test may have stopped it
            n.stop()
        self.etcd.cleanup()

    def __getitem__(self, region: str) -> NodeProcess:
        return self.nodes[region]


def start_all(nodes: list[NodeProcess]) -> None:
    with ThreadPoolExecutor(len(nodes)) as pool:
        for f in [pool.submit(n.start) for n in nodes]:
            f.result()


@contextlib.contextmanager
def cluster_of(base: Path, *regions: str) -> Iterator[Cluster]:
    c = Cluster(base, list(regions))
    try:
        yield c.start()
    finally:
        c.close()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three regions on one etcd, shared by the non-destructive tests (each
    uses its own repositories)."""
    with cluster_of(tmp_path_factory.mktemp("trio"), "eastus", "westeurope", "southeastasia") as c:
        yield c


@contextlib.asynccontextmanager
async def clients(*nodes: NodeProcess) -> AsyncIterator[list[Client]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for n in nodes:
            # Client.connect's session waits up to CLIENT_TIMEOUT for an answer.
            out.append(await stack.enter_async_context(Client.connect(n.url)))
        yield out


@contextlib.asynccontextmanager
async def etcd_client(etcd: EtcdServer) -> AsyncIterator[EtcdKV]:
    kv = EtcdKV(etcd.endpoints, timeout=5.0)
    await kv.start()
    try:
        yield kv
    finally:
        await kv.close()


def errors_logged(node: NodeProcess, since: int = 0) -> list[str]:
    """Unhandled errors (rendered as 500) in the node's log after ``since``."""
    text = node.logs()[since:]
    return [line for line in text.splitlines() if '"unhandled error"' in line]


def log_mark(*nodes: NodeProcess) -> dict[str, int]:
    return {n.url: len(n.logs()) for n in nodes}


def assert_no_500s(mark: dict[str, int], *nodes: NodeProcess) -> None:
    for n in nodes:
        errs = errors_logged(n, mark[n.url])
        assert not errs, f"{n.region} logged unhandled errors:\n" + "\n".join(errs[:3])


async def assert_consistent(kv: EtcdKV, repo: str) -> None:
    """Straight from etcd: every tag of ``repo`` names a manifest record that
    exists (no tag was left dangling, no record half-written)."""
    prefix = f"/meridian/reg/{REG}/repo/{repo}/"
    entries, _ = await kv.range(prefix)
    records = {e.key[len(prefix) + 3 :] for e in entries if e.key.startswith(prefix + "_m/")}
    dangling = {
        e.key: e.value.decode()
        for e in entries
        if e.key.startswith(prefix + "_t/") and e.value.decode() not in records
    }
    assert not dangling, f"tags without a manifest record: {dangling}"


# -- polling ------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T]], what: str, within: float = PROPAGATION
) -> T:
    """Poll ``probe`` until it returns without AssertionError; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await probe()
        except AssertionError as e:
            if loop.time() > deadline:
                raise AssertionError(f"not reached within {within:.0f}s: {what}: {e}") from e
        await asyncio.sleep(0.02)


async def tags_of(c: Client, repo: str) -> list[str]:
    r = await c.get(f"/v2/{repo}/tags/list")
    if r.status == 404:
        return []
    assert r.status == 200, r
    return r.json()["tags"]


async def catalog_of(c: Client) -> list[str]:
    r = await c.get("/v2/_catalog")
    assert r.status == 200, r
    return r.json()["repositories"]


async def tags_become(c: Client, repo: str, expected: list[str], where: str) -> None:
    async def probe() -> None:
        got = await tags_of(c, repo)
        assert got == expected, got

    await eventually(probe, f"tags of {repo} on {where} == {expected}")


async def retry_until(
    send: Callable[[], Awaitable[oci.Resp]], ok: int, what: str, within: float = 30
) -> oci.Resp:
    """Re-send a write while it answers 503 (etcd coming back; bounded), then
    expect ``ok``."""

    async def probe() -> oci.Resp:
        r = await send()
        assert r.status != 503, r
        return r

    r = await eventually(probe, what, within)
    assert r.status == ok, (what, r)
    return r


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def regions_json(etcd: EtcdServer) -> dict[str, dict]:
    r = await asyncio.to_thread(run_cli, "regions", "--etcd", etcd.client_url, "--json")
    assert r.returncode == 0, r.stderr
    return {row["region"]: row for row in json.loads(r.stdout)}


def run_skopeo(*args: str) -> str:
    exe = require_tool("skopeo")
    r = subprocess.run(
        [exe, "--insecure-policy", *with_creds(args)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"skopeo {' '.join(args)}: {r.stderr[-2000:]}"
    return r.stdout


def skopeo_raw(ref: str) -> bytes:
    exe = require_tool("skopeo")
    r = subprocess.run(
        [exe, "--insecure-policy", *with_creds(["inspect", "--raw", "--tls-verify=false"]), ref],
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def variant(base: oci.Manifest, n: int | str) -> oci.Manifest:
    """A manifest with the same config and layers as ``base`` (so no new blob
    is needed) and its own digest."""
    doc = base.doc
    doc["annotations"] = {"variant": str(n)}
    return oci.Manifest(oci.encode(doc), base.media_type, list(base.blobs))


# -- one namespace, every region ---------------------------------------------


async def test_tag_pushed_through_any_node_is_the_same_tag_everywhere(
    trio: Cluster, tmp_path: Path
) -> None:
    east, west, asia = trio["eastus"], trio["westeurope"], trio["southeastasia"]
    repo = f"apps/{uuid.uuid4().hex[:8]}"
    img1 = im.build_image([30_000, 5_000], seed=f"{repo}-1")
    img2 = im.build_image([20_000], seed=f"{repo}-2")
    layout = im.write_layout(tmp_path / "layout", {"one": img1, "two": img2})
    mark = log_mark(east, west, asia)

    # Two tags of one repository, pushed through two different regions.
    await asyncio.to_thread(
        run_skopeo, "copy", "-q", "--dest-tls-verify=false",
        f"oci:{layout}:one", f"docker://{east.hostport}/{repo}:v1",
    )  # fmt: skip
    await asyncio.to_thread(
        run_skopeo, "copy", "-q", "--dest-tls-verify=false",
        f"oci:{layout}:two", f"docker://{west.hostport}/{repo}:v2",
    )  # fmt: skip

    async with clients(east, west, asia) as cs:
        for node, c in zip((east, west, asia), cs, strict=True):
            await tags_become(c, repo, ["v1", "v2"], node.region)

            async def in_catalog(c: Client = c) -> None:
                assert repo in await catalog_of(c)

            await eventually(in_catalog, f"{repo} in the catalog of {node.region}")
        for node in (east, west, asia):
            out = await asyncio.to_thread(
                run_skopeo, "list-tags", "--tls-verify=false", f"docker://{node.hostport}/{repo}"
            )
            assert sorted(json.loads(out)["Tags"]) == ["v1", "v2"], (node.region, out)

        # The bytes are served by the region that received them.
        raw1 = await asyncio.to_thread(skopeo_raw, f"docker://{east.hostport}/{repo}:v1")
        raw2 = await asyncio.to_thread(skopeo_raw, f"docker://{west.hostport}/{repo}:v2")
        assert raw1 == img1.manifest and raw2 == img2.manifest

        # A tag deleted through a third region is gone everywhere.
        r = await cs[2].delete(f"/v2/{repo}/manifests/v1")
        assert r.status == 202, r
        for node, c in zip((east, west, asia), cs, strict=True):
            await tags_become(c, repo, ["v2"], node.region)

        # Catalog pagination is the same everywhere too.
        pages = []
        for c in cs:
            r = await c.get("/v2/_catalog", params={"n": "1000"})
            assert r.status == 200, r
            pages.append(r.json()["repositories"])
        assert pages[0] == pages[1] == pages[2] and repo in pages[0]
    assert_no_500s(mark, east, west, asia)


async def test_regions_cli_shows_every_region_and_its_endpoints(trio: Cluster) -> None:
    async def probe() -> dict[str, dict]:
        rows = await regions_json(trio.etcd)
        for region, node in trio.nodes.items():
            assert region in rows, rows
            row = rows[region]
            assert row["http"] == node.url, row
            assert row["alive"] is True and row["reachable"] is True, row
        return rows

    await eventually(probe, "every region listed alive by `meridian regions`")

    text = await asyncio.to_thread(run_cli, "regions", "--etcd", trio.etcd.client_url)
    assert text.returncode == 0, text.stderr
    for region, node in trio.nodes.items():
        line = next(ln for ln in text.stdout.splitlines() if ln.startswith(region + " "))
        assert "yes" in line.split() and node.url in line, text.stdout

    # Each node's management API answers from the same namespace.
    async with clients(*trio.nodes.values()) as cs:
        for c in cs:
            r = await c.get("/meridian/v1/regions")
            assert r.status == 200, r
            alive = {x["name"]: x["alive"] for x in r.json()["regions"]}
            assert alive == dict.fromkeys(trio.nodes, True), alive


async def test_killed_region_shows_dead_within_the_lease_ttl_and_returns(
    tmp_path: Path,
) -> None:
    with cluster_of(tmp_path, "eastus", "westeurope") as c:
        await eventually(
            lambda: _alive_is(c.etcd, {"eastus": True, "westeurope": True}), "both alive"
        )
        c["westeurope"].kill()  # SIGKILL: no chance to revoke its lease

        async def dead() -> None:
            rows = await regions_json(c.etcd)
            assert rows["westeurope"]["alive"] is False, rows["westeurope"]
            assert rows["westeurope"]["reachable"] is False, rows["westeurope"]
            assert rows["eastus"]["alive"] is True, rows["eastus"]

        await eventually(dead, "westeurope alive=false after SIGKILL", LEASE_BOUND)

        await asyncio.to_thread(c["westeurope"].start)
        await eventually(
            lambda: _alive_is(c.etcd, {"eastus": True, "westeurope": True}),
            "westeurope alive again after restart",
            LEASE_BOUND,
        )


async def _alive_is(etcd: EtcdServer, expected: dict[str, bool]) -> None:
    rows = await regions_json(etcd)
    assert {r: rows[r]["alive"] for r in expected if r in rows} == expected, rows


# -- racing tag moves ----------------------------------------------


async def test_racing_pushes_of_one_tag_through_two_nodes(trio: Cluster) -> None:
    east, west = trio["eastus"], trio["westeurope"]
    repo = f"race/{uuid.uuid4().hex[:8]}"
    base = oci.image(1)
    per_node = 30
    mark = log_mark(east, west)
    async with clients(east, west) as (ce, cw), etcd_client(trio.etcd) as kv:
        for c in (ce, cw):  # each region holds the config and layer bytes
            for b in base.blobs:
                await c.push_blob(repo, b)
        candidates = [(ce, variant(base, f"e{i}")) for i in range(per_node)] + [
            (cw, variant(base, f"w{i}")) for i in range(per_node)
        ]
        answers = await asyncio.gather(
            *(c.put_manifest(repo, "latest", m.body) for c, m in candidates)
        )
        # Every push is accepted; the later one in etcd's order wins the tag.
        won: dict[str, tuple[Client, oci.Manifest]] = {}
        for (c, m), r in zip(candidates, answers, strict=True):
            assert r.status == 201, r
            assert r.headers["Docker-Content-Digest"] == m.digest, r
            won[m.digest] = (c, m)

        entry = await kv.get(tag_key(REG, repo, "latest"))
        assert entry is not None
        final = entry.value.decode()
        assert final in won, f"tag points at {final}, which no 201 answered"

        # Every node agrees on the final value.
        holder, m = won[final]
        r = await holder.get(f"/v2/{repo}/manifests/latest", headers=ACCEPT)
        assert r.status == 200 and r.body == m.body, r
        for node, c in ((east, ce), (west, cw)):

            async def agrees(c: Client = c) -> None:
                h = await c.head(f"/v2/{repo}/manifests/latest", headers=ACCEPT)
                assert h.status == 200, h
                assert h.headers["Docker-Content-Digest"] == final, h

            await eventually(agrees, f"{node.region} resolves latest to {final}")

        # Every acknowledged push is recorded whole.
        for d in won:
            assert await kv.get(manifest_key(REG, repo, d)) is not None, d
        await assert_consistent(kv, repo)
    assert_no_500s(mark, east, west)


# -- a standalone node ----------------------------------------------------------


async def test_standalone_node_without_etcd_keeps_working(tmp_path: Path) -> None:
    node = await asyncio.to_thread(NodeProcess(tmp_path / "solo" / "data", region="solo").start)
    try:
        repo = "team/app"
        m = oci.image(2)
        async with clients(node) as (c,):
            await c.push(repo, m, "v1")
            await c.push(repo, variant(m, 2), "v2")
            assert await tags_of(c, repo) == ["v1", "v2"]
            assert await catalog_of(c) == [repo]
            r = await c.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT)
            assert r.status == 200 and r.body == m.body, r
            for b in m.blobs:
                r = await c.get(f"/v2/{repo}/blobs/{oci.digest(b)}")
                assert r.status == 200 and r.body == b, r
            h = (await c.get("/healthz")).json()
            assert h["region"] == "solo" and h["namespace_synced"] is True, h
            r = await c.get("/meridian/v1/regions")
            assert [(x["name"], x["alive"]) for x in r.json()["regions"]] == [("solo", True)]
            assert (await c.delete(f"/v2/{repo}/manifests/v2")).status == 202
        cli = await asyncio.to_thread(run_cli, "regions", "--node", node.url, "--json")
        assert cli.returncode == 0, cli.stderr
        assert [(x["region"], x["alive"]) for x in json.loads(cli.stdout)] == [("solo", True)]

        # It survives a crash with everything it acknowledged.
        await asyncio.to_thread(node.restart)
        async with clients(node) as (c,):
            assert await tags_of(c, repo) == ["v1"]
            r = await c.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT)
            assert r.status == 200 and r.body == m.body, r
            out = await asyncio.to_thread(
                run_skopeo, "list-tags", "--tls-verify=false", f"docker://{node.hostport}/{repo}"
            )
            assert json.loads(out)["Tags"] == ["v1"]
        assert not errors_logged(node)
    finally:
        node.stop()


# -- etcd down, etcd back ---------------------------------------------------------


async def test_etcd_down_pulls_served_writes_503_then_catch_up(tmp_path: Path) -> None:
    with cluster_of(tmp_path, "eastus", "westeurope") as cl:
        east, west = cl["eastus"], cl["westeurope"]
        repo = "app"
        img_e, img_w = oci.image(1), oci.image(1)
        later_e = variant(img_e, "later")  # needs only blobs eastus already has
        later_w = variant(img_w, "later")
        async with clients(east, west) as (ce, cw):
            await ce.push(repo, img_e, "e1")
            await cw.push(repo, img_w, "w1")
            await ce.push(repo, variant(img_e, "doomed"), "e-doomed")
            for c, where in ((ce, "eastus"), (cw, "westeurope")):
                await tags_become(c, repo, ["e-doomed", "e1", "w1"], where)
            upload = await ce.start_upload(repo)  # a session opened before the outage

            await cl.etcd.akill()

            async def reports_unsynced() -> None:
                h = (await ce.get("/healthz")).json()
                assert h["namespace_synced"] is False, h

            # /healthz tells the outage (the node's periodic store check).
            await eventually(reports_unsynced, "healthz reports the namespace unsynced")

            # Pulls keep being served from the cache, repeatedly.
            for _ in range(5):
                r = await ce.get(f"/v2/{repo}/manifests/e1", headers=ACCEPT)
                assert r.status == 200 and r.body == img_e.body, r
                r = await ce.get(f"/v2/{repo}/blobs/{oci.digest(img_e.blobs[1])}")
                assert r.status == 200 and r.body == img_e.blobs[1], r
                r = await cw.get(f"/v2/{repo}/manifests/w1", headers=ACCEPT)
                assert r.status == 200 and r.body == img_w.body, r
                for c in (ce, cw):
                    assert await tags_of(c, repo) == ["e-doomed", "e1", "w1"]
                    assert repo in await catalog_of(c)
                await asyncio.sleep(0.1)

            # Pushes and deletes answer 503 UNAVAILABLE (the client waits far
            # longer than the node's etcd timeout: an answer must come).
            blob = oci.blob_bytes(2048)
            chunk = oci.blob_bytes(1000)
            writes: dict[str, Callable[[], Awaitable[oci.Resp]]] = {
                "manifest PUT by tag": lambda: ce.put_manifest(repo, "e2", later_e.body),
                "manifest PUT by digest": lambda: cw.put_manifest(
                    repo, later_w.digest, later_w.body
                ),
                "tag DELETE": lambda: ce.delete(f"/v2/{repo}/manifests/e1"),
                "manifest DELETE": lambda: cw.delete(f"/v2/{repo}/manifests/{img_w.digest}"),
                "monolithic blob upload": lambda: ce.post(
                    f"/v2/{repo}/blobs/uploads/", params={"digest": oci.digest(blob)}, data=blob
                ),
                "blob DELETE": lambda: ce.delete(f"/v2/{repo}/blobs/{oci.digest(img_e.blobs[0])}"),
            }
            for what, send in writes.items():
                r = await send()  # an answer must come: the session waits up to 60 s
                assert r.status == 503, (what, r)
                assert_error(r, 503, "UNAVAILABLE")
                assert r.headers.get("Retry-After"), r
            # An upload session is local: chunks are accepted, the final PUT
            # needs the namespace.
            r = await ce.patch(upload.location, data=chunk, headers={"Content-Range": "0-999"})
            assert r.status == 202, r
            r = await ce.put(upload.location, params={"digest": oci.digest(chunk)})
            assert_error(r, 503, "UNAVAILABLE")
            # Still readable after the failed writes; nothing changed.
            for c in (ce, cw):
                assert await tags_of(c, repo) == ["e-doomed", "e1", "w1"]

            await cl.etcd.astart()  # same data dir, same ports

            # No half-written records: none of the refused writes landed.
            async with etcd_client(cl.etcd) as kv:
                assert await kv.get(tag_key(REG, repo, "e2")) is None
                assert await kv.get(manifest_key(REG, repo, later_e.digest)) is None
                assert await kv.get(manifest_key(REG, repo, later_w.digest)) is None
                assert await kv.get(tag_key(REG, repo, "e1")) is not None
                assert await kv.get(manifest_key(REG, repo, img_w.digest)) is not None
                assert await kv.get(blob_key(REG, repo, oci.digest(blob))) is None
                assert await kv.get(blob_key(REG, repo, oci.digest(chunk))) is None
                assert await kv.get(blob_key(REG, repo, oci.digest(img_e.blobs[0]))) is not None
                await assert_consistent(kv, repo)

            # westeurope writes as soon as etcd answers (eastus's watch may
            # still be reconnecting); eastus catches up by itself.
            await retry_until(
                lambda: cw.put_manifest(repo, "w2", later_w.body), 201, "westeurope push"
            )
            await retry_until(
                lambda: cw.delete(f"/v2/{repo}/manifests/e-doomed"), 202, "westeurope delete"
            )
            await tags_become(ce, repo, ["e1", "w1", "w2"], "eastus")
            # ... and eastus pushes again.
            await retry_until(lambda: ce.put_manifest(repo, "e2", later_e.body), 201, "eastus push")
            await tags_become(cw, repo, ["e1", "e2", "w1", "w2"], "westeurope")
            r = await ce.get(f"/v2/{repo}/manifests/e2", headers=ACCEPT)
            assert r.status == 200 and r.body == later_e.body, r
            for c in (ce, cw):
                h = (await c.get("/healthz")).json()
                assert h["namespace_synced"] is True, h
        assert not errors_logged(east) and not errors_logged(west)


async def test_watch_catches_up_by_full_reload_after_compaction(tmp_path: Path) -> None:
    """eastus's watch is down (process stopped) while etcd restarts, westeurope
    writes and etcd compacts its history past eastus's resume point: eastus
    must reload fully, deletes included."""
    with cluster_of(tmp_path, "eastus", "westeurope") as cl:
        east, west = cl["eastus"], cl["westeurope"]
        repo = "app"
        img = oci.image(1)
        async with clients(east, west) as (ce, cw):
            await cw.push(repo, img, "w1")
            await cw.push(repo, variant(img, "gone"), "gone")
            await tags_become(ce, repo, ["gone", "w1"], "eastus")

            assert east.proc is not None
            os.kill(east.proc.pid, signal.SIGSTOP)
            try:
                await cl.etcd.akill()
                await cl.etcd.astart()
                await retry_until(lambda: cw.put_manifest(repo, "w2", variant(img, 2).body), 201,
                                  "westeurope push after etcd restart")  # fmt: skip
                r = await cw.delete(f"/v2/{repo}/manifests/gone")
                assert r.status == 202, r
                async with etcd_client(cl.etcd) as kv:
                    _, rev = await kv.range("/meridian/reg/")
                    await kv.compact(rev)
            finally:
                os.kill(east.proc.pid, signal.SIGCONT)

            await tags_become(ce, repo, ["w1", "w2"], "eastus")
            await retry_until(
                lambda: ce.put_manifest(repo, "e1", variant(img, "e").body),
                201,
                "eastus push after reload",
            )
            await tags_become(cw, repo, ["e1", "w1", "w2"], "westeurope")
        assert not errors_logged(east) and not errors_logged(west)


# -- a node killed mid-push ------------------------------------------------------


async def test_node_killed_mid_push_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with cluster_of(tmp_path, "eastus", "westeurope") as cl:
        east, west = cl["eastus"], cl["westeurope"]
        repo = "busy"
        acked: dict[str, oci.Manifest] = {}  # tag -> manifest answered 201
        acked_blobs: dict[str, bytes] = {}
        attempted: set[str] = set()
        stop = asyncio.Event()

        async def pusher(w: int) -> None:
            async with aiohttp.ClientSession(
                skip_auto_headers=("Accept", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
                middlewares=(auth := oci.owner_auth(),),
            ) as s:
                c = Client(east.url, s, auth)
                i = 0
                while not stop.is_set():
                    m = oci.image([oci.blob_bytes(1000 + 97 * i + w)])
                    tag = f"w{w}-{i}"
                    i += 1
                    try:
                        for b in m.blobs:
                            d = oci.digest(b)
                            r = await c.post(
                                f"/v2/{repo}/blobs/uploads/", params={"digest": d}, data=b
                            )
                            if r.status != 201:
                                return
                            acked_blobs[d] = b
                        attempted.add(tag)
                        r = await c.put_manifest(repo, tag, m.body)
                        if r.status != 201:
                            return
                        acked[tag] = m
                    except (aiohttp.ClientError, TimeoutError):
                        return

        async with clients(east) as (ce,):
            # An upload session with acknowledged chunks spans the crash.
            big = oci.blob_bytes(300_000)
            up = await ce.start_upload(repo)
            r = await ce.patch(
                up.location, data=big[:200_000], headers={"Content-Range": "0-199999"}
            )
            assert r.status == 202 and r.headers["Range"] == "0-199999", r

        workers = [asyncio.create_task(pusher(w)) for w in range(6)]

        async def enough() -> None:
            assert len(acked) >= 30, len(acked)

        await eventually(enough, "30 acknowledged pushes", 60)
        await asyncio.to_thread(east.kill)  # SIGKILL while pushes are in flight
        stop.set()
        await asyncio.gather(*workers)
        acked_now = dict(acked)
        await asyncio.to_thread(east.start)

        async with clients(east, west) as (ce, cw):
            # Every acknowledged manifest is there, byte for byte, with its tag.
            for tag, m in acked_now.items():
                r = await ce.get(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)
                assert r.status == 200 and r.body == m.body, (tag, r)
                r = await ce.head(f"/v2/{repo}/manifests/{m.digest}", headers=ACCEPT)
                assert r.status == 200, r
            for d in acked_blobs:
                r = await ce.get(f"/v2/{repo}/blobs/{d}")
                assert r.status == 200 and sha256(r.body) == d, r
            # Every tag listed anywhere was attempted and resolves on eastus.
            listed = await tags_of(ce, repo)
            assert set(acked_now) <= set(listed) <= attempted
            for tag in listed:
                r = await ce.get(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)
                assert r.status == 200, r

            async def west_agrees() -> None:
                assert await tags_of(cw, repo) == listed

            await eventually(west_agrees, "westeurope lists the same tags")

            # The upload resumes at the acknowledged offset.
            r = await ce.get(up.location)
            assert r.status == 204 and r.headers["Range"] == "0-199999", r
            r = await ce.patch(
                up.location, data=big[200_000:], headers={"Content-Range": "200000-299999"}
            )
            assert r.status == 202, r
            r = await ce.put(up.location, params={"digest": oci.digest(big)})
            assert r.status == 201, r
            r = await ce.get(f"/v2/{repo}/blobs/{oci.digest(big)}")
            assert r.status == 200 and r.body == big

            # No partial blob is visible in the store: every file is whole.
            for p in (east.data / "blobs").rglob("*"):
                if p.is_file():
                    assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, p
            await ce.push(repo, oci.image(1), "after-restart")
            async with etcd_client(cl.etcd) as kv:
                for tag, m in acked_now.items():
                    entry = await kv.get(tag_key(REG, repo, tag))
                    assert entry is not None and entry.value.decode() == m.digest, tag
                await assert_consistent(kv, repo)
        assert not errors_logged(east) and not errors_logged(west)


# -- regressions -------------------------------------------------------------------
# Each of these failed on the code this module was written against (the
# failure each saw is in its docstring) and passes since commit a7b0bf9.


def _rec(digest: str) -> ManifestRecord:
    return ManifestRecord(digest=digest, media_type=OCI_MANIFEST, size=100)


@contextlib.asynccontextmanager
async def _namespaces(etcd: EtcdServer) -> AsyncIterator[Callable[..., Awaitable[Namespace]]]:
    made: list[Namespace] = []

    async def new(region: str, watch: bool = True) -> Namespace:
        ns = Namespace(EtcdKV(etcd.endpoints, timeout=5.0), region)
        if watch:
            await ns.start()
        else:  # a node whose watch lags: its cache only knows the load
            await ns.kv.start()
            await ns._reload()
        made.append(ns)
        return ns

    try:
        yield new
    finally:
        for ns in made:
            await ns.close()


async def test_stale_cache_repush_of_a_tag_does_not_win_silently(trio: Cluster) -> None:
    """A node whose cache still says tag -> D1 re-pushes D1 to that tag after
    another region moved it to D2. Was broken (Namespace.put_manifest skipped
    a tag the cache said was already there: no compare, no put): the push
    answered 201 and the tag stayed at D2, an acknowledged tag move lost."""
    repo = f"stale/{uuid.uuid4().hex[:8]}"
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    async with _namespaces(trio.etcd) as new:
        a = await new("eastus", watch=False)  # its watch has not caught up yet
        b = await new("westeurope")
        await a.put_manifest(REG, repo, _rec(d1), ["latest"])
        await eventually(_cond(lambda: b.tag(REG, repo, "latest") == d1), "b sees d1")
        await b.put_manifest(REG, repo, _rec(d2), ["latest"])
        acknowledged = True
        try:
            await a.put_manifest(REG, repo, _rec(d1), ["latest"])
        except Conflict:
            acknowledged = False
        entry = await a.kv.get(tag_key(REG, repo, "latest"))
        assert entry is not None
        if acknowledged:
            assert entry.value.decode() == d1, (
                "a's PUT of d1 to 'latest' succeeded, yet 'latest' is still "
                f"{entry.value.decode()} in etcd"
            )


async def test_stale_cache_delete_manifest_leaves_no_dangling_tag(trio: Cluster) -> None:
    """Deleting a manifest from a node whose cache lags. Was broken
    (Namespace.delete_manifest removed only the tags its cache knew): a tag
    another region had just moved onto the digest survived, pointing at a
    manifest record that no longer existed."""
    repo = f"stale/{uuid.uuid4().hex[:8]}"
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    async with _namespaces(trio.etcd) as new:
        b = await new("westeurope")
        await b.put_manifest(REG, repo, _rec(d1), ["v1"])
        await b.put_manifest(REG, repo, _rec(d2), ["other"])
        a = await new("eastus", watch=False)
        await b.put_manifest(REG, repo, _rec(d1), ["other"])  # moves 'other' onto d1
        try:
            deleted = await a.delete_manifest(REG, repo, d1)
        except Conflict:
            deleted = False
        tags, _ = await a.kv.range(f"/meridian/reg/{REG}/repo/{repo}/_t/")
        records, _ = await a.kv.range(f"/meridian/reg/{REG}/repo/{repo}/_m/")
        recorded = {e.key.rpartition("/")[2] for e in records}
        dangling = {e.key: e.value.decode() for e in tags if e.value.decode() not in recorded}
        assert not dangling, f"delete_manifest={deleted} left tags without a manifest: {dangling}"


def _cond(fn: Callable[[], bool]) -> Callable[[], Awaitable[None]]:
    async def probe() -> None:
        assert fn()

    return probe


async def test_manifest_with_many_tags_can_be_deleted(trio: Cluster) -> None:
    """A manifest reachable by 130 tags (each pushed normally) can be deleted
    by digest. Was broken (one txn with a compare and a delete per tag,
    beyond etcd's 128-op limit): 500 "internal error" on etcd and standalone
    alike, and the manifest could never be deleted."""
    east = trio["eastus"]
    repo = f"manytags/{uuid.uuid4().hex[:8]}"
    m = oci.image(1)
    async with clients(east) as (c,):
        await c.push(repo, m, "t0")
        for i in range(1, 130):
            r = await c.put_manifest(repo, f"t{i}", m.body)
            assert r.status == 201, r
        r = await c.delete(f"/v2/{repo}/manifests/{m.digest}")
        assert r.status == 202, r
        assert await tags_of(c, repo) == []


async def test_too_many_tags_in_one_put_is_a_client_error(trio: Cluster) -> None:
    """PUT by digest with 150 ``tag`` parameters. Was broken (no bound): the
    txn exceeded etcd's 128-op limit and the ValueError became 500 "internal
    error"; now a 4xx OCI error (TAG_INVALID) that changes nothing."""
    east = trio["eastus"]
    repo = f"manytags/{uuid.uuid4().hex[:8]}"
    m = oci.image(1)
    async with clients(east) as (c,):
        for b in m.blobs:
            await c.push_blob(repo, b)
        params = [("tag", f"t{i}") for i in range(150)]
        r = await c.put_manifest(repo, m.digest, m.body, params=params)
        assert r.status == 201 or 400 <= r.status < 500, r
        if r.status != 201:
            assert_error(r, r.status)
            assert await tags_of(c, repo) == []


@pytest.mark.parametrize("annotation_bytes", [1_700_000, 2_500_000])
async def test_large_manifest_is_accepted_or_refused_clearly(
    trio: Cluster, annotation_bytes: int
) -> None:
    """A manifest under the node's 4 MiB limit whose annotations exceed
    etcd's 1.5 MiB request limit. Was broken (the record kept every
    annotation): 500 "internal error" at 1.7 MB, 503 UNAVAILABLE "retry
    shortly" at 2.5 MB (gRPC RESOURCE_EXHAUSTED; no retry can succeed),
    while a standalone node accepted the same push. Expected: 201 (and the
    bytes served back), or a 4xx OCI error."""
    east = trio["eastus"]
    repo = f"big/{uuid.uuid4().hex[:8]}"
    m = oci.image(1, annotations={"big": "x" * annotation_bytes})
    async with clients(east) as (c,):
        for b in m.blobs:
            await c.push_blob(repo, b)
        r = await c.put_manifest(repo, "v1", m.body)
        assert r.status == 201 or 400 <= r.status < 500, r
        if r.status == 201:
            g = await c.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT)
            assert g.status == 200 and g.body == m.body, g


async def test_final_upload_put_refused_by_etcd_outage_can_be_retried(
    tmp_path: Path,
) -> None:
    """The final PUT of an upload answers 503 (Retry-After) while etcd is
    down; retried once etcd is back it succeeds. Was broken (the session was
    consumed before the namespace write): the retry got 404
    BLOB_UPLOAD_UNKNOWN and the whole blob had to be uploaded again."""
    with cluster_of(tmp_path, "eastus") as cl:
        east = cl["eastus"]
        data = oci.blob_bytes(50_000)
        async with clients(east) as (c,):
            up = await c.start_upload("app")
            r = await c.patch(up.location, data=data, headers={"Content-Range": "0-49999"})
            assert r.status == 202, r
            await cl.etcd.akill()
            r = await c.put(up.location, params={"digest": oci.digest(data)})
            assert_error(r, 503, "UNAVAILABLE")
            await cl.etcd.astart()
            r = await retry_until(
                lambda: c.put(up.location, params={"digest": oci.digest(data)}),
                201,
                "the retried final PUT",
            )
            r = await c.get(f"/v2/app/blobs/{oci.digest(data)}")
            assert r.status == 200 and r.body == data


async def test_restarted_node_keeps_its_region_alive(tmp_path: Path) -> None:
    """A node restarted quickly keeps its region alive throughout. Was broken
    (keep_registered saw the alive key of the dead process's lease and an
    equal RegionInfo, so did not register under its own lease): when the old
    lease expired the key was deleted and the running region showed
    alive=false for about ttl/3 s."""
    with cluster_of(tmp_path, "eastus") as cl:
        east = cl["eastus"]
        await eventually(lambda: _alive_is(cl.etcd, {"eastus": True}), "eastus alive")
        await asyncio.to_thread(east.restart)  # SIGKILL, then start on the same port
        async with etcd_client(cl.etcd) as kv:
            _, rev = await kv.range(ALIVE)
            deletes: list[Event] = []

            async def watch() -> None:
                async for batch in kv.watch(alive_key("eastus"), rev + 1):
                    deletes.extend(e for e in batch if e.value is None)

            task = asyncio.create_task(watch())
            await asyncio.sleep(LEASE_TTL + 3)  # the old lease expires in this window
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert not deletes, (
            f"eastus was running the whole time, yet its alive key was deleted at "
            f"revision {deletes[0].mod_revision}"
        )


async def test_two_nodes_of_one_region_do_not_leak_leases(tmp_path: Path) -> None:
    """Two nodes in one region (the design allows "one or more per region").
    Was broken (keep_registered re-registered whenever the region's
    RegionInfo differed from its own, i.e. every ttl/3 s with the twin's
    endpoints there, each time under a brand-new lease that EtcdKV kept
    alive forever): leases grew by ~1 per second without bound."""
    from aetcd import rpc

    with cluster_of(tmp_path, "eastus") as cl:
        twin = NodeProcess(tmp_path / "eastus-2" / "data", region="eastus", etcd=cl.etcd.client_url)
        await asyncio.to_thread(twin.start)
        try:
            async with etcd_client(cl.etcd) as kv:

                async def lease_count() -> int:
                    resp = await kv._call(
                        "lease", "LeaseLeases", rpc.LeaseLeasesRequest(), retry=True
                    )
                    return len(resp.leases)

                await asyncio.sleep(LEASE_TTL / 3 + 1)
                first = await lease_count()
                await asyncio.sleep(2 * LEASE_TTL)
                later = await lease_count()
            assert later <= max(first, 2), f"leases grew from {first} to {later}"
        finally:
            twin.stop()
