"""Benchmark of the latency-aware router (``meridian router``).

Three figures, printed as a report (never test assertions):

1. **Routing accuracy** -- on a ``meridian up`` cluster (the WAN emulator's
   latencies: 5, 40, 120 ms RTT from here by default), the share of pull
   requests (manifest GETs and blob GETs) that land on the nearest healthy
   region holding the content. Three images: one replicated everywhere, one
   only in the second region, one only in the third (the emulated gRPC links
   into those regions are cut while they are pushed, so nothing copies them
   elsewhere during the run).
2. **Router overhead** on a manifest GET: asking the nearest region
   directly vs through the router, interleaved one by one, p50/p99 and the
   difference -- on the emulated cluster, and on a plain loopback setup
   (etcd + one node + the router, no emulator: the router's own cost alone),
   where it also compares throughput under load with ``wrk``.
3. **Failover**: a loop of pulls through the router while the nearest
   region is hung (SIGSTOP, then SIGCONT) and then killed (SIGKILL) at the
   50th pull: client-visible errors, and the time until traffic moved (first
   pull that no longer touched it) and until the router took it out.

Authentication is on, as users run Meridian: every client logs in as the
cluster owner (the Docker token flow, :class:`loadtest.ocipush.TokenAuth`,
through the router as real clients do), with the password ``meridian up``
keeps in the file its ``up.json`` names, and for the plain setup's node
``$MERIDIAN_OWNER_PASSWORD`` (a random one when unset, given to the node by
environment). ``wrk`` gets a bearer token fetched just before its run.

    python -m loadtest.bench_router [--pulls 200] [--samples 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.runtime import free_port
from loadtest.common import percentile
from loadtest.ocipush import OCI_MANIFEST, Image, OciClient, TokenAuth, bearer_header, random_image
from localcluster.supervisor import (
    Child,
    get_json,
    meridian_argv,
    python_env,
    registry_answers,
    spawn,
    start_etcd,
)

# -- processes -------------------------------------------------------------------


def _wait(what: str, check: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")


def session(auth: TokenAuth, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session logged in as ``auth`` (one per event loop)."""
    return aiohttp.ClientSession(middlewares=(auth,), **kwargs)


class UpCluster:
    """``meridian up`` as a child process; its owner's login from the file
    its ``up.json`` names (``meridian up`` chose or kept the password)."""

    def __init__(self, workdir: Path, config: str | None) -> None:
        self.data = workdir / "up"
        self.port = free_port()
        args = ["up", "--port", str(self.port), "--data", str(self.data)]
        if config:
            args += ["--config", config]
        self.child = spawn(
            "meridian up", meridian_argv(*args), workdir / "up.out", env=python_env()
        )
        try:
            self.child.wait_ready(check=(self.data / "up.json").exists, timeout=90, interval=0.1)
        except BaseException:
            self.stop()
            raise
        self.state = json.loads((self.data / "up.json").read_text())
        owner = self.state.get("owner")
        if not owner:
            self.stop()
            raise RuntimeError("meridian up runs without authentication: the bench measures it on")
        self.user = owner["user"]
        self.issued: list[TokenAuth] = []
        self.password = Path(owner["password_file"]).read_text().strip()
        self.router = self.state["router"]
        self.order = [
            name
            for name, _ in sorted(self.state["regions"].items(), key=lambda kv: kv[1]["rtt_ms"])
        ]

    def auth(self) -> TokenAuth:
        a = TokenAuth(self.user, self.password)
        self.issued.append(a)
        return a

    def region_pid(self, name: str) -> int:
        return int(self.state["children"][f"region {name}"]["pid"])

    def link(self, name: str, **change: Any) -> None:
        req = urllib.request.Request(
            f"{self.state['wan']}/links/{name}",
            data=json.dumps(change).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=5).read()

    def stop(self) -> None:
        self.child.signal(signal.SIGINT)  # it stops its own children in order
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.proc.wait(30)
        self.child.stop()


class PlainCluster:
    """etcd + one node + the router on loopback, no emulator. The node's
    owner has ``password`` (by environment); it takes forwarded headers from
    the router (``--trusted-proxies``), as ``meridian up``'s regions do."""

    def __init__(self, workdir: Path, password: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Child] = []
        self.password = password
        self.issued: list[TokenAuth] = []
        try:
            env = python_env(**{OWNER_PASSWORD_ENV: password})
            etcd = start_etcd(
                workdir / "etcd",
                workdir / "etcd.log",
                name="default",
                extra=["--log-level", "warn"],
            )
            self.procs.append(etcd)
            self.etcd = etcd.extra["client_url"]
            nport = free_port()
            self.node = f"http://127.0.0.1:{nport}"
            node = spawn(
                "node",
                meridian_argv("node", "--region", "solo", "--listen", f"127.0.0.1:{nport}")
                + ["--data", str(workdir / "node"), "--etcd", self.etcd]
                + ["--auth", "--trusted-proxies", "127.0.0.1/32"],
                workdir / "node.log",
                env=env,
            )
            self.procs.append(node)
            node.wait_ready(url=self.node + "/v2/", ok=registry_answers, timeout=90)
            rport = free_port()
            self.router = f"http://127.0.0.1:{rport}"
            router = spawn(
                "router",
                meridian_argv("router", "--etcd", self.etcd, "--listen", f"127.0.0.1:{rport}"),
                workdir / "router.log",
                env=env,
            )
            self.procs.append(router)
            router.wait_ready(
                check=lambda: any(
                    r["up"] for r in get_json(self.router + "/meridian/v1/router")["regions"]
                ),
                timeout=90,
            )
        except BaseException:
            self.stop()  # whatever started before the failure
            raise

    def auth(self) -> TokenAuth:
        a = TokenAuth(OWNER, self.password)
        self.issued.append(a)
        return a

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(30)


# -- clients ---------------------------------------------------------------------


class PullError(Exception):
    pass


async def pull(s: aiohttp.ClientSession, router: str, repo: str, img: Image) -> list[str]:
    """One pull through the router (manifest, then every blob following its
    redirect); the region that served each request, in order."""
    served = []
    try:
        async with s.get(f"{router}/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}) as r:
            body = await r.read()
            if r.status != 200 or body != img.manifest:
                raise PullError(f"manifest: {r.status}")
            served.append(r.headers.get("X-Meridian-Region", "?"))
        for digest, data in img.blobs():
            async with s.get(f"{router}/v2/{repo}/blobs/{digest}") as r:
                got = await r.read()
                if r.status != 200 or got != data:
                    raise PullError(f"blob {digest[:19]}: {r.status}")
                hop = r.history[0] if r.history else r
                served.append(hop.headers.get("X-Meridian-Region", "?"))
    except (aiohttp.ClientError, TimeoutError) as e:
        raise PullError(f"{type(e).__name__}: {e}") from e
    return served


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self, text: str) -> None:
        print(text, flush=True)


# -- 1. accuracy -------------------------------------------------------------------


async def accuracy(up: UpCluster, rounds: int, report: Report) -> None:
    near, second, third = up.order[:3]
    images = {
        name: random_image(2, 64 << 10, seed=f"acc-{name}") for name in ("all", "two", "three")
    }
    async with session(up.auth()) as s:
        # Everywhere: through the router (lands nearest), then replicated.
        await OciClient(up.router, s).push_image("bench/all", "v1", images["all"])

        def in_sync() -> bool:
            node = up.state["regions"][near]["node"]
            rows = get_json(node + "/meridian/v1/replication")["regions"]
            return all(r["pending_items"] == 0 for r in rows)

        await asyncio.to_thread(_wait, "replication", in_sync, 120)
        # Only in one region each: cut the gRPC link into it, push there directly.
        for name, key in ((second, "two"), (third, "three")):
            up.link(f"regions>{name}", cut=True)
            await OciClient(up.state["regions"][name]["node"], s).push_image(
                f"bench/{key}", "v1", images[key]
            )
        await asyncio.sleep(1.0)  # the router's namespace watch sees the pushes
        expected = {"all": near, "two": second, "three": third}
        total = hits = 0
        misses: dict[str, int] = {}
        errors = 0
        for _ in range(rounds):
            for key, img in images.items():
                try:
                    served = await pull(s, up.router, f"bench/{key}", img)
                except PullError as e:
                    errors += 1
                    report.line(f"    pull error: {key}: {e}")
                    continue
                for region in served:
                    total += 1
                    if region == expected[key]:
                        hits += 1
                    else:
                        misses[f"{key}->{region}"] = misses.get(f"{key}->{region}", 0) + 1
        for name in (second, third):
            up.link(f"regions>{name}", cut=False)
    share = hits / total if total else 0.0
    report.figures["accuracy"] = {
        "requests": total,
        "on_nearest_holder": hits,
        "share": share,
        "pull_errors": errors,
        "misses": misses,
    }
    report.line(
        f"  requests on the nearest healthy region holding the content: {hits}/{total} "
        f"= {share:.2%}; pull errors {errors}" + (f"; misses: {misses}" if misses else "")
    )


# -- 2. overhead -------------------------------------------------------------------


async def overhead(
    direct: str,
    router: str,
    repo: str,
    img: Image,
    samples: int,
    label: str,
    auth: TokenAuth,
    report: Report,
) -> None:
    url = f"/v2/{repo}/manifests/v1"
    h = {"Accept": OCI_MANIFEST}
    conn = aiohttp.TCPConnector(limit=4)
    times: dict[str, list[float]] = {"direct": [], "router": []}
    async with session(auth, connector=conn) as s:
        for base in (direct, router):  # warm both paths (and log in at both)
            for _ in range(50):
                async with s.get(base + url, headers=h) as r:
                    await r.read()
        for _ in range(samples):
            for key, base in (("direct", direct), ("router", router)):
                t0 = time.perf_counter()
                async with s.get(base + url, headers=h) as r:
                    body = await r.read()
                times[key].append((time.perf_counter() - t0) * 1000)
                if r.status != 200 or body != img.manifest:
                    raise RuntimeError(f"{key}: manifest GET answered {r.status}")
    out = {}
    for q, name in ((50, "p50"), (99, "p99")):
        d, rt = percentile(times["direct"], q), percentile(times["router"], q)
        out[name] = {"direct_ms": d, "router_ms": rt, "added_ms": rt - d}
    out["mean_added_ms"] = statistics.mean(times["router"]) - statistics.mean(times["direct"])
    report.figures[f"overhead_{label}"] = out
    report.line(
        f"  {label}: p50 direct {out['p50']['direct_ms']:.3f} ms, via router "
        f"{out['p50']['router_ms']:.3f} ms (+{out['p50']['added_ms']:.3f}); p99 direct "
        f"{out['p99']['direct_ms']:.3f} ms, via router {out['p99']['router_ms']:.3f} ms "
        f"(+{out['p99']['added_ms']:.3f})   [{samples} each, interleaved]"
    )


def throughput(
    direct: str,
    router: str,
    repo: str,
    auth: TokenAuth,
    report: Report,
    rounds: int = 1,
    label: str = "plain",
) -> None:
    """wrk against the node, then the router, ``rounds`` times alternately
    (the machine is shared: interleaved, medians reported)."""
    try:
        from loadtest.loadgen import run_wrk
    except ImportError:
        return
    if not shutil.which("wrk"):
        report.line("  (wrk not installed: no throughput comparison)")
        return
    url = f"/v2/{repo}/manifests/v1"
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "router": []}
    for _ in range(max(1, rounds)):
        for key, base in (("direct", direct), ("router", router)):
            # A token fetched for this run (it lives five minutes; 20000
            # requests take seconds, and the run is cut at two minutes).
            token = bearer_header(base + url, auth)
            if not token:
                raise RuntimeError(
                    f"{key}: no token for {base + url}: the owner's login was refused"
                )
            r = run_wrk(
                base + url, 20000, 16, headers={**token, "Accept": OCI_MANIFEST}, max_seconds=120
            )
            runs[key].append(
                {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors}
            )
    res: dict[str, Any] = {}
    for key, rs in runs.items():
        res[key] = {
            "rps": statistics.median(x["rps"] for x in rs),
            "p50_ms": statistics.median(x["p50_ms"] for x in rs),
            "p99_ms": statistics.median(x["p99_ms"] for x in rs),
            "errors": sum(x["errors"] for x in rs),
            "runs": len(rs),
        }
    res["ratio"] = res["router"]["rps"] / res["direct"]["rps"] if res["direct"]["rps"] else 0.0
    res["p50_added_ms"] = res["router"]["p50_ms"] - res["direct"]["p50_ms"]
    report.figures[f"throughput_{label}"] = res
    report.line(
        f"  {label} under load (wrk, 16 connections, 20000 requests, median of "
        f"{len(runs['direct'])} interleaved): direct {res['direct']['rps']:.0f} "
        f"req/s p50 {res['direct']['p50_ms']:.2f} ms p99 {res['direct']['p99_ms']:.2f} ms; "
        f"via router {res['router']['rps']:.0f} req/s p50 {res['router']['p50_ms']:.2f} ms "
        f"p99 {res['router']['p99_ms']:.2f} ms (errors {res['router']['errors']}); "
        f"router/direct {res['ratio']:.2f}x, p50 added {res['p50_added_ms']:+.2f} ms"
    )


# -- 3. failover ---------------------------------------------------------------------


async def failover(up: UpCluster, pulls: int, mode: str, report: Report) -> None:
    near = up.order[0]
    pid = up.region_pid(near)
    img = random_image(2, 64 << 10, seed="failover")
    errors: list[str] = []
    t_fault = t_moved = t_out = t_back = None
    async with session(up.auth(), timeout=aiohttp.ClientTimeout(total=60)) as s:
        repo = "bench/failover"
        await OciClient(up.router, s).push_image(repo, "v1", img)

        def in_sync() -> bool:
            rows = get_json(up.state["regions"][near]["node"] + "/meridian/v1/replication")
            return all(r["pending_items"] == 0 for r in rows["regions"])

        await asyncio.to_thread(_wait, "replication", in_sync, 120)
        durations = []
        back_in = None
        resume = 50 + max(1, (pulls - 50) // 2)  # hang: SIGCONT halfway through the rest
        for i in range(pulls):
            if i == 50:
                os.kill(pid, signal.SIGSTOP if mode == "hang" else signal.SIGKILL)
                t_fault = time.monotonic()
            if mode == "hang" and i == resume and t_fault is not None:
                os.kill(pid, signal.SIGCONT)
                t_back = time.monotonic()
            t0 = time.monotonic()
            try:
                served = await pull(s, up.router, repo, img)
            except PullError as e:
                errors.append(f"pull {i}: {e}")
                continue
            durations.append(time.monotonic() - t0)
            if t_fault is not None and t_moved is None and near not in served:
                t_moved = time.monotonic() - t_fault
            if t_fault is not None and (t_out is None or (t_back is not None and back_in is None)):
                st = get_json(up.router + "/meridian/v1/router")
                region = {r["region"]: r for r in st["regions"]}[near]
                if t_out is None and not region["up"]:
                    t_out = time.monotonic() - t_fault
                if t_back is not None and back_in is None and near in served:
                    back_in = time.monotonic() - t_back
    fig = {
        "pulls": pulls,
        "client_errors": len(errors),
        "traffic_moved_s": t_moved,
        "out_of_rotation_s": t_out,
        "pull_p50_ms": percentile(durations, 50) * 1000,
        "pull_max_ms": max(durations) * 1000 if durations else None,
    }
    if mode == "hang":
        fig["back_in_rotation_s"] = back_in
    report.figures[f"failover_{mode}"] = fig
    what = "hung (SIGSTOP)" if mode == "hang" else "killed (SIGKILL)"

    def sec(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f} s"

    report.line(
        f"  nearest region {near} {what} at pull 50 of {pulls}: client-visible errors "
        f"{len(errors)}; traffic moved after {sec(t_moved)}; out of rotation after "
        f"{sec(t_out)}; pull p50 {fig['pull_p50_ms']:.0f} ms, slowest "
        f"{fig['pull_max_ms']:.0f} ms"
        + (f"; traffic back {sec(back_in)} after SIGCONT" if mode == "hang" else "")
    )
    for e in errors[:5]:
        report.line(f"    {e}")


# -- main ----------------------------------------------------------------------------


def tokens(report: Report, setup: str, auths: list[TokenAuth]) -> None:
    """How many tokens the clients of ``setup`` fetched: the regions challenged
    them and they logged in (authentication was on)."""
    report.figures.setdefault("auth", {"user": OWNER})[f"tokens_fetched_{setup}"] = sum(
        a.fetched for a in auths
    )


async def run(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    report.line("Meridian router benchmark")
    report.line(f"  machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    report.line("\n[2a] router overhead, plain loopback (etcd + 1 node + router, no emulator)")
    # The plain setup's owner: the password the user set, else a random one.
    password = os.environ.get(OWNER_PASSWORD_ENV) or generate()
    plain = await asyncio.to_thread(PlainCluster, workdir / "plain", password)
    try:
        img = random_image(1, 4096, seed="overhead")
        async with session(plain.auth()) as s:
            await OciClient(plain.node, s).push_image("bench/overhead", "v1", img)
        await asyncio.sleep(0.5)
        await overhead(
            plain.node,
            plain.router,
            "bench/overhead",
            img,
            args.samples,
            "plain",
            plain.auth(),
            report,
        )
        await asyncio.to_thread(
            throughput,
            plain.node,
            plain.router,
            "bench/overhead",
            plain.auth(),
            report,
            args.wrk_rounds,
        )
    finally:
        await asyncio.to_thread(plain.stop)
        tokens(report, "plain", plain.issued)
    if args.plain_only:
        return

    report.line("\n[meridian up] starting the emulated cluster ...")
    up = await asyncio.to_thread(UpCluster, workdir, args.config)
    try:
        rtts = ", ".join(f"{n} {up.state['regions'][n]['rtt_ms']:g} ms" for n in up.order)
        report.line(f"  regions (RTT from this site): {rtts}")
        report.line("\n[1] routing accuracy")
        await accuracy(up, args.rounds, report)

        report.line("\n[2b] router overhead through the emulated link to the nearest region")
        near = up.order[0]
        await overhead(
            up.state["regions"][near]["advertised"],
            up.router,
            "bench/all",
            random_image(2, 64 << 10, seed="acc-all"),
            max(200, args.samples // 4),
            "emulated",
            up.auth(),
            report,
        )
        await asyncio.to_thread(
            throughput,
            up.state["regions"][near]["advertised"],
            up.router,
            "bench/all",
            up.auth(),
            report,
            args.wrk_rounds,
            "emulated",
        )

        report.line("\n[3] failover")
        await failover(up, args.pulls, "hang", report)
        await failover(up, args.pulls, "kill", report)
    finally:
        await asyncio.to_thread(up.stop)
        tokens(report, "up", up.issued)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_router", description=__doc__)
    p.add_argument("--pulls", type=int, default=200, help="pulls in each failover loop")
    p.add_argument("--rounds", type=int, default=40, help="accuracy rounds (3 images each)")
    p.add_argument("--samples", type=int, default=2000, help="manifest GETs per path (overhead)")
    p.add_argument(
        "--wrk-rounds", type=int, default=1, help="wrk runs per path, alternating (medians)"
    )
    p.add_argument(
        "--plain-only", action="store_true", help="only the plain loopback setup (overhead, wrk)"
    )
    p.add_argument("--config", help="topology for meridian up (default: 5/40/120 ms)")
    p.add_argument("--json", help="write the figures here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="meridian-bench-router-"))
    report = Report()
    try:
        try:
            import uvloop

            uvloop.run(run(args, workdir, report))
        except ImportError:
            asyncio.run(run(args, workdir, report))
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(report.figures, indent=1, default=str))
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
