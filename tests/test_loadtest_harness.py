"""The load-test harness (``meridian loadtest``): every scenario at toy size.

Each test runs the real command (``python -m loadtest``) as a process, which
starts real servers (CNCF Distribution, Meridian nodes, etcd, the router,
the WAN emulator) and real clients (aiohttp workers, skopeo), then checks
that the result file is strict, well-formed JSON and that the HTML report
has its sections and SVG plots. Nothing here asserts a timing.

The command runs as a user runs it, without ``MERIDIAN_OWNER_PASSWORD``: the
harness picks the owner password of the Meridian it starts, or reads the one
of the ``meridian up`` it attaches to, and its clients log in (every Meridian
target reports the login; Distribution asks for none).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.auth.identities import OWNER_PASSWORD_ENV
from cluster.runtime import free_port
from loadtest import harness, samples, svg
from loadtest.procstats import flatness, listening_pid
from loadtest.progress import Progress
from loadtest.reference import REPO_ROOT, require_tool, running
from loadtest.scenarios import SCENARIOS
from loadtest.workers import NotLoopback, require_loopback, session

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    # Fail, never skip, naming the install step.
    require_tool("docker-registry", "apt-get install -y docker-registry")
    require_tool("skopeo", "apt-get install -y skopeo")
    require_tool("etcd", "apt-get install -y etcd-server")
    require_tool("wrk", "apt-get install -y wrk")
    require_tool("ab", "apt-get install -y apache2-utils")


def strict_json(text: str) -> Any:
    def bad(const: str) -> Any:
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=bad)


def run_cli(
    *argv: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m ARGV`` from the repository root, output captured, in this
    environment without the tests' owner password (as a user runs it), plus
    ``env``."""
    base = {k: v for k, v in os.environ.items() if k != OWNER_PASSWORD_ENV}
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO_ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def loadtest(tmp: Path, *argv: str, timeout: float = 150) -> tuple[dict[str, Any], str, str]:
    """Run ``python -m loadtest ARGV`` with its outputs in ``tmp``: (result, html, stdout)."""
    out = tmp / "result.json"
    work = tmp / "work"
    proc = run_cli("loadtest", *argv, "--json", str(out), "--workdir", str(work), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    doc = strict_json(out.read_text())
    html = out.with_suffix(".html").read_text()
    # every process the run started is gone, and so is its work dir
    assert not any(work.iterdir())
    return doc, html, proc.stdout


def check_document(doc: dict[str, Any], scenario: str, targets: list[str]) -> dict[str, Any]:
    assert doc["schema"] == harness.SCHEMA
    assert doc["host"]["cpus"] >= 1
    (sc,) = doc["scenarios"]
    assert sc["scenario"] == scenario
    assert [t["name"] for t in sc["targets"]] == targets
    for t in sc["targets"]:
        assert t["url"].startswith("http://127.0.0.1:")
        assert t["pids"], t  # the servers' processes were found and measured
        # Meridian asked for a login and got the owner's; Distribution asks for none.
        assert t["login"] == (None if t["kind"] in ("distribution", "registry") else "owner"), t
    assert sc["steps"]
    assert set(sc["params"]) == {p.attr for p in SCENARIOS[scenario].params}
    for step in sc["steps"]:
        assert {"id", "label", "unit", "primary", "higher_is_better"} <= set(step)
        for name in targets:
            rounds = sc["results"][name][step["id"]]
            assert len(rounds) == sc["rounds"] == 1
            for r in rounds:
                st = r["stats"]
                assert st["requests"] > 0, (name, step["id"], r["messages"])
                assert st["errors"] == 0, (name, step["id"], r["errors"], r["messages"])
                assert r["worker_failures"] == []
                assert r["server_cpu_s"] >= 0
                if st.get("p99_ms") is not None:
                    assert st["p99_ms"] >= st["p50_ms"] >= 0
                ts = r["timeseries"]
                if step["op"] not in ("wrk", "ab"):
                    assert len(ts["t"]) == len(ts["p50_ms"]) == len(ts["rps"]) >= 1
                    assert sum(ts["errors"]) == 0
                    assert r["by_op"]
    labels = [row["label"] for row in sc["figures"]]
    assert any(not label.startswith(" ") for label in labels)
    for row in sc["figures"]:
        assert set(row["values"]) <= set(targets)
        if len(targets) > 1 and row["label"].strip() != "errors":
            assert set(row["ratios"]) <= set(targets) - {sc["baseline"]}
    return sc


def check_ops(sc: dict[str, Any], step: str, ops: set[str]) -> None:
    """Every target's run of ``step`` did each of ``ops``, without errors."""
    for t in sc["targets"]:
        (res,) = sc["results"][t["name"]][step]
        assert ops <= set(res["by_op"]), res["by_op"].keys()
        for op in ops:
            assert res["by_op"][op]["requests"] > 0 and res["by_op"][op]["errors"] == 0


def check_html(html: str, scenario: str, min_svgs: int) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert html.rstrip().endswith("</html>")
    assert '<section id="summary">' in html
    assert f'id="scenario-{scenario}"' in html
    for section in ("Targets", "Parameters", "Figures", "Comparison"):
        assert f"<h3>{section}" in html, section
    # self-contained: no script, no stylesheet or image from elsewhere
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    svgs = re.findall(r"<svg [^>]*>.*?</svg>", html, re.S)
    assert len(svgs) >= min_svgs, len(svgs)
    assert all("<polyline" in s or "<rect x=" in s or "no data" in s for s in svgs)


def check_step_plots(html: str) -> None:
    for section in ("Latency percentiles over time", "Throughput over time", "Errors over time"):
        assert f"<h4>{section}</h4>" in html, section
    assert "<polyline" in html


# -- scenarios, end to end -----------------------------------------------------------------


def test_manifest_storm_both_targets(tmp_path: Path) -> None:
    doc, html, out = loadtest(tmp_path, "manifest-storm", "--toy")
    sc = check_document(doc, "manifest-storm", ["distribution", "meridian"])
    assert sc["baseline"] == "distribution"
    (row, *_) = sc["figures"]
    assert row["unit"] == "req/s" and row["ratios"]["meridian"] > 0
    assert "meridian/distribution" in out  # the table, with its ratio column
    check_html(html, "manifest-storm", 4)
    check_step_plots(html)


def test_manifest_storm_with_wrk(tmp_path: Path) -> None:
    doc, html, _ = loadtest(
        tmp_path, "manifest-storm", "--toy", "--loadgen", "wrk", "--start", "meridian"
    )
    sc = check_document(doc, "manifest-storm", ["meridian"])
    (res,) = sc["results"]["meridian"][sc["steps"][0]["id"]]
    assert res["stats"]["tool"] == "wrk"
    check_html(html, "manifest-storm", 1)


def test_head_storm_existing_and_missing(tmp_path: Path) -> None:
    doc, html, _ = loadtest(tmp_path, "head-storm", "--toy")
    sc = check_document(doc, "head-storm", ["distribution", "meridian"])
    check_ops(sc, "head", {"head", "head-missing"})  # 404s for missing blobs, not errors
    check_html(html, "head-storm", 4)
    check_step_plots(html)


def test_pull_whole_and_ranged(tmp_path: Path) -> None:
    doc, html, _ = loadtest(tmp_path, "pull", "--toy", "--sizes", "300K")
    sc = check_document(doc, "pull", ["distribution", "meridian"])
    ids = [s["id"] for s in sc["steps"]]
    assert len(ids) == 2 * 2  # modes x concurrencies
    for s in sc["steps"]:
        assert s["unit"] == "MiB/s" and s["bytes_heavy"]
        (res,) = sc["results"]["meridian"][s["id"]]
        assert res["stats"]["bytes"] > 0 and res["stats"]["mib_s"] > 0
    check_html(html, "pull", 3 * len(ids) + 1)
    check_step_plots(html)


def test_push_monolithic_and_chunked(tmp_path: Path) -> None:
    doc, html, _ = loadtest(tmp_path, "push", "--toy", "--sizes", "200K", "--concurrency", "2")
    sc = check_document(doc, "push", ["distribution", "meridian"])
    assert {s["id"] for s in sc["steps"]} == {
        "push-200KiB-monolithic-c2",
        "push-200KiB-chunked-c2",
    }
    check_html(html, "push", 7)


@pytest.mark.parametrize(("scenario", "target"), [("push", "meridian"), ("pull", "distribution")])
def test_skopeo_as_the_client(tmp_path: Path, scenario: str, target: str) -> None:
    args = ["--toy", "--client", "skopeo", "--sizes", "128K", "--concurrency", "1"]
    doc, html, _ = loadtest(tmp_path, scenario, *args, "--max-requests", "3", "--start", target)
    sc = check_document(doc, scenario, [target])
    assert sc["steps"][0]["op"] == f"skopeo_{scenario}"
    (res,) = sc["results"][target][sc["steps"][0]["id"]]
    assert res["stats"]["requests"] == 3 and res["stats"]["client_cpu_s"] > 0
    check_html(html, scenario, 4)


def test_mixed_workload(tmp_path: Path) -> None:
    doc, html, _ = loadtest(tmp_path, "mixed", "--toy")
    sc = check_document(doc, "mixed", ["distribution", "meridian"])
    check_ops(sc, "mixed", {"manifest", "pull", "push", "manifest-put"})
    check_html(html, "mixed", 4)
    check_step_plots(html)


def test_soak_checks_memory_and_fds(tmp_path: Path) -> None:
    doc, html, out = loadtest(tmp_path, "soak", "--toy", "--seconds", "6")
    sc = check_document(doc, "soak", ["meridian"])
    checks = sc["checks"]
    assert isinstance(checks["passed"], bool)
    per = checks["targets"]["meridian"]
    assert per["errors"] == 0 and per["requests"] > 0
    (proc,) = per["processes"].values()
    assert {"rss_mib", "fds"} <= set(proc)
    (res,) = sc["results"]["meridian"]["soak"]
    series = res["process"]["series"]["meridian"]
    assert len(series["rss_mb"]) == len(series["fds"]) == len(series["t"]) >= 3
    assert all(v > 0 for v in series["rss_mb"]) and all(v > 0 for v in series["fds"])
    assert "checks:" in out
    check_html(html, "soak", 6)
    for section in ("Soak checks", "Resident memory (VmRSS) over time", "Open file descriptors"):
        assert section in html


def test_rollout_through_the_router(tmp_path: Path) -> None:
    doc, html, _ = loadtest(tmp_path, "rollout", "--toy")
    sc = check_document(doc, "rollout", ["meridian"])
    (res,) = sc["results"]["meridian"]["rollout"]
    ex = res["extra"]
    assert ex["nodes"] == ex["nodes_ok"] == 4 and ex["nodes_failed"] == 0
    assert ex["all_done_s"] > 0 and ex["node_p99_s"] >= ex["node_p50_s"] > 0
    assert len(ex["node_seconds"]) == 4
    regions = set(sc["targets"][0]["regions"])
    assert len(regions) == 2
    assert set(ex["bytes_by_region"]) <= regions and sum(ex["bytes_by_region"].values()) > 0
    assert set(ex["requests_by_region"]) == regions
    assert any(v["router_redirected"] > 0 for v in ex["requests_by_region"].values())
    redirected = sum(v["router_redirected"] for v in ex["requests_by_region"].values())
    assert 0 <= ex["router_shared_heads"] < redirected  # the first GET of a blob asks itself
    pids = sc["targets"][0]["pids"]
    assert {"etcd", "router"} <= set(pids) and "wan" not in pids
    check_html(html, "rollout", 6)
    assert "Nodes done over time" in html and "Bytes served per region" in html


def test_multiregion_sites_and_replication_lag(tmp_path: Path) -> None:
    doc, html, _ = loadtest(tmp_path, "multiregion", "--toy")
    sc = check_document(doc, "multiregion", ["meridian"])
    (res,) = sc["results"]["meridian"]["multiregion"]
    ex = res["extra"]
    assert set(ex["sites"]) == {"eastus", "westeurope"}
    assert ex["sites"]["eastus"]["role"] == "push"
    assert ex["sites"]["eastus"]["requests"] == 2  # --pushes at toy size
    pull = ex["sites"]["westeurope"]
    assert pull["role"] == "pull" and pull["requests"] > 0 and pull["errors"] == 0
    assert pull["rtt_ms"] == {"eastus": 45.0, "westeurope": 2.0}
    rep = ex["replication"]["westeurope"]
    assert rep["observed"] == 2 and rep["not_replicated"] == 0
    assert rep["lag_p99_s"] >= rep["lag_p50_s"] > 0
    assert {lag["to"] for lag in ex["lags"]} == {"westeurope"}
    assert set(sc["targets"][0]["site_routers"]) == {"eastus", "westeurope"}
    check_html(html, "multiregion", 6)
    assert "Replication lag per region" in html and "Pull latency per site" in html


def test_compare_toy(tmp_path: Path) -> None:
    """The toy suite on three targets: Distribution, the node as one process
    and the node with ``--workers 2`` (and its etcd), every figure with a
    ratio for both nodes; the rollout on Distribution and a cluster."""
    out = tmp_path / "compare.json"
    work = str(tmp_path / "work")
    argv = ["loadtest", "compare", "--size", "toy", "--json", str(out), "--workdir", work]
    proc = run_cli("cluster.cli", *argv, "--workers", "2", "--quiet", timeout=170)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Meridian vs CNCF Distribution" in proc.stdout
    doc = strict_json(out.read_text())
    assert doc["kind"] == "compare"
    names = [sc["scenario"] for sc in doc["scenarios"]]
    assert names == ["manifest-storm", "head-storm", "pull", "push", "rollout"]
    three = ["distribution", "meridian", "meridian-workers"]
    for sc in doc["scenarios"][:-1]:
        assert [t["name"] for t in sc["targets"]] == three
        assert [t["login"] for t in sc["targets"]] == [None, "owner", "owner"]
        dist, one, many = sc["targets"]
        # what each ran: one node process; two (both listening) and an etcd
        assert one["extra"]["workers"] == one["extra"]["listening_processes"] == "1"
        assert set(one["pids"]) == {"meridian"} and "--workers" not in one["extra"]["cmd"]
        assert many["extra"]["workers"] == many["extra"]["listening_processes"] == "2"
        assert "--workers 2 --etcd http://127.0.0.1:" in many["extra"]["cmd"]
        assert set(many["pids"]) == {"meridian-workers", "meridian-workers-etcd"}
        for step, rounds in sc["results"]["meridian-workers"].items():
            (r,) = rounds
            assert set(r["server_cpu_by_process"]) == set(many["pids"]), step
            assert r["server_cpu_s"] == pytest.approx(sum(r["server_cpu_by_process"].values()))
        for row in sc["figures"]:
            assert all(row["values"][n] is not None for n in three), row
            if row["label"].strip() == "errors":
                continue
            for n in ("meridian", "meridian-workers"):
                if row["values"]["distribution"] and row["values"][n]:
                    assert row["ratios"][n] > 0, row
                else:  # a server CPU of 0 (under a clock tick at toy size): no ratio
                    assert row["ratios"][n] is None, row
    rollout = doc["scenarios"][-1]
    assert [t["name"] for t in rollout["targets"]] == ["distribution", "meridian"]
    assert rollout["targets"][1]["kind"] == "cluster"
    summary = doc["summary"]
    assert summary["targets"] == three
    primaries = [r for r in summary["rows"] if not r["label"].startswith(" ")]
    assert len(primaries) >= 5
    for r in primaries:
        assert r["values"]["distribution"] is not None and r["values"]["meridian"] is not None
        assert r["ratios"]["meridian"] > 0
    assert sum(r["values"].get("meridian-workers") is not None for r in primaries) == 4
    assert any(n.startswith("meridian-workers: 2 node processes") for n in summary["notes"])
    assert "meridian-workers/distribution" in proc.stdout
    html = out.with_suffix(".html").read_text()
    check_html(html, "rollout", 10)
    assert "Meridian vs CNCF Distribution" in html
    assert "<th>meridian-workers vs distribution</th>" in html and "2 node processes" in html
    assert not any((tmp_path / "work").iterdir())


def test_worker_counts_and_targets(tmp_path: Path) -> None:
    """``compare --workers 1`` is the two-target run; a bad count, or
    ``--meridian-workers`` without the target it sets, is one line, exit 2,
    before anything starts."""
    from loadtest.compare import node_targets

    assert node_targets(1) == ["distribution", "meridian"]
    assert node_targets(4) == ["distribution", "meridian", "meridian-workers"]
    bad = run_cli("loadtest", "compare", "--size", "toy", "--workers", "0", timeout=30)
    assert bad.returncode == 2
    assert "--workers '0': give a whole number of processes, 1 or more" in bad.stderr
    unused = run_cli(
        "loadtest", "head-storm", "--toy", "--start", "meridian", "--meridian-workers", "2"
    )
    assert unused.returncode == 2
    assert "--meridian-workers sets the processes of --start meridian-workers" in unused.stderr
    for proc in (bad, unused):
        assert "Traceback" not in proc.stderr and "starting" not in proc.stdout


def test_round_order_is_fair() -> None:
    """Every target runs in every position equally often over N rounds; with
    3 targets, each also follows each other equally often over 2N; 2 alternate."""
    assert [harness.round_order(["d", "m"], r) for r in range(3)] == [
        ["d", "m"],
        ["m", "d"],
        ["d", "m"],
    ]
    three = ["d", "m", "w"]
    orders = [harness.round_order(three, r) for r in range(6)]
    for block in (orders[:3], orders[3:]):
        for pos in range(3):
            assert sorted(o[pos] for o in block) == three
    follows = [(o[i], o[i + 1]) for o in orders for i in range(2)]
    assert len(set(follows)) == 6 and all(follows.count(f) == 2 for f in set(follows))


def test_target_url_is_measured_with_its_pid(tmp_path: Path) -> None:
    with running("distribution") as server:
        doc, _, _ = loadtest(tmp_path, "head-storm", "--toy", "--target", f"dist={server.base_url}")
        sc = check_document(doc, "head-storm", ["dist"])
        assert sc["targets"][0]["pids"] == {"dist": server.pid}
        assert listening_pid(server.port) == server.pid


def test_up_target_logs_in_with_its_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--up DIR`` without MERIDIAN_OWNER_PASSWORD: the harness logs in with
    the password meridian up keeps in the file its up.json names (here one it
    generated: known to nobody else). Another password in the environment is
    refused before any load, and the message holds neither."""
    from localcluster import topology as topo
    from localcluster.up import Cluster, ClusterOptions

    data = tmp_path / "up"
    monkeypatch.delenv(OWNER_PASSWORD_ENV)  # meridian up generates one
    up = Cluster(ClusterOptions(data=data, topology=topo.default(1), port=free_port()))
    try:
        up.start()
        state = json.loads((data / "up.json").read_text())
        password = Path(state["owner"]["password_file"]).read_text().strip()
        assert password and password == up.owner_password

        doc, _, _ = loadtest(tmp_path / "run", "head-storm", "--toy", "--up", str(data))
        sc = check_document(doc, "head-storm", ["meridian"])
        assert sc["targets"][0]["kind"] == "up" and sc["targets"][0]["url"] == up.router

        refused = tmp_path / "refused"
        proc = run_cli(
            "loadtest", "head-storm", "--toy", "--up", str(data), "--out", str(refused),
            env={OWNER_PASSWORD_ENV: "not-the-owners"},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "is not the owner password of the meridian up" in proc.stderr
        assert password not in proc.stdout + proc.stderr
        assert "not-the-owners" not in proc.stdout + proc.stderr
        assert not refused.exists() or not any(refused.iterdir())
    finally:
        up.stop()


# -- refusals and help -------------------------------------------------------------------


def test_only_loopback_targets(tmp_path: Path) -> None:
    far = "http://example.invalid:5000"
    proc = run_cli("loadtest", "head-storm", "--toy", "--target", far, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "only sends traffic to loopback" in proc.stderr
    assert not list(tmp_path.iterdir())
    for ok in (
        "http://127.0.0.1:5000",
        "http://localhost:1",
        "http://[::1]:80",
        "http://127.9.9.9",
    ):
        assert require_loopback(ok) == ok
    for bad in ("http://10.0.0.1:5000", "http://example.invalid", "http://192.168.1.1"):
        with pytest.raises(NotLoopback):
            require_loopback(bad)


async def test_client_sessions_refuse_other_addresses() -> None:
    # The hook runs before any name lookup or connection (redirects too).
    async with session() as s:
        with pytest.raises(NotLoopback):
            async with s.get("http://example.invalid/v2/"):
                pass


def test_help_documents_every_parameter() -> None:
    for name, cls in SCENARIOS.items():
        proc = run_cli("loadtest", name, "--help")
        assert proc.returncode == 0, proc.stderr
        for p in cls.params:
            assert f"--{p.name}" in proc.stdout, (name, p.name)
            assert p.help.split()[0] in proc.stdout
        assert "--target" in proc.stdout and "--start" in proc.stdout
    top = run_cli("cluster.cli", "loadtest", "--help")
    assert top.returncode == 0 and all(name in top.stdout for name in SCENARIOS)
    assert "compare" in top.stdout


# -- pieces --------------------------------------------------------------------------------


def test_samples_stats_and_timeseries() -> None:
    rec = samples.Recorder(origin=100.0)
    for i in range(100):
        rec.add("get", 100.0 + i * 0.01, 0.001 * (i + 1), 1000, ok=i != 50)
    rec.error("get", "HTTP 500")
    rows = samples.Rows()
    rows.extend(rec.as_dict())
    st = samples.stats(rows)
    assert st["requests"] == 100 and st["errors"] == 1 and st["bytes"] == 100_000
    assert st["p50_ms"] <= st["p90_ms"] <= st["p99_ms"] <= st["max_ms"]
    ts = samples.timeseries(rows)
    assert sum(ts["errors"]) == 1
    assert round(sum(r * ts["width_s"] for r in ts["rps"])) == 100
    assert samples.stats(samples.Rows())["p50_ms"] is None
    assert set(samples.stats_by_op(rows)) == {"get"}


def test_svg_charts_are_standalone() -> None:
    line = svg.line_chart(
        [svg.Series("a", [0, 1, 2], [1.0, None, 3.0]), svg.Series("b", [0, 1], [2.0, 2.5])],
        title="t <&>",
        y_label="ms",
    )
    assert line.startswith("<svg") and line.endswith("</svg>") and "t &lt;&amp;&gt;" in line
    assert line.count("<polyline") == 3  # None breaks a line
    bars = svg.bar_chart(["x", "y"], [("a", [1.0, 2.0]), ("b", [None, 4.0])], title="bars")
    assert bars.count("<rect x=") == 3
    assert "no data" in svg.line_chart([], title="empty")
    assert svg.nice_ticks(0, 97)[-1] >= 97


def test_flatness_and_progress() -> None:
    assert flatness([100.0] * 30, tolerance=0.1, slack=1.0)["flat"] is True
    assert flatness([100.0 + 10 * i for i in range(30)], tolerance=0.1, slack=1.0)["flat"] is False
    assert flatness([1.0, 2.0], tolerance=0.1, slack=1.0)["flat"] is None

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    p = Progress(tty)
    p.start("step", 10, 5.0, "1/2")
    p.update(5, 0, 0)
    p.done("ok")
    assert "\r" in tty.getvalue() and "[####" in tty.getvalue() and "ok" in tty.getvalue()
    plain = io.StringIO()
    p = Progress(plain, interval=0.0)
    p.start("step", 10, 5.0)
    p.update(5, 1, 0)
    p.done()
    text = plain.getvalue()
    assert "\r" not in text and text.count("\n") >= 3 and "err 1" in text


def test_param_sizes() -> None:
    assert harness.parse_size("64K") == 64 << 10 and harness.parse_size("1.5M") == 3 << 19
    assert harness.size_label(100 << 20) == "100MiB" and harness.size_label(512) == "512B"
    assert harness.ratio(10.0, 20.0, True) == 2.0 and harness.ratio(10.0, 20.0, False) == 0.5
    assert harness.ratio(None, 1.0, True) is None


def test_worker_records_failures_and_ends() -> None:
    """A worker whose every request fails records each failure and ends on its
    budget (the harness would kill it by PID after its deadline + grace)."""
    from loadtest import workers

    old = workers.GRACE_S
    workers.GRACE_S = 1.0
    try:
        job = workers.Job(
            "blob_get",
            "http://127.0.0.1:9",
            {"repo": "x", "digest": "sha256:0", "size": 1},
            5,
            1.0,
            1,
        )
        job.start_at = time.monotonic() + 0.5
        (res,) = asyncio.run(workers.run_jobs([job]))
    finally:
        workers.GRACE_S = old
    # connection refused on port 9: every attempt is a recorded failure, none hangs
    assert res.failure is None, res.failure
    assert res.samples is not None and len(res.samples["t"]) >= 1
    assert sum(res.samples["ok"]) == 0
