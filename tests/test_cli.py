"""The ``meridian`` command answers common mistakes with one line on stderr
(what is wrong, what to do) and a documented exit code (README, "Exit
codes"), never a traceback; the management verbs find a running
``meridian up`` by themselves; a node that stops cleanly takes its region out
of ``meridian regions`` at once.

Every check runs the real command as a process. ``meridian up`` with a
cluster running is in tests/test_up.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.etcd import EtcdKV
from cluster.namespace import ALIVE
from cluster.runtime import free_port
from tests.etcd_server import EtcdServer
from tests.procs import ROOT, NodeProcess

pytestmark = pytest.mark.timeout(120)

CLUSTER_ENV = ("MERIDIAN_ETCD", "MERIDIAN_NODE", "MERIDIAN_UP_DATA", "MERIDIAN_ETCD_BINARY")


def meridian(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single line a mistake is answered with."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# -- meridian node ----------------------------------------------------------------


def test_node_port_in_use_names_the_holder(tmp_path: Path) -> None:
    with listening_socket() as s:
        port = s.getsockname()[1]
        r = meridian("node", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "d"))
    assert r.returncode == 3
    line = one_line(r)
    assert line.startswith("meridian node: ")
    assert f"127.0.0.1:{port} is in use by PID {os.getpid()}" in line
    assert "--listen" in line


def test_node_grpc_port_in_use(tmp_path: Path) -> None:
    with listening_socket() as s:
        port = s.getsockname()[1]
        r = meridian(
            "node",
            "--listen", f"127.0.0.1:{free_port()}",
            "--grpc-listen", f"127.0.0.1:{port}",
            "--data", str(tmp_path / "d"),
        )  # fmt: skip
    assert r.returncode == 3
    line = one_line(r)
    assert f"127.0.0.1:{port} is in use" in line and "--grpc-listen" in line


def test_node_listen_nonsense(tmp_path: Path) -> None:
    r = meridian("node", "--listen", "nonsense", "--data", str(tmp_path / "d"))
    assert r.returncode == 2
    line = one_line(r)
    assert line.startswith("meridian node: argument --listen: ")
    assert "HOST:PORT" in line and "'nonsense'" in line and "--help" in line
    assert not (tmp_path / "d").exists()


def test_node_data_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = meridian("node", "--listen", f"127.0.0.1:{free_port()}", "--data", str(f))
    assert r.returncode == 3
    line = one_line(r)
    assert f"--data {f} is not a directory" in line
    assert f.read_text() == "x"


@pytest.mark.parametrize(
    ("data", "what"),
    [("/sys/fs", "is not writable"), ("/sys/fs/meridian-test/data", "cannot create it")],
)
def test_node_data_not_writable(data: str, what: str) -> None:
    # sysfs refuses new files even to root, so this holds for any user.
    r = meridian("node", "--listen", f"127.0.0.1:{free_port()}", "--data", data)
    assert r.returncode == 3
    line = one_line(r)
    assert f"--data {data}" in line and what in line


# -- meridian up ------------------------------------------------------------------


def test_up_etcd_binary_pointing_nowhere(tmp_path: Path) -> None:
    nowhere = tmp_path / "no-such-etcd"
    data = tmp_path / "d"
    r = meridian(
        "up", "--data", str(data), "--port", str(free_port()),
        env={"MERIDIAN_ETCD_BINARY": str(nowhere)},
    )  # fmt: skip
    assert r.returncode == 3
    line = one_line(r)
    assert f"MERIDIAN_ETCD_BINARY={nowhere}" in line and "unset it" in line
    assert not data.exists()  # nothing started, nothing written


# -- meridian regions / replication status: finding the cluster -------------------------


@pytest.mark.parametrize("verb", [["regions"], ["replication"], ["replication", "status"]])
def test_no_cluster_found(tmp_path: Path, verb: list[str]) -> None:
    r = meridian(*verb, cwd=tmp_path)
    assert r.returncode == 4
    line = one_line(r)
    assert "no cluster found" in line and "--etcd" in line and "meridian up" in line


@pytest.mark.parametrize("verb", [["regions"], ["replication", "status"]])
def test_stale_up_json_is_not_a_cluster(tmp_path: Path, verb: list[str]) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    data = tmp_path / "meridian-data"
    data.mkdir()
    state = {"pid": gone.pid, "etcd": f"http://127.0.0.1:{free_port()}"}
    (data / "up.json").write_text(json.dumps(state))
    r = meridian(*verb, cwd=tmp_path)
    assert r.returncode == 4
    line = one_line(r)
    assert "not running" in line and f"PID {gone.pid}" in line and "meridian up" in line


@pytest.mark.parametrize("verb", [["regions"], ["replication", "status"]])
def test_etcd_unreachable(tmp_path: Path, verb: list[str]) -> None:
    etcd = f"http://127.0.0.1:{free_port()}"
    r = meridian(*verb, "--etcd", etcd, cwd=tmp_path)
    assert r.returncode == 4
    line = one_line(r)
    assert f"etcd at {etcd} does not answer" in line and "--etcd" in line


def test_node_unreachable(tmp_path: Path) -> None:
    node = f"http://127.0.0.1:{free_port()}"
    r = meridian("regions", "--node", node, cwd=tmp_path)
    assert r.returncode == 4
    line = one_line(r)
    assert f"{node} does not answer" in line and "--node" in line


# -- a clean stop leaves the region at once (item 14) ------------------------------------


async def _alive(etcd: str) -> set[str]:
    kv = EtcdKV([etcd])
    await kv.start()
    try:
        entries, _ = await kv.range(ALIVE)
    finally:
        await kv.close()
    return {e.key[len(ALIVE) :] for e in entries}


def test_clean_stop_revokes_the_lease(tmp_path: Path) -> None:
    with EtcdServer(str(tmp_path / "etcd")) as etcd:
        node = NodeProcess(tmp_path / "east" / "data", region="eastus", etcd=etcd.client_url)
        node.start()
        try:
            r = meridian("regions", "--etcd", etcd.client_url, "--json")
            assert r.returncode == 0, r.stderr
            assert [(x["region"], x["alive"]) for x in json.loads(r.stdout)] == [("eastus", True)]
        finally:
            node.stop()  # SIGTERM: a clean stop
        assert node.proc is not None and node.proc.returncode == 0
        # Read at once, well within the lease's TTL: the key went with the lease.
        assert asyncio.run(_alive(etcd.client_url)) == set()
        r = meridian("regions", "--etcd", etcd.client_url, "--json")
        assert [(x["region"], x["alive"]) for x in json.loads(r.stdout)] == [("eastus", False)]


# -- what git ignores --------------------------------------------------------------------


def test_meridian_up_data_is_ignored_by_git() -> None:
    r = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", "meridian-data/up.json"], check=False
    )
    assert r.returncode == 0, "meridian-data/ (meridian up's default data dir) is not ignored"
