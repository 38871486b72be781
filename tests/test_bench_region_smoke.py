"""Smoke test of loadtest/bench_region.py at toy size: etcd, Azurite, a
region's nodes on one container and the router; checks the run completes
and its figures are well formed. Nothing about speed.

It runs as a user would, without ``MERIDIAN_OWNER_PASSWORD`` (the benchmark
picks one and gives it to its nodes): a refused request would be a wrk
error or a failed download."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from localcluster.azurite import find_azurite
from tests.benchrun import run_bench
from tests.procs import require_tool

pytestmark = pytest.mark.timeout(300)


def test_toy_run(tmp_path: Path) -> None:
    for tool in ("etcd", "wrk", "curl"):
        require_tool(tool)
    find_azurite()
    out = tmp_path / "bench_region.json"
    proc = run_bench(
        "loadtest.bench_region",
        "--blob-mib", "2",
        "--downloads", "3",
        "--parallel", "2",
        "--requests", "300",
        "--connections", "4",
        "--rounds", "2",
        "--json", str(out),
        timeout=280,
    )  # fmt: skip

    def strict(const: str) -> object:
        raise ValueError(f"non-standard JSON constant {const}")

    fig = json.loads(out.read_text(), parse_constant=strict)
    assert fig["auth"] == {"user": "owner"}
    rps = fig["manifest_rps"]
    assert len(rps["rounds"]) == 2
    for key in ("1_node", "2_nodes"):
        assert rps[key]["errors"] == 0 and rps[key]["requests"] >= 2 * 300, rps[key]
        assert rps[key]["rps"] > 0
    # The router sent manifest GETs to both nodes of the region.
    assert all(n > 0 for n in rps["2_nodes"]["per_node"].values()), rps["2_nodes"]
    assert set(rps["2_nodes"]["per_node"]) == {"node-1", "node-2"}
    blob = fig["blob_get"]
    assert blob["size"] > 1 << 20  # about --blob-mib
    for key in ("redirect", "stream"):
        assert blob[key]["downloads"] == 3 and blob[key]["bytes"] == 3 * blob["size"]
        assert math.isfinite(blob[key]["mib_s"]) and blob[key]["mib_s"] > 0
    assert "password" not in (proc.stdout + proc.stderr).lower()
