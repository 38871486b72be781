"""Single-node benchmark: Meridian against CNCF Distribution, side by side.

    python -m loadtest.bench_node [--quick] [--targets distribution,meridian]

Starts each target as a subprocess on a free loopback port (see
:mod:`loadtest.reference`), seeds the same content into each, checks that it
serves it correctly, then runs interleaved rounds (the order of the targets
alternates every round, and within a round each measurement runs on every
target back to back, so the machine's noise falls on both alike) and reports
the median of the rounds per target:

1. manifest GET by tag (req/s, p50/p99 latency, server CPU per request);
2. blob HEAD (same);
3. GET of a ~100 MiB blob (MiB/s): several sequential downloads, and 4 at once;
4. push of a ~100 MiB, 5-layer OCI image with ``skopeo copy oci:DIR docker://``
   (seconds). Every round pushes freshly generated layers into a new
   repository, so nothing can be skipped because it exists, and no
   cross-repository mount can short-circuit an upload (skopeo mounts only
   within one registry, and these blobs were never in it). Both targets get
   the same bytes in a round.

Load generators run in their own processes (wrk, ab, or spawned aiohttp
workers; see :mod:`loadtest.loadgen`), but on a small machine they share the
CPUs with the server under test: the report says how much CPU the client, the
server and everything else on the machine used.

Writes JSON (default ``results/bench_node.json``) and prints a table with
``ratio`` = Meridian / Distribution for higher-is-better rows and
Distribution / Meridian for lower-is-better ones, so > 1 means Meridian wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest import loadgen
from loadtest.ocipush import (
    MANIFEST_ACCEPT,
    OCI_MANIFEST,
    Image,
    Layer,
    OciClient,
    build_image,
    make_layer,
    random_image,
    write_oci_layout,
)
from loadtest.reference import (
    REPO_ROOT,
    TARGETS,
    LaunchError,
    Server,
    meridian_available,
    require_tool,
    start_target,
)

SCHEMA = "meridian.bench_node/1"
SKOPEO_INSTALL = "apt-get install -y skopeo"
MIB = 1 << 20
METRICS = ("manifest_get", "blob_head", "blob_get", "blob_get_x4", "push")
LABELS = {"distribution": "Distribution", "meridian": "Meridian"}


class BenchError(RuntimeError):
    pass


@dataclass
class Profile:
    rounds: int
    requests: int
    concurrency: int
    blob_mib: int
    seq_downloads: int
    par_downloads: int  # concurrent streams for blob_get_x4
    par_batches: int
    push_layers: int
    push_layer_mib: float
    warmup_requests: int


PROFILES = {
    "full": Profile(5, 20_000, 64, 100, 5, 4, 2, 5, 20, 2_000),
    "quick": Profile(3, 5_000, 64, 100, 3, 4, 1, 5, 20, 1_000),
    # for tests: seconds, not minutes
    "toy": Profile(1, 300, 8, 2, 2, 4, 1, 2, 0.25, 50),
}


# -- measurement context ---------------------------------------------------------


def _machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent not idle, since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    # guest time is already counted in user/nice
    total = sum(parts[:8])
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class CpuProbe:
    """CPU used during a measurement: by the server, by everything else."""

    server: Server
    wall: float = 0.0
    server_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0
    harness_cpu_s: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[CpuProbe]:
        s0, m0, h0, t0 = (
            self.server.cpu_seconds(),
            _machine_busy_seconds(),
            _self_cpu(),
            time.monotonic(),
        )
        yield self
        self.wall = time.monotonic() - t0
        self.server_cpu_s = self.server.cpu_seconds() - s0
        self.machine_cpu_s = _machine_busy_seconds() - m0
        self.harness_cpu_s = _self_cpu() - h0

    def fields(self, client_cpu_s: float) -> dict[str, float]:
        ncpu = os.cpu_count() or 1
        other = max(0.0, self.machine_cpu_s - self.server_cpu_s - client_cpu_s - self.harness_cpu_s)
        wall = max(self.wall, 1e-9)
        return {
            "wall_s": self.wall,
            "server_cpu_s": self.server_cpu_s,
            "client_cpu_s": client_cpu_s,
            "harness_cpu_s": self.harness_cpu_s,
            "other_cpu_s": other,
            "server_cpu_share": self.server_cpu_s / (wall * ncpu),
            "client_cpu_share": client_cpu_s / (wall * ncpu),
            "other_cpu_share": other / (wall * ncpu),
        }


@dataclass
class Seeded:
    repo: str
    tag: str
    manifest_digest: str
    manifest_size: int
    head_digest: str
    head_size: int
    big_digest: str
    big_size: int


@dataclass
class Context:
    args: argparse.Namespace
    profile: Profile
    workdir: Path
    pool: ProcessPoolExecutor | None  # aiohttp load workers, if that generator is used
    run_id: str
    servers: dict[str, Server] = field(default_factory=dict)
    seeded: dict[str, Seeded] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def tool_for(self, method: str) -> str:
        lg = self.args.loadgen
        if lg == "aiohttp":
            return "aiohttp"
        if lg == "ab" or method == "HEAD":  # wrk cannot HEAD (wg/wrk#198)
            return "ab"
        return "wrk"


# -- seeding and checks ------------------------------------------------------------


def seed_content(profile: Profile, run_id: str) -> tuple[Image, Image]:
    """The small image whose manifest we GET, and the image holding the big blob."""
    small = random_image(5, 2048, seed=f"{run_id}-small")
    big_layer = make_layer(profile.blob_mib * MIB, seed=f"{run_id}-big")
    return small, build_image([big_layer])


async def _seed_async(server: Server, small: Image, big: Image) -> Seeded:
    repo, tag = "bench/seed", "v1"
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = OciClient(server.base_url, session)
        digest = await client.push_image(repo, tag, small)
        await client.push_image(repo, "big", big)
    layer = small.layers[0]
    big_layer: Layer = big.layers[0]
    return Seeded(
        repo=repo,
        tag=tag,
        manifest_digest=digest,
        manifest_size=len(small.manifest),
        head_digest=layer.digest,
        head_size=len(layer.data),
        big_digest=big_layer.digest,
        big_size=len(big_layer.data),
    )


async def _check_async(server: Server, seeded: Seeded, small: Image) -> None:
    """What the benchmark reads must be served right, or its numbers mean nothing."""
    name = LABELS[server.name]
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        client = OciClient(server.base_url, session)
        body, ctype, digest = await client.get_manifest(seeded.repo, seeded.tag, OCI_MANIFEST)
        if body != small.manifest:
            raise BenchError(f"{name}: GET manifest by tag returned other bytes")
        if ctype.split(";")[0].strip() != OCI_MANIFEST:
            raise BenchError(f"{name}: manifest Content-Type {ctype!r}, expected {OCI_MANIFEST}")
        if digest and digest != seeded.manifest_digest:
            raise BenchError(f"{name}: Docker-Content-Digest {digest} != {seeded.manifest_digest}")
        size = await client.blob_size(seeded.repo, seeded.head_digest)
        if size != seeded.head_size:
            raise BenchError(f"{name}: HEAD blob says size {size}, expected {seeded.head_size}")
        h = hashlib.sha256()
        async with session.get(client.url(f"{seeded.repo}/blobs/{seeded.big_digest}")) as resp:
            if resp.status != 200:
                raise BenchError(f"{name}: GET big blob: HTTP {resp.status}")
            async for chunk in resp.content.iter_chunked(MIB):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != seeded.big_digest:
            raise BenchError(f"{name}: GET big blob returned bytes with the wrong digest")


# -- the measurements --------------------------------------------------------------


def _rate(ctx: Context, target: str, kind: str, n: int, record: bool = True) -> dict[str, Any]:
    server, seeded = ctx.servers[target], ctx.seeded[target]
    p = ctx.profile
    if kind == "manifest_get":
        method = "GET"
        url = f"{server.base_url}/v2/{seeded.repo}/manifests/{seeded.tag}"
        headers = {"Accept": OCI_MANIFEST}
    else:
        method = "HEAD"
        url = f"{server.base_url}/v2/{seeded.repo}/blobs/{seeded.head_digest}"
        headers = {}
    tool = ctx.tool_for(method)
    max_seconds = max(120.0, n / 20.0)
    probe = CpuProbe(server)
    with probe.measure():
        if tool == "wrk":
            res = loadgen.run_wrk(
                url,
                n,
                p.concurrency,
                headers,
                threads=ctx.args.wrk_threads,
                max_seconds=max_seconds,
                workdir=ctx.workdir,
            )
        elif tool == "ab":
            res = loadgen.run_ab(
                url,
                n,
                p.concurrency,
                method,
                headers,
                max_seconds=max_seconds,
                workdir=ctx.workdir,
            )
        else:
            assert ctx.pool is not None
            res = loadgen.run_aiohttp(
                ctx.pool, ctx.args.client_procs, url, n, p.concurrency, method, headers
            )
    out: dict[str, Any] = res.as_dict()
    out.update(probe.fields(res.client_cpu_s))
    out["server_cpu_us_per_req"] = probe.server_cpu_s / max(res.requests, 1) * 1e6
    out["client_cpu_us_per_req"] = res.client_cpu_s / max(res.requests, 1) * 1e6
    if res.errors > 0.01 * max(res.requests, 1):
        # fast failures would pass for speed: refuse to report them
        raise BenchError(
            f"{LABELS[target]} {kind}: {res.errors} errors in {res.requests} requests "
            f"({method} {url}); see the server log"
        )
    if record and res.errors:
        ctx.notes.append(f"{LABELS[target]} {kind}: {res.errors} errors in {res.requests}")
    if record and res.notes:
        ctx.notes.extend(f"{LABELS[target]} {kind}: {note}" for note in res.notes)
    return out


def _download(ctx: Context, target: str, count: int, concurrency: int) -> dict[str, Any]:
    server, seeded = ctx.servers[target], ctx.seeded[target]
    url = f"{server.base_url}/v2/{seeded.repo}/blobs/{seeded.big_digest}"
    probe = CpuProbe(server)
    with probe.measure():
        if ctx.pool is not None:
            res = ctx.pool.submit(
                loadgen.download_worker, url, seeded.big_size, count, concurrency
            ).result()
        else:
            res = loadgen.run_curl_downloads(url, seeded.big_size, count, concurrency)
    out: dict[str, Any] = {
        "tool": res["tool"],
        "downloads": count,
        "concurrency": concurrency,
        "bytes": res["bytes"],
        "seconds": res["seconds"],
        "mib_s": res["bytes"] / res["seconds"] / MIB,
        "per_download_s": res["each"],
    }
    out.update(probe.fields(float(res["cpu"])))
    out["server_cpu_ms_per_gib"] = probe.server_cpu_s * 1000 / (res["bytes"] / (1 << 30))
    return out


def _push(ctx: Context, target: str, layout: Path, image: Image, rnd: int) -> dict[str, Any]:
    server = ctx.servers[target]
    repo = f"bench/push-{ctx.run_id}-r{rnd}"
    ref = f"{server.host}/{repo}:t{rnd}"
    digestfile = ctx.workdir / f"push-{target}-r{rnd}.digest"
    argv = [
        require_tool("skopeo", SKOPEO_INSTALL),
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--digestfile",
        str(digestfile),
        f"oci:{layout}:latest",
        f"docker://{ref}",
    ]
    probe = CpuProbe(server)
    cpu0 = _children_cpu()
    with probe.measure():
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        seconds = time.monotonic() - t0
    client_cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        raise BenchError(
            f"{LABELS[target]}: skopeo copy failed (rc={proc.returncode}): {proc.stderr.strip()}"
        )
    pushed = digestfile.read_text().strip()
    if pushed != image.manifest_digest:
        raise BenchError(
            f"{LABELS[target]}: skopeo pushed manifest {pushed}, expected "
            f"{image.manifest_digest} (it must not recompress or rewrite the image)"
        )
    req = urllib.request.Request(
        f"{server.base_url}/v2/{repo}/manifests/t{rnd}",
        method="HEAD",
        headers={"Accept": MANIFEST_ACCEPT},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        got = resp.headers.get("Docker-Content-Digest")
    if got and got != image.manifest_digest:
        raise BenchError(f"{LABELS[target]}: after push, tag resolves to {got}")
    total = image.total_bytes
    out: dict[str, Any] = {
        "seconds": seconds,
        "bytes": total,
        "mib_s": total / seconds / MIB,
        "repo": repo,
    }
    out.update(probe.fields(client_cpu))
    return out


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- rows and report -----------------------------------------------------------------


@dataclass
class Row:
    label: str
    metric: str
    field: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:.1f}"


ROWS = [
    Row("manifest GET by tag", "manifest_get", "rps", "req/s", True, "{:.0f}"),
    Row("  p50 latency", "manifest_get", "p50_ms", "ms", False, "{:.2f}"),
    Row("  p99 latency", "manifest_get", "p99_ms", "ms", False, "{:.2f}"),
    Row("  server CPU per request", "manifest_get", "server_cpu_us_per_req", "us", False, "{:.0f}"),
    Row("blob HEAD", "blob_head", "rps", "req/s", True, "{:.0f}"),
    Row("  p50 latency", "blob_head", "p50_ms", "ms", False, "{:.2f}"),
    Row("  p99 latency", "blob_head", "p99_ms", "ms", False, "{:.2f}"),
    Row("  server CPU per request", "blob_head", "server_cpu_us_per_req", "us", False, "{:.0f}"),
    Row("blob GET, sequential", "blob_get", "mib_s", "MiB/s", True, "{:.0f}"),
    Row("  server CPU per GiB", "blob_get", "server_cpu_ms_per_gib", "ms", False, "{:.0f}"),
    Row("blob GET, 4 concurrent", "blob_get_x4", "mib_s", "MiB/s", True, "{:.0f}"),
    Row("skopeo push", "push", "seconds", "s", False, "{:.2f}"),
    Row("  server CPU", "push", "server_cpu_s", "s", False, "{:.2f}"),
]


def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def summarize(
    samples: dict[str, dict[str, list[dict[str, Any]]]], targets: list[str]
) -> list[dict[str, Any]]:
    rows = []
    parent = ""
    for row in ROWS:
        if not row.label.startswith(" "):
            parent = row.label
        name = row.label if row.label == parent else f"{parent}: {row.label.strip()}"
        per: dict[str, Any] = {}
        spread = 0.0
        for t in targets:
            vals = [s[row.field] for s in samples[t].get(row.metric, [])]
            med = _median(vals)
            per[t] = med
            if med and len(vals) > 1:
                spread = max(spread, (max(vals) - min(vals)) / med)
        if not any(samples[t].get(row.metric) for t in targets):
            continue
        d, m = per.get("distribution"), per.get("meridian")
        ratio = None
        if d and m:
            ratio = m / d if row.higher_is_better else d / m
        rows.append(
            {
                "row": name,
                "metric": row.metric,
                "field": row.field,
                "unit": row.unit,
                "higher_is_better": row.higher_is_better,
                "distribution": d,
                "meridian": m,
                "ratio": ratio,
                "spread": spread,
                "_fmt": row.fmt,
                "_label": row.label,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], profile_name: str, rounds: int) -> str:
    def cell(v: float | None, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    head = ("", "Distribution", "Meridian", "ratio", "spread")
    lines = []
    body = []
    for r in rows:
        label = f"{r['_label']} ({r['unit']})"
        body.append(
            (
                label,
                cell(r["distribution"], r["_fmt"]),
                cell(r["meridian"], r["_fmt"]),
                "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                f"{r['spread'] * 100:.0f}%" if r["spread"] else "-",
            )
        )
    w0 = max(len(head[0]), *(len(b[0]) for b in body)) if body else 10
    widths = [w0] + [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(1, 5)]
    fmt = "  ".join([f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]])
    lines.append(f"Single node, loopback; median of {rounds} interleaved round(s) [{profile_name}]")
    lines.append(fmt.format(*head))
    lines.append(fmt.format(*("-" * w for w in widths)))
    lines.extend(fmt.format(*b) for b in body)
    lines.append(
        "ratio: Meridian/Distribution for rates, Distribution/Meridian for times, latencies "
        "and CPU, so >1 means Meridian is better; spread: (max-min)/median over rounds, "
        "worst of the two targets."
    )
    return "\n".join(lines)


def contention_summary(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t, metrics in samples.items():
        per: dict[str, Any] = {}
        for m, ss in metrics.items():
            if not ss:
                continue
            per[m] = {
                k: statistics.median(s[k] for s in ss)
                for k in ("server_cpu_share", "client_cpu_share", "other_cpu_share")
            }
            per[m]["other_cpu_share_max"] = max(s["other_cpu_share"] for s in ss)
        out[t] = per
    return out


def format_contention(cont: dict[str, Any], ncpu: int) -> str:
    lines = [
        f"CPU use during measurements, as shares of the machine's {ncpu} CPU(s) "
        "(server / load generator / other processes, median over rounds):"
    ]
    for t, per in cont.items():
        parts = []
        for m, v in per.items():
            parts.append(
                f"{m} {v['server_cpu_share'] * 100:.0f}/{v['client_cpu_share'] * 100:.0f}/"
                f"{v['other_cpu_share'] * 100:.0f}%"
            )
        lines.append(f"  {LABELS[t]:<12} " + ", ".join(parts))
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_node",
        description="Benchmark one Meridian node against CNCF Distribution, side by side.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="3 rounds, 5k requests per rate test")
    g.add_argument("--toy", action="store_true", help="tiny sizes, 1 round (for tests)")
    p.add_argument(
        "--targets",
        default="distribution,meridian",
        help="comma-separated: distribution, meridian (default both)",
    )
    p.add_argument("--metrics", default=",".join(METRICS), help=f"subset of {','.join(METRICS)}")
    p.add_argument("--rounds", type=int, help="override the profile's rounds")
    p.add_argument("--requests", type=int, help="requests per rate test")
    p.add_argument("--concurrency", type=int, help="connections for rate tests")
    p.add_argument("--blob-mib", type=int, help="size of the blob for GET tests (MiB)")
    p.add_argument("--push-layers", type=int, help="layers in the pushed image")
    p.add_argument("--push-layer-mib", type=float, help="size of each pushed layer (MiB)")
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "ab", "aiohttp"),
        default=os.environ.get("MERIDIAN_BENCH_LOADGEN", "auto"),
        help="auto/wrk: wrk for GET, ab for HEAD (wrk cannot HEAD); ab: ab for both; "
        "aiohttp: multi-process Python client (costs more client CPU)",
    )
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument(
        "--client-procs", type=int, default=2, help="processes for --loadgen aiohttp (>= 1)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "results" / "bench_node.json",
        help="JSON results path (default results/bench_node.json)",
    )
    p.add_argument(
        "--distribution-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for Distribution, e.g. GOGC=400 (sensitivity checks)",
    )
    p.add_argument("--workdir", type=Path, help="where data dirs go (default a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    p.add_argument(
        "--meridian-cmd",
        default=os.environ.get("MERIDIAN_BENCH_NODE_CMD"),
        help="command template for a node, with {python} {port} {data}",
    )
    return p.parse_args(argv)


def build_profile(args: argparse.Namespace) -> tuple[str, Profile]:
    name = "toy" if args.toy else "quick" if args.quick else "full"
    prof = Profile(**asdict(PROFILES[name]))
    for attr, opt in (
        ("rounds", "rounds"),
        ("requests", "requests"),
        ("concurrency", "concurrency"),
        ("blob_mib", "blob_mib"),
        ("push_layers", "push_layers"),
        ("push_layer_mib", "push_layer_mib"),
    ):
        v = getattr(args, opt)
        if v is not None:
            setattr(prof, attr, v)
    if args.client_procs < 1:
        raise BenchError("--client-procs must be at least 1")
    if prof.rounds < 1 or prof.requests < 1 or prof.concurrency < 1:
        raise BenchError("rounds, requests and concurrency must be positive")
    return name, prof


def preflight(args: argparse.Namespace, targets: list[str], metrics: list[str]) -> None:
    """Fail early, naming the install step, if a needed tool is missing."""
    problems = []
    if "distribution" in targets and shutil.which("docker-registry") is None:
        problems.append("docker-registry (CNCF Distribution): apt-get install -y docker-registry")
    if "push" in metrics and shutil.which("skopeo") is None:
        problems.append(f"skopeo: {SKOPEO_INSTALL}")
    if args.loadgen != "aiohttp" and {"blob_get", "blob_get_x4"} & set(metrics):
        if not shutil.which("curl"):
            problems.append(f"curl: {loadgen.INSTALL['curl']} (or --loadgen aiohttp)")
    rate = {"manifest_get", "blob_head"} & set(metrics)
    if args.loadgen in ("auto", "wrk") and "manifest_get" in rate and not shutil.which("wrk"):
        problems.append(f"wrk: {loadgen.INSTALL['wrk']} (or --loadgen ab|aiohttp)")
    if args.loadgen != "aiohttp" and rate and not shutil.which("ab"):
        if args.loadgen == "ab" or "blob_head" in rate:
            problems.append(f"ab: {loadgen.INSTALL['ab']} (or --loadgen aiohttp)")
    if "meridian" in targets and not args.meridian_cmd:
        why = meridian_available()
        if why:
            problems.append(f"meridian: {why}")
    if problems:
        raise BenchError("missing prerequisites:\n  " + "\n  ".join(problems))


def host_info() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "tools": {
            "wrk": version(["wrk", "--version"]) if shutil.which("wrk") else "not installed",
            "ab": version(["ab", "-V"]) if shutil.which("ab") else "not installed",
            "skopeo": version(["skopeo", "--version"]),
        },
    }


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up, so that a second Ctrl-C (or
    ``timeout`` signalling the whole process group) cannot leave a server
    running; cleanup itself is bounded by the stop timeouts."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _stop_pool(pool: ProcessPoolExecutor, pids: list[int], clean: bool) -> None:
    """Shut the client pool down; if we are leaving on an error, first end its
    worker processes by PID (they may be in the middle of a long download)."""
    if clean:
        pool.shutdown(wait=True, cancel_futures=True)
        return
    me = os.getpid()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            if int(stat[stat.rfind(")") + 2 :].split()[1]) != me:
                continue  # not our child any more
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
    pool.shutdown(wait=False, cancel_futures=True)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    profile_name, prof = build_profile(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            raise BenchError(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in metrics:
        if m not in METRICS:
            raise BenchError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    preflight(args, targets, metrics)
    dist_env: dict[str, str] = {}
    for item in args.distribution_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--distribution-env wants KEY=VALUE, not {item!r}")
        dist_env[key] = value

    started = dt.datetime.now(dt.UTC)
    run_id = started.strftime("%H%M%S") + f"{os.getpid() % 1000:03d}"
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-node-", dir=args.workdir))
    host = host_info()
    ncpu = host["cpus"] or 1
    log(
        f"bench_node [{profile_name}] targets={','.join(targets)} rounds={prof.rounds} "
        f"requests={prof.requests} concurrency={prof.concurrency} workdir={workdir}"
    )
    log(
        f"machine: {ncpu} CPU(s), load average {host['loadavg_start'][0]:.2f}. Load generators, "
        "skopeo and the servers all share these CPUs: absolute numbers are bounded by that "
        "contention (and by whatever else runs here); compare the ratios."
    )

    # Python load workers, spawned up front (not while measuring); only the
    # aiohttp load generator needs them.
    ctx_pool: ProcessPoolExecutor | None = None
    if args.loadgen == "aiohttp":
        ctx_pool = ProcessPoolExecutor(
            max_workers=max(args.client_procs, 1), mp_context=multiprocessing.get_context("spawn")
        )
    pool_pids: list[int] = []
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in targets}
    ctx = Context(args, prof, workdir, ctx_pool, run_id)
    clean = False
    try:
        if ctx_pool is not None:
            warm = [ctx_pool.submit(loadgen.noop_worker, 0.5) for _ in range(args.client_procs)]
            pool_pids = list({f.result() for f in warm})
        t0 = time.monotonic()
        small, big = seed_content(prof, run_id)
        log(
            f"generated seed content in {time.monotonic() - t0:.1f}s "
            f"(blob of {len(big.layers[0].data) / MIB:.1f} MiB)"
        )
        for t in targets:
            server = start_target(t, workdir, args.meridian_cmd, dist_env)
            ctx.servers[t] = server
            log(f"started {LABELS[t]} pid {server.pid} at {server.base_url} ({server.version})")
        for t in targets:
            ctx.seeded[t] = asyncio.run(_seed_async(ctx.servers[t], small, big))
            asyncio.run(_check_async(ctx.servers[t], ctx.seeded[t], small))
            log(f"seeded and checked {LABELS[t]}")
        # warm-up: caches, connection paths, page cache; not recorded
        for t in targets:
            for kind in ("manifest_get", "blob_head"):
                if kind in metrics:
                    _rate(ctx, t, kind, prof.warmup_requests, record=False)
            if "blob_get" in metrics or "blob_get_x4" in metrics:
                _download(ctx, t, 1, 1)
        for rnd in range(prof.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            layout: Path | None = None
            image: Image | None = None
            if "push" in metrics:
                image = random_image(
                    prof.push_layers, int(prof.push_layer_mib * MIB), seed=f"{run_id}-push-{rnd}"
                )
                layout = write_oci_layout(workdir / f"layout-r{rnd}", image)
            for m in metrics:
                for t in order:
                    if m in ("manifest_get", "blob_head"):
                        s = _rate(ctx, t, m, prof.requests)
                        msg = (
                            f"{s['rps']:.0f} req/s p50 {s['p50_ms']:.2f} ms "
                            f"p99 {s['p99_ms']:.2f} ms [{s['tool']}]"
                        )
                    elif m == "blob_get":
                        s = _download(ctx, t, prof.seq_downloads, 1)
                        msg = f"{s['mib_s']:.0f} MiB/s"
                    elif m == "blob_get_x4":
                        s = _download(
                            ctx, t, prof.par_downloads * prof.par_batches, prof.par_downloads
                        )
                        msg = f"{s['mib_s']:.0f} MiB/s"
                    else:
                        assert layout is not None and image is not None
                        s = _push(ctx, t, layout, image, rnd)
                        msg = f"{s['seconds']:.2f} s ({s['mib_s']:.0f} MiB/s)"
                    s["round"] = rnd
                    samples[t].setdefault(m, []).append(s)
                    log(
                        f"round {rnd + 1}/{prof.rounds} {LABELS[t]:<12} {m:<12} {msg} "
                        f"(others used {s['other_cpu_share'] * 100:.0f}% of the machine)"
                    )
            if layout is not None:
                shutil.rmtree(layout, ignore_errors=True)
        server_info = {
            t: {
                "version": s.version,
                "rss_mib_end": s.rss_bytes() / MIB,
                "cpu_s_total": s.cpu_seconds(),
                **s.extra,
            }
            for t, s in ctx.servers.items()
        }
        clean = True
    finally:
        with signals_held():
            for s in ctx.servers.values():
                s.stop()
            if ctx_pool is not None:
                _stop_pool(ctx_pool, pool_pids, clean)
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)

    rows = summarize(samples, targets)
    cont = contention_summary(samples)
    host["loadavg_end"] = list(os.getloadavg())
    notes = list(dict.fromkeys(ctx.notes))
    notes.append(
        f"{ncpu} CPU(s) shared by servers, load generators and other processes: a server "
        "that needs less CPU per request also leaves more for the client, so rates are "
        "contention-bound, not a server's capacity on an idle machine."
    )
    if ctx.tool_for("GET") != ctx.tool_for("HEAD") and "blob_head" in metrics:
        notes.append(
            "manifest GET uses wrk (HTTP/1.1); blob HEAD uses ab (HTTP/1.0 keep-alive), "
            "because wrk cannot send HEAD."
        )
    if "distribution" in targets:
        notes.append(
            "Distribution 2.8.2 rebuilds its URL router (compiling every route regexp) on each "
            "request (distribution/distribution#3683, fixed in 3.x), hence ~0.9 ms of CPU per "
            "small request: small-request ratios are against 2.8.2 as packaged, not 3.x."
        )
    if "push" in metrics:
        notes.append(
            "push: fresh random layers every round into a new repository; skopeo "
            "uploads every blob (no existing blob, no cross-repo mount possible)."
        )
    result = {
        "schema": SCHEMA,
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "profile": profile_name,
        "config": asdict(prof)
        | {
            "targets": targets,
            "metrics": metrics,
            "loadgen": {"GET": ctx.tool_for("GET"), "HEAD": ctx.tool_for("HEAD")},
            "download_client": "aiohttp" if args.loadgen == "aiohttp" else "curl",
            "distribution_env": dist_env,
            "wrk_threads": args.wrk_threads,
            "client_procs": args.client_procs,
        },
        "host": host,
        "servers": server_info,
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "contention": cont,
        "samples": samples,
        "notes": notes,
    }
    log("")
    log(format_table(rows, profile_name, prof.rounds))
    log("")
    log(format_contention(cont, ncpu))
    for t, info in server_info.items():
        log(f"  {LABELS[t]:<12} RSS at end {info['rss_mib_end']:.0f} MiB; {info['version']}")
    for n in notes:
        log(f"note: {n}")
    return result


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    tmp.replace(out)


def exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the stack, so every ``finally`` ends its processes.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        result = run(args)
    except (BenchError, LaunchError, loadgen.LoadgenError) as e:
        print(f"bench_node: error: {e}", file=sys.stderr)
        return 2
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
