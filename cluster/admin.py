"""Management verbs of the ``meridian`` CLI that read the namespace."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import aiohttp

from cluster.namespace import ALIVE, REGIONS, RegionInfo


def namespace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--etcd",
        default=os.environ.get("MERIDIAN_ETCD", ""),
        help="etcd endpoints of the cluster (comma-separated)",
    )
    p.add_argument(
        "--node",
        default=os.environ.get("MERIDIAN_NODE", "http://127.0.0.1:5000"),
        help="ask this node's management API (used when --etcd is not given)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


async def _region_records(ns: argparse.Namespace) -> tuple[list[RegionInfo], set[str]]:
    if not ns.etcd:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(ns.node.rstrip("/") + "/meridian/v1/regions") as resp:
                resp.raise_for_status()
                doc = await resp.json()
        infos = [
            RegionInfo(**{k: r[k] for k in ("name", "http", "grpc", "started")})
            for r in doc["regions"]
        ]
        return infos, {r["name"] for r in doc["regions"] if r["alive"]}
    from cluster.etcd import EtcdKV

    kv = EtcdKV.from_flag(ns.etcd)
    await kv.start()
    try:
        infos, _ = await kv.range(REGIONS)
        alive, _ = await kv.range(ALIVE)
    finally:
        await kv.close()
    return (
        [RegionInfo(**json.loads(e.value)) for e in infos],
        {e.key[len(ALIVE) :] for e in alive},
    )


async def _probe(session: aiohttp.ClientSession, url: str) -> float | None:
    start = time.perf_counter()
    try:
        async with session.get(url.rstrip("/") + "/v2/") as resp:
            await resp.read()
            if resp.status >= 500:
                return None
    except (aiohttp.ClientError, TimeoutError):
        return None
    return (time.perf_counter() - start) * 1000


async def list_regions(ns: argparse.Namespace) -> list[dict]:
    infos, alive_names = await _region_records(ns)
    rows = []
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for info in infos:
            rtt = await _probe(session, info.http) if info.http else None
            rows.append(
                {
                    "region": info.name,
                    "http": info.http,
                    "grpc": info.grpc,
                    "alive": info.name in alive_names,
                    "reachable": rtt is not None,
                    "rtt_ms": None if rtt is None else round(rtt, 2),
                }
            )
    return rows


def regions_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="meridian regions", description="list the regions of a cluster and their health"
    )
    namespace_args(p)
    ns = p.parse_args(argv)
    rows = asyncio.run(list_regions(ns))
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'REGION':<16} {'ALIVE':<6} {'RTT':>9}  {'HTTP':<28} GRPC")
    for r in rows:
        rtt = f"{r['rtt_ms']:.1f}ms" if r["rtt_ms"] is not None else "-"
        alive = "yes" if r["alive"] else "no"
        print(f"{r['region']:<16} {alive:<6} {rtt:>9}  {r['http']:<28} {r['grpc'] or '-'}")
    return 0
