"""Smoke test of loadtest/bench_replication.py at toy size: real etcd, WAN
emulator and two region nodes; checks the run completes, every process it
started is gone, and the JSON result is well formed. Nothing about speed.

It runs as a user would, without ``MERIDIAN_OWNER_PASSWORD``: the benchmark
picks the owner password itself, its nodes require logins and its clients
log in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.benchrun import is_number, run_bench, strict_json
from tests.procs import require_tool

pytestmark = pytest.mark.timeout(120)


def test_toy_run_writes_well_formed_json(tmp_path: Path) -> None:
    require_tool("etcd")
    out = tmp_path / "bench_replication.json"
    proc = run_bench(
        "loadtest.bench_replication",
        "--image", "toy=2x96K",
        "--rounds", "1",
        "--rtt-ms", "20",
        "--bandwidth", "50M",
        "--timeout", "30",
        "--workdir", str(tmp_path / "work"),
        "--out", str(out),
        timeout=100,
    )  # fmt: skip
    assert "lag(201)" in proc.stdout and "emulator alone" in proc.stdout

    res = strict_json(out.read_text())
    assert isinstance(res, dict)
    assert res["schema"] == "meridian.bench_replication/1"
    st = res["settings"]
    assert st["rtt_ms"] == 20 and st["bandwidth_bytes_per_s"] == 50 << 20
    assert st["images"] == {"toy": "2x96K"} and st["rounds"] == 1

    # Authentication was on: the nodes challenged and the clients logged in
    # (a push and a pull at least), and no node ran in the open mode.
    assert res["auth"]["user"] == "owner" and res["auth"]["tokens_fetched"] >= 2, res["auth"]
    for region in ("eastus", "westeurope"):
        log = (tmp_path / "work" / region / f"{region}.log").read_text()
        assert "authentication is OFF" not in log

    # Every process the run started was ended.
    assert set(res["pids"]) == {"etcd", "wan", "eastus", "westeurope"}
    for pid in res["pids"].values():
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} outlived the run"

    s = res["summary"]["toy"]
    for key in (
        "push_s",
        "lag_from_ack_s",
        "floor_s",
        "lag_ratio",
        "lag_from_start_s",
        "floor_from_start_s",
        "lag_from_start_ratio",
        "floor_pipelined_from_ack_s",
    ):
        assert is_number(s[key]) and s[key] > 0, key
    assert s["floor_s"] == pytest.approx(0.020 + s["bytes"] / (50 << 20), rel=1e-3)
    assert isinstance(s["lag_goal_met"], bool)
    pull = s["pull"]
    assert pull["all_verified"] is True
    assert is_number(pull["duration_s"]) and is_number(pull["ratio"]) and pull["rounds"] == 1

    rounds = res["rounds"]
    assert sorted(r["mode"] for r in rounds) == ["lag", "pull"]
    for r in rounds:
        kinds = sorted(it["kind"] for it in r["items"])
        assert kinds == ["blob", "blob", "blob", "manifest"]  # 2 layers, config, manifest
        assert sum(it["bytes"] for it in r["items"]) == r["bytes"]
        for it in r["items"]:
            assert it["in_b_s"] >= it["in_a_s"] >= 0
        assert r["link_bytes_a_to_b"] >= r["bytes"]  # every byte crossed the emulator
        assert set(r["cpu_s"]) >= {"bench", "etcd", "wan", "eastus", "westeurope"}
    pulled = next(r for r in rounds if r["mode"] == "pull")
    pr = pulled["pull"]
    assert pr["verified"] is True and pr["bytes"] == pulled["bytes"]
    assert all(b["ok"] for b in pr["blobs"])
    assert {b["digest"] for b in pr["blobs"]} == {
        it["digest"] for it in pulled["items"] if it["kind"] == "blob"
    }
    cal = res["calibration"]
    assert cal["bytes"] == 2 * 96 * 1024 and is_number(cal["median_s"]) and cal["median_s"] > 0
    # The nodes' data and logs stayed in --workdir.
    assert (tmp_path / "work" / "westeurope" / "westeurope.log").exists()
