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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.procfs import listening_pid

MIB = 1 << 20

__all__ = [
    "ProcSampler",
    "alive",
    "flatness",
    "listening_pid",
    "process_tree",
    "process_tree_cpu_seconds",
    "process_tree_fds",
    "process_tree_rss_bytes",
]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _tree_sum(root: int, read: Callable[[int], float]) -> float:
    """``read(pid)`` summed over ``root`` and its live descendants (a process
    that is gone, or not ours to read, counts 0)."""
    total = 0.0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += read(pid)
    return total


def _cpu_ticks(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17
    return sum(int(x) for x in fields[11:15])


def _rss_pages(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1])


def process_tree_cpu_seconds(root: int) -> float:
    """utime+stime (plus reaped children's) of ``root`` and live descendants."""
    return _tree_sum(root, _cpu_ticks) / os.sysconf("SC_CLK_TCK")


def process_tree_rss_bytes(root: int) -> int:
    """Resident set size (VmRSS) of ``root`` and its live descendants."""
    return int(_tree_sum(root, _rss_pages)) * os.sysconf("SC_PAGE_SIZE")


def process_tree_fds(root: int) -> int:
    """Open file descriptors (``/proc/PID/fd``) of ``root`` and its live descendants."""
    return int(_tree_sum(root, lambda pid: len(os.listdir(f"/proc/{pid}/fd"))))


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
