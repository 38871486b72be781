"""Smoke test of loadtest/bench_instructions.py at toy size: the anchor and
a node (auth on) under callgrind, counted per request with ab. Checks the
run completes, every answer was the expected one (the benchmark refuses to
report otherwise) and the figures are well formed. Nothing about speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchrun import is_number, run_bench, strict_json
from tests.procs import require_tool

pytestmark = pytest.mark.timeout(400)


def test_toy_run(tmp_path: Path) -> None:
    for tool in ("valgrind", "ab"):
        require_tool(tool)
    out = tmp_path / "instructions.json"
    proc = run_bench(
        "loadtest.bench_instructions",
        "--requests", "40",
        "--warmup", "10",
        "--json", str(out),
        timeout=380,
    )  # fmt: skip
    fig = strict_json(out.read_text())
    assert isinstance(fig, dict)
    assert fig["requests"] == 40
    anchor = fig["anchor"]["manifest_get"]
    assert is_number(anchor["per_request"]) and anchor["per_request"] > 0
    for path in ("manifest_get", "blob_head", "missing_blob_head"):
        got = fig["meridian"][path]
        assert is_number(got["instructions"]) and got["instructions"] > 0, got
        assert got["per_request"] == round(got["instructions"] / 40)
        assert is_number(fig["x_anchor"][path]) and fig["x_anchor"][path] > 0
    assert "manifest GET by tag (auth)" in proc.stdout
