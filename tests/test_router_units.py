"""The router in-process, in front of fake regions it cannot tell from nodes
(they answer ``/healthz`` with their region and anything under ``/v2/``),
so its choices are exact: which region a request reaches, what it counts
against a region. Fast; no etcd (an embedded namespace), no subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cluster.embedded import EmbeddedKV
from cluster.httpserver import start_server
from cluster.namespace import Namespace, RegionInfo
from cluster.router import proxy
from cluster.router.app import Router, build_app
from cluster.router.config import RouterConfig
from cluster.router.table import RegionTable, TableSettings
from ocidist.digests import compute

REG = "default"


@dataclass
class FakeRegion:
    """Answers as region ``name``: every ``/v2/`` request gets 200 with a
    small body (and is recorded)."""

    name: str
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> FakeRegion:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_route("*", "/v2/{tail:.*}", self.v2)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "region": self.name})

    async def v2(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, request.headers.get("Host", "")))
        return web.Response(body=b"0123456789", content_type="application/octet-stream")

    def blob_requests(self) -> list[tuple[str, str, str]]:
        return [s for s in self.seen if "/blobs/" in s[1]]


@dataclass
class Harness:
    router: Router
    url: str
    regions: dict[str, FakeRegion]
    ns: Namespace
    kv: EmbeddedKV

    def set_rtts(self, **rtts: float) -> None:
        """Pin each region's measured RTT (the probes run once an hour here)."""
        for name, rtt in rtts.items():
            r = self.router.table.regions[name]
            r.samples.clear()
            r.srtt = None
            r.observe(rtt)
        self.router.table._reorder()

    def counters(self) -> dict[str, tuple[bool, int, int]]:
        return {n: (r.up, r.errors, r.routed) for n, r in self.router.table.regions.items()}


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path, names: tuple[str, ...] = ("a", "b", "c")
) -> AsyncIterator[Harness]:
    regions = {n: await FakeRegion(n).start() for n in names}
    kv = EmbeddedKV(str(tmp_path / "ns.sqlite"))
    ns = Namespace(kv, region="")
    await ns.start()
    cfg = RouterConfig(etcd="unused", hedge=False)  # exact choices: no second asks
    table = RegionTable(TableSettings(probe_interval=3600, probe_timeout=5))
    router = Router(cfg, ns, table)
    router.synced_once = True
    table.sync({n: RegionInfo(n, f.url) for n, f in regions.items()}, set(regions))
    runner = await start_server(build_app(router), "127.0.0.1", 0, cfg.limits())
    h = Harness(router, f"http://127.0.0.1:{runner.addresses[0][1]}", regions, ns, kv)
    try:
        for _ in range(500):  # the first probe of each (bounded)
            if all(r.up for r in table.regions.values()):
                break
            await asyncio.sleep(0.01)
        assert all(r.up for r in table.regions.values()), table.status()
        yield h
    finally:
        await runner.cleanup()
        await table.close()
        await ns.close()
        for f in regions.values():
            assert f.runner is not None
            await f.runner.cleanup()


async def raw_request(url: str, request_line: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (for request-target forms
    an HTTP client library would not send)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((head + "Connection: close\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


# -- issue 15: a blob redirect goes to a complete copy ----------------------------


async def test_blob_redirect_prefers_a_complete_holder_over_a_read_through(
    tmp_path: Path,
) -> None:
    """The nearest region "a" would fetch the blob through from "c" faster
    than going to "c" (its link to "c" is fast): a proxied read may go
    there, but a redirect only ever sends the client to a region that holds
    a complete copy (placements are recorded once a copy is whole)."""
    async with harness(tmp_path) as h:
        data = b"only in c"
        d = compute(data)
        await Namespace(h.kv, "c").record_placement(REG, d, len(data))
        for _ in range(500):
            if h.ns.placements(REG, d):
                break
            await asyncio.sleep(0.01)
        h.set_rtts(a=0.005, b=0.040, c=0.120)
        h.router.table.regions["a"].peers = {"c": 0.001}
        assert h.router.table.ranked(["c"])[0].name == "a"  # read-through wins for proxying
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.url}/v2/app/blobs/{d}", allow_redirects=False) as r:
                assert r.status == 307
                assert r.headers["X-Meridian-Region"] == "c"
                assert r.headers["Location"] == f"{h.regions['c'].url}/v2/app/blobs/{d}"
        assert [m for m, _, _ in h.regions["c"].blob_requests()] == ["HEAD"]
        assert h.regions["a"].blob_requests() == []
        # With no healthy holder, the nearest region that answers is used.
        h.router.table.regions["c"].set_up(False, "test: out of rotation")
        h.router.table._reorder()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.url}/v2/app/blobs/{d}", allow_redirects=False) as r:
                assert r.status == 307 and r.headers["X-Meridian-Region"] == "a"


# -- issue 7: absolute-form targets; the router's own errors are its own ------------


async def test_absolute_form_request_target_works_like_origin_form(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.set_rtts(a=0.005, b=0.040, c=0.120)
        authority = h.url.removeprefix("http://")
        for _ in range(10):
            status, _ = await raw_request(
                h.url, f"GET http://{authority}/v2/app/tags/list?n=1 HTTP/1.1", {"Host": "ignored"}
            )
            assert status == 200
        # The region got the origin form, and the target's authority as the host.
        assert h.regions["a"].seen[-1] == ("GET", "/v2/app/tags/list?n=1", authority)
        assert h.counters() == {"a": (True, 0, 10), "b": (True, 0, 0), "c": (True, 0, 0)}
        async with aiohttp.ClientSession() as s:
            async with s.get(h.url + "/healthz") as r:
                assert r.status == 200


async def test_an_error_the_router_makes_is_never_held_against_a_region(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(tmp_path) as h:

        def broken_url(*_: object, **__: object) -> None:
            raise RuntimeError("the router's own bug")

        monkeypatch.setattr(proxy, "URL", broken_url)
        async with aiohttp.ClientSession() as s:
            for path in ("/v2/app/manifests/v1", "/v2/app/tags/list"):
                for _ in range(5):
                    async with s.get(h.url + path) as r:
                        assert r.status == 500
                        body = await r.json()
                        assert body["errors"][0]["code"] == "UNAVAILABLE"
            async with s.put(h.url + "/v2/app/manifests/v1", data=b"{}") as r:
                assert r.status == 500
            async with s.get(h.url + "/healthz") as r:
                assert r.status == 200
        assert all(up and errors == 0 for up, errors, _ in h.counters().values()), h.counters()


# -- issue 8: unknown paths are the router's to answer ------------------------------


async def test_unknown_paths_answer_404_unsupported_and_reach_no_region(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        async with aiohttp.ClientSession() as s:
            for path in ("/etc/passwd", "/v2/app", "/v2/app/nothing/here", "/v3/", "/favicon.ico"):
                for method in ("GET", "HEAD", "POST"):
                    async with s.request(method, h.url + path) as r:
                        assert r.status == 404, (method, path)
                        assert "X-Meridian-Region" not in r.headers
                        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
                        if method != "HEAD":
                            err = json.loads(await r.read())["errors"][0]
                            assert err["code"] == "UNSUPPORTED", (method, path)
                            assert err["message"] == "no such endpoint"
            # Invalid names are refused as the node refuses them, here.
            async with s.get(h.url + "/v2/Bad..Name/manifests/v1") as r:
                assert r.status == 400
                assert (await r.json())["errors"][0]["code"] == "NAME_INVALID"
        assert all(f.seen == [] for f in h.regions.values())
        assert h.counters() == {n: (True, 0, 0) for n in h.regions}
