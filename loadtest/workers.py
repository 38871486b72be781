"""Client worker processes: where the load of a step is generated.

The harness never sends load from its own process: each step runs one or more
workers, ``python -c <entry> --region <site>`` (the ``--region`` names the
client's emulated site, so the WAN emulator can give its connections that
site's latency; see :mod:`localcluster.wan`), each with its own uvloop event loop
and aiohttp sessions. A worker reads its job (JSON) on stdin, waits for the
common start instant (CLOCK_MONOTONIC is system-wide), runs the operation
named in the job (:mod:`loadtest.ops`), and writes lines on stdout:

- ``P {"n", "err", "bytes"}`` progress, a few times a second;
- ``E {...}`` an event the harness reacts to at once (e.g. "pushed");
- ``R {"samples", "extra"}`` the result, once, at the end;
- ``X <traceback>`` if the operation itself crashed.

Sessions log in as the cluster owner when ``$MERIDIAN_OWNER_PASSWORD`` is
set (the harness sets it for the Meridian it starts), answering a registry's
401 Bearer challenge as a real client does (``loadtest.ocipush.TokenAuth``);
a registry without authentication (Distribution here) never challenges.

Every request loop is bounded twice: by its share of the step's request
count and by the step's deadline; the harness also kills a worker (by PID)
that outlives the deadline by a grace period. Every request goes to loopback
only: a trace hook refuses any other address before connecting, redirects
included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from loadtest.ocipush import TokenAuth
from loadtest.reference import REPO_ROOT
from loadtest.samples import Recorder

GRACE_S = 30.0


class NotLoopback(RuntimeError):
    """A request to an address off this machine's loopback was refused."""


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_loopback(url: str) -> str:
    """``url`` itself if its host is a loopback address, else NotLoopback."""
    host = urlsplit(url).hostname
    if not is_loopback_host(host):
        raise NotLoopback(
            f"{url}: the load-test harness only sends traffic to loopback addresses "
            "(127.0.0.0/8, ::1, localhost)"
        )
    return url


async def _guard(_s: object, _ctx: object, params: Any) -> None:
    if not is_loopback_host(params.url.host):
        raise NotLoopback(f"refusing a request to {params.url}: not a loopback address")


def session(
    limit: int = 100, timeout: float = 300.0, read_bufsize: int = 1 << 20
) -> aiohttp.ClientSession:
    """An aiohttp session that can only reach loopback (checked before every
    request, redirects included), with its own connection pool, logged in as
    the owner when the environment names its password."""
    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(_guard)
    auth = TokenAuth.owner_from_env()
    return aiohttp.ClientSession(
        middlewares=() if auth is None else (auth,),
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10),
        trace_configs=[trace],
        auto_decompress=False,
        read_bufsize=read_bufsize,
    )


# -- the job ----------------------------------------------------------------------


@dataclass
class Job:
    op: str  # a name in loadtest.ops.OPS
    base_url: str
    params: dict[str, Any] = field(default_factory=dict)
    count: int = 1_000  # this worker's share of the step's requests (op-defined unit)
    seconds: float = 60.0  # the step's time bound
    concurrency: int = 1
    start_at: float = 0.0  # CLOCK_MONOTONIC instant all workers start at
    worker: int = 0
    workers: int = 1
    site: str = "here"  # the client's emulated site (its --region)
    progress_interval: float = 0.25


class Worker:
    """What an operation gets: the job, a recorder, the budget, and ways to
    talk to the harness."""

    def __init__(self, job: Job, out: Callable[[str], None]) -> None:
        self.job = job
        self.p = job.params
        self.rec = Recorder(origin=job.start_at)
        self.deadline = job.start_at + job.seconds
        self.remaining = job.count
        self.extra: dict[str, Any] = {}
        self._out = out

    @property
    def base_url(self) -> str:
        return self.job.base_url

    def take(self) -> bool:
        """One more unit of work, if the count and the deadline allow it."""
        if self.remaining <= 0 or time.monotonic() >= self.deadline:
            return False
        self.remaining -= 1
        return True

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def emit(self, event: dict[str, Any]) -> None:
        self._out("E " + json.dumps(event))

    def session(self, limit: int | None = None) -> aiohttp.ClientSession:
        return session(limit=limit or max(self.job.concurrency, 1), timeout=self.job.seconds + 60)

    async def loops(self, body: Callable[[int], Awaitable[None]], n: int | None = None) -> None:
        """``n`` (default: the job's concurrency) coroutines each calling
        ``body(index)`` while the budget lasts."""

        async def loop(k: int) -> None:
            while self.take():
                await body(k)

        await asyncio.gather(*(loop(k) for k in range(n or max(self.job.concurrency, 1))))


async def _progress(w: Worker) -> None:
    while True:
        await asyncio.sleep(w.job.progress_interval)
        w._out("P " + json.dumps({"n": w.rec.count, "err": w.rec.failed, "bytes": w.rec.nbytes}))


async def _run(job: Job, out: Callable[[str], None]) -> None:
    from loadtest.ops import OPS

    fn = OPS[job.op]
    w = Worker(job, out)
    ticker = asyncio.create_task(_progress(w))
    try:
        await fn(w)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)  # skopeo, when it is the client
    cpu = r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime
    out("R " + json.dumps({"samples": w.rec.as_dict(), "extra": w.extra, "cpu_s": cpu}))


def worker_main() -> None:
    """Entry point of a worker process (reads its job on stdin)."""
    job = Job(**json.loads(sys.stdin.readline()))
    lock_out = sys.stdout

    def out(line: str) -> None:
        lock_out.write(line + "\n")
        lock_out.flush()

    try:
        import uvloop

        runner: Callable[[Awaitable[None]], None] = uvloop.run  # type: ignore[assignment]
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run  # type: ignore[assignment]
    try:
        runner(_run(job, out))
    except BaseException:
        out("X " + json.dumps(traceback.format_exc()))
        raise SystemExit(1) from None


# -- the harness side ---------------------------------------------------------------

ENTRY = "from loadtest.workers import worker_main; worker_main()"


@dataclass
class WorkerResult:
    job: Job
    samples: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    cpu_s: float = 0.0  # the worker process's own CPU (and its children's)
    n: int = 0
    err: int = 0
    bytes: int = 0


class WorkerError(RuntimeError):
    pass


async def run_jobs(
    jobs: list[Job],
    on_progress: Callable[[int, int, int], None] | None = None,
    on_event: Callable[[Job, dict[str, Any]], None] | None = None,
    tick: Callable[[], None] | None = None,
    tick_interval: float = 0.5,
) -> list[WorkerResult]:
    """Run ``jobs`` as worker processes at once; returns when all have
    answered (or were killed ``GRACE_S`` after their deadline)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    procs: list[asyncio.subprocess.Process] = []
    results = [WorkerResult(job) for job in jobs]
    try:
        for job in jobs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                ENTRY,
                "--region",
                job.site,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(REPO_ROOT),
                env=env,
                start_new_session=True,
                limit=64 << 20,
            )
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(asdict(job)) + "\n").encode())
            await proc.stdin.drain()
            proc.stdin.close()
            procs.append(proc)

        def total() -> None:
            if on_progress is not None:
                on_progress(
                    sum(r.n for r in results),
                    sum(r.err for r in results),
                    sum(r.bytes for r in results),
                )

        async def read(i: int, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None and proc.stderr is not None
            res = results[i]
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                kind, _, payload = line.partition(" ")
                if kind == "P":
                    p = json.loads(payload)
                    res.n, res.err, res.bytes = p["n"], p["err"], p["bytes"]
                    total()
                elif kind == "E" and on_event is not None:
                    on_event(res.job, json.loads(payload))
                elif kind == "R":
                    doc = json.loads(payload)
                    res.samples, res.extra = doc["samples"], doc["extra"]
                    res.cpu_s = float(doc.get("cpu_s", 0.0))
                    res.n = len(res.samples["t"])
                    res.err = len(res.samples["ok"]) - sum(res.samples["ok"])
                    res.bytes = sum(res.samples["b"])
                    total()
                elif kind == "X":
                    res.failure = json.loads(payload)
            err = (await proc.stderr.read()).decode(errors="replace")
            await proc.wait()
            if res.samples is None and res.failure is None:
                res.failure = f"worker exited with {proc.returncode}: {err[-2000:]}"

        async def ticker() -> None:
            while tick is not None:
                tick()
                await asyncio.sleep(tick_interval)

        deadline = max(j.start_at + j.seconds for j in jobs) + GRACE_S
        tick_task = asyncio.create_task(ticker())
        try:
            timeout = max(1.0, deadline - time.monotonic())
            await asyncio.wait_for(
                asyncio.gather(*(read(i, p) for i, p in enumerate(procs))), timeout
            )
        except TimeoutError:
            for r in results:
                if r.samples is None and r.failure is None:
                    r.failure = "worker killed: it outlived its deadline"
        finally:
            tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick_task
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await proc.wait()
    return results


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal shares."""
    parts = max(1, parts)
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
