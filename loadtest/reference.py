"""Launchers for the registries a benchmark compares, each a child process
of :mod:`localcluster.supervisor` (its own session, output in a log file,
stopped by PID).

- :func:`start_distribution` runs CNCF Distribution on a free loopback port
  with a generated config: filesystem storage in its own data dir, deletes
  enabled, no auth, log level warn, access log off. Which binary
  (:func:`distribution_binary`): ``$MERIDIAN_DISTRIBUTION_BINARY``
  (``--distribution-binary``), else v3 built by
  from the distribution/distribution sources into ``.bench/distribution-v3/``,
  else Debian's 2.8.2 (``docker-registry``), which rebuilds its URL router on
  every request and so is ~4x slower than v3 on small requests. The result
  records the version that ran.
- :func:`start_meridian` runs one standalone Meridian node
  (``python -m cluster.cli node --listen 127.0.0.1:PORT --data DIR``), with
  authentication on: its owner's password is ``$MERIDIAN_OWNER_PASSWORD``
  (set to a random one first when unset, so the load workers, which inherit
  this process's environment, log in with it). Target ``meridian`` is one
  process; target ``meridian-workers`` is the node with ``--workers N``
  (:func:`default_workers`: one per core, as Go's Distribution uses every
  core) and an etcd of its own (more than one process needs one), returned
  once all N processes listen on the port.

Both return a :class:`Server` once ``GET /v2/`` answers; :meth:`Server.stop`
ends the process (and its process group, which it leads) by PID. Use them as
context managers (:func:`running`) so every process is ended in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cluster.auth.identities import OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.procfs import listening_inodes
from cluster.runtime import free_port
from loadtest.procstats import process_tree_cpu_seconds, process_tree_rss_bytes
from localcluster.supervisor import (
    REPO_ROOT,
    Child,
    StartError,
    python_env,
    registry_answers,
    spawn,
    start_etcd,
)

DISTRIBUTION_BIN = "docker-registry"
DISTRIBUTION_INSTALL = "apt-get install -y docker-registry"
DISTRIBUTION_V3 = REPO_ROOT / ".bench" / "distribution-v3" / "registry"
DISTRIBUTION_ENV = "MERIDIAN_DISTRIBUTION_BINARY"

#: Default command for a Meridian node; ``{python}``, ``{port}`` and ``{data}``
#: are filled in. Override with ``--meridian-cmd`` / ``MERIDIAN_BENCH_NODE_CMD``.
MERIDIAN_NODE_CMD = "{python} -m cluster.cli node --listen 127.0.0.1:{port} --data {data}"

TARGETS = ("distribution", "meridian", "meridian-workers")
WORKERS_TARGET = "meridian-workers"  # the node with --workers N (default: one per core)


def default_workers() -> int:
    """Processes of the ``meridian-workers`` target: one per core."""
    return os.cpu_count() or 1


def parse_workers(value: str | int) -> int:
    """A process count (1 or more) given on a command line, or a LaunchError."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise LaunchError(f"--workers {value!r}: give a whole number of processes, 1 or more")
    return n


class LaunchError(StartError):
    """A registry could not be started (missing tool, crash, never ready)."""


def require_tool(name: str, install: str) -> str:
    """The path of ``name`` on PATH, or a LaunchError naming the install step."""
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"{name} not found on PATH; install it with: {install}")
    return path


@dataclass
class Server:
    """A registry process listening on ``127.0.0.1:port``."""

    name: str
    port: int
    child: Child
    workdir: Path
    version: str = ""
    owns_workdir: bool = True
    extra: dict[str, str] = field(default_factory=dict)
    helpers: list[Child] = field(default_factory=list)  # stopped after it (an etcd)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def log_path(self) -> Path:
        return self.child.log

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        return self.child.log_tail(lines)

    @property
    def pids(self) -> dict[str, int]:
        """The processes to measure, by name: the server (its descendants, a
        node's workers, are counted with it) and its helpers (an etcd)."""
        out = {self.name: self.pid}
        for h in self.helpers:
            out[f"{self.name}-{h.name}"] = h.pid
        return out

    def cpu_seconds(self) -> float:
        """User+system CPU time of the server's and its helpers' process trees."""
        return sum(process_tree_cpu_seconds(pid) for pid in self.pids.values())

    def rss_bytes(self) -> int:
        """Resident set size of the server's and its helpers' process trees."""
        return sum(process_tree_rss_bytes(pid) for pid in self.pids.values())

    def stop(self, timeout: float = 10.0) -> None:
        """End the process by PID: SIGTERM to its group, then SIGKILL."""
        self.child.stop(timeout)
        for helper in self.helpers:
            helper.stop(timeout)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(
    name: str,
    argv: list[str],
    port: int,
    workdir: Path,
    owns_workdir: bool,
    ready_timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    try:
        child = spawn(name, argv, workdir / f"{name}.log", env=env, cwd=cwd or workdir)
    except StartError as e:
        raise LaunchError(str(e)) from None
    server = Server(name, port, child, workdir, owns_workdir=owns_workdir)
    try:
        child.wait_ready(url=server.base_url + "/v2/", ok=registry_answers, timeout=ready_timeout)
    except StartError as e:
        server.stop()
        raise LaunchError(str(e)) from None
    except BaseException:
        server.stop()
        raise
    return server


def _make_workdir(base: Path | None, name: str) -> tuple[Path, bool]:
    """A fresh directory for one server (config, data, log), removed on stop."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base)), True


def distribution_config(port: int, data_dir: Path) -> str:
    """The YAML config for a Distribution on 127.0.0.1:port storing in data_dir.

    Mirrors the Debian package's defaults where they matter for speed
    (in-memory blob descriptor cache) but with no auth, the storage health
    check off and the access log off (one log line per request would be a
    large share of the CPU on a request-rate benchmark)."""
    return (
        "version: 0.1\n"
        "log:\n"
        "  level: warn\n"
        "  accesslog:\n"
        "    disabled: true\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {data_dir}\n"
        "  delete:\n"
        "    enabled: true\n"
        "  cache:\n"
        "    blobdescriptor: inmemory\n"
        "  maintenance:\n"
        "    uploadpurging:\n"
        "      enabled: false\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
        "  secret: meridian-bench-not-a-secret\n"
        "  headers:\n"
        "    X-Content-Type-Options: [nosniff]\n"
    )


def distribution_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def distribution_binary() -> str:
    """The Distribution to compare with: the one named, else a locally built
    v3, else Debian's 2.8.2."""
    named = os.environ.get(DISTRIBUTION_ENV)
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            raise LaunchError(f"{DISTRIBUTION_ENV}={named}: not an executable file")
        return named
    if os.access(DISTRIBUTION_V3, os.X_OK):
        return str(DISTRIBUTION_V3)
    return require_tool(DISTRIBUTION_BIN, DISTRIBUTION_INSTALL)


def start_distribution(
    workdir: Path | None = None,
    ready_timeout: float = 30.0,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start CNCF Distribution on a free loopback port; returns when it answers.
    ``extra_env`` (e.g. ``{"GOGC": "400"}``) is for sensitivity checks only:
    the reference is Distribution as packaged."""
    binary = distribution_binary()
    wd, owns = _make_workdir(workdir, "distribution")
    data = wd / "data"
    data.mkdir()
    port = free_port()
    config = wd / "config.yml"
    config.write_text(distribution_config(port, data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    # v3 exports traces to localhost:4318 unless told not to (an error per batch).
    env["OTEL_TRACES_EXPORTER"] = "none"
    env.update(extra_env or {})
    try:
        server = _spawn(
            "distribution", [binary, "serve", str(config)], port, wd, owns, ready_timeout, env
        )
    except BaseException:
        if owns:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    server.version = distribution_version(binary)
    server.extra["config"] = str(config)
    if extra_env:
        server.extra["env"] = " ".join(f"{k}={v}" for k, v in extra_env.items())
    return server


def meridian_available() -> str | None:
    """None if a Meridian node can be launched from this checkout, else why not."""
    if os.environ.get("MERIDIAN_BENCH_NODE_CMD"):
        return None
    if not (REPO_ROOT / "cluster" / "cli.py").exists():
        return (
            f"{REPO_ROOT / 'cluster' / 'cli.py'} does not exist yet (the Meridian node "
            "is not built); run with --targets distribution, or pass --meridian-cmd"
        )
    return None


def start_meridian(
    workdir: Path | None = None,
    ready_timeout: float = 60.0,
    cmd: str | None = None,
    workers: int = 1,
    name: str = "meridian",
) -> Server:
    """Start one standalone Meridian node on a free loopback port.

    ``cmd`` (or ``$MERIDIAN_BENCH_NODE_CMD``) is a shell-style command template
    with ``{python}``, ``{port}`` and ``{data}`` placeholders; it runs from the
    repository root with the repository on PYTHONPATH. ``workers`` > 1 runs it
    with ``--workers N`` and an etcd of its own (a helper: measured with it,
    stopped after it), and returns once all N processes listen."""
    template = cmd or os.environ.get("MERIDIAN_BENCH_NODE_CMD") or MERIDIAN_NODE_CMD
    if cmd is None and template == MERIDIAN_NODE_CMD:
        why = meridian_available()
        if why:
            raise LaunchError(why)
    workers = parse_workers(workers)
    wd, owns = _make_workdir(workdir, name)
    data = wd / "data"
    data.mkdir()
    port = free_port()
    os.environ.setdefault(OWNER_PASSWORD_ENV, generate())  # the node's, and the workers'
    argv = [
        part.format(python=sys.executable, port=port, data=str(data))
        for part in shlex.split(template)
    ]
    helpers: list[Child] = []
    try:
        if workers > 1:  # more than one process needs etcd
            etcd = start_etcd(wd / "etcd", wd / "etcd.log")
            helpers.append(etcd)
            argv += ["--workers", str(workers), "--etcd", etcd.extra["client_url"]]
        server = _spawn(name, argv, port, wd, False, ready_timeout, python_env(), REPO_ROOT)
        server.helpers = helpers
        if workers > 1:
            _wait_listening(server, workers, ready_timeout)
    except BaseException:
        for helper in helpers:
            helper.stop()
        if owns:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    server.owns_workdir = owns
    server.version = _meridian_version()
    server.extra["workers"] = str(workers)
    # what ran: one listening socket per process of the node
    server.extra["listening_processes"] = str(len(listening_inodes(port)))
    server.extra["cmd"] = shlex.join(argv)
    if helpers:
        server.extra["etcd"] = helpers[0].extra["client_url"]
    return server


def _wait_listening(server: Server, processes: int, timeout: float) -> None:
    """Until ``processes`` sockets listen on the server's port (each process
    of a node with workers has its own); stops it and raises if they never do."""
    try:
        server.child.wait_ready(
            check=lambda: len(listening_inodes(server.port)) >= processes, timeout=timeout
        )
    except StartError as e:
        server.stop()
        why = f"{e} (waiting for {processes} processes on port {server.port})"
        raise LaunchError(why) from None


def _meridian_version() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return f"meridian {out.stdout.strip() or 'unknown'}"
    except (OSError, subprocess.TimeoutExpired):
        return "meridian unknown"


def start_target(
    name: str,
    workdir: Path | None = None,
    meridian_cmd: str | None = None,
    distribution_env: dict[str, str] | None = None,
    workers: int | None = None,
) -> Server:
    """Start target ``name`` (one of :data:`TARGETS`); ``workers``: the
    processes of ``meridian-workers`` (default :func:`default_workers`)."""
    if name == "distribution":
        return start_distribution(workdir, extra_env=distribution_env)
    if name == "meridian":
        return start_meridian(workdir, cmd=meridian_cmd)
    if name == WORKERS_TARGET:
        n = default_workers() if workers is None else workers
        return start_meridian(workdir, cmd=meridian_cmd, workers=n, name=name)
    raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")


@contextlib.contextmanager
def running(
    name: str,
    workdir: Path | None = None,
    meridian_cmd: str | None = None,
    distribution_env: dict[str, str] | None = None,
    workers: int | None = None,
) -> Iterator[Server]:
    """Start a target, yield it, and always stop it by PID."""
    server = start_target(name, workdir, meridian_cmd, distribution_env, workers)
    try:
        yield server
    finally:
        server.stop()
