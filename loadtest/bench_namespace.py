"""The registry-wide namespace on etcd: propagation, read rate, scale.

    python -m loadtest.bench_namespace [--quick] [--out results/bench_namespace.json]

Real processes only: a real etcd (``/usr/bin/etcd`` or ``$MERIDIAN_BENCH_ETCD``)
on ephemeral loopback ports and real ``meridian node`` subprocesses.

1. **Watch propagation.** Nodes A (eastus) and B (westeurope) on one etcd.
   Sequential samples: PUT a new manifest under a new tag through A; from
   the moment A's 201 arrives, poll B's ``tags/list`` back to back until
   the tag is listed. Reported: p50/p90/p99/max of ack->visible (and of
   send->visible), the median poll round trip on B (the resolution of the
   measurement) and how often the tag was already there at the first poll.
2. **Manifest GET by tag, req/s**: a node on etcd vs a standalone node
   (embedded namespace), each serving a manifest pushed to it, measured
   with ``wrk -t1 -c32 -d5s --latency`` in alternating rounds.
3. **Scale.** A fresh etcd is seeded directly (EtcdKV transactions of 128
   ops, several in flight, the key layout of cluster/namespace.py) with
   N repositories x T tags, each tag its own manifest record (records +
   tags; no blob links or placements). Then a fresh node starts on it:
   time from spawn until ``/v2/`` answers and until ``/healthz`` reports
   ``namespace_synced``; its RSS (VmRSS) next to the same node on an empty
   namespace; ``tags/list`` latency for a repository of T tags and
   ``_catalog`` latency (``n=100``, ``n=1000`` and the full list) with
   ``wrk -t1 -c1 --latency`` (one connection: latency, not throughput).

Authentication is on, as users run Meridian: the nodes' owner password is
``$MERIDIAN_OWNER_PASSWORD`` (a random one when unset; the nodes get it by
environment); every client logs in as the owner (the Docker token flow,
:class:`loadtest.ocipush.TokenAuth`), and each ``wrk`` run carries a bearer
token fetched just before it (``wrk`` cannot answer a challenge; a run lasts
seconds, far less than a token's five minutes).

Prints a table and writes JSON (default ``results/bench_namespace.json``).
Figures are what this machine did in this run, not thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.etcd import EtcdKV
from cluster.kv import Op, Put
from cluster.namespace import ROOT, ManifestRecord, manifest_key, tag_key
from cluster.runtime import free_port
from loadtest.common import BenchError, exit_on_sigterm, host_info, percentile, write_json
from loadtest.ocipush import TokenAuth, bearer_header
from localcluster.supervisor import (
    REPO_ROOT,
    Child,
    StartError,
    find_etcd,
    meridian_argv,
    python_env,
    registry_answers,
    spawn,
)
from localcluster.supervisor import start_etcd as start_etcd_child
from ocidist.mediatypes import OCI_CONFIG, OCI_MANIFEST
from ocidist.mediatypes import OCI_LAYER_GZIP as OCI_LAYER

REG = "default"
TXN_OPS = 128  # etcd's default --max-txn-ops


# -- the owner's login -----------------------------------------------------------


class Login:
    """The owner's credentials for the nodes this run starts (they get the
    password by environment), and the clients that log in with them: one
    :class:`TokenAuth` per event loop (its locks belong to one), all counted."""

    def __init__(self, password: str) -> None:
        self.password = password
        self._auths: list[TokenAuth] = []

    def __repr__(self) -> str:  # never the password
        return f"Login({OWNER!r})"

    def auth(self) -> TokenAuth:
        a = TokenAuth(OWNER, self.password)
        self._auths.append(a)
        return a

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An aiohttp session logged in as the owner."""
        return aiohttp.ClientSession(middlewares=(self.auth(),), **kwargs)

    def bearer(self, url: str) -> dict[str, str]:
        """A fresh token for pulling ``url`` (for one wrk run)."""
        header = bearer_header(url, self.auth())
        if not header:
            raise BenchError(f"no token for {url}: the owner's login was refused")
        return header

    @property
    def tokens_fetched(self) -> int:
        return sum(a.fetched for a in self._auths)


def owner_login() -> Login:
    """``$MERIDIAN_OWNER_PASSWORD``, or a random one put there, so the nodes
    this process starts (:func:`python_env` copies the environment) create
    their owner with it."""
    return Login(os.environ.setdefault(OWNER_PASSWORD_ENV, generate()))


# -- processes ------------------------------------------------------------------


@dataclass
class Proc:
    """A child process (:mod:`localcluster.supervisor`) and its HTTP port."""

    child: Child
    port: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise BenchError(f"no VmRSS for pid {self.pid}")

    def stop(self) -> None:
        self.child.stop()


def _ready(p: Proc, url: str, ok: Any, timeout: float) -> float:
    """Poll ``url`` every 5 ms until ``ok(status, body)``; the perf_counter
    time it did."""
    try:
        return p.child.wait_ready(url=url, ok=ok, timeout=timeout, interval=0.005)
    except StartError as e:
        raise BenchError(str(e)) from None


def etcd_binary() -> str:
    try:
        return find_etcd("MERIDIAN_BENCH_ETCD")
    except StartError as e:
        raise BenchError(str(e)) from None


def start_etcd(workdir: Path) -> Proc:
    try:
        child = start_etcd_child(
            workdir / "data",
            workdir / "etcd.log",
            binary=etcd_binary(),
            name="bench",
            extra=["--log-level", "warn", "--quota-backend-bytes", str(4 << 30)],
            env=python_env(),
            cwd=REPO_ROOT,
        )
    except StartError as e:
        raise BenchError(str(e)) from None
    return Proc(child, int(child.extra["client_url"].rpartition(":")[2]))


def start_node(workdir: Path, region: str, etcd: str = "") -> Proc:
    """Start a node (authentication on; its owner's password from the
    environment, see :func:`owner_login`); ``extra`` records seconds from
    spawn to /v2/ answering (200, or 401: up and asking for a login) and to
    /healthz reporting namespace_synced."""
    port = free_port()
    argv = meridian_argv(
        "node",
        "--listen", f"127.0.0.1:{port}",
        "--data", str(workdir / "data"),
        "--region", region,
    )  # fmt: skip
    if etcd:
        argv += ["--etcd", etcd]
    t0 = time.perf_counter()
    p = Proc(spawn(f"node-{region}", argv, workdir / f"node-{region}.log", env=python_env()), port)
    try:
        t_v2 = _ready(p, p.url + "/v2/", registry_answers, 600)
        t_sync = _ready(
            p,
            p.url + "/healthz",
            lambda st, b: st == 200 and json.loads(b).get("namespace_synced") is True,
            600,
        )
    except BaseException:
        p.stop()
        raise
    p.extra["start_to_v2_s"] = t_v2 - t0
    p.extra["start_to_synced_s"] = t_sync - t0
    return p


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


# -- content ----------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blobs_and_manifest(nonce: str) -> tuple[list[bytes], Any]:
    """A config and a layer blob, and a function making manifests (distinct
    by an annotation) that reference them."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
         "config": {"Labels": {"nonce": nonce}}}
    ).encode()  # fmt: skip
    layer = os.urandom(2048)

    def manifest(i: int | str) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}],
                "annotations": {"bench.sample": str(i)},
            }
        ).encode()

    return [config, layer], manifest


async def push_blobs(s: aiohttp.ClientSession, base: str, repo: str, blobs: list[bytes]) -> None:
    for b in blobs:
        async with s.post(
            f"{base}/v2/{repo}/blobs/uploads/", params={"digest": sha256(b)}, data=b
        ) as r:
            if r.status != 201:
                raise BenchError(f"blob push to {base}: {r.status} {await r.text()}")


async def put_manifest(s: aiohttp.ClientSession, base: str, repo: str, ref: str, body: bytes):
    async with s.put(
        f"{base}/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": OCI_MANIFEST}
    ) as r:
        await r.read()
        if r.status != 201:
            raise BenchError(f"manifest PUT to {base}: {r.status} {await r.text()}")


# -- statistics -------------------------------------------------------------------


def dist_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
        "mean_ms": statistics.fmean(ms) if ms else math.nan,
    }


# -- 1. watch propagation ---------------------------------------------------------------


async def _tags(r: aiohttp.ClientResponse) -> dict[str, Any]:
    """A tags/list answer; no tags while B does not know the repository yet."""
    if r.status == 404:
        return {"tags": []}
    if r.status != 200:
        raise BenchError(f"GET tags/list on B: HTTP {r.status} {await r.text()}")
    return await r.json()


async def propagation(a: Proc, b: Proc, samples: int, login: Login) -> dict[str, Any]:
    repo = "bench/propagation"
    blobs, manifest = blobs_and_manifest("propagation")
    ack_to_visible: list[float] = []
    send_to_visible: list[float] = []
    poll_rtts: list[float] = []
    first_poll_hits = 0
    conn = aiohttp.TCPConnector(limit=1)
    async with login.session() as sa, login.session(connector=conn) as sb:
        await push_blobs(sa, a.url, repo, blobs)
        await put_manifest(sa, a.url, repo, "warmup", manifest("warmup"))
        for i in range(samples):
            tag = f"p{i:05d}"
            body = manifest(i)
            t_send = time.perf_counter()
            await put_manifest(sa, a.url, repo, tag, body)
            t_ack = time.perf_counter()
            polls = 0
            while True:
                t = time.perf_counter()
                async with sb.get(f"{b.url}/v2/{repo}/tags/list") as r:
                    doc = await _tags(r)
                now = time.perf_counter()
                poll_rtts.append(now - t)
                polls += 1
                if tag in doc["tags"]:
                    break
                if now - t_ack > 30:
                    raise BenchError(f"tag {tag} not visible on B after 30 s")
            if polls == 1:
                first_poll_hits += 1
            ack_to_visible.append(now - t_ack)
            send_to_visible.append(now - t_send)
        # Second pass: B is polled from the moment the PUT is sent, so a tag
        # that is visible on B before A's 201 reaches the client shows up as
        # a negative ack->visible time.
        relative: list[float] = []
        before_ack = 0
        for i in range(samples):
            tag = f"q{i:05d}"
            body = manifest(f"q{i}")
            seen = asyncio.Event()
            t_visible = 0.0

            async def poll(tag: str = tag, seen: asyncio.Event = seen) -> None:
                nonlocal t_visible
                while True:
                    async with sb.get(f"{b.url}/v2/{repo}/tags/list") as r:
                        doc = await _tags(r)
                    if tag in doc["tags"]:
                        t_visible = time.perf_counter()
                        seen.set()
                        return

            poller = asyncio.create_task(poll())
            await asyncio.sleep(0)
            await put_manifest(sa, a.url, repo, tag, body)
            t_ack = time.perf_counter()
            await asyncio.wait_for(poller, 30)
            relative.append(t_visible - t_ack)
            before_ack += t_visible < t_ack
    return {
        "samples": samples,
        "concurrent_poll": {
            "visible_minus_ack": dist_ms(relative),
            "visible_before_ack": before_ack / samples,
        },
        "ack_to_visible": dist_ms(ack_to_visible),
        "send_to_visible": dist_ms(send_to_visible),
        "poll_rtt_p50_ms": percentile([x * 1000 for x in poll_rtts], 50),
        "visible_at_first_poll": first_poll_hits / samples,
    }


# -- 2. manifest GET rate ---------------------------------------------------------------

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        return math.nan
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def run_wrk(
    url: str, connections: int, seconds: int, login: Login, accept: str | None = None
) -> dict[str, Any]:
    """``wrk`` on ``url`` for ``seconds``, with a bearer token fetched for
    this run (it lives five minutes; a run lasts seconds)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk not found: apt-get install -y wrk")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for k, v in login.bearer(url).items():
        argv += ["-H", f"{k}: {v}"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise BenchError(f"unexpected wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    pcts = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(x) for x in sock.groups()) if sock else 0),
        "p50_ms": _wrk_ms(pcts.get("50", "")),
        "p99_ms": _wrk_ms(pcts.get("99", "")),
        "connections": connections,
        "seconds": seconds,
    }


async def seed_get_target(node: Proc, login: Login) -> str:
    repo = "bench/get"
    blobs, manifest = blobs_and_manifest(f"get-{node.name}")
    async with login.session() as s:
        await push_blobs(s, node.url, repo, blobs)
        await put_manifest(s, node.url, repo, "bench", manifest("get"))
        async with s.get(
            f"{node.url}/v2/{repo}/manifests/bench", headers={"Accept": OCI_MANIFEST}
        ) as r:
            if r.status != 200 or await r.read() != manifest("get"):
                raise BenchError(f"{node.name} does not serve the pushed manifest")
    return f"{node.url}/v2/{repo}/manifests/bench"


def manifest_get_rate(
    targets: dict[str, str], rounds: int, seconds: int, login: Login, log: Any
) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
    for url in targets.values():  # warm-up
        run_wrk(url, 32, 1, login, OCI_MANIFEST)
    names = list(targets)
    for rnd in range(rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            r = run_wrk(targets[name], 32, seconds, login, OCI_MANIFEST)
            log(f"  round {rnd + 1} {name}: {r['rps']:.0f} req/s, errors {r['errors']}")
            results[name].append(r)
    out: dict[str, Any] = {}
    for name, rs in results.items():
        out[name] = {
            "rps_median": statistics.median(r["rps"] for r in rs),
            "p50_ms_median": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "rounds": rs,
        }
    return out


# -- 3. scale ---------------------------------------------------------------------


def repo_names(n: int) -> list[str]:
    return [f"team{r // 50:03d}/service-{r:04d}" for r in range(n)]


async def seed_namespace(etcd_url: str, repos: int, tags_per_repo: int) -> dict[str, Any]:
    """Write records + tags straight into etcd, as pushes would have."""
    kv = EtcdKV([etcd_url], timeout=30.0)
    await kv.start()
    config_d, layer_d = sha256(b"bench-config"), sha256(b"bench-layer")
    now = time.time()

    def ops() -> Iterator[Op]:
        for repo in repo_names(repos):
            for t in range(tags_per_repo):
                d = sha256(f"{repo}:{t}".encode())
                rec = ManifestRecord(
                    digest=d,
                    media_type=OCI_MANIFEST,
                    size=527,
                    blobs=(config_d, layer_d),
                    created=now,
                )
                yield Put(manifest_key(REG, repo, d), rec.to_json())
                yield Put(tag_key(REG, repo, f"v1.{t}.0"), d.encode())

    batches: list[list[Op]] = []
    batch: list[Op] = []
    for op in ops():
        batch.append(op)
        if len(batch) == TXN_OPS:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    keys = sum(len(b) for b in batches)
    queue: asyncio.Queue[list[Op]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    async def worker() -> None:
        while not queue.empty():
            b = queue.get_nowait()
            res = await kv.txn([], b)
            if not res.succeeded:
                raise BenchError("seed txn failed")

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(16)))
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        entries, rev = await kv.range(ROOT)
        range_s = time.perf_counter() - t1
        value_bytes = sum(len(e.key) + len(e.value) for e in entries)
    finally:
        await kv.close()
    return {
        "keys": keys,
        "txns": len(batches),
        "seed_seconds": seconds,
        "keys_per_s": keys / seconds,
        "range_all_seconds": range_s,  # one client reading it all, for reference
        "keys_plus_values_mib": value_bytes / (1 << 20),
        "revision": rev,
    }


async def check_scale_node(node: Proc, repos: int, tags_per_repo: int, login: Login) -> None:
    names = repo_names(repos)
    async with login.session() as s:
        async with s.get(f"{node.url}/v2/_catalog") as r:
            if r.status != 200:
                raise BenchError(f"GET /v2/_catalog: HTTP {r.status} {await r.text()}")
            got = (await r.json())["repositories"]
        if got != sorted(names):
            raise BenchError(f"catalog has {len(got)} repositories, expected {repos}")
        async with s.get(f"{node.url}/v2/{names[0]}/tags/list") as r:
            if r.status != 200:
                raise BenchError(f"GET tags/list: HTTP {r.status} {await r.text()}")
            tags = (await r.json())["tags"]
        if len(tags) != tags_per_repo:
            raise BenchError(f"{names[0]} lists {len(tags)} tags, expected {tags_per_repo}")


def scale(
    base: Path, repos: int, tags_per_repo: int, seconds: int, login: Login, log: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"repos": repos, "tags_per_repo": tags_per_repo}
    etcd = start_etcd(base / "etcd-scale")
    with running([etcd]):
        empty = start_node(base / "scale-empty", "empty", etcd.url)
        with running([empty]):
            time.sleep(1)
            out["empty_namespace"] = {
                "start_to_v2_s": empty.extra["start_to_v2_s"],
                "start_to_synced_s": empty.extra["start_to_synced_s"],
                "rss_mib": empty.rss_kib() / 1024,
            }
        log(f"  seeding {repos * tags_per_repo} tags in {repos} repositories into etcd ...")
        out["seed"] = asyncio.run(seed_namespace(etcd.url, repos, tags_per_repo))
        log(
            f"  seeded {out['seed']['keys']} keys in {out['seed']['seed_seconds']:.1f} s "
            f"({out['seed']['keys_per_s']:.0f} keys/s)"
        )
        node = start_node(base / "scale-node", "scale", etcd.url)
        with running([node]):
            out["start_to_v2_s"] = node.extra["start_to_v2_s"]
            out["start_to_synced_s"] = node.extra["start_to_synced_s"]
            out["rss_mib_after_start"] = node.rss_kib() / 1024
            asyncio.run(check_scale_node(node, repos, tags_per_repo, login))
            repo = repo_names(repos)[repos // 2]
            urls = {
                "tags_list": f"{node.url}/v2/{repo}/tags/list",
                "catalog_n100": f"{node.url}/v2/_catalog?n=100",
                "catalog_n1000": f"{node.url}/v2/_catalog?n=1000",
                "catalog_full": f"{node.url}/v2/_catalog",
            }
            out["latency"] = {}
            for name, url in urls.items():
                run_wrk(url, 1, 1, login)  # warm-up (sorted lists are built lazily)
                r = run_wrk(url, 1, seconds, login)
                out["latency"][name] = r
                log(
                    f"  {name}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms "
                    f"({r['rps']:.0f} req/s on 1 connection, errors {r['errors']})"
                )
            out["rss_mib_after_reads"] = node.rss_kib() / 1024
    empty_mib, n_tags = out["empty_namespace"]["rss_mib"], repos * tags_per_repo
    for when in ("after_start", "after_reads"):
        grown = (out[f"rss_mib_{when}"] - empty_mib) * (1 << 20)
        out[f"rss_bytes_per_tag_{when}"] = grown / n_tags
    return out


# -- report -------------------------------------------------------------------------


def _rows_1_2(res: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    p = res["propagation"]
    a2v, s2v = p["ack_to_visible"], p["send_to_visible"]
    rows.append(("1. watch propagation A->B (tags/list)", ""))
    rows.append(
        (
            f"   PUT ack on A -> visible on B, {p['samples']} samples",
            f"p50 {a2v['p50_ms']:.2f} ms  p90 {a2v['p90_ms']:.2f}  p99 {a2v['p99_ms']:.2f}  "
            f"max {a2v['max_ms']:.2f}",
        )
    )
    rows.append(
        (
            "   PUT sent to A -> visible on B",
            f"p50 {s2v['p50_ms']:.2f} ms  p99 {s2v['p99_ms']:.2f}",
        )
    )
    rows.append(
        (
            "   poll round trip on B (resolution)",
            f"p50 {p['poll_rtt_p50_ms']:.2f} ms; already visible at 1st poll: "
            f"{p['visible_at_first_poll'] * 100:.0f}%",
        )
    )
    c = p["concurrent_poll"]
    rows.append(
        (
            "   B polled from PUT send: visible - ack",
            f"p50 {c['visible_minus_ack']['p50_ms']:.2f} ms  "
            f"p99 {c['visible_minus_ack']['p99_ms']:.2f}; visible on B before A's 201 "
            f"arrived: {c['visible_before_ack'] * 100:.0f}%",
        )
    )
    g = res["manifest_get"]
    rows.append(("2. manifest GET by tag, wrk -t1 -c32", ""))
    for name in ("etcd_node", "standalone_node"):
        r = g[name]
        rows.append(
            (
                f"   {name}",
                f"{r['rps_median']:.0f} req/s  p50 {r['p50_ms_median']:.2f} ms  "
                f"p99 {r['p99_ms_median']:.2f} ms  errors {r['errors']}",
            )
        )
    rows.append(
        (
            "   ratio etcd / standalone",
            f"{g['etcd_node']['rps_median'] / g['standalone_node']['rps_median']:.2f}x",
        )
    )
    return rows


def format_table(res: dict[str, Any]) -> str:
    rows = _rows_1_2(res) if "propagation" in res else []
    s = res["scale"]
    n_tags = s["repos"] * s["tags_per_repo"]
    rows.append((f"3. scale: {n_tags} tags in {s['repos']} repos ({s['seed']['keys']} keys)", ""))
    rows.append(
        (
            "   seed etcd directly",
            f"{s['seed']['seed_seconds']:.1f} s ({s['seed']['keys_per_s']:.0f} keys/s); "
            f"one range read of all: {s['seed']['range_all_seconds']:.2f} s, "
            f"{s['seed']['keys_plus_values_mib']:.1f} MiB",
        )
    )
    e = s["empty_namespace"]
    rows.append(
        (
            "   node start -> /v2/ | synced",
            f"{s['start_to_v2_s']:.2f} s | {s['start_to_synced_s']:.2f} s  "
            f"(empty namespace: {e['start_to_v2_s']:.2f} s | {e['start_to_synced_s']:.2f} s)",
        )
    )
    rows.append(
        (
            "   node RSS (VmRSS)",
            f"{s['rss_mib_after_start']:.0f} MiB after start, {s['rss_mib_after_reads']:.0f} MiB "
            f"after reads (empty namespace: {e['rss_mib']:.0f} MiB)",
        )
    )
    rows.append(
        (
            "   RSS per tag over the empty node",
            f"{s['rss_bytes_per_tag_after_start']:.0f} B after start, "
            f"{s['rss_bytes_per_tag_after_reads']:.0f} B after reads",
        )
    )
    for name, label in (
        ("tags_list", f"tags/list ({s['tags_per_repo']} tags)"),
        ("catalog_n100", "_catalog?n=100"),
        ("catalog_n1000", "_catalog?n=1000"),
        ("catalog_full", f"_catalog (all {s['repos']})"),
    ):
        r = s["latency"][name]
        rows.append(
            (
                f"   {label}, 1 connection",
                f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  ({r['rps']:.0f} req/s)",
            )
        )
    w = max(len(r[0]) for r in rows)
    h = res["host"]
    head = f"Meridian namespace on etcd [{res['profile']}], {h['cpus']} CPUs, loopback"
    foot = (
        f"load average (1 min) at start {h['loadavg_start'][0]:.2f}, at end "
        f"{h['loadavg_end'][0]:.2f}: well above this run's own load means other work "
        "shared the CPUs"
    )
    return "\n".join([head, "-" * len(head)] + [f"{a:<{w}}  {b}" for a, b in rows] + [foot])


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_namespace", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer samples, 10k tags, short runs")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench_namespace.json")
    p.add_argument("--samples", type=int, help="propagation samples (default 200, quick 50)")
    p.add_argument("--repos", type=int, help="scale: repositories (default 1000, quick 100)")
    p.add_argument("--tags-per-repo", type=int, default=100)
    p.add_argument("--workdir", type=Path, help="keep processes' files here (default: temp)")
    p.add_argument(
        "--scale-only",
        action="store_true",
        help="run only step 3 (scale: start time, RSS per tag, list latency)",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    quick = args.quick
    samples = args.samples or (50 if quick else 200)
    repos = args.repos or (100 if quick else 1000)
    wrk_seconds = 2 if quick else 5
    rounds = 1 if quick else 3
    lat_seconds = 2 if quick else 5
    owns = args.workdir is None
    base = Path(tempfile.mkdtemp(prefix="bench-namespace-")) if owns else args.workdir
    base.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "namespace",
        "profile": "quick" if quick else "full",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": host_info(tools=("wrk", "etcd")),
        "params": {
            "propagation_samples": samples,
            "get_wrk": f"wrk -t1 -c32 -d{wrk_seconds}s --latency",
            "get_rounds": rounds,
            "scale_repos": repos,
            "scale_tags_per_repo": args.tags_per_repo,
            "latency_wrk": f"wrk -t1 -c1 -d{lat_seconds}s --latency",
        },
    }
    login = owner_login()
    try:
        if not args.scale_only:
            steps_1_2(base, samples, rounds, wrk_seconds, login, result, log)
        log("3. scale")
        result["scale"] = scale(base, repos, args.tags_per_repo, lat_seconds, login, log)
    finally:
        if owns:
            shutil.rmtree(base, ignore_errors=True)
    result["host"]["loadavg_end"] = list(os.getloadavg())
    # Authentication was on: the nodes challenged, the clients logged in.
    result["auth"] = {"user": OWNER, "tokens_fetched": login.tokens_fetched}
    return result


def steps_1_2(
    base: Path,
    samples: int,
    rounds: int,
    wrk_seconds: int,
    login: Login,
    result: dict[str, Any],
    log: Any,
) -> None:
    """Watch propagation and the manifest GET rate (into ``result``)."""
    log("1-2. etcd + nodes A (eastus), B (westeurope) on it, standalone node S")
    etcd = start_etcd(base / "etcd")
    with running([etcd]) as procs:
        a = start_node(base / "a", "eastus", etcd.url)
        procs.append(a)
        b = start_node(base / "b", "westeurope", etcd.url)
        procs.append(b)
        s = start_node(base / "s", "standalone")
        procs.append(s)
        log(f"  watch propagation, {samples} sequential samples ...")
        result["propagation"] = asyncio.run(propagation(a, b, samples, login))
        p = result["propagation"]["ack_to_visible"]
        log(f"  ack->visible p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms")
        targets = {
            "etcd_node": asyncio.run(seed_get_target(a, login)),
            "standalone_node": asyncio.run(seed_get_target(s, login)),
        }
        log("  manifest GET by tag (wrk) ...")
        result["manifest_get"] = manifest_get_rate(targets, rounds, wrk_seconds, login, log)
        result["idle_rss_mib"] = {
            "etcd_node": a.rss_kib() / 1024,
            "standalone": s.rss_kib() / 1024,
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        result = run(args)
    except BenchError as e:
        print(f"bench_namespace: error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_table(result))
    write_json(result, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
