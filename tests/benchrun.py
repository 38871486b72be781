"""Running a benchmark at toy size, as a user would, for the smoke tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from cluster.auth.identities import OWNER_PASSWORD_ENV
from tests.procs import ROOT


def run_bench(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository root, without
    ``MERIDIAN_OWNER_PASSWORD`` (the benchmark picks one for what it starts);
    fails with the tail of its output unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != OWNER_PASSWORD_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def strict_json(text: str) -> object:
    """JSON as the standard has it: NaN or Infinity in a result is an error."""

    def bad(const: str) -> object:
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=bad)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
