"""Smoke test of loadtest/bench_namespace.py at toy size: real etcd and
Meridian nodes, wrk; checks the run completes and the JSON result is well
formed. Nothing about speed.

It runs as a user would, without ``MERIDIAN_OWNER_PASSWORD``: the benchmark
picks the owner password itself, its nodes require logins, its clients log
in and wrk carries a bearer token (a request refused would count as a wrk
error)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.benchrun import run_bench, strict_json
from tests.procs import require_tool

pytestmark = pytest.mark.timeout(240)


def test_toy_run_logs_in_and_writes_well_formed_json(tmp_path: Path) -> None:
    require_tool("etcd")
    require_tool("wrk")
    out = tmp_path / "bench_namespace.json"
    work = tmp_path / "work"
    proc = run_bench(
        "loadtest.bench_namespace",
        "--quick",
        "--samples", "3",
        "--repos", "12",
        "--tags-per-repo", "3",
        "--workdir", str(work),
        "--out", str(out),
        timeout=220,
    )  # fmt: skip
    assert f"wrote {out}" in proc.stdout

    res = strict_json(out.read_text())
    assert isinstance(res, dict)
    assert res["bench"] == "namespace" and res["profile"] == "quick"
    # The nodes challenged and the clients logged in (sessions and wrk runs).
    assert res["auth"]["user"] == "owner" and res["auth"]["tokens_fetched"] >= 6, res["auth"]
    for name in ("a", "b", "s", "scale-node"):
        (log,) = (work / name).glob("node-*.log")
        assert "authentication is OFF" not in log.read_text()

    p = res["propagation"]
    assert p["samples"] == 3 and p["ack_to_visible"]["n"] == 3
    for name in ("etcd_node", "standalone_node"):
        g = res["manifest_get"][name]
        assert g["errors"] == 0 and g["rps_median"] > 0, g
    s = res["scale"]
    assert s["repos"] == 12 and s["tags_per_repo"] == 3 and s["seed"]["keys"] == 12 * 3 * 2
    assert math.isfinite(s["start_to_v2_s"]) and s["start_to_synced_s"] >= s["start_to_v2_s"]
    for name, r in s["latency"].items():
        assert r["errors"] == 0 and r["requests"] > 0, (name, r)
