"""``meridian loadtest compare``: Meridian and CNCF Distribution side by side.

Starts three targets, each on its own free loopback port with its own data
dir: ``distribution``, CNCF Distribution (v3 when built locally or named with
``--distribution-binary``, else Debian's 2.8.2: see
``loadtest.reference.distribution_binary``; the report names the version that
ran), which as a Go program uses every core; ``meridian``, a standalone node
as one process (one core); and ``meridian-workers``, the node with
``--workers N`` (N processes sharing the port, N = ``--workers``, default one
per core, with the etcd that needs, whose CPU counts as the node's). It runs a
fixed suite of scenarios on all of them (every step on every target back to
back, the order rotating every round: ``harness.round_order``) and prints
every figure with its ratio to Distribution (> 1: Meridian better).
``--workers 1`` leaves the third target out. The rollout runs Distribution
(clients straight to it) against a Meridian cluster (etcd, one region, the
router: clients go through the router, which redirects blob GETs to the
region), as a Kubernetes cluster would use each.

Sizes: ``--size moderate`` (default: a few minutes), ``toy`` (seconds, for
tests), ``full`` (longer, larger counts).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtest.cli import (
    DEFAULT_OUT,
    PROG,
    make_targets,
    output_paths,
    resolve_params,
    run_one,
    scenario_parser,
)
from loadtest.common import exit_on_sigterm, signals_held
from loadtest.harness import (
    HarnessError,
    Run,
    Target,
    format_table,
    new_document,
    new_run_id,
)
from loadtest.progress import Progress
from loadtest.reference import (
    DISTRIBUTION_ENV,
    WORKERS_TARGET,
    LaunchError,
    default_workers,
    parse_workers,
)
from loadtest.scenarios import create
from loadtest.workers import NotLoopback

#: Per size, the scenarios run, as their command lines. Every scenario but
#: the rollout runs on the started servers (Distribution, the node, the node
#: with workers); the rollout on Distribution and a Meridian cluster.
SUITES: dict[str, list[str]] = {
    "toy": [
        "manifest-storm --requests 200 --concurrency 4",
        "head-storm --requests 200 --concurrency 4",
        "pull --sizes 256K --concurrency 2 --volume 2M",
        "push --sizes 256K --concurrency 1 --modes monolithic --volume 1M",
        "rollout --nodes 3 --layers 2 --layer-size 128K --regions 1 --no-emulate",
    ],
    "moderate": [
        "manifest-storm --requests 8000 --concurrency 32 --procs 2",
        "manifest-storm --requests 20000 --concurrency 32 --loadgen wrk",
        "head-storm --requests 8000 --concurrency 32 --missing 0.5 --procs 2",
        "head-storm --requests 20000 --concurrency 32 --loadgen ab",
        "pull --sizes 1M,10M,100M --concurrency 1,4 --volume 400M --max-requests 200 --procs 2",
        "push --sizes 1M,10M,100M --concurrency 1 --modes monolithic,chunked --volume 200M "
        "--max-requests 100",
        "push --sizes 10M --concurrency 4 --modes monolithic --volume 200M",
        "push --sizes 100M --concurrency 1 --client skopeo --layers 5 --max-requests 3 "
        "--volume 300M",
        "rollout --nodes 50 --layers 4 --layer-size 8M --regions 1 --no-emulate --procs 2",
    ],
    "full": [
        "manifest-storm --requests 20000 --concurrency 64 --procs 2",
        "manifest-storm --requests 50000 --concurrency 64 --loadgen wrk",
        "head-storm --requests 20000 --concurrency 64 --missing 0.5 --procs 2",
        "head-storm --requests 50000 --concurrency 64 --loadgen ab",
        "pull --sizes 1M,10M,100M --concurrency 1,4,16 --modes whole,ranged --volume 1G --procs 2",
        "push --sizes 1M,10M,100M --concurrency 1,4 --modes monolithic,post,chunked --volume 500M",
        "push --sizes 100M --concurrency 1 --client skopeo --layers 5 --max-requests 5 "
        "--volume 500M",
        "mixed --seconds 60 --concurrency 16",
        "rollout --nodes 50 --layers 5 --layer-size 10M --regions 1 --no-emulate --procs 2",
    ],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"{PROG} compare",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", choices=tuple(SUITES), default="moderate")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; toy 1)")
    p.add_argument("--only", help="comma-separated scenarios of the suite to run")
    p.add_argument(
        "--workers",
        default=str(default_workers()),
        metavar="N",
        help="processes of the meridian-workers target (meridian node --workers N: one per "
        "core by default, as Distribution uses every core); 1 leaves that target out",
    )
    p.add_argument(
        "--distribution-binary",
        metavar="PATH",
        help="the CNCF Distribution binary to run (env MERIDIAN_DISTRIBUTION_BINARY; default: "
        ".bench/distribution-v3/registry when built, else Debian's docker-registry 2.8.2)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--json", type=Path)
    p.add_argument("--html", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def scenario_args(line: str, base: argparse.Namespace) -> tuple[str, argparse.Namespace]:
    """A suite's command line, parsed as ``meridian loadtest`` would."""
    name, *argv = shlex.split(line)
    sc = create(name)
    ns = scenario_parser(sc).parse_args([*argv, "--baseline", "distribution"])
    ns.rounds, ns.out, ns.workdir, ns.keep, ns.quiet, ns.meridian_workers = (
        base.rounds,
        base.out,
        base.workdir,
        base.keep,
        base.quiet,
        base.workers,
    )
    resolve_params(ns, sc.params)
    return name, ns


def compare_main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.rounds = args.rounds or (1 if args.size == "toy" else 3)
    try:
        args.workers = parse_workers(args.workers)
    except LaunchError as e:
        print(f"{PROG} compare: error: {e}", file=sys.stderr)
        return 2
    if args.distribution_binary:
        os.environ[DISTRIBUTION_ENV] = args.distribution_binary
    suite = SUITES[args.size]
    if args.only:
        want = {x.strip() for x in args.only.split(",") if x.strip()}
        suite = [line for line in suite if line.split()[0] in want]
        if not suite:
            print(f"{PROG} compare: --only matches nothing in the suite", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-compare-", dir=args.workdir))
    progress = Progress(enabled=not args.quiet)
    doc = new_document("compare", {"argv": ["meridian", "loadtest", "compare", *argv]})
    run_id = new_run_id()
    servers: list[Target] = []
    try:
        for line in suite:
            name, ns = scenario_args(line, args)
            sc = create(name)
            print(f"\n== {sc.title}: {line} ==")
            if name == "rollout":
                ns.start = ["distribution", "cluster"]
                doc["scenarios"].append(run_one(sc, ns, workdir, progress, print, None, run_id))
                continue
            if not servers:
                ns.start = node_targets(args.workers)
                dummy = Run(sc, ns, [], workdir, run_id, 1, progress)
                servers = make_targets(sc, ns, workdir, dummy, print)
            doc["scenarios"].append(run_one(sc, ns, workdir, progress, print, servers, run_id))
    except (HarnessError, LaunchError, NotLoopback) as e:
        print(f"{PROG} compare: error: {e}", file=sys.stderr)
        return 2
    finally:
        with signals_held():
            for t in servers:
                t.stop()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    doc["summary"] = summary(doc)
    print("\n" + "=" * 30 + " Meridian vs CNCF Distribution " + "=" * 30)
    print(format_table(doc["summary"]["rows"], doc["summary"]["targets"], "distribution"))
    for note in doc["summary"]["notes"]:
        print(f"note: {note}")
    json_path, html_path = output_paths(args, f"compare-{args.size}")
    from loadtest.report import write_html, write_result

    write_result(doc, json_path)
    write_html(doc, html_path)
    print(f"wrote {json_path}\nwrote {html_path}")
    return 0


def node_targets(workers: int) -> list[str]:
    """What the node scenarios run on: Distribution, the node as one process,
    and (``workers`` > 1) the node with ``--workers``."""
    return ["distribution", "meridian", *([WORKERS_TARGET] if workers > 1 else [])]


def describe_target(t: dict[str, Any]) -> str:
    """One line on what a target ran (from its description in the result)."""
    extra = t.get("extra") or {}
    if t["kind"] == "distribution":
        return f"{t['name']}: {t['version']}, one Go process (it uses every core)"
    if t["kind"] == "cluster":
        return f"{t['name']} (rollout): {t['version']}"
    n = int(extra.get("workers") or 1)
    how = f"{n} node processes (--workers {n})" if n > 1 else "one node process"
    helpers = [k for k in t["pids"] if k != t["name"]]
    if helpers:
        how += f" and {', '.join(helpers)}, all counted in its server CPU"
    return f"{t['name']}: {how}: {extra.get('cmd', '')}".rstrip(": ")


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Every figure of every scenario, in one table (ratios vs Distribution),
    with a note per target on the processes it ran."""
    rows: list[dict[str, Any]] = []
    targets: list[str] = []
    described: dict[str, str] = {}
    for sc in doc["scenarios"]:
        for t in sc["targets"]:
            if t["name"] not in targets:
                targets.append(t["name"])
            described.setdefault(f"{t['name']}/{t['kind']}", describe_target(t))
        for r in sc["figures"]:
            if r["label"].strip() == "errors" and not any(r["values"].values()):
                continue
            rows.append(r)
    notes = [
        *described.values(),
        "The rollout compares Distribution (nodes pull from it directly) with a Meridian "
        "cluster (one region behind the router: manifests proxied, blob GETs redirected).",
    ]
    return {
        "targets": targets,
        "baseline": "distribution",
        "rows": rows,
        "notes": notes,
    }
