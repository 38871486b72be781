"""Many nodes per region (issue 15, membership): each node registers its own
key under the region with its endpoints and lease; ``meridian regions``
lists a region's nodes; a region is alive while any of its nodes is, and a
node that stops cleanly is gone at once.

The two nodes of a region here use separate data dirs (the filesystem store
is not shared between processes in these tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.namespace import Cache, Namespace, NodeInfo, RegionInfo, node_key, region_key
from tests.etcd_server import EtcdServer
from tests.procs import NodeProcess
from tests.test_cli import meridian

pytestmark = pytest.mark.timeout(120)


def test_cache_keeps_nodes_per_region_and_regions_names_a_live_node() -> None:
    ns = Namespace.__new__(Namespace)
    ns.cache = Cache()
    c = ns.cache
    c.apply(region_key("east"), RegionInfo("east", "http://gone:1", "gone:2").to_json(), 1)
    a = NodeInfo("east", "a", "http://a:1", "a:2")
    b = NodeInfo("east", "b", "http://b:1", "b:2")
    c.apply(node_key("east", "a"), a.to_json(), 2)
    c.apply(node_key("east", "b"), b.to_json(), 3)
    assert ns.nodes() == {"east": {"a": a, "b": b}}
    assert c.regions == {"east": RegionInfo("east", "http://gone:1", "gone:2")}  # not a region
    # The record names a node that is gone: readers get a live node instead.
    assert ns.regions()["east"] == RegionInfo("east", "http://a:1", "a:2")
    assert ns.alive_regions() == {"east"}  # no liveness key, but live nodes
    c.apply(node_key("east", "a"), None, 4)
    assert ns.regions()["east"].http == "http://b:1"
    c.apply(node_key("east", "b"), None, 5)
    assert ns.nodes() == {}
    assert ns.alive_regions() == set()
    assert ns.regions()["east"].http == "http://gone:1"


def _regions(etcd: str) -> dict[str, dict]:
    r = meridian("regions", "--etcd", etcd, "--json")
    assert r.returncode == 0, r.stderr
    return {x["region"]: x for x in json.loads(r.stdout)}


def test_two_nodes_in_one_region(tmp_path: Path) -> None:
    with EtcdServer(str(tmp_path / "etcd")) as etcd:
        url = etcd.client_url
        one = NodeProcess(tmp_path / "one", region="eastus", etcd=url, extra=("--node-id", "one"))
        two = NodeProcess(tmp_path / "two", region="eastus", etcd=url, extra=("--node-id", "two"))
        one.start()
        try:
            two.start()
            try:
                east = _regions(url)["eastus"]
                assert east["alive"] is True
                nodes = [(n["node"], n["http"], n["alive"], n["reachable"]) for n in east["nodes"]]
                assert nodes == [
                    ("one", one.url, True, True),
                    ("two", two.url, True, True),
                ]
                table = meridian("regions", "--etcd", url)
                assert table.returncode == 0, table.stderr
                assert "node one" in table.stdout and "node two" in table.stdout
                # The node's own view (meridian regions --node) lists both too.
                via_node = meridian("regions", "--node", one.url, "--json")
                assert via_node.returncode == 0, via_node.stderr
                (row,) = json.loads(via_node.stdout)
                assert [n["node"] for n in row["nodes"]] == ["one", "two"]
            finally:
                two.stop()  # a clean stop: its key goes at once, the region stays
            east = _regions(url)["eastus"]
            assert east["alive"] is True
            assert [n["node"] for n in east["nodes"]] == ["one"]
            assert east["http"] == one.url  # the region's endpoint is a live node
        finally:
            one.stop()
        east = _regions(url)["eastus"]
        assert east["alive"] is False
        assert east["nodes"] == []
