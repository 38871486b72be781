"""``meridian loadtest`` (and ``python -m loadtest``): drive OCI registries,
write a result file (JSON) and a self-contained HTML report.

    meridian loadtest <scenario> [--target [NAME=]URL ...] [--start KIND ...] [options]
    meridian loadtest compare [--size moderate|toy|full] [--rounds N] [--workers N]
    meridian loadtest report RESULT.json [--html OUT.html]
    meridian loadtest list

``meridian loadtest <scenario> --help`` documents every parameter of a
scenario. See :mod:`loadtest.harness` for how a run works and
:mod:`loadtest.compare` for the side-by-side comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtest.common import exit_on_sigterm, signals_held
from loadtest.harness import (
    HarnessError,
    Param,
    Run,
    Scenario,
    Target,
    attach_up,
    attach_url,
    format_table,
    new_document,
    new_run_id,
    run_scenario,
    scenario_document,
    start_cluster,
    start_server,
)
from loadtest.progress import Progress
from loadtest.reference import (
    DISTRIBUTION_ENV,
    REPO_ROOT,
    TARGETS,
    WORKERS_TARGET,
    LaunchError,
    parse_workers,
)
from loadtest.report import load_result, write_html, write_result
from loadtest.scenarios import SCENARIOS, cluster_topology, create
from loadtest.workers import NotLoopback

PROG = "meridian loadtest"
DEFAULT_OUT = REPO_ROOT / "results" / "loadtest"
START_KINDS = (*TARGETS, "cluster")


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("targets and output")
    g.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="[NAME=]URL",
        help="a registry to drive (repeatable; loopback addresses only). Its server's PID "
        "is found from the listening socket when it runs on this machine",
    )
    g.add_argument(
        "--start",
        action="append",
        default=[],
        choices=START_KINDS,
        help="start a registry for the run (repeatable): distribution (CNCF Distribution), "
        "meridian (one standalone node, one process), meridian-workers (the node with "
        "--workers N, one process per core as Distribution uses every core, and an etcd of its "
        "own), cluster (etcd, nodes, WAN emulator, router). Default when no --target: the "
        "scenario's own choice",
    )
    g.add_argument(
        "--distribution-binary",
        metavar="PATH",
        help="the CNCF Distribution binary --start distribution runs (env "
        "MERIDIAN_DISTRIBUTION_BINARY; default: .bench/distribution-v3/registry when built "
        "from the distribution/distribution sources, else Debian's docker-registry 2.8.2)",
    )
    g.add_argument(
        "--meridian-workers",
        metavar="N",
        help="processes of the node --start meridian-workers runs (meridian node --workers N; "
        "default: one per core). Its etcd's CPU is counted with it",
    )
    g.add_argument("--up", metavar="DIR", help="drive a running `meridian up` (its data dir)")
    g.add_argument(
        "--baseline",
        help="target the others are compared to (default: "
        "distribution if measured, else the first)",
    )
    g.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1)")
    g.add_argument(
        "--toy", action="store_true", help="every parameter at its toy value: seconds, for tests"
    )
    g.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory of the result files (default results/loadtest)",
    )
    g.add_argument("--json", type=Path, help="result file (default <out>/<name>-<time>.json)")
    g.add_argument("--html", type=Path, help="report (default: the result file's .html)")
    g.add_argument("--workdir", type=Path, help="where started registries keep their data")
    g.add_argument("--keep", action="store_true", help="keep the work dir (data, logs)")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def add_params(p: argparse.ArgumentParser, params: list[Param]) -> None:
    g = p.add_argument_group("scenario parameters")
    for prm in params:
        extra = f" (default {prm.default}; --toy: {prm.toy})"
        if isinstance(prm.default, bool):
            g.add_argument(
                f"--{prm.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=prm.help + extra,
            )
        else:
            g.add_argument(
                f"--{prm.name}",
                default=None,
                choices=prm.choices,
                metavar=None if prm.choices else prm.name.upper().replace("-", "_"),
                help=prm.help + extra,
            )


def resolve_params(args: argparse.Namespace, params: list[Param]) -> None:
    """Fill unset parameters (toy or default values), then parse them; the
    values as given are kept in ``args.raw_params`` (for the report)."""
    args.raw_params = {}
    for prm in params:
        v = getattr(args, prm.attr, None)
        if v is None:
            v = prm.toy if args.toy and prm.toy is not None else prm.default
        args.raw_params[prm.attr] = v
        if isinstance(prm.default, bool):
            v = bool(v)
        elif prm.parse is not None:
            try:
                v = prm.parse(str(v))
            except ValueError as e:
                raise HarnessError(f"--{prm.name} {v!r}: {e}") from None
        elif isinstance(prm.default, int):
            v = int(v)
        elif isinstance(prm.default, float):
            v = float(v)
        setattr(args, prm.attr, v)


def scenario_parser(sc: Scenario, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or f"{PROG} {sc.name}",
        description=f"{sc.title}: {sc.description}",
    )
    add_params(p, sc.params)
    add_common(p)
    return p


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def make_targets(
    sc: Scenario, args: argparse.Namespace, workdir: Path, run: Run, log: Any
) -> list[Target]:
    targets: list[Target] = []
    taken: set[str] = set()
    if sc.needs_cluster and (args.target or args.up):
        raise HarnessError(
            f"{sc.name} starts its own cluster (with one router per site); "
            "use --start cluster, not --target or --up"
        )
    for spec in args.target:
        t = attach_url(spec)
        t.name = _unique(t.name, taken)
        targets.append(t)
    if args.up:
        t = attach_up(Path(args.up))
        t.name = _unique(t.name, taken)
        targets.append(t)
    starts = list(args.start) or ([] if targets else list(sc.default_start))
    try:
        for kind in starts:
            name = _unique("meridian" if kind == "cluster" else kind, taken)
            log(f"starting {kind} ...")
            if kind == "cluster":
                topology = cluster_topology(run) if hasattr(args, "regions") else None
                if topology is None:
                    from localcluster import topology as topo

                    topology = topo.default(1)
                sites = [r.name for r in topology.regions] if sc.needs_cluster else None
                targets.append(
                    start_cluster(
                        name,
                        workdir,
                        topology,
                        sites,
                        getattr(args, "emulate", False),
                        getattr(args, "site_rtt", 2.0),
                    )
                )
            else:
                workers = getattr(args, "meridian_workers", None)
                targets.append(start_server(kind, workdir, name, workers))
            t = targets[-1]
            workers = t.server.extra.get("workers") if t.server is not None else None
            more = f" (node: {workers} process(es))" if workers else ""
            log(f"  {t.name}: {t.url} ({t.version}); processes {t.pids}{more}")
    except BaseException:
        for t in targets:
            t.stop()
        raise
    return targets


def pick_baseline(targets: list[Target], wanted: str | None) -> str | None:
    names = [t.name for t in targets]
    if wanted:
        if wanted not in names:
            raise HarnessError(f"--baseline {wanted}: no such target ({', '.join(names)})")
        return wanted
    if len(names) < 2:
        return None
    return "distribution" if "distribution" in names else names[0]


def output_paths(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or (args.out / f"{name}-{stamp}.json")
    html_path = args.html or json_path.with_suffix(".html")
    return json_path, html_path


def run_one(
    sc: Scenario,
    args: argparse.Namespace,
    workdir: Path,
    progress: Progress,
    log: Any,
    targets: list[Target] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Run one scenario (starting its targets unless given); its document."""
    started = dt.datetime.now(dt.UTC)
    run = Run(sc, args, [], workdir, run_id or new_run_id(), args.rounds or 1, progress, log)
    own = targets is None
    run.targets = targets if targets is not None else make_targets(sc, args, workdir, run, log)
    try:
        run.baseline = pick_baseline(run.targets, args.baseline)
        asyncio.run(run_scenario(run))
        doc = scenario_document(run, started)
    finally:
        if own:
            with signals_held():
                for t in run.targets:
                    t.stop()
    log("")
    log(f"{sc.title}: median of {run.rounds} round(s)")
    log(format_table(doc["figures"], [t["name"] for t in doc["targets"]], doc["baseline"]))
    for n in doc["notes"]:
        log(f"note: {n}")
    if doc["checks"]:
        log(format_checks(doc["checks"]))
    return doc


def format_checks(checks: dict[str, Any]) -> str:
    lines = [f"checks: {'PASSED' if checks.get('passed') else 'FAILED'}"]
    for t, per in checks.get("targets", {}).items():
        lines.append(
            f"  {t}: {per.get('requests')} requests, {per.get('errors')} errors, "
            f"{per.get('worker_failures')} worker failures"
        )
        for proc, v in per.get("processes", {}).items():
            r, f = v["rss_mib"], v["fds"]
            if r.get("flat") is None:
                lines.append(f"    {proc}: {r.get('why')}")
                continue
            lines.append(
                f"    {proc}: VmRSS {r['early']:.1f} -> {r['late']:.1f} MiB (limit "
                f"{r['limit']:.1f}: {'flat' if r['flat'] else 'GREW'}), fds {f['early']:.0f} -> "
                f"{f['late']:.0f} (limit {f['limit']:.0f}: {'flat' if f['flat'] else 'GREW'})"
            )
    return "\n".join(lines)


def scenario_main(name: str, argv: list[str], prog: str | None = None) -> int:
    sc = create(name)
    args = scenario_parser(sc, prog).parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        resolve_params(args, sc.params)
        if args.rounds is not None and args.rounds < 1:
            raise HarnessError("--rounds must be at least 1")
        if args.distribution_binary:
            os.environ[DISTRIBUTION_ENV] = args.distribution_binary
        if args.meridian_workers is not None:
            args.meridian_workers = parse_workers(args.meridian_workers)
            if WORKERS_TARGET not in args.start:
                raise HarnessError(
                    f"--meridian-workers sets the processes of --start {WORKERS_TARGET}; add "
                    "that (--start meridian is one process)"
                )
        args.out.mkdir(parents=True, exist_ok=True)
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"loadtest-{name}-", dir=args.workdir))
        progress = Progress(enabled=not args.quiet)
        try:
            doc = new_document("scenario", {"argv": ["meridian", "loadtest", name, *argv]})
            doc["scenarios"].append(run_one(sc, args, workdir, progress, print))
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    except (HarnessError, LaunchError, NotLoopback) as e:
        print(f"{PROG} {name}: error: {e}", file=sys.stderr)
        return 2
    json_path, html_path = output_paths(args, name)
    write_result(doc, json_path)
    write_html(doc, html_path)
    print(f"wrote {json_path}\nwrote {html_path}")
    checks = doc["scenarios"][0].get("checks") or {}
    if checks and not checks.get("passed"):
        print(f"{PROG} {name}: checks FAILED", file=sys.stderr)
        return 1
    return 0


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"{PROG} report", description="render the HTML report of a result file again"
    )
    p.add_argument("result", type=Path)
    p.add_argument("--html", type=Path, help="default: the result file's .html")
    args = p.parse_args(argv)
    doc = load_result(args.result)
    out = args.html or args.result.with_suffix(".html")
    write_html(doc, out)
    print(f"wrote {out}")
    return 0


def usage() -> str:
    lines = [
        f"usage: {PROG} <scenario|compare|report|list> [options]",
        "",
        "scenarios (each: --help for its parameters):",
    ]
    for name, cls in SCENARIOS.items():
        lines.append(f"  {name:<15} {cls.title}")
    lines += [
        "",
        "  compare         Meridian and CNCF Distribution side by side, every figure with its "
        "ratio",
        "  report          render the HTML report of a result file again",
        "  list            the scenarios, with what each measures",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "compare":
        from loadtest.compare import compare_main

        return compare_main(rest)
    if cmd == "report":
        return report_main(rest)
    if cmd == "list":
        for name, cls in SCENARIOS.items():
            print(f"{name}: {cls.title}\n    {cls.description}\n")
        return 0
    if cmd in SCENARIOS:
        return scenario_main(cmd, rest)
    print(f"{PROG}: unknown scenario {cmd!r}\n\n{usage()}", file=sys.stderr)
    return 2
