from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import NodeProcess

# Interim, while the suite moves to authentication on: nodes started by the
# tests run in the open mode. Removed by the migration commit.
os.environ.setdefault("MERIDIAN_AUTH", "0")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A standalone node (embedded namespace) as a real process."""
    n = NodeProcess(tmp_path / "data").start()
    try:
        yield n
    finally:
        n.stop()
