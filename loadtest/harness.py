"""The load-test harness: targets, steps, interleaved rounds, figures.

A *scenario* (:mod:`loadtest.scenarios`) is a list of *steps* (one
measurement each: e.g. "pull 10 MiB blobs, 4 at once") plus how to seed a
registry with what the steps read. The harness runs every step on every
*target* (a registry: one the harness started, or any URL on loopback), in
rounds whose target order rotates (:func:`round_order`), so the machine's
noise falls on all alike, and reports medians over rounds:

- each step's load comes from worker processes (:mod:`loadtest.workers`),
  bounded by a request count and a time limit;
- while a step runs, the harness samples the target's server processes
  (CPU, VmRSS, open fds: :mod:`loadtest.procstats`) and shows progress;
- a step's result: request count, errors, req/s, MiB/s, latency
  percentiles overall and per operation, a time series (for the plots),
  server CPU seconds (and per GiB served / per request), and whatever the
  scenario adds (per-node times in a rollout, replication lag, ...).

Targets: ``--target [NAME=]URL`` (loopback only; the server's PID is found
from its listening socket when it runs here, for CPU and memory figures),
``--start distribution|meridian|meridian-workers|cluster`` (started by the
harness on free ports with their own data dirs, stopped by PID at the end),
``--up DIR`` (a running ``meridian up``, from its ``up.json``).

Authentication stays on: clients (the harness's seeding sessions, the worker
processes, wrk/ab/curl, skopeo) log in as the cluster owner with
``$MERIDIAN_OWNER_PASSWORD`` (:mod:`loadtest.workers`). The harness sets it
when the user has not: for a Meridian it starts (node or cluster), a random
password, which the new owner is created with; for ``--up DIR``, the password
``meridian up`` keeps in the file its ``up.json`` names. One owner password
serves the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cluster import units
from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.preflight import CliError
from loadtest import loadgen
from loadtest.common import host_info, machine_busy_seconds, percentile
from loadtest.ocipush import OciClient, TokenAuth
from loadtest.procstats import ProcSampler, listening_pid
from loadtest.progress import Progress
from loadtest.reference import Server, start_target
from loadtest.samples import MIB, Rows, stats, stats_by_op, timeseries
from loadtest.sites import LocalCluster
from loadtest.workers import Job, WorkerResult, require_loopback, run_jobs, session, split
from localcluster import topology as topo
from localcluster.supervisor import StartError

SCHEMA = "meridian.loadtest/1"
GIB = 1 << 30
START_DELAY_S = 1.2  # workers start, import and connect before this instant


class HarnessError(RuntimeError):
    """The run cannot go on (bad arguments, a target that does not answer)."""


# -- targets -------------------------------------------------------------------------


@dataclass
class Target:
    """A registry under test and what we know of its processes."""

    name: str
    url: str  # what clients use (the router, for a cluster)
    kind: str  # distribution | meridian | meridian-workers | cluster | up | registry
    pids: dict[str, int] = field(default_factory=dict)
    version: str = ""
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)
    site_routers: dict[str, str] = field(default_factory=dict)
    server: Server | None = None
    cluster: LocalCluster | None = None
    workdir: Path | None = None
    login: str | None = None  # the user clients log in as (None: it asked for no login)

    @property
    def is_cluster(self) -> bool:
        return self.kind in ("cluster", "up")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "kind": self.kind,
            "pids": dict(self.pids),
            "version": self.version,
            "regions": {
                k: {"node": v.get("node"), "rtt_ms": v.get("rtt_ms")}
                for k, v in self.regions.items()
            },
            "site_routers": dict(self.site_routers),
            "login": self.login,
            "extra": dict(self.server.extra) if self.server is not None else {},
        }

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def attach_url(spec: str) -> Target:
    """``--target [NAME=]URL``: a registry someone else runs, on loopback."""
    name, sep, url = spec.partition("=")
    if not sep or "://" in name:
        name, url = "", spec
    url = require_loopback(url.rstrip("/"))
    parts = urlsplit(url)
    name = name or parts.netloc
    pids: dict[str, int] = {}
    port = parts.port or (443 if parts.scheme == "https" else 80)
    pid = listening_pid(port)
    if pid is not None:
        pids[name] = pid
    return Target(name, url, "registry", pids)


def attach_up(data: Path) -> Target:
    """``--up DIR``: a running ``meridian up`` (its router, nodes and PIDs),
    logged in to as its owner (see :func:`use_up_owner`)."""
    path = data / "up.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HarnessError(f"{path}: cannot read a running meridian up's state ({e})") from None
    router = require_loopback(state["router"])
    use_up_owner(data, state)
    pids = {
        name: int(c["pid"])
        for name, c in state.get("children", {}).items()
        if c.get("pid") and name != "wan"
    }
    return Target("meridian", router, "up", pids, "meridian up", dict(state.get("regions", {})))


def use_up_owner(data: Path, state: dict[str, Any]) -> None:
    """The owner's password of the ``meridian up`` in ``data`` (the file its
    ``up.json`` names) into this process's environment, for the harness's
    sessions and the worker processes; nothing for one without authentication.
    A different ``$MERIDIAN_OWNER_PASSWORD`` already set is refused: the run
    logs in to every target as one owner."""
    owner = state.get("owner")
    if not owner:
        return
    file = Path(owner["password_file"])
    try:
        password = file.read_text().strip()
    except OSError as e:
        raise HarnessError(
            f"{file}: cannot read the owner's password of the meridian up in {data} "
            f"({e.strerror or e})"
        ) from None
    if not password:
        raise HarnessError(f"{file}: no owner password in it (meridian up in {data})")
    current = os.environ.get(OWNER_PASSWORD_ENV)
    if current and current != password:
        raise HarnessError(
            f"{OWNER_PASSWORD_ENV} is set and is not the owner password of the meridian up "
            f"in {data} (kept in {file}); a run logs in to every target as one owner: "
            f"unset {OWNER_PASSWORD_ENV} to use that one"
        )
    os.environ[OWNER_PASSWORD_ENV] = password


def start_cluster(
    name: str,
    workdir: Path,
    topology: topo.Topology,
    sites: list[str] | None = None,
    emulate: bool = True,
    site_rtt_ms: float = 2.0,
) -> Target:
    """A Meridian cluster (etcd, nodes, WAN emulator, router[s]) of our own,
    authentication on. Its owner's password is ``$MERIDIAN_OWNER_PASSWORD``,
    a random one put there when unset: the cluster (on its new data dir)
    creates its owner with it, and the worker processes inherit it."""
    os.environ.setdefault(OWNER_PASSWORD_ENV, generate())
    wd = Path(tempfile.mkdtemp(prefix="cluster-", dir=workdir))
    cl = LocalCluster(wd, topology, sites=sites, emulate=emulate, site_rtt_ms=site_rtt_ms)
    try:
        cl.start()
    except (StartError, CliError) as e:  # a part that would not start: its log's tail
        cl.stop()
        shutil.rmtree(wd, ignore_errors=True)
        raise HarnessError(f"the cluster did not start: {e}") from None
    except BaseException:
        cl.stop()
        shutil.rmtree(wd, ignore_errors=True)
        raise
    if cl.owner_password != os.environ[OWNER_PASSWORD_ENV]:  # a new data dir takes it
        cl.stop()
        shutil.rmtree(wd, ignore_errors=True)
        raise HarnessError(f"the cluster's owner did not get {OWNER_PASSWORD_ENV}")
    regions = len(topology.regions)
    how = "emulated WAN" if emulate else "no emulation"
    return Target(
        name,
        cl.router,
        "cluster",
        cl.server_pids(),
        f"meridian cluster: {regions} region(s), router, etcd, {how}",
        cl.regions(),
        dict(cl.site_routers),
        cluster=cl,
        workdir=wd,
    )


def start_server(
    kind: str, workdir: Path, name: str | None = None, workers: int | None = None
) -> Target:
    """A registry of ``kind`` (:data:`loadtest.reference.TARGETS`) of our own;
    ``workers``: the processes of a ``meridian-workers``."""
    server = start_target(kind, workdir, workers=workers)
    pids = {k.replace(server.name, name or kind, 1): v for k, v in server.pids.items()}
    return Target(name or kind, server.base_url, kind, pids, server.version, server=server)


# -- parameters and steps ----------------------------------------------------------------


def parse_size(v: str) -> int:
    """Bytes from "64K", "10M", "1.5G", "100" (K/M/G are powers of 1024)."""
    n = units.parse_size(v)
    if n < 0:
        raise ValueError(f"{v!r}: a size is not negative")
    return n


def size_label(n: int) -> str:
    for unit, m in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= m:
            v = n / m
            return f"{v:g}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{n}B"


def int_list(v: str) -> list[int]:
    return [int(x) for x in v.split(",") if x.strip()]


def size_list(v: str) -> list[int]:
    return [parse_size(x) for x in v.split(",") if x.strip()]


def str_list(v: str) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


@dataclass
class Param:
    """One documented parameter of a scenario (a ``--flag``)."""

    name: str  # flag name without dashes; attribute with underscores
    default: str | int | float | bool
    help: str
    toy: str | int | float | bool | None = None  # the value of --toy (tests: seconds)
    parse: Callable[[str], Any] | None = None  # converts the string form
    choices: tuple[str, ...] | None = None

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


@dataclass
class Step:
    id: str
    label: str
    op: str  # an op of loadtest.ops, or "wrk" / "ab"
    count: int
    seconds: float
    concurrency: int = 1
    procs: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    primary: str = "rps"  # figure that matters: rps | mib_s | seconds (+ scenario's)
    ops: tuple[str, ...] = ()  # recorded ops the primary figures are computed from
    group: str = ""  # steps with one group share a comparison chart
    bytes_heavy: bool = False  # report CPU per GiB rather than per request
    site: str = "here"


#: primary figure -> (unit, higher is better); a scenario may put its own in ``extra``
UNITS = {
    "rps": ("req/s", True),
    "mib_s": ("MiB/s", True),
    "seconds": ("s", False),
    "all_done_s": ("s", False),
    "push_s": ("s", False),
}


class Scenario:
    """Base of every scenario; see :mod:`loadtest.scenarios`."""

    name = ""
    title = ""
    description = ""
    params: list[Param] = []
    #: what runs when no target is named: ("distribution",), ("cluster",) ...
    default_start: tuple[str, ...] = ()
    needs_cluster = False

    def steps(self, run: Run) -> list[Step]:
        raise NotImplementedError

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        return {}

    def jobs(self, run: Run, target: Target, step: Step, seed: dict[str, Any]) -> list[Job]:
        """By default: ``step.procs`` workers (no more than the concurrency)
        splitting the count and the concurrency."""
        procs = max(1, min(step.procs, step.concurrency))
        counts = split(step.count, procs)
        conc = split(step.concurrency, procs)
        params = self.step_params(run, target, step, seed)
        return [
            Job(
                step.op,
                target.url,
                params,
                counts[i],
                step.seconds,
                conc[i],
                worker=i,
                workers=procs,
                site=step.site,
            )
            for i in range(procs)
            if counts[i] > 0
        ]

    def step_params(
        self, run: Run, target: Target, step: Step, seed: dict[str, Any]
    ) -> dict[str, Any]:
        return dict(step.params)

    async def before_step(self, run: Run, target: Target, step: Step) -> Any:
        return None

    async def after_step(self, o: Outcome) -> None:
        """Add to ``o.result["extra"]`` what the scenario measures itself."""
        return None

    def on_event(self, run: Run, target: Target, job: Job, event: dict[str, Any]) -> None:
        return None

    def figures(self, run: Run) -> list[dict[str, Any]]:
        """Extra summary rows beyond the per-step ones (see :func:`figure_rows`)."""
        return []

    def checks(self, run: Run) -> dict[str, Any]:
        """Pass/fail verdicts (the soak); empty for measurement-only scenarios."""
        return {}


@dataclass
class Outcome:
    """A step just run on a target: what ``Scenario.after_step`` gets."""

    run: Run
    target: Target
    step: Step
    state: Any  # what before_step returned
    result: dict[str, Any]
    workers: list[WorkerResult]


@dataclass
class Run:
    scenario: Scenario
    p: argparse.Namespace
    targets: list[Target]
    workdir: Path
    run_id: str
    rounds: int
    progress: Progress
    log: Callable[[str], None] = print
    baseline: str | None = None
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    seeds: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # scenario's scratch space

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# -- one step on one target ---------------------------------------------------------------


def _merge(workers: list[WorkerResult]) -> Rows:
    rows = Rows()
    for w in workers:
        if w.samples is not None:
            rows.extend(w.samples)
    return rows


#: steps measured by a C client instead of worker processes
LOADGEN_OPS = ("wrk", "ab", "curl")


async def _loadgen_step(
    run: Run, target: Target, step: Step, params: dict[str, Any]
) -> tuple[Rows, dict[str, Any]]:
    """A step measured by wrk, ab or curl (C clients: far less client CPU per
    request than any Python client). Summary figures only, no time series.
    ``params``: ``path`` (after the target's URL), ``headers``, ``method``;
    for curl (whole GETs of one blob, ``step.concurrency`` at once),
    ``size``: the bytes each GET must return."""
    url = target.url + params["path"]
    headers = dict(params.get("headers", {}))
    if step.op == "curl":
        res = await asyncio.to_thread(
            loadgen.run_curl_downloads,
            url,
            int(params["size"]),
            step.count,
            step.concurrency,
            max_seconds=step.seconds + 60,
        )
        each = [float(x) for x in res["each"]]
        seconds = float(res["seconds"])
        return Rows(), {
            "tool": "curl",
            "requests": len(each),
            "errors": 0,  # run_curl_downloads fails on any wrong answer
            "seconds": seconds,
            "rps": len(each) / seconds if seconds > 0 else 0.0,
            "bytes": int(res["bytes"]),
            "p50_ms": percentile(each, 50) * 1000,
            "p99_ms": percentile(each, 99) * 1000,
            "client_cpu_s": float(res["cpu"]),
        }
    if step.op == "wrk":
        res = await asyncio.to_thread(
            loadgen.run_wrk,
            url,
            step.count,
            step.concurrency,
            headers,
            max_seconds=step.seconds,
            workdir=run.workdir,
        )
    else:
        res = await asyncio.to_thread(
            loadgen.run_ab,
            url,
            step.count,
            step.concurrency,
            params.get("method", "GET"),
            headers,
            max_seconds=step.seconds + 30,
            workdir=run.workdir,
        )
    return Rows(), res.as_dict()


async def run_step(run: Run, target: Target, step: Step, rnd: int, index: str) -> dict[str, Any]:
    sc = run.scenario
    seed = run.seeds[target.name]
    sampler = ProcSampler(dict(target.pids))
    state = await sc.before_step(run, target, step)
    run.progress.start(f"{step.label} @ {target.name}", step.count, step.seconds, index)
    cpu0 = sampler.cpu_seconds()
    machine0, self0 = machine_busy_seconds(), _self_cpu()
    t0 = time.monotonic()
    failures: list[str] = []
    workers: list[WorkerResult] = []
    loadgen_res: dict[str, Any] | None = None
    if step.op in LOADGEN_OPS:
        sampler.sample()
        params = sc.step_params(run, target, step, seed)
        rows, loadgen_res = await _loadgen_step(run, target, step, params)
        sampler.sample()
        origin = t0
        seconds = float(loadgen_res["seconds"])
    else:
        jobs = sc.jobs(run, target, step, seed)
        origin = time.monotonic() + START_DELAY_S + 0.1 * len(jobs)
        for j in jobs:
            j.start_at = origin
        sampler.origin = origin
        workers = await run_jobs(
            jobs,
            on_progress=run.progress.update,
            on_event=lambda job, ev: sc.on_event(run, target, job, ev),
            tick=lambda: (sampler.sample(), run.progress.tick()),
        )
        failures = [f"worker {w.job.worker}: {w.failure}" for w in workers if w.failure]
        rows = _merge(workers)
        ends = [t + d for t, d in zip(rows.t, rows.d, strict=True)]
        seconds = max(ends) if ends else time.monotonic() - origin
    wall = time.monotonic() - t0
    machine_cpu, harness_cpu = machine_busy_seconds() - machine0, _self_cpu() - self0
    cpu1 = sampler.cpu_seconds()
    cpu_by = {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}
    server_cpu = sum(cpu_by.values())
    primary_rows = rows.select(step.ops) if step.ops else rows
    st = stats(primary_rows, seconds)
    if loadgen_res is not None:
        nbytes = int(loadgen_res.get("bytes", 0))
        st = {
            "requests": loadgen_res["requests"],
            "errors": loadgen_res["errors"],
            "error_rate": loadgen_res["errors"] / max(loadgen_res["requests"], 1),
            "seconds": seconds,
            "rps": loadgen_res["rps"],
            "bytes": nbytes,
            "mib_s": nbytes / MIB / seconds if seconds > 0 else 0.0,
            "p50_ms": loadgen_res["p50_ms"],
            "p90_ms": None,
            "p99_ms": loadgen_res["p99_ms"],
            "max_ms": None,
            "mean_ms": None,
            "tool": loadgen_res["tool"],
            "client_cpu_s": loadgen_res["client_cpu_s"],
        }
    if loadgen_res is None:
        st["client_cpu_s"] = sum(w.cpu_s for w in workers)
    all_bytes = sum(rows.b) if rows.b else st["bytes"]
    # Who used the machine meanwhile (servers, load generators, the rest):
    # on a small machine they all share the CPUs, so rates are bounded by it.
    capacity = max(wall, 1e-9) * (os.cpu_count() or 1)
    other = max(0.0, machine_cpu - server_cpu - st["client_cpu_s"] - harness_cpu)
    result: dict[str, Any] = {
        "round": rnd,
        "wall_s": wall,
        "stats": st,
        "by_op": stats_by_op(rows, seconds) if len(rows) else {},
        "timeseries": timeseries(rows, span=seconds) if len(rows) else None,
        "server_cpu_s": server_cpu,
        "server_cpu_by_process": cpu_by,
        "cpu_s_per_gib": server_cpu / (all_bytes / GIB) if all_bytes > 0 else None,
        "cpu_us_per_req": server_cpu / st["requests"] * 1e6 if st["requests"] else None,
        "cpu_share": {
            "server": server_cpu / capacity,
            "client": st["client_cpu_s"] / capacity,
            "other": other / capacity,
        },
        "process": sampler.as_dict(),
        "errors": dict(rows.errors),
        "messages": list(rows.messages),
        "worker_failures": failures,
        "extra": {},
    }
    await sc.after_step(Outcome(run, target, step, state, result, workers))
    pr = result["stats"].get(step.primary, result["extra"].get(step.primary))
    unit = UNITS.get(step.primary, ("", True))[0]
    errs = result["stats"]["errors"]
    summary = f"{fmt_value(pr)} {unit}"
    if result["stats"].get("p99_ms") is not None:
        st = result["stats"]
        summary += f", p50 {fmt_value(st['p50_ms'])} ms p99 {fmt_value(st['p99_ms'])} ms"
    summary += f", {errs} errors, server CPU {server_cpu:.2f}s"
    run.progress.done(summary)
    for f in failures:
        run.note(f"{target.name} {step.id}: {f[:400]}")
    return result


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fmt_value(v: Any) -> str:
    """A figure for a table: ``-`` for none, 3-4 significant digits for floats."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not isinstance(v, float):
        return str(v)
    for limit, spec in ((100, ".0f"), (10, ".1f"), (0.1, ".2f")):
        if abs(v) >= limit:
            return format(v, spec)
    return format(v, ".3f")


# -- a whole scenario ------------------------------------------------------------------


async def seed_all(run: Run) -> None:
    for t in run.targets:
        async with session(limit=8) as s:
            # Does it ask for a login (as an anonymous client)? Then as the owner.
            async with s.get(t.url + "/v2/", middlewares=()) as r:
                await r.read()
                status = r.status
            if status == 401:
                if TokenAuth.owner_from_env() is None:
                    raise HarnessError(
                        f"{t.name}: {t.url} asks for a login: set {OWNER_PASSWORD_ENV} to "
                        "its owner's password"
                    )
                async with s.get(t.url + "/v2/") as r:
                    await r.read()
                    status = r.status
                if status == 401:
                    raise HarnessError(
                        f"{t.name}: {t.url} refused the owner's login: {OWNER_PASSWORD_ENV} "
                        "is not its owner's password"
                    )
                t.login = OWNER
            if status != 200:
                raise HarnessError(f"{t.name}: GET {t.url}/v2/ answered HTTP {status}")
        run.log(f"seeding {t.name} ({t.url}) ...")
        run.seeds[t.name] = await run.scenario.seed(run, t)


async def run_scenario(run: Run) -> None:
    run.steps = run.scenario.steps(run)
    await seed_all(run)
    total = len(run.steps) * len(run.targets) * run.rounds
    k = 0
    for rnd in range(run.rounds):
        order = round_order(run.targets, rnd)
        for step in run.steps:
            for t in order:
                k += 1
                res = await run_step(run, t, step, rnd, f"{k}/{total}")
                run.results.setdefault(t.name, {}).setdefault(step.id, []).append(res)


def round_order(targets: list[Any], rnd: int) -> list[Any]:
    """The order the targets run each step in round ``rnd``: rotated by one
    every round, so each runs first, second, ... equally often over
    ``len(targets)`` rounds; with 3 or more, the next ``len(targets)`` rounds
    rotate the reversed order, so each also follows each other equally often
    (2 targets simply alternate)."""
    n = len(targets)
    if n == 0:
        return []
    base = targets[::-1] if n > 2 and (rnd // n) % 2 else targets
    k = rnd % n
    return base[k:] + base[:k]


def median(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def median_round(results: list[dict[str, Any]], primary: str) -> dict[str, Any] | None:
    """The round whose primary figure is the median (the one plotted)."""
    if not results:
        return None

    def key(r: dict[str, Any]) -> float:
        v = r["stats"].get(primary, r["extra"].get(primary))
        return v if isinstance(v, int | float) else 0.0

    ordered = sorted(results, key=key)
    return ordered[(len(ordered) - 1) // 2]


def ratio(base: float | None, other: float | None, higher_is_better: bool) -> float | None:
    """How much better ``other`` is than ``base`` (> 1: better)."""
    if not base or not other:
        return None
    return other / base if higher_is_better else base / other


def figure_rows(run: Run) -> list[dict[str, Any]]:
    """Per step: the primary figure, latency, server CPU; medians over rounds
    per target, and each target's ratio to the baseline."""
    names = [t.name for t in run.targets]
    rows: list[dict[str, Any]] = []

    def add(step: Step | None, label: str, unit: str, hib: bool, get: Callable) -> None:
        values = {}
        for n in names:
            rs = run.results.get(n, {}).get(step.id, []) if step else []
            values[n] = median([get(r) for r in rs])
        if all(v is None for v in values.values()):
            return
        rows.append(_row(run, label, unit, hib, values, step.id if step else ""))

    for step in run.steps:
        unit, hib = UNITS.get(step.primary, ("", True))
        add(
            step,
            step.label,
            unit,
            hib,
            lambda r, s=step: r["stats"].get(s.primary, r["extra"].get(s.primary)),
        )
        add(step, "  p50 latency", "ms", False, lambda r: r["stats"]["p50_ms"])
        add(step, "  p99 latency", "ms", False, lambda r: r["stats"]["p99_ms"])
        if step.bytes_heavy:
            add(step, "  server CPU per GiB", "CPU-s", False, lambda r: r["cpu_s_per_gib"])
        else:
            add(step, "  server CPU per request", "us", False, lambda r: r["cpu_us_per_req"])
        add(step, "  errors", "", False, lambda r: r["stats"]["errors"])
    for extra in run.scenario.figures(run):
        rows.append(
            _row(
                run,
                extra["label"],
                extra["unit"],
                extra["higher_is_better"],
                extra["values"],
                extra.get("step", ""),
            )
        )
    return rows


def _row(
    run: Run, label: str, unit: str, hib: bool, values: dict[str, Any], step: str
) -> dict[str, Any]:
    base = run.baseline
    ratios = {}
    if base is not None and base in values and label.strip() != "errors":
        for n, v in values.items():
            if n != base:
                ratios[n] = ratio(values[base], v, hib)
    return {
        "step": step,
        "label": label,
        "unit": unit,
        "higher_is_better": hib,
        "values": values,
        "ratios": ratios,
    }


def format_table(rows: list[dict[str, Any]], names: list[str], baseline: str | None) -> str:
    others = [n for n in names if n != baseline] if baseline else []
    head = ["", *names, *[f"{n}/{baseline}" for n in others]]
    body = []
    for r in rows:
        label = r["label"] + (f" ({r['unit']})" if r["unit"] else "")
        cells = [label, *[fmt_value(r["values"].get(n)) for n in names]]
        for n in others:
            q = r["ratios"].get(n)
            cells.append("-" if q is None else f"{q:.2f}x")
        body.append(cells)
    if not body:
        return "(no figures)"
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
    lines = [
        "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head))
    ]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append(
            "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(b))
        )
    if others:
        lines.append(
            f"ratio: how much better than {baseline} (rates: X/{baseline}; times, latencies, "
            f"CPU: {baseline}/X), so > 1 means better."
        )
    return "\n".join(lines)


def scenario_document(run: Run, started: dt.datetime) -> dict[str, Any]:
    """Everything about one scenario's run, as the result file holds it."""
    rows = figure_rows(run)
    steps = []
    for s in run.steps:
        unit, hib = UNITS.get(s.primary, ("", True))
        steps.append(
            {
                "id": s.id,
                "label": s.label,
                "op": s.op,
                "count": s.count,
                "seconds": s.seconds,
                "concurrency": s.concurrency,
                "procs": s.procs,
                "primary": s.primary,
                "unit": unit,
                "higher_is_better": hib,
                "group": s.group,
                "ops": list(s.ops),
                "bytes_heavy": s.bytes_heavy,
                "site": s.site,
                "params": {k: v for k, v in s.params.items() if _small(v)},
            }
        )
    raw = getattr(run.p, "raw_params", {})
    params = {
        p.attr: _plain(raw.get(p.attr, getattr(run.p, p.attr, None))) for p in run.scenario.params
    }
    return {
        "scenario": run.scenario.name,
        "title": run.scenario.title,
        "description": run.scenario.description,
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "run_id": run.run_id,
        "rounds": run.rounds,
        "params": params,
        "targets": [t.describe() for t in run.targets],
        "baseline": run.baseline,
        "steps": steps,
        "results": run.results,
        "figures": rows,
        "extra": {k: v for k, v in run.state.items() if not k.startswith("_")},
        "checks": run.scenario.checks(run),
        "notes": list(run.notes),
    }


def _small(v: Any) -> bool:
    return not isinstance(v, list | dict) or len(json.dumps(v, default=str)) < 400


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def new_document(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": kind,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "command": args,
        "host": host_info(),
        "scenarios": [],
    }


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%H%M%S") + f"{os.getpid() % 1000:03d}"


@contextlib.asynccontextmanager
async def client(url: str, limit: int = 8):  # noqa: ANN201 - async context of an OciClient
    """A seeding client (loopback only) for ``url``."""
    async with session(limit=limit, timeout=900) as s:
        yield OciClient(url, s)
