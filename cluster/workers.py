"""Worker processes sharing a server's port (``meridian node --workers N``,
``meridian router --workers N``). Described for the node; the router is
the same with nothing that runs once: every router process is a whole
router (its own region table, manifest cache, usage and audit, named
``router-<host>-<port>-w<i>`` in worker i); its run dir is
``<tmp>/meridian-router-<uid>-<port>``.

One Python process uses one core. With ``--workers N`` (N > 1; ``0`` or
``auto``: one per CPU) the node runs N processes that all accept on the
node's HTTP port (``SO_REUSEPORT``: the kernel spreads the connections):

- the **primary** (the process started, index 0) serves HTTP like the
  others and is the only one running what must run once per node: the gRPC
  server, membership registration (the node id), the replicator, the
  reclaimer, webhook delivery and the purge of abandoned upload sessions;
- **workers** 1..N-1 are its children, started with the same command line
  and ``MERIDIAN_WORKER_INDEX=<i>``. Each loads and watches its own namespace
  cache, reads through to other regions, counts usage (the region's usage
  record adds up by compare-and-swap) and writes its own audit batches as
  node ``<node id>-w<i>`` (so keys never collide).

Lifecycle: SIGTERM or SIGINT to the primary stops every worker, then the
primary; a worker that dies is started again (after a pause that grows
while it keeps dying at once); a worker whose primary died (even by
SIGKILL) exits: the kernel signals it (``PR_SET_PDEATHSIG``) and it also
checks its parent every second -- so no orphan keeps the port.

Metrics: prometheus_client's multiprocess mode. The primary clears
``<data>/run/<node id>/metrics`` at start and names it in
``PROMETHEUS_MULTIPROC_DIR`` before any metric exists (it re-executes itself
once with that environment, keeping its PID); ``/metrics`` served by any
process sums all of them. The replication backlog in
``/meridian/v1/status`` is the primary's, shared through
``<data>/run/<node id>/status.json`` (rewritten every second).

Per-process limits (a registry's operations per minute, failed logins) are
enforced by every process on its own connections, each with the limit
divided by N (rounded down, at least 1), so the node as a whole never lets
more through than the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

log = logging.getLogger("meridian.workers")

WORKER_ENV = "MERIDIAN_WORKER_INDEX"
PARENT_ENV = "MERIDIAN_WORKER_PARENT"
COUNT_ENV = "MERIDIAN_WORKER_COUNT"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
PR_SET_PDEATHSIG = 1
STOP_GRACE = 15.0  # seconds a worker has to stop before SIGKILL
MAX_PAUSE = 30.0  # longest pause before restarting a worker that keeps dying


class CountError(ValueError, argparse.ArgumentTypeError):
    """A ``--workers`` value that is no count (argparse shows its message)."""


def parse_count(text: str) -> int:
    """``--workers``: a count, or ``auto``/``0`` for one per CPU."""
    text = str(text).strip().lower()
    if text in ("auto", "0"):
        return max(1, os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        raise CountError(f"{text!r}: choose 1-256 processes, or auto for one per CPU") from None
    if n < 0 or n > 256:
        raise CountError(f"{n}: choose 1-256 processes, or auto for one per CPU")
    return n


def index() -> int:
    """This process's index: 0 for the primary (or a node without workers)."""
    try:
        return int(os.environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def is_worker() -> bool:
    return index() > 0


def worker_suffix() -> str:
    """What names this process's own records apart: ``-w<i>`` in worker i,
    nothing in the primary."""
    i = index()
    return f"-w{i}" if i > 0 else ""


def worker_count() -> int:
    """N, as the primary told its workers (1 in a node without workers)."""
    try:
        return max(1, int(os.environ.get(COUNT_ENV, "1")))
    except ValueError:
        return 1


def share(limit: int, workers: int) -> int:
    """One process's part of a per-node ``limit``."""
    return limit if workers <= 1 else max(1, limit // workers)


def run_dir(data: str, node: str) -> str:
    """A node's: ``<data>/run/<node id>``."""
    return os.path.join(os.path.abspath(data), "run", node)


def become_primary(rundir: str, workers: int) -> None:
    """In the process started with ``--workers N`` (N > 1): clear
    ``rundir``, then re-execute this same command (same PID) with the
    environment that makes prometheus_client count in files (in
    ``<rundir>/metrics``) from its first import. Returns only in the
    re-executed primary (or without workers)."""
    if workers <= 1 or WORKER_ENV in os.environ:
        return
    shutil.rmtree(rundir, ignore_errors=True)  # a previous run's
    path = os.path.join(rundir, "metrics")
    os.makedirs(path, exist_ok=True)
    os.environ[METRICS_ENV] = path
    os.environ[WORKER_ENV] = "0"
    os.environ[COUNT_ENV] = str(workers)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def multiprocess_registry():  # noqa: ANN201 - prometheus_client's CollectorRegistry or None
    """The registry ``/metrics`` serves: every process's files summed (None:
    this process alone, the default registry)."""
    if not os.environ.get(METRICS_ENV):
        return None
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


# -- in a worker -----------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: parent_gone's polling still notices


async def parent_gone() -> None:
    """Return once the primary that started this worker is gone."""
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells; the kernel's signal may
        await asyncio.sleep(1.0)
    log.warning("the node's primary process is gone; worker %d exits", index())


# -- in the primary ---------------------------------------------------------------------


class Workers:
    """The primary's children: started, restarted when they die, stopped."""

    def __init__(self, count: int) -> None:
        self.count = count  # N, the primary included
        self.procs: dict[int, subprocess.Popen] = {}
        self._stopping = False
        self._task: asyncio.Task | None = None

    def _spawn(self, i: int) -> subprocess.Popen:
        env = {**os.environ, WORKER_ENV: str(i), PARENT_ENV: str(os.getpid())}
        # From the event loop's thread: the parent-death signal follows the
        # thread that forked, which lives as long as the primary.
        proc = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env)
        log.info("worker %d started (pid %d)", i, proc.pid)
        return proc

    def start(self) -> None:
        for i in range(1, self.count):
            self.procs[i] = self._spawn(i)
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="workers")

    async def _supervise(self) -> None:
        pauses = {i: 0.0 for i in self.procs}
        started = {i: time.monotonic() for i in self.procs}
        due: dict[int, float] = {}
        while not self._stopping:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for i, proc in list(self.procs.items()):
                if i in due:
                    if now >= due[i] and not self._stopping:
                        del due[i]
                        self.procs[i] = self._spawn(i)
                        started[i] = now
                    continue
                code = proc.poll()
                if code is None or self._stopping:
                    continue
                _mark_dead(proc.pid)
                # Died within a minute of starting: wait longer each time.
                pauses[i] = min(MAX_PAUSE, max(1.0, 2 * pauses[i])) if now - started[i] < 60 else 0
                log.warning(
                    "worker %d (pid %d) exited with %s; starting it again in %.0f s",
                    i,
                    proc.pid,
                    code,
                    pauses[i],
                )
                due[i] = now + pauses[i]

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if p.poll() is None:
                log.warning("worker pid %d did not stop in %.0f s: killing it", p.pid, STOP_GRACE)
                p.kill()
                p.wait()
        for p in self.procs.values():
            _mark_dead(p.pid)


def _mark_dead(pid: int) -> None:
    if os.environ.get(METRICS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# -- the primary's replication backlog, for every process's status ---------------------


def status_path(rundir: str) -> str:
    return os.path.join(rundir, "status.json")


async def publish_backlog(path: str, replicator) -> None:  # noqa: ANN001 - node.replication's
    """Every second, write the replicator's backlog where workers read it."""
    while True:
        doc = {"backlog_items": len(replicator.plan), "backlog_bytes": replicator.pending_bytes}
        try:
            _write_json(path, doc)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
        await asyncio.sleep(1.0)


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def read_backlog(path: str) -> tuple[int | None, int | None]:
    """The primary's backlog (items, bytes); (None, None) before it wrote one."""
    try:
        with open(path) as f:
            doc = json.load(f)
        return int(doc["backlog_items"]), int(doc["backlog_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
