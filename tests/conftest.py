from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cluster.auth.admin import Admin
from cluster.etcd import EtcdKV
from cluster.namespace import Namespace
from cluster.runtime import PORT_RANGE_ENV
from tests.etcd_server import EtcdServer
from tests.procs import NodeProcess

# Parallel test workers (pytest-xdist) choose ports from ranges of their own,
# so one worker never takes a port another has just chosen for a process.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    _lo = 10000 + 5000 * int(_worker[2:])
    os.environ[PORT_RANGE_ENV] = f"{_lo}-{_lo + 4999}"

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
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs (a disk to fill up); needs root (``mount``):
    fails, never skips, without it."""
    if os.geteuid() != 0:
        raise RuntimeError("small_fs mounts a tmpfs: run the tests as root")
    mnt = tmp_path / "data"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


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
