from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cluster.auth.admin import Admin
from cluster.etcd import EtcdKV
from cluster.namespace import Namespace
from tests.etcd_server import EtcdServer
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


@pytest.fixture
async def admin(etcd: EtcdServer) -> AsyncIterator[Admin]:
    """The identity operations (cluster/auth/admin.py) over a namespace on
    the module's ``etcd`` (each module using it defines that fixture)."""
    ns = Namespace(EtcdKV(etcd.endpoints), "tests")
    await ns.start()
    try:
        yield Admin(ns)
    finally:
        await ns.close()
