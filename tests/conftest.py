from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import NodeProcess

# Nodes run with authentication on (their owner's password comes from the
# environment, see tests/procs.py); tests about the open mode pass --no-auth.


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A standalone node (embedded namespace) as a real process."""
    n = NodeProcess(tmp_path / "data").start()
    try:
        yield n
    finally:
        n.stop()
