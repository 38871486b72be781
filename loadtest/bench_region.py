"""Benchmark of a region of several nodes over shared object storage.

One setup, on loopback: etcd, Azurite (Microsoft's Azure Storage emulator,
``localcluster.azurite``), the nodes of one region on one Azurite container,
and the router. Two figures side by side, printed as a report (never test
assertions):

1. **Blob GET MiB/s, redirect vs streaming**: one blob, downloaded whole
   ``--downloads`` times (``--parallel`` at once, curl) from a node that
   answers ``307`` to a read-only SAS URL (``--storage-redirect``, the
   default: curl follows it to Azurite, the bytes never pass through the
   node) and from a node of the same region, on the same container, that
   streams the bytes itself (``--no-storage-redirect``).
2. **Manifest GET requests/s through the router, 1 vs 2 nodes**: ``wrk`` on
   one manifest through the router (its own manifest cache off, so every
   GET reaches a node) while the region has one node, then
   again once a second node is in the router's rotation (the router
   balances across a region's nodes); ``--rounds`` pairs (the second node
   stopped cleanly between them), medians reported. Client, router and
   nodes share this machine's CPUs: the ratio says what a second node buys
   *here*.

Authentication is on: the owner's password is ``$MERIDIAN_OWNER_PASSWORD``
(a random one when unset), given to the nodes by environment; curl and wrk
get a bearer token fetched just before their run (``bearer_header``), which
curl sends to the node only, never to storage.

    python -m loadtest.bench_region [--blob-mib 32] [--downloads 20] [--parallel 4]
        [--requests 20000] [--connections 16] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.runtime import free_port
from loadtest.common import BenchError, host_info, scrape, write_json
from loadtest.loadgen import run_curl_downloads, run_wrk
from loadtest.ocipush import OCI_MANIFEST, OciClient, TokenAuth, random_image
from localcluster.azurite import Azurite
from localcluster.supervisor import (
    Child,
    get_json,
    meridian_argv,
    python_env,
    registry_answers,
    spawn,
    start_etcd,
)

MIB = 1 << 20
REGION = "eastus"
REPO = "bench/region"


class RegionSetup:
    """etcd, Azurite and the router; nodes of ``REGION`` added one by one,
    all on one container."""

    def __init__(self, workdir: Path, password: str) -> None:
        self.workdir = workdir
        self.password = password
        self.procs: list[Child] = []
        self.nodes: dict[str, str] = {}  # node id -> URL
        self.children: dict[str, Child] = {}
        self.azurite = Azurite(workdir / "azurite")
        self.container = "meridian-bench-" + os.urandom(4).hex()
        try:
            etcd = start_etcd(
                workdir / "etcd",
                workdir / "etcd.log",
                name="default",
                extra=["--log-level", "warn"],
            )
            self.procs.append(etcd)
            self.etcd = etcd.extra["client_url"]
            self.azurite.start()
            assert self.azurite.child is not None
            self.procs.append(self.azurite.child)
            rport = free_port()
            self.router = f"http://127.0.0.1:{rport}"
            self._env = python_env(
                **{
                    OWNER_PASSWORD_ENV: password,
                    "MERIDIAN_AZURE_CONNECTION_STRING": self.azurite.connection_string,
                }
            )
            self.add_node("node-1", redirect=True)
            # The router's own manifest cache off (where it has one): the
            # manifest GETs measure the region's nodes behind it.
            router = spawn(
                "router",
                meridian_argv("router", "--etcd", self.etcd, "--listen", f"127.0.0.1:{rport}"),
                workdir / "router.log",
                env={**self._env, "MERIDIAN_MANIFEST_CACHE": "0"},
            )
            self.procs.append(router)
            self.router_child = router
            self.wait_nodes_up(1)
        except BaseException:
            self.stop()
            raise

    def add_node(self, node_id: str, *, redirect: bool) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        node = spawn(
            node_id,
            meridian_argv(
                "node",
                "--region", REGION,
                "--node-id", node_id,
                "--listen", f"127.0.0.1:{port}",
                "--data", str(self.workdir / node_id),
                "--etcd", self.etcd,
                "--storage", "azure",
                "--azure-container", self.container,
                "--storage-redirect" if redirect else "--no-storage-redirect",
                "--auth", "--trusted-proxies", "127.0.0.1/32",
            ),
            self.workdir / f"{node_id}.log",
            env=self._env,
        )  # fmt: skip
        self.procs.append(node)
        self.children[node_id] = node
        node.wait_ready(url=url + "/v2/", ok=registry_answers, timeout=90)
        self.nodes[node_id] = url
        return url

    def remove_node(self, node_id: str) -> None:
        """Stop a node cleanly (it leaves the region at once)."""
        node = self.children.pop(node_id)
        node.stop(30)
        self.procs.remove(node)
        del self.nodes[node_id]

    def wait_nodes_up(self, n: int) -> None:
        """Until the router has exactly ``n`` of the region's nodes in rotation."""

        def ready() -> bool:
            st = get_json(self.router + "/meridian/v1/router")
            rows = [r for r in st["regions"] if r["region"] == REGION]
            if not rows or not rows[0]["up"]:
                return False
            nodes = rows[0].get("nodes") or [{"up": True}]
            return sum(1 for x in nodes if x["up"]) == n

        self.router_child.wait_ready(check=ready, timeout=90, interval=0.1)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(30)


async def push(base: str, auth: TokenAuth, layer_mib: float) -> tuple[str, str, int]:
    """Push an image of one layer of ``layer_mib`` MiB; (manifest digest,
    layer digest, layer size)."""
    img = random_image(1, int(layer_mib * MIB), seed="bench-region")
    async with aiohttp.ClientSession(middlewares=(auth,)) as s:
        await OciClient(base, s).push_image(REPO, "v1", img)
    layer = img.layers[0]
    return img.manifest_digest, layer.digest, len(layer.data)


async def first_answer(url: str, auth: TokenAuth) -> int:
    """The status a blob GET of ``url`` gets (redirects not followed)."""
    async with (
        aiohttp.ClientSession(middlewares=(auth,)) as s,
        s.get(url, allow_redirects=False) as r,
    ):
        await r.read()
        return r.status


def served(setup: RegionSetup) -> dict[str, float]:
    """Requests each node answered 200 to so far."""
    key = 'meridian_http_requests_total{method="GET",status="200"}'
    return {n: scrape(url).get(key, 0.0) for n, url in setup.nodes.items()}


def mib_s(res: dict[str, Any]) -> float:
    return float(res["bytes"]) / MIB / max(float(res["seconds"]), 1e-9)


def downloads(url: str, size: int, count: int, parallel: int, *, follow: bool) -> dict[str, Any]:
    res = run_curl_downloads(url, size, count, parallel, follow=follow)
    each = sorted(float(x) for x in res["each"])  # type: ignore[union-attr]
    return {
        "mib_s": mib_s(res),
        "downloads": len(each),
        "bytes": res["bytes"],
        "seconds": res["seconds"],
        "client_cpu_s": res["cpu"],
        "fastest_s": each[0] if each else None,
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    password = os.environ.get(OWNER_PASSWORD_ENV) or generate(18)
    os.environ[OWNER_PASSWORD_ENV] = password  # bearer_header logs in with it
    auth = TokenAuth(OWNER, password)
    fig: dict[str, Any] = {"host": host_info(("wrk", "curl")), "auth": {"user": OWNER}}
    print("Meridian region benchmark (one region on Azurite, behind the router)", flush=True)
    print(f"  machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    setup = RegionSetup(workdir, password)
    try:
        manifest, layer, size = asyncio.run(push(setup.nodes["node-1"], auth, args.blob_mib))
        manifest_url = f"{setup.router}/v2/{REPO}/manifests/{manifest}"
        headers = {"Accept": OCI_MANIFEST}

        print(f"\n[2] manifest GETs through the router (wrk), {args.rounds} rounds", flush=True)
        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            if i:
                setup.remove_node("node-2")
                setup.wait_nodes_up(1)
            one = run_wrk(manifest_url, args.requests, args.connections, headers=headers)
            setup.add_node("node-2", redirect=False)
            setup.wait_nodes_up(2)
            before = served(setup)
            two = run_wrk(manifest_url, args.requests, args.connections, headers=headers)
            # How the router spread them (each node's count of 200s).
            spread = {k: v - before[k] for k, v in served(setup).items()}
            rounds.append({"1_node": asdict(one), "2_nodes": {**asdict(two), "per_node": spread}})
            print(
                f"  round {i + 1}: 1 node {one.rps:7.0f} req/s (p99 {one.p99_ms:.1f} ms), "
                f"2 nodes {two.rps:7.0f} req/s (p99 {two.p99_ms:.1f} ms; per node {spread})",
                flush=True,
            )
        rps: dict[str, Any] = {"rounds": rounds}
        for key in ("1_node", "2_nodes"):
            runs = [r[key] for r in rounds]
            rps[key] = {
                "rps": statistics.median(r["rps"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "requests": sum(r["requests"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
            }
        per_node: dict[str, float] = {}
        for r in rounds:
            for k, v in r["2_nodes"]["per_node"].items():
                per_node[k] = per_node.get(k, 0.0) + v
        rps["2_nodes"]["per_node"] = per_node
        rps["ratio"] = rps["2_nodes"]["rps"] / rps["1_node"]["rps"]
        print(
            f"  median: 1 node {rps['1_node']['rps']:.0f} req/s, 2 nodes "
            f"{rps['2_nodes']['rps']:.0f} req/s: {rps['ratio']:.2f}x",
            flush=True,
        )
        fig["manifest_rps"] = rps

        print(
            f"\n[1] blob GETs of {size / MIB:.0f} MiB x {args.downloads}, {args.parallel} at once "
            "(curl)",
            flush=True,
        )
        urls = {
            "redirect": f"{setup.nodes['node-1']}/v2/{REPO}/blobs/{layer}",
            "stream": f"{setup.nodes['node-2']}/v2/{REPO}/blobs/{layer}",
        }
        for key, want in (("redirect", 307), ("stream", 200)):
            got = asyncio.run(first_answer(urls[key], auth))
            if got != want:
                raise BenchError(f"a blob GET on the {key} node answered {got}, not {want}")
        blob = {
            "redirect": downloads(
                urls["redirect"],
                size,
                args.downloads,
                args.parallel,
                follow=True,
            ),
            "stream": downloads(
                urls["stream"],
                size,
                args.downloads,
                args.parallel,
                follow=False,
            ),
        }
        for label, key in (("redirect to storage", "redirect"), ("streamed by the node", "stream")):
            b = blob[key]
            print(f"  {label}: {b['mib_s']:8.1f} MiB/s  ({b['downloads']} downloads)", flush=True)
        blob["ratio"] = blob["redirect"]["mib_s"] / blob["stream"]["mib_s"]
        print(f"  redirect / stream: {blob['ratio']:.2f}x", flush=True)
        fig["blob_get"] = {"size": size, **blob}
    finally:
        setup.stop()
    rps = fig.get("manifest_rps", {})
    errors = {k: rps[k]["errors"] for k in ("1_node", "2_nodes") if k in rps}
    if any(errors.values()):
        raise BenchError(f"wrk saw errors: {errors}")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_region", description=__doc__)
    p.add_argument("--blob-mib", type=float, default=32, help="size of the blob downloaded")
    p.add_argument("--downloads", type=int, default=20, help="downloads of it per path")
    p.add_argument("--parallel", type=int, default=4, help="downloads at once")
    p.add_argument("--requests", type=int, default=20000, help="manifest GETs per wrk run")
    p.add_argument("--connections", type=int, default=16, help="wrk connections")
    p.add_argument(
        "--rounds", type=int, default=3, help="1-node/2-nodes pairs of wrk runs (medians kept)"
    )
    p.add_argument("--json", help="write the figures here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    for name in ("downloads", "parallel", "requests", "connections", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.blob_mib <= 0:
        p.error("--blob-mib must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="meridian-bench-region-"))
    try:
        fig = run(args, workdir)
        if args.json:
            write_json(fig, Path(args.json))
    except BenchError as e:
        print(f"bench_region: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
