"""Smoke test of loadtest/bench_router.py at toy size: a plain setup (etcd,
a node, the router) and a ``meridian up`` cluster, wrk; checks the run
completes and its figures are well formed. Nothing about speed.

It runs as a user would, without ``MERIDIAN_OWNER_PASSWORD``: the plain
setup's node gets a password the benchmark picks, ``meridian up`` generates
its own (kept in the file its up.json names, which the benchmark reads), and
every pull, push and wrk run logs in (a refused request would be a pull
error, or a wrk error)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.benchrun import run_bench, strict_json
from tests.procs import require_tool

pytestmark = pytest.mark.timeout(300)


def test_toy_run_logs_in_everywhere(tmp_path: Path) -> None:
    require_tool("etcd")
    require_tool("wrk")
    out = tmp_path / "bench_router.json"
    proc = run_bench(
        "loadtest.bench_router",
        "--pulls", "55",
        "--rounds", "1",
        "--samples", "40",
        "--json", str(out),
        timeout=280,
    )  # fmt: skip
    fig = strict_json(out.read_text())
    assert isinstance(fig, dict)
    # Both setups challenged and their clients logged in.
    auth = fig["auth"]
    assert auth["user"] == "owner", auth
    assert auth["tokens_fetched_plain"] >= 2 and auth["tokens_fetched_up"] >= 2, auth

    acc = fig["accuracy"]
    assert acc["pull_errors"] == 0 and acc["requests"] > 0, acc
    for key in ("overhead_plain", "overhead_emulated"):
        for q in ("p50", "p99"):
            assert math.isfinite(fig[key][q]["router_ms"]) and fig[key][q]["router_ms"] > 0
    for path in ("direct", "router"):
        t = fig["throughput_plain"][path]
        assert t["errors"] == 0 and t["rps"] > 0, (path, t)
    for mode in ("hang", "kill"):
        f = fig[f"failover_{mode}"]
        assert f["pulls"] == 55 and math.isfinite(f["pull_p50_ms"]), f
    # Passwords stay out of what the run prints.
    assert "password" not in proc.stdout.lower() + proc.stderr.lower()
