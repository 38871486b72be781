"""Management verbs of the ``meridian`` CLI that read the namespace:
``meridian regions`` and ``meridian replication``."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

import aiohttp

from cluster import discovery, etcd_options
from cluster.etcd_options import EtcdOptions
from cluster.namespace import ALIVE, NODES, REGIONS, NodeInfo, RegionInfo
from cluster.preflight import CliError, Parser, answer


def namespace_args(p: argparse.ArgumentParser) -> None:
    """``--etcd``, ``--node``, ``--json``; without the first two, the verbs
    find a running ``meridian up`` (``cluster.discovery``)."""
    discovery.add_arguments(p)


async def _region_records(
    ns: discovery.Where, options: EtcdOptions | None = None, verify: ssl.SSLContext | bool = True
) -> tuple[list[RegionInfo], set[str], dict[str, list[NodeInfo]]]:
    """The region records, the alive regions and each region's live nodes
    (``verify``: how to verify ``--node``'s HTTPS)."""
    fields = ("name", "http", "grpc", "started")
    if not ns.etcd:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            url = ns.node.rstrip("/") + "/meridian/v1/regions"
            async with s.get(url, ssl=verify) as resp:
                resp.raise_for_status()
                doc = await resp.json()
        infos = [RegionInfo(**{k: r[k] for k in fields}) for r in doc["regions"]]
        nodes = {r["name"]: [NodeInfo(**n) for n in r.get("nodes", ())] for r in doc["regions"]}
        return infos, {r["name"] for r in doc["regions"] if r["alive"]}, nodes
    from cluster.etcd import EtcdKV

    kv = EtcdKV.from_flag(ns.etcd, options=options)
    await kv.start()
    try:
        entries, _ = await kv.range(REGIONS)
        alive, _ = await kv.range(ALIVE)
    finally:
        await kv.close()
    records: dict[str, RegionInfo] = {}
    nodes: dict[str, list[NodeInfo]] = {}
    for e in entries:
        if NODES in e.key[len(REGIONS) :]:
            n = NodeInfo(**json.loads(e.value))
            nodes.setdefault(n.region, []).append(n)
        else:
            info = RegionInfo(**json.loads(e.value))
            records[info.name] = info
    for name, ns_nodes in nodes.items():
        rec = records.get(name)
        if rec is None or all(n.http != rec.http for n in ns_nodes):
            records[name] = min(ns_nodes, key=lambda n: n.node).region_info()
    live = {e.key[len(ALIVE) :] for e in alive} | {r for r, n in nodes.items() if n}
    return list(records.values()), live, nodes


class _Prober:
    """Times ``GET /v2/`` at nodes (milliseconds; None when it fails),
    verifying HTTPS as ``verify`` says; remembers a certificate it could
    not verify, for the one line saying what to pass."""

    def __init__(self, session: aiohttp.ClientSession, verify: ssl.SSLContext | bool) -> None:
        self.session = session
        self.verify = verify
        self.untrusted: str = ""  # the first URL whose certificate failed verification

    async def rtt_ms(self, url: str) -> float | None:
        start = time.perf_counter()
        try:
            async with self.session.get(url.rstrip("/") + "/v2/", ssl=self.verify) as resp:
                await resp.read()
                if resp.status >= 500:
                    return None
        except aiohttp.ClientConnectorCertificateError:
            self.untrusted = self.untrusted or url
            return None
        except (aiohttp.ClientError, TimeoutError):
            return None
        return (time.perf_counter() - start) * 1000


async def list_regions(
    ns: discovery.Where, options: EtcdOptions | None = None
) -> tuple[list[dict], str]:
    """One row per region; ``nodes``: its live nodes (a node's key is
    leased, so a listed node is alive), each probed like the region. And
    the first URL whose certificate was not trusted ("" when none was)."""
    verify = ns.ssl_context()
    infos, alive_names, nodes = await _region_records(ns, options, verify)
    rows = []
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        probe = _Prober(session, verify)
        for info in sorted(infos, key=lambda i: i.name):
            rtt = await probe.rtt_ms(info.http) if info.http else None
            node_rows = []
            for n in sorted(nodes.get(info.name, ()), key=lambda n: n.node):
                n_rtt = await probe.rtt_ms(n.http) if n.http else None
                node_rows.append(
                    {
                        "node": n.node,
                        "http": n.http,
                        "grpc": n.grpc,
                        "alive": True,
                        "reachable": n_rtt is not None,
                        "rtt_ms": None if n_rtt is None else round(n_rtt, 2),
                    }
                )
            rows.append(
                {
                    "region": info.name,
                    "http": info.http,
                    "grpc": info.grpc,
                    "alive": info.name in alive_names,
                    "reachable": rtt is not None or any(n["reachable"] for n in node_rows),
                    "rtt_ms": None if rtt is None else round(rtt, 2),
                    "nodes": node_rows,
                }
            )
    return rows, probe.untrusted


def regions_main(argv: list[str]) -> int:
    p = Parser(
        prog="meridian regions", description="list the regions of a cluster and their health"
    )
    namespace_args(p)
    ns = p.parse_args(argv)
    options = etcd_options.from_args(ns)
    return answer(
        "meridian regions",
        lambda: _print_regions(ns.etcd, ns.node, ns.json, options, ns.tls_ca),
    )


def _print_regions(
    etcd: str, node: str, as_json: bool, options: EtcdOptions | None = None, ca: str = ""
) -> int:
    where = discovery.find_cluster(etcd, node, ca)
    with discovery.answering(where):
        rows, untrusted = asyncio.run(list_regions(where, options))
    if untrusted:
        print(
            f"meridian regions: the certificate of {untrusted} is not trusted, so it shows no "
            "RTT; pass --tls-ca CA.pem (or set MERIDIAN_TLS_CA) with the CA that signed it",
            file=sys.stderr,
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'REGION':<16} {'ALIVE':<6} {'RTT':>9}  {'HTTP':<28} GRPC")
    for r in rows:
        rtt = f"{r['rtt_ms']:.1f}ms" if r["rtt_ms"] is not None else "-"
        alive = "yes" if r["alive"] else "no"
        print(f"{r['region']:<16} {alive:<6} {rtt:>9}  {r['http']:<28} {r['grpc'] or '-'}")
        for n in r["nodes"]:
            n_rtt = f"{n['rtt_ms']:.1f}ms" if n["rtt_ms"] is not None else "-"
            n_alive = "yes" if n["alive"] else "no"
            name = f"  node {n['node']}"
            print(f"{name:<16} {n_alive:<6} {n_rtt:>9}  {n['http']:<28} {n['grpc'] or '-'}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


async def _replication_rows(etcd: str, options: EtcdOptions | None = None) -> list[dict]:
    # The backlog is computed as the nodes compute it; the CLI imports the
    # node's planning code only when this verb runs (as ``meridian node``).
    from cluster.etcd import EtcdKV
    from cluster.namespace import Namespace
    from node.replication.plan import status_rows

    ns = Namespace(EtcdKV.from_flag(etcd, options=options), "")
    await ns.start()
    try:
        return status_rows(ns)
    finally:
        await ns.close()


def replication_main(argv: list[str]) -> int:
    """``meridian replication status`` (or no verb): per region status,
    items and bytes pending, lag -- read from the namespace (``--etcd``) or
    from a node's management API (``--node``). A registry's replications
    are ``cluster.replicas_cli``'s verbs."""
    import urllib.request

    p = Parser(
        prog="meridian replication status",
        description="replication status of a cluster: every region's backlog and lag",
    )
    namespace_args(p)
    args = p.parse_args(argv)
    options = etcd_options.from_args(args)
    try:
        where = discovery.find_cluster(args.etcd, args.node, args.tls_ca)
        with discovery.answering(where):
            if where.etcd:
                rows = asyncio.run(_replication_rows(where.etcd, options))
            else:
                url = where.node.rstrip("/") + "/meridian/v1/replication"
                verify = where.ssl_context()
                context = verify if isinstance(verify, ssl.SSLContext) else None
                with urllib.request.urlopen(url, timeout=10, context=context) as resp:
                    rows = json.loads(resp.read())["regions"]
    except CliError as e:
        print(f"meridian replication: {e}", file=sys.stderr)
        return e.code
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'REGION':<16} {'STATUS':<12} {'ITEMS':>7} {'BYTES':>10} {'LAG':>9}")
    for r in rows:
        print(
            f"{r['region']:<16} {r['status']:<12} {r['pending_items']:>7} "
            f"{_human(r['pending_bytes']):>10} {r['lag_seconds']:>8.1f}s"
        )
    return 0
