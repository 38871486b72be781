"""Replications, region removal and usage (node/manage_replicas.py,
cluster/replicas_cli.py, node/usage.py) on a real multi-region cluster: real
etcd, real nodes with authentication on, a real router behind a WAN
emulator (eastus nearest, so a push that ignored a registry's replicas
would land there), and the ``meridian`` CLI as a subprocess.

Registries are created through the management API (``POST
/meridian/v1/registries``) and selected by Host (``<name>.meridian.test``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.etcd import EtcdKV
from cluster.kv import Entry
from cluster.namespace import Namespace
from localcluster.wan import Wan
from node.replication.reclaim import kept_digests
from node.usage import GIB, Counters, UsageRecorder
from ocidist.mediatypes import OCI_MANIFEST
from tests import oci
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.procs import OWNER_LOGIN
from tests.test_manage_identities import Cli, api, get_token, http, push_blob, sha256, v2
from tests.test_replication import RegionNode, placements, wait_until
from tests.test_router import RouterProcess

pytestmark = pytest.mark.timeout(300)

DOMAIN = "meridian.test"
TRUSTED = "127.0.0.1/32"
LATENCY = {"eastus": 0.002, "westeurope": 0.015, "southeastasia": 0.030}  # one way, from here
FAST = [
    "--domain", DOMAIN,
    "--trusted-proxies", TRUSTED,
    "--reclaim-interval", "0.5",
    "--reclaim-grace", "3",
    "--usage-interval", "0.5",
]  # fmt: skip

etcd = etcd_fixture(scope="module")


@dataclass
class Env:
    etcd: EtcdServer
    nodes: dict[str, RegionNode]
    router: RouterProcess
    base: Path

    def __getitem__(self, region: str) -> RegionNode:
        return self.nodes[region]


@pytest.fixture(scope="module")
def env(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("replicas")
    wan = Wan().start()
    nodes: dict[str, RegionNode] = {}
    router: RouterProcess | None = None
    try:
        for name, latency in LATENCY.items():
            node = RegionNode(base, name, etcd.client_url, extra=FAST)
            link = wan.link(node.hostport, latency=latency)
            node.extra += ["--advertise", f"http://{link.address}"]
            nodes[name] = node.start()
        router = RouterProcess(etcd.client_url, base, ("--domain", DOMAIN)).start()
        router.wait_for(
            lambda st: (
                [r["region"] for r in st["regions"] if r["up"]] == sorted(LATENCY)
                and st["nearest"][:1] == ["eastus"]
            ),
            "every region in rotation, eastus nearest",
        )
        yield Env(etcd, nodes, router, base)
    finally:
        if router is not None:
            router.stop()
        for node in nodes.values():
            node.stop()
        wan.stop()


# -- helpers ---------------------------------------------------------------------------


def mapi(at: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """The management API of the node (or router) ``at``, as the owner."""
    return api(at, method, path, body)


def create_registry(at: Any, name: str, sku: str, location: str) -> dict:
    return oci.create_registry(at.url, name, sku, location)


def message(doc: Any) -> str:
    return doc["errors"][0]["message"]


@dataclass
class Pushed:
    digest: str  # the manifest's
    manifest: bytes
    sizes: dict[str, int]  # every digest (config, layers, manifest) -> size

    @property
    def blobs(self) -> list[str]:
        return [d for d in self.sizes if d != self.digest]


def push_image(at: Any, reg: str, repo: str, tag: str, layers: list[bytes]) -> Pushed:
    """An image of ``layers`` (``tests.oci.image``) pushed to ``at`` as the
    owner; returns what the push stored."""
    status, _, tok = get_token(at, reg, f"repository:{repo}:pull,push", OWNER_LOGIN)
    assert status == 200
    m = oci.image(layers)
    for blob in m.blobs:
        assert push_blob(at, reg, repo, tok, blob) == 201
    status, _ = v2(at, reg, "PUT", f"{repo}/manifests/{tag}", tok, m.body, m.media_type)
    assert status == 201
    sizes = {sha256(b): len(b) for b in m.blobs}
    sizes[m.digest] = len(m.body)
    return Pushed(m.digest, m.body, sizes)


def pull_manifest(at: Any, reg: str, repo: str, tag: str) -> tuple[int, dict[str, str], bytes]:
    status, _, tok = get_token(at, reg, f"repository:{repo}:pull", OWNER_LOGIN)
    assert status == 200
    headers = {"Host": f"{reg}.{DOMAIN}", "Authorization": f"Bearer {tok}"}
    return http("GET", f"{at.url}/v2/{repo}/manifests/{tag}", headers=headers)


def replications(at: Any, reg: str) -> dict[str, dict]:
    status, doc = mapi(at, "GET", f"/registries/{reg}/replications")
    assert status == 200, doc
    return {r["region"]: r for r in doc["replications"]}


def owner_cli(base: Path, server: str) -> Cli:
    c = Cli(base / "home", base / "docker")
    r = c.login(server)
    assert r.returncode == 0, r.stderr
    return c


# -- unit: what a region keeps -----------------------------------------------------------


def _entries(doc: dict[str, Any]) -> list[Entry]:
    return [
        Entry(k, v if isinstance(v, bytes) else json.dumps(v).encode(), i + 1)
        for i, (k, v) in enumerate(doc.items())
    ]


def test_kept_digests_never_drops_the_last_copy_nor_shared_bytes() -> None:
    r = "/meridian/reg/"
    rec = {"digest": "m1", "media_type": OCI_MANIFEST, "size": 1, "blobs": ["a", "b", "s"]}
    entries = _entries(
        {
            # "one" left westeurope: "a" is home too, "b" is only here
            r + "one/config": {"sku": "Premium", "location": "eastus", "replicas": ["eastus"]},
            r + "one/repo/app/_m/m1": rec,
            r + "one/place/m1/eastus": {"size": 1},
            r + "one/place/m1/westeurope": {"size": 1},
            r + "one/place/a/eastus": {"size": 1},
            r + "one/place/a/westeurope": {"size": 1},
            r + "one/place/b/westeurope": {"size": 1},
            r + "one/place/s/eastus": {"size": 1},
            r + "one/place/s/westeurope": {"size": 1},
            # "two" still replicates here and shares "s"
            r + "two/config": {"replicas": ["eastus", "westeurope"]},
            r + "two/repo/x/_b/s": {"size": 1, "t": 0},
        }
    )
    keep, drop = kept_digests(entries, "westeurope")
    assert keep == {"b", "s"}  # b: the last copy; s: "two" replicates here
    assert sorted(drop) == [("one", "a"), ("one", "m1"), ("one", "s")]
    keep, drop = kept_digests(entries, "eastus")
    assert keep == {"m1", "a", "b", "s"} and drop == []


# -- replications ----------------------------------------------------------------------------


def test_replication_create_syncs_list_shows_it_delete_reclaims_the_copy(env: Env) -> None:
    east, west = env["eastus"], env["westeurope"]
    create_registry(east, "replprem1", "Premium", "eastus")
    # "replshare1" also lives in westeurope and shares a layer with replprem1
    create_registry(east, "replshare1", "Premium", "eastus")
    status, doc = mapi(
        east, "POST", "/registries/replshare1/replications", {"location": "westeurope"}
    )
    assert status == 201, doc
    shared = os.urandom(20_000)
    mine = push_image(east, "replprem1", "team/app", "v1", [os.urandom(70_000), shared])
    theirs = push_image(east, "replshare1", "other/app", "v1", [shared])
    wait_until(lambda: west.has_all(list(theirs.sizes)), "westeurope holds replshare1", 60)
    only_mine = [d for d in mine.sizes if d not in theirs.sizes]

    rows = replications(east, "replprem1")
    assert list(rows) == ["eastus"]
    assert rows["eastus"]["home"] is True and rows["eastus"]["status"] == "ready"
    assert not any(west.has(d) for d in only_mine)

    # add westeurope: it backfills and becomes ready
    status, doc = mapi(
        east, "POST", "/registries/replprem1/replications", {"location": "westeurope"}
    )
    assert status == 201, doc
    assert doc["region"] == "westeurope" and doc["home"] is False
    assert doc["status"] in ("syncing", "ready")
    wait_until(
        lambda: replications(west, "replprem1")["westeurope"]["status"] == "ready",
        "westeurope ready",
        60,
    )
    assert west.has_all(list(mine.sizes))
    for d in mine.sizes:
        assert placements(env.etcd, d, "replprem1") == {"eastus", "westeurope"}
    rows = replications(west, "replprem1")
    assert {r: (v["status"], v["pending_items"]) for r, v in rows.items()} == {
        "eastus": ("ready", 0),
        "westeurope": ("ready", 0),
    }

    # mistakes change nothing
    for body, code in (
        ({"location": "westeurope"}, 409),
        ({"location": "nowhere"}, 400),
        ({}, 400),
        ({"location": "westeurope", "extra": 1}, 400),
    ):
        status, doc = mapi(east, "POST", "/registries/replprem1/replications", body)
        assert status == code, (body, doc)
    assert "already a replica" in message(
        mapi(east, "POST", "/registries/replprem1/replications", {"location": "westeurope"})[1]
    )
    status, doc = mapi(east, "DELETE", "/registries/replprem1/replications/eastus")
    assert status == 400 and "home location" in message(doc)
    status, doc = mapi(east, "DELETE", "/registries/replprem1/replications/southeastasia")
    assert status == 404, doc
    status, doc = mapi(east, "GET", "/registries/nosuchreg1/replications")
    assert status == 404, doc
    assert set(replications(east, "replprem1")) == {"eastus", "westeurope"}

    # delete westeurope: its copy of replprem1 goes, the shared layer stays
    status, doc = mapi(east, "DELETE", "/registries/replprem1/replications/westeurope")
    assert status == 204, doc
    assert list(replications(east, "replprem1")) == ["eastus"]
    wait_until(
        lambda: not any(west.has(d) for d in only_mine),
        "westeurope reclaimed replprem1's copy",
        60,
    )
    for d in mine.sizes:
        assert placements(env.etcd, d, "replprem1") == {"eastus"}
    assert west.has(sha256(shared)), "a blob replshare1 still replicates there was removed"
    assert placements(env.etcd, sha256(shared), "replshare1") == {"eastus", "westeurope"}
    assert all(east.has(d) for d in mine.sizes)
    status, _, body = pull_manifest(east, "replprem1", "team/app", "v1")
    assert status == 200 and body == mine.manifest


def test_replication_needs_premium(env: Env) -> None:
    east = env["eastus"]
    create_registry(east, "replbasic1", "Basic", "eastus")
    status, doc = mapi(
        east, "POST", "/registries/replbasic1/replications", {"location": "westeurope"}
    )
    assert status == 400
    assert "Premium" in message(doc) and "meridian registry update replbasic1" in message(doc)
    assert list(replications(east, "replbasic1")) == ["eastus"]
    status, doc = mapi(east, "GET", "/registries/replbasic1")
    assert status == 200 and doc["replicas"] == ["eastus"], doc


def test_router_sends_pushes_to_replica_regions_and_pulls_to_holders(env: Env) -> None:
    """eastus is the router's nearest region; a registry living in
    westeurope gets its pushes there, and once its eastus replica is
    deleted and reclaimed, its pulls too."""
    east, west = env["eastus"], env["westeurope"]
    create_registry(east, "routedwest1", "Premium", "westeurope")
    status, _, tok = get_token(env.router, "routedwest1", "repository:app:pull,push", OWNER_LOGIN)
    assert status == 200
    headers = {"Host": f"routedwest1.{DOMAIN}", "Authorization": f"Bearer {tok}"}
    for _ in range(4):
        data = os.urandom(3000)
        status, h, body = http(
            "POST",
            f"{env.router.url}/v2/app/blobs/uploads/?digest={sha256(data)}",
            data=data,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        assert status == 201, body
        assert h["X-Meridian-Region"] == "westeurope"
    pushed = push_image(env.router, "routedwest1", "app", "v1", [os.urandom(5000)])
    assert all(west.has(d) for d in pushed.sizes)
    assert not any(east.has(d) for d in pushed.sizes)
    # a replica in eastus, then gone again
    status, doc = mapi(east, "POST", "/registries/routedwest1/replications", {"location": "eastus"})
    assert status == 201, doc
    wait_until(lambda: east.has_all(list(pushed.sizes)), "eastus holds routedwest1", 60)
    assert mapi(east, "DELETE", "/registries/routedwest1/replications/eastus")[0] == 204
    wait_until(
        lambda: not any(east.has(d) for d in pushed.sizes), "eastus reclaimed routedwest1", 60
    )
    for _ in range(6):
        status, h, body = pull_manifest(env.router, "routedwest1", "app", "v1")
        assert status == 200 and body == pushed.manifest
        assert h["X-Meridian-Region"] == "westeurope"


def test_replication_cli_end_to_end(env: Env, tmp_path: Path) -> None:
    east, west = env["eastus"], env["westeurope"]
    create_registry(east, "replcli1", "Premium", "eastus")
    push_image(east, "replcli1", "cli/app", "v1", [os.urandom(10_000)])
    cli = owner_cli(tmp_path, east.url)
    row = cli.ok("replication", "create", "--registry", "replcli1", "--location", "southeastasia")
    assert row["region"] == "southeastasia" and row["home"] is False
    wait_until(
        lambda: (
            {
                r["region"]: r["status"]
                for r in cli.ok("replication", "list", "--registry", "replcli1")["replications"]
            }
            == {"eastus": "ready", "southeastasia": "ready"}
        ),
        "replcli1 ready in both regions",
        60,
    )
    table = cli("replication", "list", "--registry", "replcli1")
    assert table.returncode == 0 and "southeastasia" in table.stdout and "ready" in table.stdout
    tsv = cli("replication", "list", "--registry", "replcli1", "-o", "tsv").stdout.splitlines()
    assert [line.split("\t")[:3] for line in tsv] == [
        ["eastus", "true", "ready"],
        ["southeastasia", "false", "ready"],
    ]
    line = cli.fails(7, "replication", "create", "--registry", "replcli1", "-l", "southeastasia")
    assert "already a replica" in line
    line = cli.fails(2, "replication", "create", "--registry", "replcli1", "-l", "atlantis")
    assert "unknown location" in line
    line = cli.fails(2, "replication", "delete", "--registry", "replcli1", "-l", "southeastasia")
    assert "--yes" in line
    assert (
        cli.ok("replication", "delete", "--registry", "replcli1", "-l", "southeastasia", "--yes")
        is None
    )
    line = cli.fails(2, "replication", "delete", "--registry", "replcli1", "-l", "eastus", "--yes")
    assert "home location" in line
    line = cli.fails(6, "replication", "list", "--registry", "nosuchreg2")
    assert "nosuchreg2" in line
    # the cluster's status view: no verb, or ``status``
    for argv in (["replication"], ["replication", "status"]):
        r = cli(*argv, "--node", west.url)
        assert r.returncode == 0, r.stderr
        assert "REGION" in r.stdout and "westeurope" in r.stdout
    rows = json.loads(cli("replication", "status", "--node", west.url, "--json").stdout)
    assert {r["region"] for r in rows} >= set(LATENCY)


# -- usage ----------------------------------------------------------------------------------------


def test_usage_counts_bytes_pushes_pulls_and_gib_days(env: Env, tmp_path: Path) -> None:
    east, west = env["eastus"], env["westeurope"]
    create_registry(east, "usageprem1", "Premium", "eastus")
    assert (
        mapi(east, "POST", "/registries/usageprem1/replications", {"location": "westeurope"})[0]
        == 201
    )
    layer = os.urandom(150_000)
    pushed = push_image(east, "usageprem1", "use/app", "v1", [layer, os.urandom(40_000)])
    stored = sum(pushed.sizes.values())
    wait_until(lambda: west.has_all(list(pushed.sizes)), "westeurope holds usageprem1", 60)
    for at in (east, east, west):
        assert pull_manifest(at, "usageprem1", "use/app", "v1")[0] == 200
    status, _, tok = get_token(east, "usageprem1", "repository:use/app:pull", OWNER_LOGIN)
    assert v2(east, "usageprem1", "GET", f"use/app/blobs/{sha256(layer)}", tok)[0] == 200

    def usage() -> dict:
        status, doc = mapi(west, "GET", "/registries/usageprem1/usage")
        assert status == 200, doc
        return doc

    def settled(doc: dict) -> bool:
        rows = {r["region"]: r for r in doc["regions"]}
        return (
            rows["eastus"]["pulls"] == 2
            and rows["westeurope"]["pulls"] == 1
            and rows["eastus"]["pushes"] == 1
            and rows["westeurope"]["stored_bytes_billed"] == stored
            and rows["eastus"]["bytes_served"] == 2 * len(pushed.manifest) + len(layer)
        )

    wait_until(lambda: settled(usage()), "usage flushed by both regions", 30)
    doc = usage()
    rows = {r["region"]: r for r in doc["regions"]}
    assert set(rows) == {"eastus", "westeurope"}
    for region in rows:
        assert rows[region]["stored_bytes"] == stored, rows[region]
        assert rows[region]["gib_days"] > 0
    assert rows["eastus"]["home"] is True
    assert rows["eastus"]["bytes_served"] == 2 * len(pushed.manifest) + len(layer)
    assert rows["westeurope"]["bytes_served"] == len(pushed.manifest)
    assert rows["westeurope"]["pushes"] == 0
    total = doc["total"]
    assert total["stored_bytes"] == stored  # distinct digests, not one per copy
    assert (total["pushes"], total["pulls"]) == (1, 3)
    first = total["gib_days"]
    wait_until(lambda: usage()["total"]["gib_days"] > first, "GiB-days grow", 10)
    # bytes held for 2 regions accrue about twice one region's rate
    later = usage()
    assert later["total"]["gib_days"] == pytest.approx(sum(r["gib_days"] for r in later["regions"]))

    cli = owner_cli(tmp_path, east.url)
    out = cli.ok("usage", "--registry", "usageprem1")
    assert out["total"]["stored_bytes"] == stored and out["registry"] == "usageprem1"
    table = cli("usage", "--registry", "usageprem1")
    assert table.returncode == 0 and "(total)" in table.stdout and "westeurope" in table.stdout
    line = cli.fails(6, "usage", "--registry", "nosuchreg3")
    assert "nosuchreg3" in line


async def test_usage_records_add_up_across_nodes_of_a_region(etcd: EtcdServer) -> None:
    """Two nodes of one region flushing at once: every count lands once and
    every second of storage is integrated once (compare-and-swap)."""
    reg = "usagecas1"
    nss = [Namespace(EtcdKV(etcd.endpoints), "casregion") for _ in range(2)]
    for ns in nss:
        await ns.start()
    try:
        await nss[0].set_registry_config(
            reg, {"sku": "Premium", "location": "casregion", "replicas": ["casregion"]}
        )
        size = 3 << 20
        digest = sha256(b"usagecas1-layer")
        await nss[0].link_blob(reg, "app", digest, size)
        counters = [Counters(), Counters()]
        recorders = [
            UsageRecorder(ns, c, 3600, "default") for ns, c in zip(nss, counters, strict=True)
        ]
        for ns in nss:
            await ns.caught_up()
        assert await recorders[0].flush_once() == 1  # first integration point
        await nss[1].caught_up()
        start = nss[1].usage_records(reg)["casregion"]["integrated_at"]
        for _ in range(5):
            for c in counters:
                for _ in range(7):
                    c.pull(reg, 100)
                c.push(reg)
            await asyncio.gather(*(r.flush_once() for r in recorders))
            await asyncio.sleep(0.05)
        entry = await nss[0].kv.get(f"/meridian/reg/{reg}/usage/casregion")
        assert entry is not None
        rec = json.loads(entry.value)
        assert (rec["pulls"], rec["pushes"], rec["bytes_served"]) == (70, 10, 7000)
        assert rec["stored_bytes"] == size
        expected = size / GIB * (rec["integrated_at"] - start) / 86400
        assert rec["gib_days"] == pytest.approx(expected, rel=1e-9)
        assert rec["gib_days"] > 0
    finally:
        for ns in nss:
            await ns.close()


# -- regions ------------------------------------------------------------------------------------


def test_region_remove(env: Env, tmp_path: Path) -> None:
    """A stopped region stays DOWN everywhere until removed; then it leaves
    the namespace, the router, the regions and replication status, every
    node's tables, placements and registries' replicas."""
    east, west = env["eastus"], env["westeurope"]
    extra = RegionNode(env.base, "centralus", env.etcd.client_url, extra=FAST).start()
    try:
        env.router.wait_for(
            lambda st: any(r["region"] == "centralus" and r["up"] for r in st["regions"]),
            "centralus in rotation",
        )
        create_registry(east, "regremove1", "Premium", "eastus")
        create_registry(east, "regremove2", "Premium", "centralus")
        assert (
            mapi(east, "POST", "/registries/regremove1/replications", {"location": "centralus"})[0]
            == 201
        )
        pushed = push_image(east, "regremove1", "rm/app", "v1", [os.urandom(9000)])
        wait_until(lambda: extra.has_all(list(pushed.sizes)), "centralus holds regremove1", 60)
        cli = owner_cli(tmp_path, east.url)
        line = cli.fails(7, "region", "remove", "centralus", "--yes")
        assert "regremove2" in line and "home location" in line
        assert cli.ok("registry", "delete", "regremove2", "--yes") is None
        line = cli.fails(7, "region", "remove", "centralus", "--yes")
        assert "stop its nodes first" in line
        line = cli.fails(2, "region", "remove", "centralus")
        assert "--yes" in line
    finally:
        extra.stop()
    # stopped: DOWN everywhere, as before this existed
    wait_until(
        lambda: any(
            r["region"] == "centralus" and r["status"] == "down"
            for r in json.loads(cli("replication", "status", "--node", west.url, "--json").stdout)
        ),
        "centralus down in the replication status",
        30,
    )
    assert replications(west, "regremove1")["centralus"]["status"] == "down"
    assert "centralus" in cli("regions", "--etcd", env.etcd.client_url).stdout
    doc = cli.ok("region", "remove", "centralus", "--yes")
    assert doc["region"] == "centralus"
    assert doc["removed"]["placements"] >= len(pushed.sizes) and doc["removed"]["registries"] == 1
    line = cli.fails(6, "region", "remove", "centralus", "--yes")
    assert "unknown region" in line

    def gone_everywhere() -> bool:
        regions = json.loads(cli("regions", "--etcd", env.etcd.client_url, "--json").stdout)
        status = json.loads(cli("replication", "status", "--node", west.url, "--json").stdout)
        router = env.router.status()
        for n in (east, west):
            _, _, raw = http("GET", n.url + "/meridian/v1/regions")
            if "centralus" in {r["name"] for r in json.loads(raw)["regions"]}:
                return False
            if "centralus" in n.status().peers_rtt_s:
                return False
            if 'meridian_replication_peer_up{region="centralus"}' in n.metrics():
                return False  # its peer entry (channel, RTT, gauges) is gone too
        return (
            "centralus" not in {r["region"] for r in regions}
            and "centralus" not in {r["region"] for r in status}
            and "centralus" not in {r["region"] for r in router["regions"]}
        )

    wait_until(gone_everywhere, "centralus gone from every table", 30)
    for d in pushed.sizes:
        assert placements(env.etcd, d, "regremove1") == {"eastus"}
    status, doc = mapi(east, "GET", "/registries/regremove1")
    assert doc["replicas"] == ["eastus"], doc
    assert list(replications(west, "regremove1")) == ["eastus"]
    # a live region is refused (southeastasia is no registry's home)
    line = cli.fails(7, "region", "remove", "southeastasia", "--yes")
    assert "stop its nodes first" in line
    assert "southeastasia" in {r["region"] for r in env.router.status()["regions"]}


def test_region_remove_needs_the_owner_and_passes_the_router(env: Env) -> None:
    status, doc = api(env["eastus"], "DELETE", "/regions/eastus", auth={})
    assert status == 401, doc
    # the router forwards it to a region, as the rest of the management API
    status, doc = api(env.router, "DELETE", "/regions/nowhere")
    assert status == 404 and doc["errors"][0]["code"] == "NOT_FOUND", doc
    assert "unknown region" in message(doc)
    assert "eastus" in {r["region"] for r in env.router.status()["regions"]}
