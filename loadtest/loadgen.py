"""Request-rate load generators, each run in its own process(es).

Every generator sends a bounded number of requests (``n``) to one URL over
``concurrency`` keep-alive connections and returns a :class:`LoadResult`
(completed requests, errors, wall seconds, requests/s, p50/p99 latency, and
the CPU seconds the generator itself used, so a report can show that load
generation was not the bottleneck).

- ``wrk`` (C, HTTP/1.1): the cheapest client per request. It cannot send HEAD
  (its parser then waits for a body that never comes: wg/wrk#198), and it is
  duration-based, so a Lua script counts responses, stops each thread at its
  share of ``n``, timestamps first and last with CLOCK_MONOTONIC, and tells
  us on stdout; we then SIGINT wrk to cut its fixed sleep short.
- ``ab`` (ApacheBench, C, HTTP/1.0 with ``Connection: keep-alive``): request
  bounded by itself and handles HEAD (``-i``); as cheap as wrk per request.
- ``aiohttp``: pure Python fallback, several spawned processes (uvloop when
  available). Costs ~5x the client CPU of wrk/ab per request, which on a small
  machine takes CPU away from the server under test.

Bulk downloads use curl (one process, bodies to /dev/null) or, as the
fallback, an aiohttp worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from cluster.auth.tokens import TOKEN_TTL
from loadtest.common import percentile
from loadtest.ocipush import EXPIRY_MARGIN, bearer_header

INSTALL = {
    "wrk": "apt-get install -y wrk",
    "ab": "apt-get install -y apache2-utils",
    "curl": "apt-get install -y curl",
    "valgrind": "apt-get install -y valgrind",
    "callgrind_control": "apt-get install -y valgrind",
}


#: wrk, ab and curl carry one bearer token per run (fetched just before it;
#: they cannot answer a challenge): such a run is cut this many seconds after,
#: before Meridian's token (TOKEN_TTL, 300 s) expires under it.
BEARER_RUN_MAX_S = TOKEN_TTL - EXPIRY_MARGIN


class LoadgenError(RuntimeError):
    pass


@dataclass
class LoadResult:
    tool: str
    method: str
    requests: int  # responses received (any status)
    errors: int  # non-200 answers plus socket errors/timeouts
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: float
    concurrency: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LoadgenError(f"{tool} not found on PATH; install it with: {INSTALL[tool]}")
    return path


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- wrk ---------------------------------------------------------------------

WRK_SCRIPT = r"""
-- Request-bounded wrk: each thread stops after BENCH_LIMIT responses.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  limit = tonumber(os.getenv("BENCH_LIMIT"))
  count = 0
  bad = 0
  t0 = now()
  t1 = t0
end

function response(status, headers, body)
  if count < limit then
    count = count + 1
    if status ~= 200 then bad = bad + 1 end
    t1 = now()
    if count == limit then
      io.write("BENCH-THREAD-DONE\n")
      io.flush()
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local c, b, first, last = 0, 0, nil, 0
  for _, t in ipairs(threads) do
    c = c + t:get("count")
    b = b + t:get("bad")
    local a = t:get("t0")
    if first == nil or a < first then first = a end
    if t:get("t1") > last then last = t:get("t1") end
  end
  io.write(string.format(
    'BENCH-RESULT {"count":%d,"bad":%d,"t0":%.9f,"t1":%.9f,"p50_us":%d,"p99_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_timeout":%d}\n',
    c, b, first or 0, last, latency:percentile(50), latency:percentile(99),
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
  io.flush()
end
"""


def run_wrk(
    url: str,
    n: int,
    concurrency: int,
    headers: dict[str, str] | None = None,
    threads: int = 1,
    max_seconds: float = 300.0,
    workdir: Path | None = None,
) -> LoadResult:
    """GET ``url`` ``n`` times (rounded up to a multiple of ``threads``)."""
    wrk = require("wrk")
    bearer = bearer_header(url)
    if bearer:
        max_seconds = min(max_seconds, BEARER_RUN_MAX_S)
    threads = max(1, min(threads, concurrency))
    per_thread = math.ceil(n / threads)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        script = Path(tmp) / "count.lua"
        script.write_text(WRK_SCRIPT)
        argv = [
            wrk,
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, int(max_seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
        ]
        for k, v in {**bearer, **(headers or {})}.items():
            argv += ["-H", f"{k}: {v}"]
        argv.append(url)
        env = dict(os.environ, BENCH_LIMIT=str(per_thread))
        cpu0 = _children_cpu()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        done_threads = 0
        result: dict[str, float] | None = None
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("BENCH-THREAD-DONE"):
                    done_threads += 1
                    if done_threads == threads:
                        # wrk sleeps for -d regardless; SIGINT ends the sleep.
                        proc.send_signal(signal.SIGINT)
                elif line.startswith("BENCH-RESULT "):
                    result = json.loads(line.split(" ", 1)[1])
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cpu = _children_cpu() - cpu0
    if result is None:
        raise LoadgenError(f"wrk gave no result (rc={proc.returncode}):\n{''.join(lines)}")
    count = int(result["count"])
    sock_errors = sum(
        int(result[k]) for k in ("err_connect", "err_read", "err_write", "err_timeout")
    )
    seconds = max(result["t1"] - result["t0"], 1e-9)
    notes = []
    if done_threads < threads:
        notes.append(f"incomplete: {count} of {per_thread * threads} within {max_seconds:.0f}s")
    return LoadResult(
        tool="wrk",
        method="GET",
        requests=count,
        errors=int(result["bad"]) + sock_errors,
        seconds=seconds,
        rps=count / seconds,
        p50_ms=result["p50_us"] / 1000.0,
        p99_ms=result["p99_us"] / 1000.0,
        client_cpu_s=cpu,
        concurrency=concurrency,
        notes=notes,
    )


# -- ab ----------------------------------------------------------------------

_AB_FIELDS = {
    "complete": re.compile(r"^Complete requests:\s+(\d+)", re.M),
    "failed": re.compile(r"^Failed requests:\s+(\d+)", re.M),
    "non2xx": re.compile(r"^Non-2xx responses:\s+(\d+)", re.M),
    "keepalive": re.compile(r"^Keep-Alive requests:\s+(\d+)", re.M),
    "seconds": re.compile(r"^Time taken for tests:\s+([\d.]+) seconds", re.M),
}


def run_ab(
    url: str,
    n: int,
    concurrency: int,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    max_seconds: float = 300.0,
    workdir: Path | None = None,
) -> LoadResult:
    """ApacheBench: ``n`` requests, keep-alive, GET or HEAD."""
    ab = require("ab")
    if method not in ("GET", "HEAD"):
        raise ValueError(f"ab: unsupported method {method}")
    bearer = bearer_header(url)
    if bearer:
        max_seconds = min(max_seconds, BEARER_RUN_MAX_S)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        pct = Path(tmp) / "percentiles.csv"
        argv = [ab, "-q", "-k", "-r", "-n", str(n), "-c", str(concurrency), "-s", "30"]
        argv += ["-e", str(pct)]
        if method == "HEAD":
            argv.append("-i")
        for k, v in {**bearer, **(headers or {})}.items():
            argv += ["-H", f"{k}: {v}"]
        argv.append(url)
        cpu0 = _children_cpu()
        try:
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=max_seconds, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise LoadgenError(f"ab did not finish {n} requests in {max_seconds:.0f}s") from e
        cpu = _children_cpu() - cpu0
        text = out.stdout
        got = {k: rx.search(text) for k, rx in _AB_FIELDS.items()}
        if out.returncode != 0 or got["complete"] is None or got["seconds"] is None:
            raise LoadgenError(f"ab failed (rc={out.returncode}):\n{text}\n{out.stderr}")
        pcts: dict[int, float] = {}
        with open(pct, newline="") as f:
            for row in csv.reader(f):
                with contextlib.suppress(ValueError, IndexError):
                    pcts[int(float(row[0]))] = float(row[1])

    def val(key: str) -> int:
        m = got[key]
        return int(m.group(1)) if m else 0

    complete = val("complete")
    seconds = float(got["seconds"].group(1))  # type: ignore[union-attr]
    notes = []
    if val("keepalive") < complete:
        notes.append(f"only {val('keepalive')} of {complete} requests reused a connection")
    return LoadResult(
        tool="ab",
        method=method,
        requests=complete,
        errors=val("failed") + val("non2xx"),
        seconds=seconds,
        rps=complete / seconds if seconds > 0 else math.nan,
        p50_ms=pcts.get(50, math.nan),
        p99_ms=pcts.get(99, math.nan),
        client_cpu_s=cpu,
        concurrency=concurrency,
        notes=notes,
    )


# -- aiohttp, multi-process ---------------------------------------------------


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _aiohttp_load(
    url: str,
    method: str,
    headers: dict[str, str],
    n: int,
    conns: int,
    start_at: float,
) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=conns)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout, auto_decompress=False
    ) as session:

        async def warm() -> None:
            async with session.request(method, url) as resp:
                await resp.read()

        # Open the connections before the clock starts.
        await asyncio.gather(*(warm() for _ in range(conns)))
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        remaining = n
        errors = 0
        latencies: list[float] = []

        async def loop() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                try:
                    async with session.request(method, url) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                latencies.append(time.perf_counter() - t)

        t0 = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(conns)))
        t1 = time.monotonic()
    return {"t0": t0, "t1": t1, "latencies": latencies, "errors": errors}


def aiohttp_load_worker(
    url: str, method: str, headers: dict[str, str], n: int, conns: int, start_at: float
) -> dict[str, object]:
    """Process-pool entry point: one share of an aiohttp load run. Its CPU
    counts everything this call did (warm-up and connection set-up included),
    like the whole-process figure for wrk and ab."""
    cpu0 = _self_cpu()
    _use_uvloop()
    out = asyncio.run(_aiohttp_load(url, method, headers, n, conns, start_at))
    out["cpu"] = _self_cpu() - cpu0
    return out


def noop_worker(delay: float = 0.0) -> int:
    """Process-pool entry point that just answers its PID (after ``delay``
    seconds, so that concurrent calls make the pool spawn every worker)."""
    time.sleep(delay)
    return os.getpid()


def run_aiohttp(
    pool: Executor,
    procs: int,
    url: str,
    n: int,
    concurrency: int,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Split ``n`` requests and ``concurrency`` connections over ``procs``
    worker processes of ``pool`` (which must have at least that many)."""
    procs = max(1, min(procs, concurrency, n))
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    conns = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start_at = time.monotonic() + 1.0 + 0.2 * concurrency / 64
    futures = [
        pool.submit(aiohttp_load_worker, url, method, headers or {}, s, c, start_at)
        for s, c in zip(shares, conns, strict=True)
    ]
    parts = [f.result() for f in futures]
    latencies: list[float] = []
    for p in parts:
        latencies.extend(p["latencies"])  # type: ignore[arg-type]
    latencies.sort()
    t0 = min(float(p["t0"]) for p in parts)  # type: ignore[arg-type]
    t1 = max(float(p["t1"]) for p in parts)  # type: ignore[arg-type]
    seconds = max(t1 - t0, 1e-9)
    notes = []
    if t0 < start_at - 0.001:
        notes.append("a worker started late: connections were slow to open")
    return LoadResult(
        tool=f"aiohttp x{procs}",
        method=method,
        requests=len(latencies),
        errors=sum(int(p["errors"]) for p in parts),  # type: ignore[call-overload]
        seconds=seconds,
        rps=len(latencies) / seconds,
        p50_ms=percentile(latencies, 50) * 1000.0,
        p99_ms=percentile(latencies, 99) * 1000.0,
        client_cpu_s=sum(float(p["cpu"]) for p in parts),  # type: ignore[arg-type]
        concurrency=concurrency,
        notes=notes,
    )


# -- bulk downloads -------------------------------------------------------------


def run_curl_downloads(
    url: str,
    expected: int,
    count: int,
    parallel: int,
    max_seconds: float = 900.0,
    *,
    follow: bool = False,
) -> dict[str, object]:
    """``count`` full GETs of ``url`` by one curl process, bodies to /dev/null,
    over one keep-alive connection (``parallel`` 1) or ``parallel`` at once;
    ``follow``: through redirects (curl sends the bearer token to the first
    host only, as registry clients do).
    Needs about half the client CPU of the aiohttp downloader, which matters
    when client and server share two CPUs.

    ``seconds`` is the sum of per-transfer times when sequential, and the
    process's wall time when parallel (it includes curl's start, a few ms)."""
    curl = require("curl")
    argv = [curl, "-s", "-w", "%{http_code} %{size_download} %{time_total}\\n"]
    if follow:
        argv.append("-L")
    if parallel > 1:
        argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
    bearer = bearer_header(url)
    if bearer:
        max_seconds = min(max_seconds, BEARER_RUN_MAX_S)
    for k, v in bearer.items():
        argv += ["-H", f"{k}: {v}"]
    for _ in range(count):
        argv += ["-o", "/dev/null", url]
    cpu0 = _children_cpu()
    t0 = time.monotonic()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=max_seconds, check=False)
    except subprocess.TimeoutExpired as e:
        raise LoadgenError(f"curl did not finish {count} downloads in {max_seconds:.0f}s") from e
    wall = time.monotonic() - t0
    cpu = _children_cpu() - cpu0
    each: list[float] = []
    total = 0
    for line in out.stdout.splitlines():
        code, size, secs = line.split()
        if code != "200" or int(size) != expected:
            raise LoadgenError(f"GET {url}: HTTP {code}, {size} bytes, expected 200 and {expected}")
        each.append(float(secs))
        total += int(size)
    if out.returncode != 0 or len(each) != count:
        raise LoadgenError(f"curl failed (rc={out.returncode}, {len(each)}/{count}): {out.stderr}")
    seconds = sum(each) if parallel <= 1 else wall
    return {"bytes": total, "seconds": seconds, "each": each, "cpu": cpu, "tool": "curl"}


async def _downloads(
    url: str, expected: int, count: int, concurrency: int, bufsize: int
) -> dict[str, object]:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, read_bufsize=bufsize, auto_decompress=False
    ) as session:
        # Open the connections first so the timed part is transfer only.
        async def ping() -> None:
            async with session.head(url) as resp:
                await resp.read()

        await asyncio.gather(*(ping() for _ in range(concurrency)))
        remaining = count
        each: list[float] = []
        total = 0

        async def one() -> None:
            nonlocal remaining, total
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                got = 0
                async with session.get(url) as resp:
                    if resp.status != 200:
                        body = await resp.text()
                        raise LoadgenError(f"GET {url}: HTTP {resp.status}: {body[:300]}")
                    async for chunk in resp.content.iter_any():
                        got += len(chunk)
                if got != expected:
                    raise LoadgenError(f"GET {url}: {got} bytes, expected {expected}")
                each.append(time.perf_counter() - t)
                total += got

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "each": each}


def download_worker(
    url: str, expected: int, count: int, concurrency: int, bufsize: int = 1 << 20
) -> dict[str, object]:
    """Process-pool entry point: ``count`` full GETs of ``url`` over
    ``concurrency`` connections, bodies read and discarded."""
    cpu0 = _self_cpu()
    _use_uvloop()
    out = asyncio.run(_downloads(url, expected, count, concurrency, bufsize))
    out["cpu"] = _self_cpu() - cpu0
    out["tool"] = "aiohttp"
    return out
