"""``meridian node --workers 2``: two processes share the node's port
(SO_REUSEPORT), and the node behaves as one -- pushes and pulls over many
connections, an upload session continued on whichever process a
connection lands on, ``/metrics`` summing both, status from either, and
the processes' lifecycle (stop, crash of the primary, crash of a worker).

Which process answered is ``/healthz``'s ``worker`` (0: the primary);
each request of a ``force_close`` session is a new connection, which the
kernel gives to either process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from cluster import skus
from cluster.registries import Guard, Limits
from loadtest.procstats import process_tree
from ocidist.errors import RegistryError
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.images import build_image, read_layout, verify_layout, write_layout
from tests.oci import Client, blob_bytes, digest, owner_auth, repo_name
from tests.procs import NodeProcess, skopeo
from tests.test_manage_identities import basic, http
from tests.test_replication import wait_until
from tests.test_router import RouterProcess

etcd = etcd_fixture(scope="module")

FRESH_CONNECTIONS = 64  # both processes answer some of these (all on one: 2^-63)


def start_node(tmp_path: Path, etcd: EtcdServer, name: str) -> NodeProcess:
    return NodeProcess(
        tmp_path / "data", region=name, etcd=etcd.client_url, extra=["--workers", "2"]
    ).start()


@pytest.fixture
def wnode(
    tmp_path: Path, etcd: EtcdServer, request: pytest.FixtureRequest
) -> Iterator[NodeProcess]:
    """A node with two processes, in a region of its own (one etcd per module)."""
    n = start_node(tmp_path, etcd, f"w{zlib.crc32(request.node.name.encode())}")
    try:
        yield n
    finally:
        n.stop()


def get_json(url: str) -> dict:
    # urllib opens one connection per request: each may land on either process
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def workers_seen(node: NodeProcess, n: int = FRESH_CONNECTIONS) -> set[int]:
    return {get_json(node.url + "/healthz")["worker"] for _ in range(n)}


def children(pid: int) -> set[int]:
    """``pid``'s live descendants (its workers)."""
    return {p for p in process_tree(pid) if p != pid and alive(p)}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def both_serving(node: NodeProcess) -> None:
    wait_until(lambda: workers_seen(node) == {0, 1}, "both processes answering", timeout=60)


def counter(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0][len(name) + 1 :] == want:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metrics(node: NodeProcess) -> str:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as r:
        return r.read().decode()


# -- serving ------------------------------------------------------------------------------


def test_both_processes_serve_and_metrics_count_every_request(wnode: NodeProcess) -> None:
    both_serving(wnode)
    labels = {"method": "GET", "status": "401"}
    before = counter(metrics(wnode), "meridian_http_requests_total", **labels)
    sent = 0
    for _ in range(FRESH_CONNECTIONS):  # unauthenticated: 401, each on a new connection
        req = urllib.request.Request(wnode.url + "/v2/")
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            assert e.code == 401
            sent += 1
    # whichever process serves /metrics, it sums both processes' counts
    for _ in range(8):
        assert counter(metrics(wnode), "meridian_http_requests_total", **labels) == before + sent
    assert "meridian_http_connections" in metrics(wnode)


def test_status_and_health_from_either_process(wnode: NodeProcess) -> None:
    both_serving(wnode)

    def agreed() -> bool:
        docs = [get_json(wnode.url + "/meridian/v1/status") for _ in range(24)]
        return all(
            d["region"] == wnode.region
            and d["namespace_synced"] is True
            and d["backlog_items"] == 0  # the primary's replicator's, shared with the worker
            and d["backlog_bytes"] == 0
            for d in docs
        )

    wait_until(agreed, "every process answering the node's status", timeout=60)
    for _ in range(16):
        h = get_json(wnode.url + "/healthz")
        assert h["status"] == "ok" and h["region"] == wnode.region


def test_skopeo_push_and_pull_through_both_processes(wnode: NodeProcess, tmp_path: Path) -> None:
    both_serving(wnode)
    image = build_image([3000, 70_000, 5000, 120_000], seed="workers-1")
    layout = write_layout(tmp_path / "src", {"v1": image})
    for i in range(3):
        ref = f"docker://{wnode.hostport}/workers/app{i}:v1"
        skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", ref)
        out = tmp_path / f"pulled{i}"
        skopeo("copy", "-q", "--src-tls-verify=false", ref, f"oci:{out}:v1")
        verify_layout(out)  # every blob hashes to its name
        pulled = read_layout(out)
        ref_v1 = pulled.ref("v1")
        assert ref_v1.digest == image.digest
        assert set(pulled.walk(ref_v1)) == {image.digest} | {b.digest for b in image.all_blobs()}
        raw = skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
        assert digest(raw.encode()) == image.digest


async def test_an_upload_session_continues_on_any_process(wnode: NodeProcess) -> None:
    both_serving(wnode)
    data = blob_bytes(16 * 4096)
    repo = repo_name("wk")
    seen: set[int] = set()
    # force_close: every request on a new connection, to either process
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector,
        middlewares=(owner_auth(),),
        skip_auto_headers=("Accept", "Content-Type"),
    ) as s:
        c = Client(wnode.url, s, owner_auth())
        r = await c.start_upload(repo)
        location = r.location
        for i in range(16):
            chunk = data[i * 4096 : (i + 1) * 4096]
            r = await c.patch(
                location,
                data=chunk,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{i * 4096}-{(i + 1) * 4096 - 1}",
                },
            )
            assert r.status == 202, r
            assert r.headers["Range"] == f"0-{(i + 1) * 4096 - 1}"
            location = r.location
            h = await c.get("/healthz")
            seen.add(h.json()["worker"])
        d = digest(data)
        r = await c.put(location, params={"digest": d})
        assert r.status == 201, r
        for _ in range(8):
            r = await c.get(f"/v2/{repo}/blobs/{d}")
            assert r.status == 200 and r.body == data
    assert seen == {0, 1}  # the session's requests went to both processes


# -- limits counted per process ---------------------------------------------------------------


def test_failed_logins_are_limited_node_wide(wnode: NodeProcess) -> None:
    """10 failed logins per user name per minute on the node: each of the two
    processes allows 5, so of 12 tries spread over both, at most 10 are
    answered 401 and the rest 429 (one process got at least 6)."""
    both_serving(wnode)
    statuses = [
        http("GET", wnode.url + "/oauth2/token", headers=basic("mallory", "wrong-" + "x" * 12))[0]
        for _ in range(12)
    ]
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= 10 and statuses.count(429) >= 2, statuses


def test_a_registry_rate_limit_is_shared_out_among_the_processes() -> None:
    basic_tier = skus.parse("Basic")
    lim = Limits({"sku": "Basic"}, workers=2)
    assert lim.reads.limit == basic_tier.read_ops_per_min // 2
    assert lim.writes.limit == basic_tier.write_ops_per_min // 2
    for _ in range(lim.writes.limit):
        Guard.count("myreg1", lim, write=True, now=1000.0)
    with pytest.raises(RegistryError) as e:
        Guard.count("myreg1", lim, write=True, now=1000.0)
    # the message names the tier's limit, not one process's share
    assert f"allows {basic_tier.write_ops_per_min} write operations" in str(e.value.message)
    assert Limits({"sku": "Basic"}).writes.limit == basic_tier.write_ops_per_min


# -- lifecycle ------------------------------------------------------------------------------


def test_sigterm_to_the_primary_stops_every_process_and_frees_the_port(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    node = start_node(tmp_path, etcd, "wterm")
    try:
        both_serving(node)
        workers = children(node.proc.pid)
        assert len(workers) == 1
        node.stop()
        assert node.proc.returncode == 0
        wait_until(lambda: not any(alive(p) for p in workers), "the worker stopped", timeout=30)
        wait_until(lambda: port_free(node.port), "the port free", timeout=30)
    finally:
        node.kill()


def test_sigkill_of_the_primary_makes_the_worker_exit(tmp_path: Path, etcd: EtcdServer) -> None:
    node = start_node(tmp_path, etcd, "wkill")
    workers: set[int] = set()
    try:
        both_serving(node)
        workers = children(node.proc.pid)
        assert len(workers) == 1
        node.kill()
        wait_until(lambda: not any(alive(p) for p in workers), "the orphan exits", timeout=30)
        wait_until(lambda: port_free(node.port), "the port free", timeout=30)
    finally:
        for p in workers:
            if alive(p):
                os.kill(p, 9)


def test_a_killed_worker_is_replaced(wnode: NodeProcess, tmp_path: Path) -> None:
    both_serving(wnode)
    (old,) = children(wnode.proc.pid)
    os.kill(old, 9)
    wait_until(lambda: not alive(old), "the worker dead", timeout=30)
    wait_until(
        lambda: len(children(wnode.proc.pid) - {old}) == 1, "a new worker started", timeout=60
    )
    both_serving(wnode)
    image = build_image([2000, 9000], seed="workers-2")
    layout = write_layout(tmp_path / "src", {"v1": image})
    ref = f"docker://{wnode.hostport}/workers/after-crash:v1"
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", ref)
    raw = skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
    assert digest(raw.encode()) == image.digest
    assert wnode.proc.poll() is None


def test_more_than_one_worker_needs_etcd(tmp_path: Path) -> None:
    from localcluster.supervisor import meridian_argv

    r = subprocess.run(
        meridian_argv("node", "--data", str(tmp_path / "d"), "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--workers 2 needs --etcd" in r.stderr


# -- the router ---------------------------------------------------------------------------


def total(text: str, name: str) -> float:
    """Sum of every labelled series of counter ``name``."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def test_router_with_two_processes(tmp_path: Path, etcd: EtcdServer) -> None:
    node = NodeProcess(tmp_path / "data", region="wrouted", etcd=etcd.client_url).start()
    router = RouterProcess(etcd.client_url, tmp_path, ("--workers", "2")).start()
    try:
        router.wait_for(lambda st: "wrouted" in st["nearest"], "the region in rotation")

        def seen() -> set[int]:
            return {get_json(router.url + "/healthz")["worker"] for _ in range(FRESH_CONNECTIONS)}

        wait_until(lambda: seen() == {0, 1}, "both router processes answering", timeout=60)
        image = build_image([2000, 9000], seed="workers-router")
        layout = write_layout(tmp_path / "src", {"v1": image})
        ref = f"docker://127.0.0.1:{router.port}/workers/routed:v1"
        skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", ref)
        for _ in range(4):
            raw = skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
            assert digest(raw.encode()) == image.digest
        # every proxied request counted once, whichever process proxied it
        with urllib.request.urlopen(router.url + "/metrics", timeout=10) as r:
            before = total(r.read().decode(), "meridian_router_requests_total")
        for _ in range(FRESH_CONNECTIONS):  # no token: the region answers 401 through it
            assert http("GET", f"{router.url}/v2/workers/routed/tags/list")[0] == 401
        for _ in range(8):
            with urllib.request.urlopen(router.url + "/metrics", timeout=10) as r:
                after = total(r.read().decode(), "meridian_router_requests_total")
            assert after - before == FRESH_CONNECTIONS
        (worker,) = children(router.proc.pid)
        router.stop()
        assert router.proc.returncode == 0
        wait_until(lambda: not alive(worker), "the router's worker stopped", timeout=30)
        wait_until(lambda: port_free(router.port), "the router's port free", timeout=30)
    finally:
        router.stop()
        node.stop()


def test_a_bad_worker_count_is_one_line_saying_what_to_give(tmp_path: Path) -> None:
    from localcluster.supervisor import meridian_argv

    for args in (["--workers", "many"], ["--workers", "999"]):
        r = subprocess.run(
            meridian_argv("node", "--data", str(tmp_path / "d"), *args),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert "choose 1-256 processes, or auto for one per CPU" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
