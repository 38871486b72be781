"""The one process supervisor: how ``meridian up``, the load tests and the
tests start, watch and stop the processes they run.

- :func:`spawn` starts a child with stdin closed and stdout+stderr appended
  to a log file; by default in a session of its own (Ctrl-C in a terminal
  reaches only the parent, which stops its children in order) and, with
  ``die_with_parent``, with ``PR_SET_PDEATHSIG`` (SIGTERM when the thread
  that spawned it dies: use it from a thread that lives as long as the
  child, such as the main thread).
- :meth:`Child.wait_ready` polls until the child is ready -- an HTTP URL
  answers (optionally: with a body that ``ok`` accepts), a TCP port
  accepts, or any ``check`` holds -- and raises :class:`StartError` with
  the tail of its log when it exits first or time runs out.
- :meth:`Child.stop` ends it by PID: SIGTERM, SIGKILL after ``grace``
  (to its process group, which it leads, when it has its own session);
  :func:`stop_all` does that to many at once.
- :func:`start_etcd` runs a single-member etcd on loopback (the command
  line in :func:`etcd_argv`; callers add their tuning flags);
  :func:`find_etcd` names the install step when there is none.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.runtime import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE = 10.0
ETCD_INSTALL = "apt-get install -y etcd-server"


class StartError(RuntimeError):
    """A child did not start: it exited, or never became ready (the message
    ends with the tail of its log)."""


class MissingProgram(StartError):
    """A program the child needs is not installed (the message names the
    install step)."""


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def python_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a Python child: this checkout first on
    PYTHONPATH (so ``python -m`` finds the packages from anywhere) and
    unbuffered output (log lines appear as they happen)."""
    env = dict(os.environ if base is None else base)
    prior = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + prior if prior else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def meridian_argv(*args: str) -> list[str]:
    """``python -m cluster.cli ARGS``: the ``meridian`` command of this checkout."""
    return [sys.executable, "-m", "cluster.cli", *args]


def get_json(url: str, timeout: float = 2.0) -> Any:
    """GET ``url`` and parse its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def registry_answers(status: int, body: bytes) -> bool:
    """Readiness of a registry's ``GET /v2/``: 200, or 401 (it is up and
    wants a token; the caller deals with auth)."""
    return status in (200, 401)


def tail(path: Path, lines: int = 20, indent: str = "") -> str:
    """The last ``lines`` lines of a log file ("" if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(indent + line for line in text.splitlines()[-lines:])


@dataclass
class Child:
    """A process started by :func:`spawn`."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    own_group: bool = True  # leads its own session and process group
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20, indent: str = "") -> str:
        return tail(self.log, lines, indent)

    def _failed(self, why: str) -> StartError:
        text = self.log_tail(15, "    ")
        return StartError(f"{self.name} {why}; log {self.log}" + (f":\n{text}" if text else ""))

    def wait_ready(
        self,
        *,
        url: str | None = None,
        ok: Callable[[int, bytes], bool] | None = None,
        port: int | None = None,
        check: Callable[[], bool] | None = None,
        timeout: float = 30.0,
        interval: float = 0.05,
    ) -> float:
        """Poll until ready; the ``time.perf_counter()`` at which it was.

        ``url``: ready when a GET answers 2xx (or, with ``ok(status, body)``,
        when ``ok`` accepts the answer, whatever its status); ``port``: when a
        TCP connection to 127.0.0.1:``port`` succeeds; ``check``: when it
        returns true (OSError and ValueError count as not yet)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise self._failed(f"exited with code {self.proc.returncode} while starting")
            try:
                if self._ready(url, ok, port, check):
                    return time.perf_counter()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (OSError, ValueError, KeyError, TypeError) as e:
                last = str(e) or type(e).__name__
            if time.monotonic() > deadline:
                raise self._failed(f"was not ready within {timeout:.0f}s ({last})")
            time.sleep(interval)

    @staticmethod
    def _ready(
        url: str | None,
        ok: Callable[[int, bytes], bool] | None,
        port: int | None,
        check: Callable[[], bool] | None,
    ) -> bool:
        if url is not None:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    status, body = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                if ok is None:
                    raise
                status, body = e.code, e.read()
            if not (ok(status, body) if ok is not None else 200 <= status < 300):
                return False
        if port is not None:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        return check() if check is not None else True

    def signal(self, sig: int) -> None:
        """Send ``sig`` by PID (to its process group when it leads one)."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(self.proc.pid, sig)
            else:
                os.kill(self.proc.pid, sig)

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM, then SIGKILL if it is still running after ``grace``
        seconds; returns its exit code."""
        stop_all([self], grace)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        self.signal(signal.SIGKILL)
        self.proc.wait()


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
    new_session: bool = True,
    die_with_parent: bool = False,
    append: bool = True,
) -> Child:
    """Start ``argv`` with its output in ``log`` (appended to, unless
    ``append`` is false). A program that does not exist is a
    :class:`MissingProgram` naming it."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=None if cwd is None else str(cwd),
                start_new_session=new_session,
                preexec_fn=_pdeathsig if die_with_parent else None,
            )
        except (FileNotFoundError, PermissionError) as e:
            raise MissingProgram(f"{name}: cannot run {argv[0]}: {e.strerror or e}") from None
    return Child(name, list(argv), log, proc, own_group=new_session)


def stop_all(children: Iterable[Child], grace: float = STOP_GRACE) -> None:
    """Stop several children at once: SIGTERM to each, then SIGKILL to
    whichever is still running ``grace`` seconds later."""
    group = [c for c in children if c.running()]
    for c in group:
        c.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for c in group:
        try:
            c.proc.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.signal(signal.SIGKILL)
            c.proc.wait()
    for c in group:
        if c.own_group:  # what outlived the leader in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)


def stop_pid(pid: int, grace: float = STOP_GRACE) -> None:
    """Stop a process that is not our child (one a dead parent left): SIGTERM
    by PID, SIGKILL if it is still there after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not os.path.exists(f"/proc/{pid}"):
                return
            time.sleep(0.05)


# -- etcd ----------------------------------------------------------------------------


def find_etcd(env: str = "MERIDIAN_ETCD_BINARY") -> str:
    """The etcd to run: ``$env`` when set (it must be an executable file),
    else ``etcd`` on PATH, else ``/usr/bin/etcd``."""
    wanted = os.environ.get(env, "")
    if wanted:
        if os.path.isfile(wanted) and os.access(wanted, os.X_OK):
            return wanted
        raise MissingProgram(
            f"{env}={wanted} is not an executable file; point it at etcd or unset it "
            f"(to use etcd from PATH: {ETCD_INSTALL})"
        )
    found = shutil.which("etcd")
    if found:
        return found
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    raise MissingProgram(f"etcd not found: {ETCD_INSTALL} (or put etcd on PATH)")


def etcd_argv(binary: str, name: str, data_dir: str, client_url: str, peer_url: str) -> list[str]:
    """The command line of a one-member etcd cluster (callers add their own
    tuning flags)."""
    return [
        binary,
        "--name", name,
        "--data-dir", data_dir,
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{name}={peer_url}",
        "--initial-cluster-state", "new",
    ]  # fmt: skip


def etcd_healthy(status: int, body: bytes) -> bool:
    return status == 200 and b'"health":"true"' in body


def start_etcd(
    data_dir: Path,
    log: Path,
    *,
    binary: str | None = None,
    name: str = "meridian",
    client_port: int | None = None,
    peer_port: int | None = None,
    extra: Sequence[str] = (),
    timeout: float = 30.0,
    child_name: str = "etcd",
    **spawn_kwargs: Any,
) -> Child:
    """A single-member etcd on loopback, returned once ``/health`` says
    true; ``child.extra["client_url"]`` and ``["peer_url"]`` are its
    addresses. It is stopped (by PID) if it does not become healthy."""
    client_port = client_port or free_port()
    peer_port = peer_port or free_port({client_port})
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    argv = [
        *etcd_argv(binary or find_etcd(), name, str(data_dir), client_url, peer_url),
        "--logger", "zap",
        *extra,
    ]  # fmt: skip
    child = spawn(child_name, argv, log, **spawn_kwargs)
    child.extra.update(client_url=client_url, peer_url=peer_url)
    try:
        child.wait_ready(url=client_url + "/health", ok=etcd_healthy, timeout=timeout)
    except BaseException:
        child.kill()
        raise
    return child
