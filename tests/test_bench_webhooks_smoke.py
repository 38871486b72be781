"""Smoke test of loadtest/bench_webhooks.py at toy size: a real node with
authentication on, the receivers in the benchmark's process; checks the
run completes, its node is gone, every series has its samples and the JSON
is well formed. Nothing about speed.

It runs as a user would, without ``MERIDIAN_OWNER_PASSWORD``: the benchmark
picks the owner password itself and its clients log in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.benchrun import is_number, run_bench

pytestmark = pytest.mark.timeout(120)


def test_toy_run_writes_well_formed_json(tmp_path: Path) -> None:
    out = tmp_path / "bench_webhooks.json"
    proc = run_bench(
        "loadtest.bench_webhooks",
        "--rounds", "2",
        "--receiver-delay", "1",
        "--layer-size", "4K",
        "--workdir", str(tmp_path / "work"),
        "--out", str(out),
        timeout=100,
    )  # fmt: skip
    assert "webhook, slow receiver" in proc.stdout and "ratio slow/fast" in proc.stdout

    res = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    assert res["schema"] == "meridian.bench_webhooks/1"
    assert res["settings"] == {"rounds": 2, "layer_size": 4096, "receiver_delay_s": 1.0}
    # Authentication was on: the client fetched tokens, the node never ran open.
    assert res["auth"]["user"] == "owner" and res["auth"]["tokens_fetched"] >= 1
    assert "authentication is OFF" not in (tmp_path / "work" / "node.log").read_text()
    assert not os.path.exists(f"/proc/{res['pids']['node']}"), "the node outlived the run"
    for series in ("none", "fast", "slow"):
        s = res["series"][series]
        assert s["n"] == 2 and len(res["samples"][series]) == 2
        for key in ("manifest_put_ms", "push_ms"):
            assert is_number(s[key]["median"]) and s[key]["median"] > 0
            assert s[key]["p95"] >= s[key]["median"]
    for which in ("slow/fast", "fast/none"):
        assert all(is_number(v) for v in res["ratio_median"][which].values())
    assert set(res["deliveries_received_during_run"]) == {"fast", "slow"}
