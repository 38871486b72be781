"""The latency-aware router (cluster/router.py) against real processes.

One module-wide cluster: a real etcd, three real nodes ("near", "mid",
"far") each behind its own emulated WAN link (localcluster/wan.py, in this
process: 4, 20 and 40 ms round trips from "this site") and advertising the
link's address, and a real ``meridian router`` process. The nodes have no
gRPC service, so nothing replicates: where content is, is exactly where a
test put it. Fault tests restore the cluster before they end.

Authentication is on (the nodes trust the router's X-Forwarded-For, as
``--trusted-proxies 127.0.0.1/32``): clients log in as the cluster owner
and do the token flow through the router; a blob GET is redirected with a
grant the region honours without ``Authorization``.

Waits are bounded polls of the router's own status (``/meridian/v1/router``);
no assertion is about elapsed time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from yarl import URL

from cluster.namespace import Namespace, RegionInfo
from cluster.router.table import Region, RegionTable, TableSettings, normalize_base
from localcluster.wan import Link, Wan
from tests import images as im
from tests.containerd import Containerd
from tests.etcd_server import EtcdServer
from tests.oci import (
    Client,
    Manifest,
    assert_error,
    create_registry,
    digest,
    image,
    owner_auth,
    repo_name,
)
from tests.procs import OWNER_CREDS, OWNER_LOGIN, ROOT, NodeProcess, free_port, require_tool

DOMAIN = "meridian.test"
REGISTRIES = ("teamreg", "walled")  # created registries the tests select by Host
LATENCY = {"near": 0.002, "mid": 0.010, "far": 0.020}  # one way, seconds
PIN = "meridian_region"
TRUSTED = "127.0.0.1/32"  # the router (through the in-process WAN links)


# -- processes -------------------------------------------------------------------


class RouterProcess:
    """A real ``meridian router`` subprocess on a free loopback port."""

    def __init__(self, etcd: str, log_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.etcd = etcd
        self.extra = list(extra)
        self.port = free_port()
        self.log = Path(log_dir) / f"router-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterProcess:
        cmd = [
            sys.executable,
            "-m",
            "cluster.cli",
            "router",
            "--etcd",
            self.etcd,
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.extra,
        ]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                self.status()
                return self
            time.sleep(0.05)
        raise TimeoutError(f"router did not answer:\n{self.logs()}")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/meridian/v1/router", timeout=2) as r:
            return json.loads(r.read())

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                st = self.status()
                if pred(st):
                    return st
            time.sleep(0.05)
        raise AssertionError(f"router: {what} did not happen; status:\n{json.dumps(st, indent=1)}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def regions_of(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["region"]: r for r in st["regions"]}


def up_names(st: dict[str, Any]) -> set[str]:
    return {r["region"] for r in st["regions"] if r["up"]}


@dataclass
class Cluster:
    etcd: EtcdServer
    wan: Wan
    nodes: dict[str, NodeProcess]
    links: dict[str, Link]
    router: RouterProcess
    base: Path

    def advertised(self, region: str) -> str:
        return f"http://{self.links[region].address}"

    def restore(self) -> None:
        """Every node running and answering, every link as at the start, the
        router with all three regions in rotation, ranked by their links'
        latency (its estimates settle over a few probes)."""
        if not self.etcd.running:
            self.etcd.start()
        for name, node in self.nodes.items():
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGCONT)
            else:
                node.start()
            self.links[name].heal()
            self.links[name].set(latency=LATENCY[name])
        self.router.wait_for(
            lambda st: up_names(st) >= set(LATENCY) and st["nearest"][:3] == list(LATENCY),
            "all regions back in rotation, nearest first",
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("router")
    etcd = EtcdServer(str(base / "etcd")).start()
    wan = Wan().start()
    nodes: dict[str, NodeProcess] = {}
    links: dict[str, Link] = {}
    router: RouterProcess | None = None
    try:
        for name, latency in LATENCY.items():
            node = NodeProcess(base / name, region=name, etcd=etcd.client_url)
            link = wan.link(node.hostport, latency=latency)
            node.extra += [
                "--advertise", f"http://{link.address}",
                "--domain", DOMAIN,
                "--auth",
                "--trusted-proxies", TRUSTED,
                "--access-log",
            ]  # fmt: skip
            nodes[name], links[name] = node.start(), link
        for reg in REGISTRIES:  # registries exist once created (cluster.registries)
            create_registry(nodes["near"].url, reg)
        router = RouterProcess(etcd.client_url, base, ("--domain", DOMAIN)).start()
        c = Cluster(etcd, wan, nodes, links, router, base)
        c.restore()
        yield c
    finally:
        if router is not None:
            router.stop()
        for node in nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGCONT)
            node.stop()
        wan.stop()
        etcd.cleanup()


@pytest.fixture
def healthy(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, restored after the test whatever it did."""
    try:
        yield cluster
    finally:
        cluster.restore()


# -- clients -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def session(auth: bool = True, **kw: Any) -> Any:
    """A client session; ``auth``: logged in as the owner (the token flow on
    every challenge); more ``ClientSession`` arguments in ``kw``."""
    async with aiohttp.ClientSession(
        skip_auto_headers=("Accept", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=30),
        middlewares=(owner_auth(),) if auth else (),
        **kw,
    ) as s:
        yield s


def bearer(base: str, scope: str, login: tuple[str, str] = OWNER_LOGIN) -> dict[str, str]:
    """``Authorization`` with a token for ``scope`` from ``base``'s token endpoint."""
    basic = base64.b64encode(":".join(login).encode()).decode()
    req = urllib.request.Request(
        f"{base}/oauth2/token?scope={scope}", headers={"Authorization": f"Basic {basic}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return {"Authorization": f"Bearer {json.loads(r.read())['token']}"}


async def push_to(url: str, repo: str, m: Manifest, ref: str = "v1", host: str = "") -> None:
    headers = {"Host": host} if host else None
    async with Client.connect(url) as c:
        for b in m.blobs:
            r = await c.post(
                f"/v2/{repo}/blobs/uploads/", params={"digest": digest(b)}, data=b, headers=headers
            )
            assert r.status == 201, r
        h = {"Content-Type": m.media_type, **(headers or {})}
        r = await c.put(f"/v2/{repo}/manifests/{ref}", data=m.body, headers=h)
        assert r.status == 201, r


async def pull(
    s: aiohttp.ClientSession, base: str, repo: str, m: Manifest, ref: str = "v1"
) -> dict:
    """A client's pull through the router (following blob redirects): which
    region served the manifest and each blob. Raises on any error."""
    served: dict[str, str] = {}
    async with s.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": m.media_type}) as r:
        body = await r.read()
        assert r.status == 200, (r.status, body[:300])
        assert body == m.body
        served["manifest"] = r.headers["X-Meridian-Region"]
    for b in m.blobs:
        d = digest(b)
        async with s.get(f"{base}/v2/{repo}/blobs/{d}") as r:
            data = await r.read()
            assert r.status == 200, (r.status, data[:300])
            assert data == b
            hop = r.history[0] if r.history else r
            served[d] = hop.headers["X-Meridian-Region"]
    return served


async def astatus(s: aiohttp.ClientSession, router: RouterProcess) -> dict[str, Any]:
    async with s.get(router.url + "/meridian/v1/router") as r:
        return await r.json()


async def pull_until(
    s: aiohttp.ClientSession,
    c: Cluster,
    repo: str,
    m: Manifest,
    done: Callable[[dict[str, Any], dict[str, str]], bool],
    what: str,
    within: float = 30,
) -> int:
    """Pull in a loop (every pull must succeed) until ``done(status, served)``;
    the number of pulls."""
    deadline = time.monotonic() + within
    n = 0
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        served = await pull(s, c.router.url, repo, m)
        n += 1
        st = await astatus(s, c.router)
        if done(st, served):
            return n
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} did not happen after {n} pulls; status {json.dumps(st)}")


@pytest.fixture(scope="module")
def everywhere(cluster: Cluster) -> tuple[str, Manifest]:
    """An image pushed to every region directly (so any region can serve it)."""
    repo, m = repo_name("everywhere"), image(2)

    async def go() -> None:
        for node in cluster.nodes.values():
            await push_to(node.url, repo, m)

    asyncio.run(go())
    return repo, m


# -- unit: ranking ---------------------------------------------------------------


def _table(rtts: dict[str, float | None], down: tuple[str, ...] = ()) -> RegionTable:
    t = RegionTable(TableSettings())
    for name, rtt in rtts.items():
        r = Region(RegionInfo(name, f"http://127.0.0.1:1/{name}"), t.settings)
        if rtt is not None:
            r.observe(rtt)
        r.up = name not in down
        t.regions[name] = r
    t._reorder()
    return t


def test_ranking_nearest_holder_and_fetch_through() -> None:
    t = _table({"a": 0.005, "b": 0.040, "c": 0.120})
    names = lambda rs: [r.name for r in rs]  # noqa: E731
    assert names(t.ranked(None)) == ["a", "b", "c"]
    assert names(t.ranked(["a", "c"])) == ["a", "c", "b"]  # holders first for retries
    # Only "c" holds it; nothing known about links: go there.
    assert names(t.ranked(["c"]))[0] == "c"
    # "a" reaches "c" in 60 ms: 5 + 60 + 2 < 120, fetching through "a" wins.
    t.regions["a"].peers = {"c": 0.060}
    assert names(t.ranked(["c"]))[0] == "a"
    # ...but not when the link is slow.
    t.regions["a"].peers = {"c": 0.200}
    assert names(t.ranked(["c"]))[0] == "c"
    # A holder out of rotation does not count; down regions come last.
    t2 = _table({"a": 0.005, "b": 0.040, "c": 0.120}, down=("c",))
    assert names(t2.ranked(["c"])) == ["a", "b", "c"]
    t3 = _table({"a": 0.005, "b": 0.040, "c": 0.120}, down=("a",))
    assert names(t3.ranked(None)) == ["b", "c", "a"]
    # Never measured ranks after measured.
    t4 = _table({"a": None, "b": 0.040})
    assert names(t4.ranked(None)) == ["b", "a"]


def test_normalize_base() -> None:
    assert normalize_base("http://127.0.0.1:5000/") == ("http://127.0.0.1:5000", "")
    assert normalize_base("https://Reg.Example/") == ("https://reg.example", "")
    assert normalize_base("http://[::1]:80") == ("http://[::1]:80", "")
    for bad in ("", "not a url", "ftp://x", "http://", "http://h:99999", "http://h/?q=1"):
        base, why = normalize_base(bad)
        assert base == "" and why, bad


# -- routing ---------------------------------------------------------------------


def test_learns_regions_and_ranks_by_latency(cluster: Cluster) -> None:
    st = cluster.router.status()
    assert st["nearest"] == ["near", "mid", "far"]
    regions = regions_of(st)
    for name in LATENCY:
        assert regions[name]["http"] == cluster.advertised(name)
        assert regions[name]["alive"] is True
    assert regions["near"]["rtt_ms"] < regions["mid"]["rtt_ms"] < regions["far"]["rtt_ms"]
    with urllib.request.urlopen(cluster.router.url + "/healthz") as r:
        assert json.loads(r.read())["regions_up"] == 3
    with urllib.request.urlopen(cluster.router.url + "/metrics") as r:
        assert b"meridian_router_region_up" in r.read()


async def test_pull_lands_on_nearest(cluster: Cluster) -> None:
    repo, m = repo_name("near"), image(2)
    await push_to(cluster.router.url, repo, m)  # through the router: lands "near"
    async with session() as s:
        served = await pull(s, cluster.router.url, repo, m)
        assert set(served.values()) == {"near"}
        d = digest(m.blobs[1])
        async with s.get(f"{cluster.router.url}/v2/{repo}/blobs/{d}", allow_redirects=False) as r:
            assert r.status == 307
            location = r.headers["Location"]
            # To the region, with a grant for this blob in the URL (URL-encoded).
            blob_url = f"{cluster.advertised('near')}/v2/{repo}/blobs/{d}"
            assert location.startswith(f"{blob_url}?meridian_grant=")
    # The region serves the grant to a client sending no Authorization, and
    # refuses the same URL without it.
    grant = parse_qs(urlsplit(location).query)["meridian_grant"][0]
    async with session(auth=False) as bare:
        async with bare.get(URL(location, encoded=True)) as r:
            assert r.status == 200 and await r.read() == m.blobs[1]
        # The node's access log has the request, not the grant (a credential).
        deadline = time.monotonic() + 10
        while "meridian_grant=REDACTED" not in cluster.nodes["near"].logs():
            assert time.monotonic() < deadline, "the grant's GET was never logged"
            await asyncio.sleep(0.05)
        assert grant not in cluster.nodes["near"].logs()
        async with bare.get(blob_url) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
        # Without credentials through the router: its 401, never a redirect;
        # the realm is the router's own token endpoint.
        async with bare.get(
            f"{cluster.router.url}/v2/{repo}/blobs/{d}", allow_redirects=False
        ) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == (
                f'Bearer realm="{cluster.router.url}/oauth2/token",'
                f'service="default.{DOMAIN}",scope="repository:{repo}:pull"'
            )
    async with session() as s:
        async with s.head(
            f"{cluster.router.url}/v2/{repo}/manifests/v1", headers={"Accept": m.media_type}
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(m.body))
            assert r.headers["Docker-Content-Digest"] == m.digest
        async with s.head(f"{cluster.router.url}/v2/{repo}/blobs/{d}") as r:
            assert r.status == 200 and r.headers["Content-Length"] == str(len(m.blobs[1]))
        async with s.get(f"{cluster.router.url}/v2/{repo}/tags/list") as r:
            assert (await r.json())["tags"] == ["v1"]
        async with s.get(f"{cluster.router.url}/v2/") as r:
            assert r.status == 200
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_content_only_elsewhere_goes_where_it_is(cluster: Cluster) -> None:
    repo, m = repo_name("far"), image(2)
    await push_to(cluster.nodes["far"].url, repo, m)
    async with session() as s:
        served = await pull(s, cluster.router.url, repo, m)
        assert set(served.values()) == {"far"}, served
        # A copy in "mid" too: the nearest holder wins, once the router's
        # watch-fed copy of the namespace has the new placements (an event,
        # milliseconds after the push's commit; a pull racing it may still
        # see "far" as the only holder of the manifest).
        await push_to(cluster.nodes["mid"].url, repo, m)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            served = await pull(s, cluster.router.url, repo, m)
            if set(served.values()) == {"mid"} or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert set(served.values()) == {"mid"}, served
        # Something nobody has: the nearest region answers the 404s.
        async with s.get(f"{cluster.router.url}/v2/{repo}/manifests/nope") as r:
            assert r.status == 404 and r.headers["X-Meridian-Region"] == "near"
        d = digest(b"nobody pushed this")
        async with s.get(f"{cluster.router.url}/v2/{repo}/blobs/{d}") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_upload_location_points_at_the_region_and_stays_pinned(cluster: Cluster) -> None:
    repo = repo_name("up")
    near = cluster.advertised("near")
    data = os.urandom(100_000)
    d = digest(data)
    async with Client.connect(cluster.router.url) as c:
        r = await c.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status == 202, r
        loc = r.location
        assert loc.startswith(f"{near}/v2/{repo}/blobs/uploads/") and f"{PIN}=near" in loc
        # The data goes to the region directly, chunk then close.
        r = await c.patch(loc, data=data[:60_000], headers={"Content-Range": "0-59999"})
        assert r.status == 202, r
        r = await c.put(f"{loc}&digest={d}", data=data[60_000:])
        assert r.status == 201, r

        # A session started in "far"; its URL reaches the router.
        async with Client.connect(cluster.nodes["far"].url) as far:
            r = await far.post(f"/v2/{repo}/blobs/uploads/")
            assert r.status == 202
            path = r.location  # relative, as the node gives it
        upload_id = path.rsplit("/", 1)[-1]
        r = await c.patch(
            f"{path}?{PIN}=far", data=data[:60_000], headers={"Content-Range": "0-59999"}
        )
        assert r.status == 202, r
        assert r.headers["X-Meridian-Region"] == "far"
        assert r.location.startswith(f"{cluster.advertised('far')}{path}?")
        # Without the pin the router finds the owner by asking the regions.
        r = await c.put(f"{path}?digest={d}", data=data[60_000:])
        assert r.status == 201, r
        assert r.headers["X-Meridian-Region"] == "far"
        r = await c.get(f"{path}?{PIN}=far")
        assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")  # closed

        r = await c.patch(f"{path}?{PIN}=atlantis", data=b"x")
        assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
        assert r.json()["errors"][0]["detail"]["region"] == "atlantis"
        r = await c.get(f"/v2/{repo}/blobs/uploads/{upload_id[:-4]}beef")
        assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")


async def test_registry_selected_by_host_is_preserved(cluster: Cluster) -> None:
    repo, m = repo_name("hosted"), image(1)
    host = f"teamreg.{DOMAIN}"
    await push_to(cluster.router.url, repo, m, host=host)
    async with session() as s:
        h = {"Accept": m.media_type}
        async with s.get(
            f"{cluster.router.url}/v2/{repo}/manifests/v1", headers={**h, "Host": host}
        ) as r:
            assert r.status == 200 and await r.read() == m.body
        # The same repository in the default registry does not exist.
        async with s.get(f"{cluster.router.url}/v2/{repo}/manifests/v1", headers=h) as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"
        # The node itself serves it under that host name: it landed in "teamreg".
        async with s.get(
            f"{cluster.nodes['near'].url}/v2/{repo}/manifests/v1", headers={**h, "Host": host}
        ) as r:
            assert r.status == 200
        # Blob GET: proxied, not redirected (a redirect would lose the host).
        d = digest(m.blobs[1])
        async with s.get(
            f"{cluster.router.url}/v2/{repo}/blobs/{d}",
            headers={"Host": host},
            allow_redirects=False,
        ) as r:
            assert r.status == 200 and await r.read() == m.blobs[1]
        # An upload URL stays on the router, pinned to the region.
        async with s.post(
            f"{cluster.router.url}/v2/{repo}/blobs/uploads/", headers={"Host": host}
        ) as r:
            assert r.status == 202
            loc = r.headers["Location"]
            assert loc.startswith(f"/v2/{repo}/blobs/uploads/") and f"{PIN}=near" in loc
        data = b"hosted blob"
        async with s.put(
            f"{cluster.router.url}{loc}&digest={digest(data)}", data=data, headers={"Host": host}
        ) as r:
            assert r.status == 201, await r.text()


async def test_unknown_hosts(cluster: Cluster, everywhere: tuple[str, Manifest]) -> None:
    repo, m = everywhere
    async with session() as s:
        h = {"Accept": m.media_type}
        # A registry nobody created: the region answers, with the spec's error
        # naming the registry (its token endpoint too).
        for path in (f"/v2/{repo}/manifests/v1", "/v2/", "/oauth2/token"):
            async with s.get(
                f"{cluster.router.url}{path}", headers={**h, "Host": f"nosuch.{DOMAIN}"}
            ) as r:
                assert r.status == 404, path
                err = (await r.json())["errors"][0]
                assert err["code"] == "NAME_UNKNOWN" and "'nosuch'" in err["message"], err
        # A host outside the domain (or the bare domain): the default registry.
        for host in ("registry.elsewhere.example:8443", DOMAIN, "127.0.0.1"):
            async with s.get(
                f"{cluster.router.url}/v2/{repo}/manifests/v1", headers={**h, "Host": host}
            ) as r:
                assert r.status == 200, host
        # A Host label that is no registry name: refused as a node refuses it,
        # by the router itself.
        async with s.get(
            f"{cluster.router.url}/v2/{repo}/manifests/v1",
            headers={**h, "Host": f"bad_label.{DOMAIN}"},
        ) as r:
            assert r.status == 400 and "X-Meridian-Region" not in r.headers
            assert (await r.json())["errors"][0]["code"] == "NAME_INVALID"
        # Not the registry API at all, or no endpoint of it: the router's own
        # 404, never proxied.
        for path in ("/etc/passwd", f"/v2/{repo}/nothing"):
            async with s.get(f"{cluster.router.url}{path}") as r:
                assert r.status == 404 and "X-Meridian-Region" not in r.headers
                err = (await r.json())["errors"][0]
                assert (err["code"], err["message"]) == ("UNSUPPORTED", "no such endpoint")
        async with s.get(f"{cluster.router.url}/v2/..%2f..%2fetc/manifests/x") as r:
            assert 400 <= r.status < 500


def raw_request(base: str, request_line: str, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request written byte for byte on a socket (a request
    target an HTTP client library would not send): status, headers, body."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ", 2)[1]), fields, body


def test_absolute_form_request_target(cluster: Cluster, everywhere: tuple[str, Manifest]) -> None:
    """RFC 9112 3.2.2: ``GET http://host/v2/... HTTP/1.1`` is a legal request;
    it is served like the origin form, however often a client sends it, and
    never costs a region its place in rotation."""
    repo, m = everywhere
    router = cluster.router
    authority = router.url.removeprefix("http://")
    auth = bearer(router.url, f"repository:{repo}:pull")
    before = regions_of(router.status())
    for _ in range(20):
        status, fields, body = raw_request(
            router.url,
            f"GET http://{authority}/v2/{repo}/manifests/v1 HTTP/1.1",
            {"Host": authority, "Accept": m.media_type, **auth},
        )
        assert status == 200, body[:300]
        assert body == m.body and fields["X-Meridian-Region"] == "near"
    # Host is still required (RFC 9112 3.2), but the target's authority wins.
    status, fields, _ = raw_request(
        router.url, f"GET http://{authority}/v2/ HTTP/1.1", {"Host": "elsewhere.example", **auth}
    )
    assert status == 200 and fields["X-Meridian-Region"] == "near"
    after = regions_of(router.status())
    assert {n for n, r in after.items() if r["up"]} == set(LATENCY)
    assert {n: r["errors"] for n, r in after.items()} == {n: r["errors"] for n, r in before.items()}
    with urllib.request.urlopen(router.url + "/healthz") as r:
        assert r.status == 200


async def test_no_verify_redirects_still_grants_a_client_with_credentials(
    cluster: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    """With --no-verify-redirects a blob GET that carries a token is still
    verified (only that HEAD gets a grant), so a pull works as with the
    default; one without credentials is redirected blind, and the region
    asks it to log in."""
    repo, m = everywhere
    blind = await asyncio.to_thread(
        RouterProcess(
            cluster.etcd.client_url, cluster.base, ("--domain", DOMAIN, "--no-verify-redirects")
        ).start
    )
    try:
        await asyncio.to_thread(
            blind.wait_for, lambda st: st["nearest"][:3] == list(LATENCY), "ranked"
        )
        async with session() as s:
            assert set((await pull(s, blind.url, repo, m)).values()) == {"near"}
        d = digest(m.blobs[0])
        async with session(auth=False) as bare:
            async with bare.get(
                f"{blind.url}/v2/{repo}/blobs/{d}",
                headers=bearer(blind.url, f"repository:{repo}:pull"),
                allow_redirects=False,
            ) as r:
                assert r.status == 307
                location = r.headers["Location"]
                assert "meridian_grant=" in location
            async with bare.get(URL(location, encoded=True)) as r:
                assert r.status == 200 and await r.read() == m.blobs[0]
        async with session(auth=False) as bare:
            async with bare.get(f"{blind.url}/v2/{repo}/blobs/{d}", allow_redirects=False) as r:
                assert r.status == 307
                location = r.headers["Location"]
                assert location == f"{cluster.advertised('near')}/v2/{repo}/blobs/{d}"
            async with bare.get(location) as r:
                assert r.status == 401
    finally:
        blind.stop()


async def test_concurrent_blob_gets_share_one_verifying_head(
    healthy: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    """Blob GETs of one identity for one blob that reach the router while its
    verifying HEAD for them is in flight take that HEAD's answer (its region
    and grant) instead of asking again, as a rollout's nodes pulling one layer
    at once do; half of them hold another token of the same identity (other
    scopes). Every redirect works without ``Authorization``."""
    c = healthy
    repo, m = everywhere
    blob = m.blobs[-1]
    d = digest(blob)
    scopes = (f"repository:{repo}:pull", f"repository:{repo}:pull,push")
    tokens = [bearer(c.router.url, scope) for scope in scopes]
    assert tokens[0] != tokens[1]
    shared_before = c.router.status()["shared_heads"]
    redirects: set[tuple[str, str]] = set()  # (region, Location)
    deadline = time.monotonic() + 30
    async with session(auth=False) as s:

        async def get(n: int) -> tuple[str, str]:
            url = f"{c.router.url}/v2/{repo}/blobs/{d}"
            async with s.get(url, headers=tokens[n % 2], allow_redirects=False) as r:
                assert r.status == 307, (r.status, await r.read())
                return r.headers["X-Meridian-Region"], r.headers["Location"]

        while c.router.status()["shared_heads"] == shared_before:
            assert time.monotonic() < deadline, "no blob GET ever shared a verifying HEAD"
            redirects.update(await asyncio.gather(*(get(n) for n in range(16))))
        for region, location in redirects:
            assert location.startswith(f"{c.advertised(region)}/v2/{repo}/blobs/{d}?")
            async with s.get(URL(location, encoded=True)) as r:
                assert r.status == 200 and await r.read() == blob
    # One identity, one blob: each region handed out one grant (node.auth.GRANT_REUSE).
    grants: dict[str, set[str]] = {}
    for region, location in redirects:
        grant = parse_qs(urlsplit(location).query)["meridian_grant"][0]
        grants.setdefault(region, set()).add(grant)
    assert all(len(g) == 1 for g in grants.values()), grants


def test_connection_cap_idle_and_slow_clients_do_not_lock_others_out(
    cluster: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    """More idle and header-trickling connections than the router's cap: the
    idle ones make room (then the oldest tricklers) and a normal client
    pulls as usual (``cluster/httpserver.py``, ``--max-connections``)."""
    repo, m = everywhere
    capped = RouterProcess(
        cluster.etcd.client_url, cluster.base, ("--domain", DOMAIN, "--max-connections", "8")
    ).start()
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        capped.wait_for(lambda st: up_names(st) == set(LATENCY), "capped router ready")
        host, port = capped.url.removeprefix("http://").rsplit(":", 1)
        for _ in range(8):
            idle.append(socket.create_connection((host, int(port)), timeout=30))
            time.sleep(0.01)
        for _ in range(8):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # never the end
            slow.append(sock)
            time.sleep(0.01)

        async def go() -> dict:
            async with session() as s:
                return await pull(s, capped.url, repo, m)

        assert set(asyncio.run(go()).values()) == {"near"}
        for sock in idle:  # closed by the router to make room
            assert sock.recv(1) == b""
    finally:
        for sock in idle + slow:
            sock.close()
        capped.stop()


async def test_forwarded_for_names_the_client_only_through_a_trusted_proxy(
    cluster: Cluster,
) -> None:
    """A registry open to 10.1.2.0/24 and 127.0.0.3 only (its network rule).
    The router appends the client's address to X-Forwarded-For and the node,
    trusting the router's address, judges that client; a forged
    X-Forwarded-For from a peer the node does not trust is ignored (the peer
    is judged), as is one sent through the router (the router's entry is
    the last)."""
    from cluster.etcd import EtcdKV

    host = f"walled.{DOMAIN}"
    ns = Namespace(EtcdKV(cluster.etcd.endpoints), region="")
    await ns.start()
    try:
        rules = {"public_access": False, "allowed_cidrs": ["10.1.2.0/24", "127.0.0.3"]}
        await ns.update_registry_config("walled", lambda c: {**c, "network": rules})
    finally:
        await ns.close()
    forged = {"X-Forwarded-For": "10.1.2.3"}
    near = cluster.nodes["near"].url

    async def status(base: str, source: str, headers: dict[str, str] | None = None) -> int:
        """GET /v2/ for the walled registry from ``source``, without a token:
        401 (let in, asked to log in) or 403 (kept out by the rule)."""
        conn = aiohttp.TCPConnector(local_addr=(source, 0))
        async with session(auth=False, connector=conn) as s:
            async with s.get(base + "/v2/", headers={"Host": host, **(headers or {})}) as r:
                if r.status == 403:
                    body = await r.json()
                    assert body["errors"][0]["code"] == "DENIED"
                return r.status

    deadline = time.monotonic() + 10  # every node's namespace watch has the rule
    while await status(near, "127.0.0.2") != 403:
        assert time.monotonic() < deadline, "the network rule never took effect"
        await asyncio.sleep(0.05)
    # Directly at a node: X-Forwarded-For counts from a trusted proxy only.
    assert await status(near, "127.0.0.2", forged) == 403
    assert await status(near, "127.0.0.1", forged) == 401
    # Through the router: the node judges the router's client.
    assert await status(cluster.router.url, "127.0.0.3") == 401
    assert await status(cluster.router.url, "127.0.0.2", forged) == 403
    assert await status(cluster.router.url, "127.0.0.1") == 403


# -- faults ----------------------------------------------------------------------


async def test_wrong_endpoints_in_the_namespace(
    healthy: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    from cluster.etcd import EtcdKV
    from cluster.kv import Delete, Put

    c = healthy
    repo, m = everywhere
    closed = free_port()
    bogus = {
        "refused": RegionInfo("refused", f"http://127.0.0.1:{closed}"),
        "nodns": RegionInfo("nodns", "http://no-such-host.invalid:5000"),
        "garbled": RegionInfo("garbled", "not a url"),
        "impostor": RegionInfo("impostor", c.advertised("near")),  # answers as "near"
        "notmeridian": RegionInfo("notmeridian", c.etcd.client_url),  # some other server
    }
    kv = EtcdKV(c.etcd.endpoints)
    await kv.start()
    keys = [f"/meridian/regions/{n}" for n in bogus] + ["/meridian/regions/unparsable"]
    try:
        ops = [Put(f"/meridian/regions/{n}", info.to_json()) for n, info in bogus.items()]
        ops.append(Put("/meridian/regions/unparsable", b"{not json"))
        await kv.txn([], ops)
        st = await asyncio.to_thread(
            c.router.wait_for,
            lambda st: (
                set(bogus) <= set(regions_of(st))
                and all(regions_of(st)[n]["probes"] > 0 or n == "garbled" for n in bogus)
            ),
            "bogus regions probed",
        )
        regions = regions_of(st)
        for n in bogus:
            assert regions[n]["up"] is False, regions[n]
        assert "bad endpoint" in regions["garbled"]["reason"]
        assert "answers as region 'near'" in regions["impostor"]["reason"]
        assert "unparsable" not in regions
        async with session() as s:
            for _ in range(10):
                served = await pull(s, c.router.url, repo, m)
                assert set(served.values()) == {"near"}
        st = c.router.status()
        assert all(not regions_of(st)[n]["up"] for n in bogus)
        assert up_names(st) == set(LATENCY)
    finally:
        await kv.txn([], [Delete(k) for k in keys])
        await kv.close()
    await asyncio.to_thread(
        c.router.wait_for, lambda st: not set(bogus) & set(regions_of(st)), "bogus regions gone"
    )


async def test_hung_region_is_taken_out_and_put_back(
    healthy: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    """SIGSTOP: the kernel still accepts connections, nothing answers."""
    c = healthy
    repo, m = everywhere
    pid = c.nodes["near"].proc.pid  # type: ignore[union-attr]
    async with session() as s:
        before = await astatus(s, c.router)
        os.kill(pid, signal.SIGSTOP)
        try:
            await pull_until(
                s,
                c,
                repo,
                m,
                lambda st, served: "near" not in up_names(st) and "near" not in served.values(),
                "near out of rotation",
            )
            for _ in range(5):
                served = await pull(s, c.router.url, repo, m)
                assert set(served.values()) == {"mid"}, served
            st = await astatus(s, c.router)
            reason = regions_of(st)["near"]["reason"]
            assert "timed out" in reason or "no answer" in reason, reason
            # The pulls that reached "near" meanwhile were hedged or retried.
            assert st["hedges"] + st["retries"] > before["hedges"] + before["retries"]
        finally:
            os.kill(pid, signal.SIGCONT)
        await pull_until(
            s,
            c,
            repo,
            m,
            lambda st, served: st["nearest"][0] == "near" and set(served.values()) == {"near"},
            "near back in rotation",
        )


async def test_killed_region_pulls_see_no_error(
    healthy: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    c = healthy
    repo, m = everywhere
    async with session() as s:
        assert set((await pull(s, c.router.url, repo, m)).values()) == {"near"}
        c.nodes["near"].kill()
        n = await pull_until(
            s,
            c,
            repo,
            m,
            lambda st, served: "near" not in up_names(st),
            "near out of rotation",
        )
        assert n >= 1
        assert set((await pull(s, c.router.url, repo, m)).values()) == {"mid"}
        await asyncio.to_thread(c.nodes["near"].start)
        await pull_until(
            s,
            c,
            repo,
            m,
            lambda st, served: set(served.values()) == {"near"},
            "near back in rotation",
        )


async def test_slow_region_loses_its_traffic_and_gets_it_back(
    healthy: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    c = healthy
    repo, m = everywhere
    async with session() as s:
        c.links["near"].set(latency=0.15)  # 300 ms round trip: slower than "mid"
        await pull_until(
            s,
            c,
            repo,
            m,
            lambda st, served: st["nearest"][0] == "mid" and set(served.values()) == {"mid"},
            "traffic moved to mid",
        )
        c.links["near"].set(latency=LATENCY["near"])
        await pull_until(
            s,
            c,
            repo,
            m,
            lambda st, served: set(served.values()) == {"near"},
            "traffic back on near",
        )


async def test_etcd_down_router_keeps_its_table(
    healthy: Cluster, everywhere: tuple[str, Manifest]
) -> None:
    c = healthy
    repo, m = everywhere
    late: RouterProcess | None = None
    try:
        await c.etcd.akill()
        async with session() as s:
            for _ in range(5):
                served = await pull(s, c.router.url, repo, m)
                assert set(served.values()) == {"near"}
            st = await astatus(s, c.router)
            assert up_names(st) == set(LATENCY)
            # A router that starts now has nothing to go on yet: a clear 503.
            late = await asyncio.to_thread(
                RouterProcess(c.etcd.client_url, c.base, ("--domain", DOMAIN)).start
            )
            async with s.get(f"{late.url}/v2/{repo}/manifests/v1") as r:
                assert r.status == 503
                body = await r.json()
                assert body["errors"][0]["code"] == "UNAVAILABLE"
                assert "namespace not loaded" in body["errors"][0]["message"]
            # The first router noticed the namespace is gone, and still serves.
            await asyncio.to_thread(
                c.router.wait_for,
                lambda st: st["namespace_reachable"] is False,
                "namespace store unreachable",
            )
            served = await pull(s, c.router.url, repo, m)
            assert set(served.values()) == {"near"}
        await c.etcd.astart()
        await asyncio.to_thread(
            late.wait_for, lambda st: up_names(st) == set(LATENCY), "late router ready"
        )
        await asyncio.to_thread(
            c.router.wait_for, lambda st: st["namespace_reachable"], "namespace store back"
        )
        async with session() as s:
            served = await pull(s, late.url, repo, m)
            assert set(served.values()) == {"near"}
    finally:
        if late is not None:
            late.stop()


async def test_writes_to_a_dead_region_go_elsewhere(healthy: Cluster) -> None:
    """Nothing sent yet (the region refuses connections): the next region takes it."""
    c = healthy
    repo, m = repo_name("failover-push"), image(1)
    c.nodes["near"].kill()
    c.links["near"].cut()  # refuse, as a dead host's port would
    await push_to(c.router.url, repo, m)
    async with session() as s:
        served = await pull(s, c.router.url, repo, m)
        assert "near" not in served.values()
        # An upload pinned to the dead region cannot move: a clear 503.
        async with s.patch(
            f"{c.router.url}/v2/{repo}/blobs/uploads/0b4a5e4c-0000-4000-8000-000000000000"
            f"?{PIN}=near",
            data=b"x",
        ) as r:
            assert r.status in (502, 503)
            assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"


# -- containerd ------------------------------------------------------------------


def test_containerd_pulls_through_the_router_as_its_mirror(
    cluster: Cluster, tmp_path: Path
) -> None:
    require_tool("ctr")
    img = im.build_image([300_000, 40_000], seed="router-ctr")
    assert im.Registry(cluster.router.url).push("mirror/app", "v1", img) == img.digest
    upstream = "registry.meridian.test"
    hosts = tmp_path / "certs.d"
    (hosts / upstream).mkdir(parents=True)
    (hosts / upstream / "hosts.toml").write_text(
        f'server = "https://{upstream}"\n\n'
        f'[host."{cluster.router.url}"]\n'
        f'  capabilities = ["pull", "resolve"]\n'
    )
    before = cluster.router.status()
    with Containerd(tmp_path / "containerd") as ctrd:
        ref = f"{upstream}/mirror/app:v1"
        ctrd.ctr(
            "images", "pull", "--hosts-dir", str(hosts), "--user", OWNER_CREDS,
            "--snapshotter", ctrd.snapshotter, ref,
        )  # fmt: skip
        assert ctrd.images()[ref] == (im.OCI_MANIFEST, img.digest)
        for layer in img.layers:
            assert ctrd.content_bytes(layer.digest) == layer.data
    after = cluster.router.status()
    routed = lambda st: {r["region"]: (r["routed"], r["redirected"]) for r in st["regions"]}  # noqa: E731
    b, a = routed(before), routed(after)
    assert a["near"][1] - b["near"][1] >= len(img.layers) + 1  # config + layers redirected


def test_management_api_through_the_router(healthy: Cluster) -> None:
    """The nodes' management API answers through the router (any region
    takes it: writes go to the namespace), so `meridian login ROUTER` and
    the identity verbs work against the address clients use."""
    basic = base64.b64encode(":".join(OWNER_LOGIN).encode()).decode()

    def call(method: str, path: str, body: dict | None = None, auth: bool = True):  # noqa: ANN202
        req = urllib.request.Request(
            healthy.router.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"Basic {basic}"} if auth else {}),
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null"), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), e.headers

    status, doc, headers = call("GET", "/meridian/v1/whoami")
    assert status == 200 and headers["X-Meridian-Region"] in LATENCY, doc
    status, _, headers = call("GET", "/meridian/v1/serviceprincipals", auth=False)
    assert status == 401 and headers["WWW-Authenticate"].startswith(
        f'Bearer realm="{healthy.router.url}/oauth2/token"'
    )
    name = f"rt{uuid.uuid4().hex[:8]}"
    status, doc, _ = call(
        "POST",
        "/meridian/v1/registries/default/scopemaps",
        {"name": name, "actions": {"team/*": ["content/read"]}},
    )
    assert status == 201, doc
    status, doc, _ = call("GET", f"/meridian/v1/registries/default/scopemaps/{name}")
    assert status == 200 and doc["actions"] == {"team/*": ["content/read"]}, doc
    status, doc, _ = call(
        "POST",
        "/meridian/v1/registries/default/scopemaps",
        {"name": name, "actions": {"team/*": ["content/read"]}},
    )
    assert status == 409, doc  # a duplicate, answered once: not retried elsewhere
    status, _, _ = call("DELETE", f"/meridian/v1/registries/default/scopemaps/{name}")
    assert status in (200, 204)
    status, _, _ = call("GET", f"/meridian/v1/registries/default/scopemaps/{name}")
    assert status == 404
