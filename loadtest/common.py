"""What every load test and benchmark shares: percentiles, the machine's
description, strict JSON result files, Prometheus scrapes, CPU accounting
of the machine, and signal handling around cleanup.

(Starting and stopping processes is :mod:`localcluster.supervisor`'s job;
``get_json`` is its too.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from localcluster.supervisor import REPO_ROOT


class BenchError(RuntimeError):
    """A benchmark cannot go on (a process that does not start, an answer
    that is wrong: figures over wrong answers would mean nothing)."""


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly
    between the two nearest ranks; NaN when there are none."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return s[lo]
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


TOOL_VERSIONS = {
    "wrk": ["wrk", "--version"],
    "ab": ["ab", "-V"],
    "skopeo": ["skopeo", "--version"],
    "curl": ["curl", "--version"],
    "etcd": ["etcd", "--version"],
}


def host_info(tools: Iterable[str] = ("wrk", "ab", "skopeo")) -> dict[str, Any]:
    """The machine a result was measured on: CPUs, load average at the
    start (``loadavg_end`` is for the caller to add), Python, platform, the
    versions of ``tools`` and of this checkout."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "tools": {t: _first_line(TOOL_VERSIONS.get(t, [t, "--version"])) for t in tools},
        "meridian": _first_line(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"]),
    }


def json_safe(value: Any) -> Any:
    """NaN and infinities become null, keys strings: the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(result: Any, out: Path, indent: int = 2) -> None:
    """Write ``result`` as strict JSON, atomically (a temporary file renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(result), indent=indent, allow_nan=False) + "\n")
    tmp.replace(out)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{labels}': value}``, plus ``'name'``: the
    sum over a labelled metric's series."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        name, labels = m.group(1), m.group(2) or ""
        out[name + labels] = value
        if labels:
            out[name] = out.get(name, 0.0) + value
    return out


def scrape(base_url: str, *, missing_ok: bool = False, timeout: float = 5.0) -> dict[str, float]:
    """A server's ``/metrics`` (see :func:`parse_metrics`); ``{}`` when it
    does not answer and ``missing_ok``."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=timeout) as resp:
            return parse_metrics(resp.read().decode(errors="replace"))
    except (OSError, urllib.error.URLError):
        if missing_ok:
            return {}
        raise


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent not idle, since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    # guest time is already counted in user/nice
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up, so that a second Ctrl-C (or
    ``timeout`` signalling the whole process group) cannot leave a server
    running; cleanup itself is bounded by the stop timeouts."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def exit_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM handler: SystemExit unwinds the stack, so every ``finally``
    ends its processes."""
    raise SystemExit(128 + signum)
