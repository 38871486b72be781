from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import NodeProcess


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A standalone node (embedded namespace) as a real process."""
    n = NodeProcess(tmp_path / "data").start()
    try:
        yield n
    finally:
        n.stop()
