"""Per-request samples and what is computed from them.

A :class:`Recorder` keeps one row per request (start time relative to the
step's start, duration, bytes moved, operation, success) in flat lists, cheap
enough to append from a hot loop and to ship from a worker process as JSON.
:func:`stats` reduces rows to the figures a report shows (count, errors,
req/s, MiB/s, latency percentiles), overall and per operation;
:func:`timeseries` buckets them over time (latency percentiles, throughput and
errors per bucket) for the plots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.common import percentile

MIB = 1 << 20  # sizes and throughput are in MiB (as bench_node reports them)
MAX_ERROR_MESSAGES = 20


@dataclass
class Rows:
    """Samples: per request its start (seconds from the step's start),
    duration, bytes, operation and success; merged from several recorders."""

    t: list[float] = field(default_factory=list)
    d: list[float] = field(default_factory=list)
    b: list[int] = field(default_factory=list)
    op: list[str] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def extend(self, part: dict[str, Any], shift: float = 0.0) -> None:
        self.t.extend(x + shift for x in part["t"])
        self.d.extend(part["d"])
        self.b.extend(part["b"])
        self.op.extend(part["op"])
        self.ok.extend(part["ok"])
        for k, v in part.get("errors", {}).items():
            self.errors[k] = self.errors.get(k, 0) + int(v)
        room = MAX_ERROR_MESSAGES - len(self.messages)
        if room > 0:
            self.messages.extend(part.get("messages", [])[:room])

    def select(self, ops: Iterable[str]) -> Rows:
        want = set(ops)
        out = Rows()
        for i, o in enumerate(self.op):
            if o in want:
                out.t.append(self.t[i])
                out.d.append(self.d[i])
                out.b.append(self.b[i])
                out.op.append(o)
                out.ok.append(self.ok[i])
        return out

    def __len__(self) -> int:
        return len(self.t)


@dataclass
class Recorder(Rows):
    """Rows of (start, duration, bytes, op, ok) for one worker and one step,
    with start times relative to ``origin`` (the step's start instant)."""

    origin: float = field(default_factory=time.monotonic)

    def add(self, op: str, t0: float, dur: float, nbytes: int = 0, ok: bool = True) -> None:
        self.t.append(t0 - self.origin)
        self.d.append(dur)
        self.b.append(nbytes)
        self.op.append(op)
        self.ok.append(1 if ok else 0)

    def error(self, op: str, message: str) -> None:
        key = f"{op}: {message.splitlines()[0][:120] if message else 'error'}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.messages) < MAX_ERROR_MESSAGES:
            self.messages.append(f"{op}: {message[:500]}")

    @property
    def count(self) -> int:
        return len(self.t)

    @property
    def failed(self) -> int:
        return len(self.ok) - sum(self.ok)

    @property
    def nbytes(self) -> int:
        return sum(self.b)

    def as_dict(self) -> dict[str, Any]:
        return {
            "t": [round(x, 6) for x in self.t],
            "d": [round(x, 7) for x in self.d],
            "b": self.b,
            "op": self.op,
            "ok": self.ok,
            "errors": self.errors,
            "messages": self.messages,
        }


def _lat(sorted_d: Sequence[float], q: float) -> float | None:
    return None if not sorted_d else percentile(sorted_d, q) * 1000.0


def stats(rows: Rows, seconds: float | None = None) -> dict[str, Any]:
    """Count, errors, rates and latency percentiles (ms) of ``rows``.

    ``seconds`` is the wall time the rows span (default: first start to last
    end); rates are per that."""
    n = len(rows)
    if seconds is None:
        ends = [t + d for t, d in zip(rows.t, rows.d, strict=True)]
        seconds = (max(ends) - min(rows.t)) if n else 0
    seconds = max(float(seconds), 1e-9)
    ok_d = sorted(d for d, ok in zip(rows.d, rows.ok, strict=True) if ok)
    nbytes = sum(rows.b)
    errors = n - sum(rows.ok)
    return {
        "requests": n,
        "errors": errors,
        "error_rate": errors / n if n else 0.0,
        "seconds": seconds,
        "rps": n / seconds,
        "bytes": nbytes,
        "mib_s": nbytes / seconds / MIB,
        "p50_ms": _lat(ok_d, 50),
        "p90_ms": _lat(ok_d, 90),
        "p99_ms": _lat(ok_d, 99),
        "max_ms": ok_d[-1] * 1000.0 if ok_d else None,
        "mean_ms": (sum(ok_d) / len(ok_d) * 1000.0) if ok_d else None,
    }


def stats_by_op(rows: Rows, seconds: float | None = None) -> dict[str, dict[str, Any]]:
    return {op: stats(rows.select([op]), seconds) for op in sorted(set(rows.op))}


def bucket_width(span: float, max_buckets: int = 120) -> float:
    """A round bucket width giving at most ``max_buckets`` buckets over ``span``."""
    for w in (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if span / w <= max_buckets:
            return float(w)
    return math.ceil(span / max_buckets)


def timeseries(rows: Rows, span: float | None = None, width: float | None = None) -> dict[str, Any]:
    """Per time bucket (by request completion): requests/s, MiB/s, errors and
    p50/p90/p99 latency (ms) of the requests that completed in it."""
    n = len(rows)
    ends = [t + d for t, d in zip(rows.t, rows.d, strict=True)]
    if span is None:
        span = max(ends) if n else 0.0
    span = max(span, 1e-3)
    width = width or bucket_width(span)
    nb = max(1, math.ceil(span / width))
    lat: list[list[float]] = [[] for _ in range(nb)]
    count = [0] * nb
    errs = [0] * nb
    nbytes = [0] * nb
    for i in range(n):
        k = min(nb - 1, max(0, int(ends[i] / width)))
        count[k] += 1
        nbytes[k] += rows.b[i]
        if rows.ok[i]:
            lat[k].append(rows.d[i])
        else:
            errs[k] += 1
    p50, p90, p99 = [], [], []
    for bucket in lat:
        bucket.sort()
        p50.append(_lat(bucket, 50))
        p90.append(_lat(bucket, 90))
        p99.append(_lat(bucket, 99))
    return {
        "width_s": width,
        "t": [round((k + 1) * width, 3) for k in range(nb)],
        "rps": [c / width for c in count],
        "mib_s": [x / width / MIB for x in nbytes],
        "errors": errs,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
    }
