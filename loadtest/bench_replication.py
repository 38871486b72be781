"""Geo-replication over an emulated WAN: replication lag and a pull in the
far region, against the link's physical floor.

    python -m loadtest.bench_replication [--quick] [--rounds N]
        [--image small=1x5M --image large=5x20M] [--rtt-ms 50] [--bandwidth 100M]
        [--out results/bench_replication.json]

Real processes only, all on loopback, each stopped by PID at the end:

- one etcd (``start_etcd`` of ``loadtest.bench_namespace``);
- the WAN emulator (``python -m localcluster.wan --config``, a process) with one
  link into each region's gRPC service -- ``--rtt-ms``/2 each way and a
  ``--bandwidth`` cap per direction -- plus a calibration link;
- two ``meridian node`` processes, eastus (A) and westeurope (B), each with
  its own data dir and gRPC service, advertising the emulator's link as
  their gRPC address (``--grpc-advertise``): every inter-region byte crosses
  the emulated link. The client talks to each node directly over loopback.

Measured (fresh random content every round, sizes interleaved, medians):

1. **Replication lag.** Push an image to A (blobs POST+PUT one after another,
   then the manifest PUT). "Local in B" is read from the namespace: an etcd
   watch on ``/meridian/reg/<reg>/place/`` in this process sees the placement
   key ``<digest>/westeurope`` that B writes only once the bytes are whole,
   verified, fsynced and renamed into its store -- event driven, no polling,
   no request to B (a blob GET on B would start a read-through instead). Done
   = the manifest and every blob placed in B. Reported:

   - lag from the manifest PUT's 201 vs the floor RTT + size/bandwidth;
   - lag from the push's start vs the floor for that: replication starts as
     soon as a blob is uploaded, so the honest floor is the link draining
     the blobs as they became available in A,
     ``RTT + max_k(avail_k + bytes available at or after avail_k / bw)``
     (avail_k from the same watch: A's placement of blob k). That floor is
     also given relative to the 201 ("pipelined floor from ack").

2. **Pull in B right after the push.** At the manifest PUT's 201 in A, a
   client (aiohttp, its own session) GETs the manifest by tag from B (a 404
   -- B's namespace cache not yet updated -- is retried every 5 ms, counted
   and timed), then the config and every layer (``--pull-concurrency`` at a
   time, like containerd/docker's 3), streaming and hashing each body; the
   digests and sizes of everything pulled are verified. B serves what it has
   and reads the rest through from A (joining transfers the replicator
   already runs). Duration (201 -> last byte verified) vs RTT + size/bw.

3. **Calibration** (unless ``--no-calibrate``): the emulator alone, same
   latency and cap, on its own link to a plain TCP source in this process:
   one request byte, then the largest image's size streamed back; vs the
   same floor. It tells how much of any gap is the emulator's own pacing.

Per round also: CPU seconds of each process (A, B, emulator, etcd), bytes
that crossed the link, per-blob lag in B after the blob became available in
A, and what B's own log says (``replicated ... after push``). A warm-up push
(not in the medians) opens and warms the inter-region gRPC channel first, as
between long-running regions.

Authentication is on, as users run Meridian: the nodes' owner password is
``$MERIDIAN_OWNER_PASSWORD`` (a random one when unset; the nodes get it by
environment), and the pushing and pulling clients log in as the owner (the
Docker token flow, :class:`loadtest.ocipush.TokenAuth`); the JSON counts the
tokens they fetched.

Prints a table and writes JSON (schema ``meridian.bench_replication/1``).
Figures are what this machine did in this run, not thresholds; the goals
(lag within 1.3x of its floor, pull within floor + 20%) are reported as met
or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.etcd import EtcdKV
from cluster.runtime import free_port
from cluster.units import parse_size
from loadtest.common import BenchError, host_info, scrape, write_json
from loadtest.ocipush import (
    MANIFEST_ACCEPT,
    Image,
    OciClient,
    TokenAuth,
    random_image,
    sha256_digest,
)
from loadtest.procstats import process_tree_cpu_seconds
from localcluster.supervisor import (
    REPO_ROOT,
    Child,
    StartError,
    get_json,
    meridian_argv,
    python_env,
    registry_answers,
    spawn,
    start_etcd,
)

SCHEMA = "meridian.bench_replication/1"
REG = "default"
A, B = "eastus", "westeurope"
MIB = 1 << 20
LAG_GOAL = 1.3  # lag within 1.3x of its floor
PULL_GOAL = 1.2  # pull within the floor's time + 20%


@dataclass(frozen=True)
class ImageSpec:
    name: str
    layers: int
    layer_size: int

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """``NAME=LAYERSxSIZE``, e.g. ``large=5x20M``."""
        name, _, rest = text.partition("=")
        m = re.fullmatch(r"(\d+)[xX](.+)", rest.strip())
        if not name or not m:
            raise argparse.ArgumentTypeError(f"expected NAME=LAYERSxSIZE, got {text!r}")
        spec = cls(name.strip(), int(m.group(1)), parse_size(m.group(2)))
        if spec.layers < 1 or spec.layer_size < 1:
            raise argparse.ArgumentTypeError(f"empty image {text!r}")
        return spec

    def describe(self) -> str:
        return f"{self.layers}x{_human(self.layer_size)}"


def _human(n: float) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{int(n)}B"


# -- processes --------------------------------------------------------------------


@dataclass
class Cluster:
    """etcd, the emulator and the two region nodes; stopped by PID."""

    procs: list[Child] = field(default_factory=list)
    etcd_url: str = ""
    control: str = ""
    nodes: dict[str, str] = field(default_factory=dict)  # region -> HTTP base URL
    link_into: dict[str, str] = field(default_factory=dict)  # region -> link name
    calib_link: str = ""
    calib_address: str = ""
    logins: list[TokenAuth] = field(default_factory=list)  # every client's, counted

    def auth(self) -> TokenAuth:
        """The owner's login for a client (one per session: its locks belong
        to one event loop); the nodes' owner password is in the environment."""
        auth = TokenAuth.owner_from_env()
        if auth is None:
            raise BenchError(f"{OWNER_PASSWORD_ENV} is not set: start_cluster sets it")
        self.logins.append(auth)
        return auth

    def proc(self, name: str) -> Child:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(name)

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process, and of this one (the client)."""
        me = os.times()
        out = {"bench": me.user + me.system}
        for p in self.procs:
            with contextlib.suppress(Exception):
                out[p.name] = process_tree_cpu_seconds(p.pid)
        return out

    def links(self) -> dict[str, Any]:
        return get_json(f"http://{self.control}/links", timeout=5)["links"]


def start_cluster(
    base: Path,
    *,
    rtt: float,
    bandwidth: int,
    calib_port: int,
    node_args: list[str],
    log: Any,
) -> Cluster:
    c = Cluster()
    os.environ.setdefault(OWNER_PASSWORD_ENV, generate())  # the nodes' owner; clients log in
    env = python_env()
    try:
        etcd = start_etcd(
            base / "etcd" / "data",
            base / "etcd" / "etcd.log",
            name="bench",
            extra=["--log-level", "warn", "--quota-backend-bytes", str(4 << 30)],
            env=env,
            cwd=REPO_ROOT,
        )
        c.procs.append(etcd)
        c.etcd_url = etcd.extra["client_url"]

        http = {r: free_port() for r in (A, B)}
        grpc = {r: free_port() for r in (A, B)}
        link = {r: free_port() for r in (A, B)}
        calib = free_port()
        wan_control = free_port()
        links = [
            {
                "name": f"regions>{r}",
                "listen": f"127.0.0.1:{link[r]}",
                "target": f"127.0.0.1:{grpc[r]}",
                "latency": rtt / 2,
                "bandwidth": bandwidth,
            }
            for r in (A, B)
        ]
        links.append(
            {
                "name": "calibration",
                "listen": f"127.0.0.1:{calib}",
                "target": f"127.0.0.1:{calib_port}",
                "latency": rtt / 2,
                "bandwidth": bandwidth,
            }
        )
        c.link_into = {r: f"regions>{r}" for r in (A, B)}
        c.calib_link, c.calib_address = "calibration", f"127.0.0.1:{calib}"
        wan_dir = base / "wan"
        wan_dir.mkdir(parents=True, exist_ok=True)
        (wan_dir / "links.json").write_text(json.dumps({"links": links}, indent=1))
        c.control = f"127.0.0.1:{wan_control}"
        wan = spawn(
            "wan",
            [
                sys.executable, "-m", "localcluster.wan",
                "--config", str(wan_dir / "links.json"),
                "--control", c.control,
            ],
            wan_dir / "wan.log",
            env=env,
            cwd=REPO_ROOT,
        )  # fmt: skip
        c.procs.append(wan)
        wan.wait_ready(url=f"http://{c.control}/healthz", ok=lambda st, b: b'"ok"' in b)

        for r in (A, B):
            argv = meridian_argv(
                "node",
                "--region", r,
                "--listen", f"127.0.0.1:{http[r]}",
                "--data", str(base / r / "data"),
                "--etcd", c.etcd_url,
                "--grpc-listen", f"127.0.0.1:{grpc[r]}",
                "--grpc-advertise", f"127.0.0.1:{link[r]}",
                "--log-level", "info",
                *node_args,
            )  # fmt: skip
            c.procs.append(spawn(r, argv, base / r / f"{r}.log", env=env, cwd=REPO_ROOT))
            c.nodes[r] = f"http://127.0.0.1:{http[r]}"
        for r in (A, B):
            p = c.proc(r)
            p.wait_ready(url=c.nodes[r] + "/v2/", ok=registry_answers, timeout=60, interval=0.005)
            p.wait_ready(
                url=c.nodes[r] + "/healthz",
                ok=lambda st, b: st == 200 and json.loads(b).get("namespace_synced") is True,
                timeout=60,
                interval=0.005,
            )
        # Until each region has pinged the other (through the emulator).
        deadline = time.monotonic() + 30
        for r, other in ((A, B), (B, A)):
            key = f'meridian_replication_peer_up{{region="{other}"}}'
            while scrape(c.nodes[r]).get(key) != 1:
                if time.monotonic() > deadline:
                    raise BenchError(f"{r} never saw {other} up:\n{c.proc(r).log_tail()}")
                time.sleep(0.1)
        log(
            f"  etcd pid {etcd.pid}, wan pid {wan.pid}, "
            + ", ".join(f"{r} pid {c.proc(r).pid} {c.nodes[r]}" for r in (A, B))
        )
        return c
    except StartError as e:
        c.stop()
        raise BenchError(str(e)) from None
    except BaseException:
        c.stop()
        raise


# -- the placement watch ------------------------------------------------------------


class PlacementWatch:
    """When each (digest, region) placement first appeared (perf_counter
    seconds), seen by an etcd watch on its own thread and event loop, so
    the timestamps do not wait for this process's client work (a pull
    hashing 100 MiB in the main loop). ``sys.setswitchinterval`` bounds how
    long the watch thread may wait for the GIL."""

    def __init__(self, etcd_url: str, reg: str = REG) -> None:
        self.etcd_url = etcd_url
        self.prefix = f"/meridian/reg/{reg}/place/"
        self.seen: dict[tuple[str, str], float] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> PlacementWatch:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="placement-watch", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(30):
            raise BenchError("the etcd placement watch did not start")
        if self._error is not None:
            raise BenchError(f"the etcd placement watch failed: {self._error}")
        return self

    def _note(self, key: str, now: float) -> None:
        digest, _, region = key[len(self.prefix) :].partition("/")
        self.seen.setdefault((digest, region), now)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        kv = EtcdKV([self.etcd_url], timeout=10.0)
        task: asyncio.Task[None] | None = None
        try:
            await kv.start()
            entries, rev = await kv.range(self.prefix)
            now = time.perf_counter()
            for e in entries:
                self._note(e.key, now)
            task = asyncio.create_task(self._run(kv, rev + 1))
            self._ready.set()
            await self._stop.wait()
        except BaseException as e:  # reported by start()
            self._error = e
        finally:
            self._ready.set()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await kv.close()

    async def _run(self, kv: EtcdKV, rev: int) -> None:
        async for batch in kv.watch(self.prefix, rev):
            now = time.perf_counter()
            for ev in batch:
                if ev.value is not None:
                    self._note(ev.key, now)

    async def wait_all(self, region: str, digests: list[str], within: float) -> float:
        """The time the last of ``digests`` was placed in ``region`` (polled
        every 2 ms; the times themselves come from the watch thread)."""
        deadline = time.perf_counter() + within
        while True:
            times = [self.seen.get((d, region)) for d in digests]
            if all(t is not None for t in times):
                return max(t for t in times if t is not None)
            if time.perf_counter() > deadline:
                missing = [d for d, t in zip(digests, times, strict=True) if t is None]
                raise BenchError(f"{len(missing)} items never placed in {region}: {missing[:3]}")
            await asyncio.sleep(0.002)

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(15)


# -- floors -----------------------------------------------------------------------------


def floor_simple(rtt: float, size: int, bandwidth: int) -> float:
    return rtt + size / bandwidth


def floor_pipelined(rtt: float, bandwidth: int, avail: list[tuple[float, int]]) -> float:
    """Earliest the far region can hold everything when item k (avail_k,
    size_k) can only start crossing the link once it exists at the source:
    the link drains what is available, one RTT for the request and the first
    byte. ``RTT + max_k(avail_k + sum(size_j, avail_j >= avail_k) / bw)``."""
    items = sorted(avail)
    best = 0.0
    for k, (t, _) in enumerate(items):
        rest = sum(s for _, s in items[k:])
        best = max(best, t + rest / bandwidth)
    return rtt + best


# -- one push, one pull -----------------------------------------------------------------


@dataclass
class Pushed:
    image: Image
    repo: str
    tag: str
    t0: float
    wall_t0: float  # time.time() at t0: to place the nodes' log timestamps
    t_ack: float
    blob_done: dict[str, float]  # digest -> 201 time


async def push(client: OciClient, repo: str, tag: str, image: Image) -> Pushed:
    wall_t0, t0 = time.time(), time.perf_counter()
    done: dict[str, float] = {}
    for digest, data in image.blobs():
        await client.upload_blob(repo, data, digest)
        done[digest] = time.perf_counter()
    await client.put_manifest(repo, tag, image.manifest)
    t_ack = time.perf_counter()
    return Pushed(image, repo, tag, t0, wall_t0, t_ack, done)


async def pull(
    base: str, repo: str, tag: str, image: Image, concurrency: int, auth: TokenAuth
) -> dict[str, Any]:
    """Pull ``repo:tag`` from ``base`` as a client: manifest, then blobs,
    each streamed and hashed; everything checked against what was pushed."""
    t0 = time.perf_counter()
    not_found = 0
    t_last_404 = t0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, middlewares=(auth,)
    ) as s:
        while True:
            async with s.get(
                f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}
            ) as resp:
                body = await resp.read()
                if resp.status == 404 and time.perf_counter() - t0 < 10:
                    not_found += 1
                    t_last_404 = time.perf_counter()
                    await asyncio.sleep(0.005)
                    continue
                if resp.status != 200:
                    raise BenchError(f"GET manifest from B: HTTP {resp.status}: {body[:300]!r}")
                header_digest = resp.headers.get("Docker-Content-Digest", "")
                break
        t_manifest = time.perf_counter()
        ok = body == image.manifest and sha256_digest(body) == image.manifest_digest
        ok = ok and header_digest in ("", image.manifest_digest)
        doc = json.loads(body)
        descs = [doc["config"], *doc["layers"]]
        sem = asyncio.Semaphore(max(concurrency, 1))
        results: list[tuple[str, bool, int, float, float]] = []

        async def one(desc: dict[str, Any]) -> None:
            async with sem:
                start = time.perf_counter()
                h = hashlib.sha256()
                n = 0
                async with s.get(f"{base}/v2/{repo}/blobs/{desc['digest']}") as r:
                    if r.status != 200:
                        raise BenchError(f"GET blob {desc['digest']} from B: HTTP {r.status}")
                    async for chunk in r.content.iter_chunked(1 << 20):
                        h.update(chunk)
                        n += len(chunk)
                good = "sha256:" + h.hexdigest() == desc["digest"] and n == desc["size"]
                results.append((desc["digest"], good, n, start, time.perf_counter()))

        await asyncio.gather(*(one(d) for d in descs))
    t_end = time.perf_counter()
    want = {d: len(data) for d, data in image.blobs()}
    got = {d: n for d, good, n, _, _ in results if good}
    verified = ok and got == want
    return {
        "t0": t0,
        "t_manifest": t_manifest,
        "t_end": t_end,
        "manifest_404s": not_found,
        "manifest_404_window_s": t_last_404 - t0,
        "bytes": sum(n for _, _, n, _, _ in results) + len(body),
        "verified": verified,
        "blobs": [
            {"digest": d, "ok": good, "bytes": n, "start_s": s0 - t0, "end_s": e - t0}
            for d, good, n, s0, e in results
        ],
    }


# -- B's own account --------------------------------------------------------------------

_FETCHED = re.compile(r"^fetched (\S+) \(\d+ bytes\) from ")
_REPLICATED = re.compile(r"^replicated \S+ (\S+) .* ([\d.]+)s after push$")


def annotate_from_log(rows: list[dict[str, Any]], log_path: Path) -> None:
    """Add what B's own log says (read once, after the rounds): per item,
    when B committed the bytes (``fetched ...``: before its placement write;
    log timestamps have 1 ms resolution), and the lag B reported for the
    image (``replicated ... after push``, counted from the manifest record's
    creation in A)."""
    fetched: dict[str, float] = {}
    replicated: dict[str, float] = {}
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        if '"fetched ' not in line and '"replicated ' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            doc = json.loads(line)
            msg = doc["msg"]
            if m := _FETCHED.match(msg):
                fetched.setdefault(m.group(1), float(doc["ts"]))
            elif m := _REPLICATED.match(msg):
                replicated.setdefault(m.group(1), float(m.group(2)))
    for row in rows:
        for it in row["items"]:
            ts = fetched.get(it["digest"])
            it["b_committed_s"] = None if ts is None else ts - row["wall_t0"]
            if it["kind"] == "manifest":
                row["b_reported_lag_s"] = replicated.get(it["digest"])


# -- a round ------------------------------------------------------------------------------


@dataclass
class Settings:
    rtt: float
    bandwidth: int
    pull_concurrency: int
    timeout: float


async def run_round(
    c: Cluster,
    watch: PlacementWatch,
    spec: ImageSpec,
    mode: str,  # "lag" or "pull"
    label: str,
    cfg: Settings,
) -> dict[str, Any]:
    image = await asyncio.to_thread(random_image, spec.layers, spec.layer_size)
    repo, tag = f"bench/{spec.name}", label
    items = [*(d for d, _ in image.blobs()), image.manifest_digest]
    sizes = {d: len(data) for d, data in image.blobs()}
    sizes[image.manifest_digest] = len(image.manifest)
    total = sum(sizes.values())
    link_name = c.link_into[A]  # B dials A: A -> B bytes flow "down" that link
    links0 = c.links()[link_name]
    cpu0 = c.cpu()
    mb0 = scrape(c.nodes[B])
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), middlewares=(c.auth(),)
    ) as s:
        pushed = await push(OciClient(c.nodes[A], s), repo, tag, image)
    pulled: dict[str, Any] | None = None
    if mode == "pull":
        pull_task = asyncio.create_task(
            pull(c.nodes[B], repo, tag, image, cfg.pull_concurrency, c.auth())
        )
        pulled = await asyncio.wait_for(pull_task, cfg.timeout)
    t_done = await watch.wait_all(B, items, cfg.timeout)
    await watch.wait_all(A, items, 5)
    cpu1 = c.cpu()
    links1 = c.links()[link_name]
    mb1 = scrape(c.nodes[B])

    t0, t_ack = pushed.t0, pushed.t_ack
    avail = {d: min(watch.seen[(d, A)], pushed.blob_done.get(d, t_ack)) for d in items}
    in_b = {d: watch.seen[(d, B)] for d in items}
    fl_simple = floor_simple(cfg.rtt, total, cfg.bandwidth)
    fl_start = floor_pipelined(cfg.rtt, cfg.bandwidth, [(avail[d] - t0, sizes[d]) for d in items])
    lag_ack = t_done - t_ack
    lag_start = t_done - t0
    whole_in_b_at_ack = sum(sizes[d] for d in items if in_b[d] <= t_ack)
    row: dict[str, Any] = {
        "image": spec.name,
        "mode": mode,
        "label": label,
        "bytes": total,
        "layers": spec.layers,
        "push_s": t_ack - t0,
        "lag_from_ack_s": lag_ack,
        "floor_s": fl_simple,
        "lag_ratio": lag_ack / fl_simple,
        "lag_from_start_s": lag_start,
        "floor_from_start_s": fl_start,
        "lag_from_start_ratio": lag_start / fl_start,
        "floor_pipelined_from_ack_s": max(fl_start - (t_ack - t0), cfg.rtt),
        "lag_pipelined_ratio": lag_ack / max(fl_start - (t_ack - t0), cfg.rtt),
        "bytes_whole_in_b_at_ack": whole_in_b_at_ack,
        "wall_t0": pushed.wall_t0,
        "b_reported_lag_s": None,  # annotate_from_log, after the rounds
        "items": [
            {
                "digest": d,
                "kind": "manifest" if d == image.manifest_digest else "blob",
                "bytes": sizes[d],
                "in_a_s": avail[d] - t0,
                "in_b_s": in_b[d] - t0,
                "b_after_a_s": in_b[d] - avail[d],
                "item_floor_s": floor_simple(cfg.rtt, sizes[d], cfg.bandwidth),
            }
            for d in items
        ],
        "link_bytes_a_to_b": links1["bytes_down"] - links0["bytes_down"],
        "cpu_s": {k: round(cpu1.get(k, 0.0) - v, 3) for k, v in cpu0.items()},
        "b_metrics": {
            k: mb1.get(k, 0.0) - mb0.get(k, 0.0)
            for k in (
                "meridian_replication_bytes_copied_total",
                "meridian_replication_readthrough_total",
                "meridian_replication_fetches_total",
                "meridian_replication_errors_total",
            )
        },
    }
    if pulled is not None:
        dur = pulled["t_end"] - t_ack
        row["pull"] = {
            "duration_s": dur,
            "floor_s": fl_simple,
            "ratio": dur / fl_simple,
            "manifest_s": pulled["t_manifest"] - t_ack,
            "manifest_404s": pulled["manifest_404s"],
            "manifest_404_window_s": pulled["manifest_404_window_s"],
            "verified": pulled["verified"],
            "bytes": pulled["bytes"],
            "blobs": pulled["blobs"],
        }
    return row


# -- calibration ------------------------------------------------------------------------


class Source:
    """A TCP server: reads one byte, then sends ``size`` bytes and closes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._chunk = os.urandom(1 << 20)

    async def start(self) -> Source:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readexactly(1)
            left = self.size
            while left > 0:
                n = min(left, len(self._chunk))
                w.write(self._chunk[:n])
                await w.drain()
                left -= n
            w.close()
        except (OSError, asyncio.IncompleteReadError):
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def calibrate(address: str, size: int, cfg: Settings, rounds: int) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    times = []
    for _ in range(rounds):
        r, w = await asyncio.open_connection(host, int(port))
        t0 = time.perf_counter()
        w.write(b"g")
        n = 0
        while True:
            data = await r.read(1 << 20)
            if not data:
                break
            n += len(data)
        times.append(time.perf_counter() - t0)
        w.close()
        if n != size:
            raise BenchError(f"calibration: got {n} of {size} bytes through the emulator")
        await asyncio.sleep(0.2)
    fl = floor_simple(cfg.rtt, size, cfg.bandwidth)
    med = statistics.median(times)
    return {
        "bytes": size,
        "seconds": times,
        "median_s": med,
        "floor_s": fl,
        "ratio": med / fl,
        "mib_per_s": size / max(med - cfg.rtt, 1e-9) / MIB,
    }


# -- the run -------------------------------------------------------------------------------


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarize(rows: list[dict[str, Any]], specs: list[ImageSpec]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in specs:
        lag = [r for r in rows if r["image"] == spec.name and r["mode"] == "lag"]
        pulls = [r for r in rows if r["image"] == spec.name and r["mode"] == "pull"]
        s: dict[str, Any] = {"image": spec.describe(), "rounds": len(lag)}
        if lag:
            s.update(
                bytes=lag[0]["bytes"],
                push_s=_median(lag, "push_s"),
                lag_from_ack_s=_median(lag, "lag_from_ack_s"),
                floor_s=_median(lag, "floor_s"),
                lag_ratio=_median(lag, "lag_ratio"),
                lag_from_start_s=_median(lag, "lag_from_start_s"),
                floor_from_start_s=_median(lag, "floor_from_start_s"),
                lag_from_start_ratio=_median(lag, "lag_from_start_ratio"),
                floor_pipelined_from_ack_s=_median(lag, "floor_pipelined_from_ack_s"),
                lag_pipelined_ratio=_median(lag, "lag_pipelined_ratio"),
                lag_goal_met=_median(lag, "lag_ratio") <= LAG_GOAL,
                lag_from_start_goal_met=_median(lag, "lag_from_start_ratio") <= LAG_GOAL,
            )
        if pulls:
            p = [r["pull"] for r in pulls]
            s["pull"] = {
                "rounds": len(p),
                "duration_s": statistics.median(x["duration_s"] for x in p),
                "floor_s": statistics.median(x["floor_s"] for x in p),
                "ratio": statistics.median(x["ratio"] for x in p),
                "manifest_s": statistics.median(x["manifest_s"] for x in p),
                "manifest_404s": sum(x["manifest_404s"] for x in p),
                "all_verified": all(x["verified"] for x in p),
                "goal_met": statistics.median(x["ratio"] for x in p) <= PULL_GOAL,
                "lag_from_ack_s": _median(pulls, "lag_from_ack_s"),
            }
        out[spec.name] = s
    return out


def format_table(res: dict[str, Any]) -> str:
    st = res["settings"]
    lines = [
        f"Meridian replication over an emulated WAN: RTT {st['rtt_ms']:.0f} ms, "
        f"{st['bandwidth_bytes_per_s'] / MIB:.0f} MiB/s each way, "
        f"{res['host']['cpus']} CPUs, {st['rounds']} rounds (medians)",
        "",
        f"{'image':<8}{'layers':>9}{'MiB':>8}{'push':>7}"
        f"{'lag(201)':>10}{'floor':>7}{'x':>6}"
        f"{'lag(start)':>11}{'floor':>7}{'x':>6}"
        f"{'pull B':>8}{'floor':>7}{'x':>6}  ok",
    ]
    for name, s in res["summary"].items():
        if "lag_ratio" not in s:
            continue
        p = s.get("pull")
        pull = (
            f"{p['duration_s']:>8.3f}{p['floor_s']:>7.3f}{p['ratio']:>6.2f}  "
            f"{'yes' if p['all_verified'] else 'NO'}"
            if p
            else ""
        )
        lines.append(
            f"{name:<8}{s['image']:>9}{s['bytes'] / MIB:>8.1f}{s['push_s']:>7.3f}"
            f"{s['lag_from_ack_s']:>10.3f}{s['floor_s']:>7.3f}{s['lag_ratio']:>6.2f}"
            f"{s['lag_from_start_s']:>11.3f}{s['floor_from_start_s']:>7.3f}"
            f"{s['lag_from_start_ratio']:>6.2f}{pull}"
        )
    lines.append("")
    lines.append(
        "  seconds; lag(201): manifest PUT acknowledged in eastus -> manifest and all blobs "
        "placed in westeurope; floor = RTT + bytes/bandwidth"
    )
    lines.append(
        "  lag(start): push start -> all placed in westeurope; its floor lets the link drain "
        "each blob from the moment it existed in eastus"
    )
    lines.append(
        "  pull B: 201 in eastus -> manifest + every blob pulled from westeurope and verified; "
        "same floor"
    )
    for name, s in res["summary"].items():
        if "lag_ratio" not in s:
            continue
        goals = [
            f"lag(201) {'met' if s['lag_goal_met'] else 'MISSED'} (<= {LAG_GOAL}x)",
            f"lag(start) {'met' if s['lag_from_start_goal_met'] else 'MISSED'} (<= {LAG_GOAL}x)",
        ]
        if "pull" in s:
            goals.append(f"pull {'met' if s['pull']['goal_met'] else 'MISSED'} (<= {PULL_GOAL}x)")
        extra = (
            f"; pipelined floor from 201 {s['floor_pipelined_from_ack_s']:.3f}s "
            f"(lag(201) {s['lag_pipelined_ratio']:.2f}x that)"
        )
        if "pull" in s:
            extra += f"; manifest 404s on B: {s['pull']['manifest_404s']}"
        lines.append(f"  {name}: " + ", ".join(goals) + extra)
    cal = res.get("calibration")
    if cal:
        lines.append(
            f"  emulator alone: {cal['bytes'] / MIB:.1f} MiB in {cal['median_s']:.3f}s "
            f"(floor {cal['floor_s']:.3f}s, {cal['ratio']:.2f}x, "
            f"{cal['mib_per_s']:.0f} MiB/s after the first RTT)"
        )
    cpu = res.get("cpu_s_per_round")
    if cpu:
        parts = ", ".join(
            f"{name}: " + " ".join(f"{k} {v:.2f}" for k, v in per.items())
            for name, per in cpu.items()
        )
        lines.append(f"  CPU s per lag round (median): {parts}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_replication",
        description="replication lag and far-region pulls over an emulated WAN",
    )
    p.add_argument("--quick", action="store_true", help="2 rounds (default 5)")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument(
        "--image",
        action="append",
        type=ImageSpec.parse,
        help="NAME=LAYERSxSIZE (repeatable; default small=1x5M and large=5x20M)",
    )
    p.add_argument("--rtt-ms", type=float, default=50.0, help="round trip between the regions")
    p.add_argument("--bandwidth", type=parse_size, default=parse_size("100M"), help="bytes/s")
    p.add_argument("--pull-concurrency", type=int, default=3, help="blobs pulled at once")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per round, at most")
    p.add_argument("--no-calibrate", action="store_true", help="skip the emulator-alone probe")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--node-arg", action="append", default=[], help="extra flag for both nodes")
    p.add_argument("--workdir", help="keep processes' data and logs here (default: a temp dir)")
    p.add_argument("--out", default="results/bench_replication.json")
    return p.parse_args(argv)


async def _measure(
    c: Cluster, specs: list[ImageSpec], cfg: Settings, rounds: int, warmup: bool, log: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    watch = await asyncio.to_thread(PlacementWatch(c.etcd_url).start)
    rows: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    try:
        if warmup:
            big = max(specs, key=lambda s: s.layers * s.layer_size)
            row = await run_round(c, watch, big, "lag", "warmup", cfg)
            warm.append(row)
            log(f"  warm-up {big.name}: lag {row['lag_from_ack_s']:.3f}s (not counted)")
        for i in range(rounds):
            # Interleave sizes and modes; alternate which mode goes first.
            modes = ["lag", "pull"] if i % 2 == 0 else ["pull", "lag"]
            for spec in specs:
                for mode in modes:
                    await asyncio.sleep(0.3)  # let the previous round's tail settle
                    row = await run_round(c, watch, spec, mode, f"r{i}-{mode}", cfg)
                    rows.append(row)
                    msg = (
                        f"  round {i + 1}/{rounds} {spec.name:<6} {mode:<4} "
                        f"push {row['push_s']:.3f}s  lag(201) {row['lag_from_ack_s']:.3f}s "
                        f"({row['lag_ratio']:.2f}x)  lag(start) {row['lag_from_start_s']:.3f}s "
                        f"({row['lag_from_start_ratio']:.2f}x)"
                    )
                    if "pull" in row:
                        pr = row["pull"]
                        msg += (
                            f"  pull {pr['duration_s']:.3f}s ({pr['ratio']:.2f}x"
                            f"{'' if pr['verified'] else ', NOT VERIFIED'})"
                        )
                    log(msg)
    finally:
        watch.close()
    return rows, warm


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    specs: list[ImageSpec] = args.image or [
        ImageSpec("small", 1, 5 * MIB),
        ImageSpec("large", 5, 20 * MIB),
    ]
    if len({s.name for s in specs}) != len(specs):
        raise BenchError("image names must differ")
    rounds = args.rounds or (2 if args.quick else 5)
    cfg = Settings(args.rtt_ms / 1000, args.bandwidth, args.pull_concurrency, args.timeout)
    tmp = None
    if args.workdir:
        base = Path(args.workdir).resolve()
        base.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="meridian-bench-repl-")
        base = Path(tmp)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    host = host_info()
    calib_size = max(s.layers * s.layer_size for s in specs)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # the watch thread's timestamps: see PlacementWatch

    async def main() -> dict[str, Any]:
        source = await Source(calib_size).start()
        c: Cluster | None = None
        try:
            log(f"starting etcd, WAN emulator, {A} and {B} in {base}")
            c = await asyncio.to_thread(
                start_cluster,
                base,
                rtt=cfg.rtt,
                bandwidth=cfg.bandwidth,
                calib_port=source.port,
                node_args=list(args.node_arg),
                log=log,
            )
            calibration = None
            if not args.no_calibrate:
                calibration = await calibrate(c.calib_address, calib_size, cfg, 3)
                log(
                    f"  emulator alone: {calibration['median_s']:.3f}s for "
                    f"{calib_size / MIB:.1f} MiB (floor {calibration['floor_s']:.3f}s)"
                )
            rows, warm = await _measure(c, specs, cfg, rounds, not args.no_warmup, log)
            await asyncio.sleep(0.5)  # B logs "replicated" after its next plan
            annotate_from_log([*rows, *warm], c.proc(B).log)
            return {
                "rows": rows,
                "warmup": warm,
                "calibration": calibration,
                "pids": {p.name: p.pid for p in c.procs},
                # Authentication was on: the nodes challenged, the clients logged in.
                "auth": {"user": OWNER, "tokens_fetched": sum(a.fetched for a in c.logins)},
            }
        finally:
            if c is not None:
                c.stop()  # synchronously: runs even while the loop is being cancelled
            await source.close()

    try:
        measured = asyncio.run(main())
    finally:
        sys.setswitchinterval(switch)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = measured["rows"]
    cpu: dict[str, dict[str, float]] = {}
    for spec in specs:
        lag = [r for r in rows if r["image"] == spec.name and r["mode"] == "lag"]
        if lag:
            names = sorted({k for r in lag for k in r["cpu_s"]})
            cpu[spec.name] = {
                k: round(statistics.median(r["cpu_s"].get(k, 0.0) for r in lag), 3) for k in names
            }
    return {
        "schema": SCHEMA,
        "started": started,
        "host": host,
        "settings": {
            "rtt_ms": args.rtt_ms,
            "bandwidth_bytes_per_s": args.bandwidth,
            "rounds": rounds,
            "images": {s.name: s.describe() for s in specs},
            "pull_concurrency": args.pull_concurrency,
            "node_args": list(args.node_arg),
            "goals": {"lag_ratio_max": LAG_GOAL, "pull_ratio_max": PULL_GOAL},
        },
        "summary": summarize(rows, specs),
        "calibration": measured["calibration"],
        "cpu_s_per_round": cpu,
        "rounds": rows,
        "warmup": measured["warmup"],
        "pids": measured["pids"],
        "auth": measured["auth"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = run(args)
    except BenchError as e:
        print(f"bench_replication: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_replication: interrupted (its processes are stopped)", file=sys.stderr)
        return 130
    print()
    print(format_table(res))
    out = Path(args.out)
    write_json(res, out, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
