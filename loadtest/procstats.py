"""What the server processes under test use, read from ``/proc``.

- :class:`ProcSampler` samples, for each named server process (and its
  descendants), CPU seconds (``/proc/PID/stat`` utime+stime), resident memory
  (VmRSS) and open file descriptors (``/proc/PID/fd``) over a run; the soak
  scenario checks these stay flat, every scenario divides CPU by bytes served.
- :func:`listening_pid` finds the local process listening on a loopback TCP
  port, so ``--target http://127.0.0.1:5000`` is measured without naming its
  PID.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from loadtest.reference import process_tree_cpu_seconds, process_tree_fds, process_tree_rss_bytes
from localcluster.wan import _owns, _proc_addr

MIB = 1 << 20


def listening_pid(port: int) -> int | None:
    """PID of the process with a listening TCP socket on ``port`` (any local
    address), or None when there is none or it is not ours to see."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or parts[3] != "0A":  # 0A: LISTEN
                        continue
                    with contextlib.suppress(ValueError):
                        if _proc_addr(parts[1])[1] == port:
                            inodes.add(int(parts[9]))
    if not inodes:
        return None
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if any(_owns(int(entry), f"socket:[{inode}]") for inode in inodes):
            return int(entry)
    return None


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


@dataclass
class ProcSampler:
    """Samples of named processes: ``{name: {"t", "cpu_s", "rss_mb", "fds"}}``."""

    procs: dict[str, int]
    origin: float = field(default_factory=time.monotonic)
    series: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def cpu_seconds(self) -> dict[str, float]:
        return {name: process_tree_cpu_seconds(pid) for name, pid in self.procs.items()}

    def total_cpu(self) -> float:
        return sum(self.cpu_seconds().values())

    def sample(self) -> None:
        now = time.monotonic() - self.origin
        for name, pid in self.procs.items():
            if not alive(pid):
                continue
            s = self.series.setdefault(name, {"t": [], "cpu_s": [], "rss_mb": [], "fds": []})
            s["t"].append(round(now, 3))
            s["cpu_s"].append(round(process_tree_cpu_seconds(pid), 3))
            s["rss_mb"].append(round(process_tree_rss_bytes(pid) / MIB, 2))
            s["fds"].append(process_tree_fds(pid))

    def as_dict(self) -> dict[str, Any]:
        return {"pids": dict(self.procs), "series": self.series}


def flatness(values: list[float], *, tolerance: float, slack: float) -> dict[str, Any]:
    """Whether a resource stayed flat: the median of the last third of the run
    may exceed the median of its first third (after warm-up) by at most
    ``tolerance`` (a fraction) plus ``slack`` (absolute)."""
    if len(values) < 6:
        return {"flat": None, "why": "too few samples"}
    n = len(values)
    third = max(2, n // 3)
    first = sorted(values[third // 2 : third // 2 + third])  # skip the warm-up
    last = sorted(values[-third:])
    a, b = first[len(first) // 2], last[len(last) // 2]
    limit = a * (1 + tolerance) + slack
    return {
        "flat": b <= limit,
        "early": a,
        "late": b,
        "growth": b - a,
        "limit": limit,
        "max": max(values),
    }
