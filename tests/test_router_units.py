"""The router in-process, in front of fake regions it cannot tell from nodes
(they answer ``/healthz`` with their region and anything under ``/v2/``),
so its choices are exact: which region a request reaches, what it counts
against a region. Fast; no etcd (an embedded namespace), no subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from cluster import pki
from cluster.embedded import EmbeddedKV
from cluster.httpserver import start_server
from cluster.namespace import Namespace, RegionInfo
from cluster.router import proxy
from cluster.router.app import Router, build_app, make_access_log_middleware
from cluster.router.config import RouterConfig
from cluster.router.table import RegionTable, TableSettings
from ocidist.digests import compute

REG = "default"


@dataclass
class FakeRegion:
    """Answers as region ``name``: every ``/v2/`` request gets 200 with a
    small body (and is recorded). With ``auth``, as a node with
    authentication on: a ``/v2/`` request without a bearer token gets 401
    with a challenge whose realm is the address the client used, and a blob
    request with a token and ``X-Meridian-Grant: want`` gets a grant.
    ``/oauth2/token`` answers ``token_status`` (and records the request)."""

    name: str
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    tokens: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None
    auth: bool = False
    token_status: int = 200

    @property
    def grant(self) -> str:
        return f"grant/for {self.name}+=&?"  # every character that needs encoding

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> FakeRegion:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_route("*", "/v2/{tail:.*}", self.v2)
        app.router.add_route("*", "/oauth2/token", self.token)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "region": self.name})

    async def v2(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, request.headers.get("Host", "")))
        self.headers_seen.append(dict(request.headers))
        headers = {}
        if self.auth:
            if not request.headers.get("Authorization", "").startswith("Bearer "):
                host = request.headers.get("X-Forwarded-Host") or request.host
                proto = request.headers.get("X-Forwarded-Proto") or request.scheme
                challenge = f'Bearer realm="{proto}://{host}/oauth2/token",service="{REG}"'
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                    status=401,
                    headers={"WWW-Authenticate": challenge},
                )
            if "/blobs/" in request.path and request.headers.get("X-Meridian-Grant") == "want":
                headers["X-Meridian-Grant"] = self.grant
        return web.Response(
            body=b"0123456789", content_type="application/octet-stream", headers=headers
        )

    async def token(self, request: web.Request) -> web.Response:
        self.tokens.append((request.method, dict(request.headers), await request.read()))
        if self.token_status != 200:
            return web.json_response({"errors": []}, status=self.token_status)
        return web.json_response({"token": f"from-{self.name}", "access_token": "x"})

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
    tmp_path: Path,
    names: tuple[str, ...] = ("a", "b", "c"),
    *,
    region_ssl: ssl.SSLContext | None = None,
    router_ssl: ssl.SSLContext | None = None,
    up: bool = True,
    **settings: object,
) -> AsyncIterator[Harness]:
    """Fake regions (HTTPS with ``region_ssl``) behind an in-process router
    (HTTPS with ``router_ssl``; more ``RouterConfig`` fields in
    ``settings``). ``up``: wait until every region is in rotation."""
    regions = {n: await FakeRegion(n).start(region_ssl) for n in names}
    kv = EmbeddedKV(str(tmp_path / "ns.sqlite"))
    ns = Namespace(kv, region="")
    await ns.start()
    # hedge off: exact choices, no second asks
    cfg = RouterConfig(**{"etcd": "unused", "hedge": False, **settings})  # type: ignore[arg-type]
    table = RegionTable(
        TableSettings(probe_interval=3600, probe_timeout=5, ssl_context=cfg.client_ssl())
    )
    router = Router(cfg, ns, table)
    router.synced_once = True
    table.sync({n: RegionInfo(n, f.url) for n, f in regions.items()}, set(regions))
    app = build_app(router)
    app.middlewares.append(make_access_log_middleware())  # every request logged
    runner = await start_server(app, "127.0.0.1", 0, cfg.limits(), ssl_context=router_ssl)
    scheme = "https" if router_ssl else "http"
    h = Harness(router, f"{scheme}://127.0.0.1:{runner.addresses[0][1]}", regions, ns, kv)
    try:
        for _ in range(500):  # the first probe of each (bounded)
            if all(r.up or r.probes for r in table.regions.values()) and not up:
                break
            if all(r.up for r in table.regions.values()):
                break
            await asyncio.sleep(0.01)
        if up:
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


# -- issue 11: identity through the router ---------------------------------------------


def _query(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query, keep_blank_values=True)


async def test_every_proxied_request_names_the_client_and_the_address_it_used(
    tmp_path: Path,
) -> None:
    """Host and X-Forwarded-Host are the address the client used (a forged
    X-Forwarded-Host or -Proto is replaced), X-Forwarded-Proto is the
    router's own scheme, and the client's address is appended to
    X-Forwarded-For: on reads, writes, blob HEADs and the token endpoint."""
    async with harness(tmp_path) as h:
        h.set_rtts(a=0.005, b=0.040, c=0.120)
        authority = h.url.removeprefix("http://")
        forged = {
            "X-Forwarded-For": "10.9.9.9",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
        }
        d = compute(b"x")
        async with aiohttp.ClientSession() as s:
            for method, path in (
                ("GET", "/v2/app/tags/list"),
                ("PUT", "/v2/app/manifests/v1"),
                ("GET", f"/v2/app/blobs/{d}"),  # the verifying HEAD
                ("GET", "/oauth2/token?service=default"),
            ):
                async with s.request(
                    method, h.url + path, headers=forged, allow_redirects=False
                ) as r:
                    assert r.status in (200, 307), (method, path, r.status)
        a = h.regions["a"]
        seen = [*a.headers_seen, *(hdrs for _, hdrs, _ in a.tokens)]
        assert len(seen) == 4
        for hdrs in seen:
            assert hdrs["Host"] == authority
            assert hdrs["X-Forwarded-Host"] == authority
            assert hdrs["X-Forwarded-Proto"] == "http"
            assert hdrs["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"


async def test_token_endpoint_is_proxied_retried_on_failure_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cret-Passw0rd"
    basic = base64.b64encode(f"owner:{password}".encode()).decode()
    async with harness(tmp_path) as h:
        h.set_rtts(a=0.005, b=0.040, c=0.120)
        h.regions["a"].token_status = 503  # the nearest fails: the next one answers
        form = f"grant_type=password&username=owner&password={password}&service=default"
        async with aiohttp.ClientSession() as s:
            async with s.post(
                h.url + "/oauth2/token",
                data=form.encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as r:
                assert r.status == 200 and (await r.json())["token"] == "from-b"
                assert r.headers["X-Meridian-Region"] == "b"
            async with s.get(
                h.url + "/oauth2/token?service=default&scope=repository:app:pull",
                headers={"Authorization": f"Basic {basic}"},
            ) as r:
                assert r.status == 200 and (await r.json())["token"] == "from-b"
            # A refusal is the client's answer, not a failure to retry.
            h.regions["b"].token_status = 401
            async with s.get(
                h.url + "/oauth2/token", headers={"Authorization": f"Basic {basic}"}
            ) as r:
                assert r.status == 401 and r.headers["X-Meridian-Region"] == "b"
        a, b, c = (h.regions[n].tokens for n in "abc")
        assert [m for m, _, _ in a] == ["POST", "GET", "GET"]
        assert [m for m, _, _ in b] == ["POST", "GET", "GET"]
        assert c == []
        assert b[0][2] == form.encode()  # the body, unchanged
        assert b[0][1]["Content-Type"] == "application/x-www-form-urlencoded"
        assert b[1][1]["Authorization"] == f"Basic {basic}"
        assert h.router.retries == 3
        # Never a secret in a log line, its message or its fields (the
        # access log is on here).
        logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
        assert "/oauth2/token?service=default" in logged
        for secret in (password, basic):
            assert secret not in logged
        # A region failing the token endpoint counts against it like any 5xx.
        assert h.router.table.regions["a"].errors == 3


async def test_token_request_body_is_bounded(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        async with aiohttp.ClientSession() as s:
            async with s.post(h.url + "/oauth2/token", data=b"x" * (proxy.TOKEN_BODY_MAX + 1)) as r:
                assert r.status == 413
        assert all(f.tokens == [] for f in h.regions.values())


async def test_blob_redirect_carries_a_grant_and_passes_401(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.set_rtts(a=0.005, b=0.040, c=0.120)
        for f in h.regions.values():
            f.auth = True
        a = h.regions["a"]
        d = compute(b"a blob")
        authority = h.url.removeprefix("http://")
        async with aiohttp.ClientSession() as s:
            # No credentials: the region's 401, with the router as the realm.
            async with s.get(f"{h.url}/v2/app/blobs/{d}", allow_redirects=False) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"] == (
                    f'Bearer realm="http://{authority}/oauth2/token",service="{REG}"'
                )
                assert (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"
                assert r.headers["X-Meridian-Region"] == "a"
            assert [m for m, _, _ in a.blob_requests()] == ["HEAD"]  # no GET after it
            assert "X-Meridian-Grant" not in a.headers_seen[-1]
            # A token: redirected with the grant the region gave.
            bearer = {"Authorization": "Bearer tok"}
            for query in ("", f"?{proxy.PIN}=a&{proxy.GRANT_PARAM}=stale"):
                async with s.get(
                    f"{h.url}/v2/app/blobs/{d}{query}", headers=bearer, allow_redirects=False
                ) as r:
                    assert r.status == 307
                    loc = r.headers["Location"]
                    assert loc.startswith(f"{a.url}/v2/app/blobs/{d}?")
                    q = _query(loc)
                    assert q[proxy.GRANT_PARAM] == [a.grant]
                    assert r.headers["Cache-Control"] == "no-store"
                    if query:
                        assert q[proxy.PIN] == ["a"]
                sent = a.headers_seen[-1]
                assert sent["Authorization"] == "Bearer tok"
                assert sent["X-Meridian-Grant"] == "want"
        assert [m for m, _, _ in a.blob_requests()] == ["HEAD"] * 3
        assert all(up and errors == 0 for up, errors, _ in h.counters().values())


async def test_no_verify_redirects_still_verifies_a_client_with_credentials(
    tmp_path: Path,
) -> None:
    """--no-verify-redirects cannot get a grant without the HEAD: a blob GET
    with Authorization is verified anyway; one without is redirected blind."""
    async with harness(tmp_path, verify_redirects=False) as h:
        h.set_rtts(a=0.005, b=0.040, c=0.120)
        a = h.regions["a"]
        a.auth = True
        d = compute(b"a blob")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.url}/v2/app/blobs/{d}", allow_redirects=False) as r:
                assert r.status == 307 and r.headers["Location"] == f"{a.url}/v2/app/blobs/{d}"
            assert a.blob_requests() == []
            async with s.get(
                f"{h.url}/v2/app/blobs/{d}",
                headers={"Authorization": "Bearer tok"},
                allow_redirects=False,
            ) as r:
                assert r.status == 307
                assert _query(r.headers["Location"])[proxy.GRANT_PARAM] == [a.grant]
            assert [m for m, _, _ in a.blob_requests()] == ["HEAD"]


def test_grant_names_match_the_nodes() -> None:
    from node import auth

    assert (proxy.GRANT_HEADER, proxy.GRANT_PARAM, proxy.TOKEN_PATH) == (
        auth.GRANT_HEADER,
        auth.GRANT_PARAM,
        auth.TOKEN_PATH,
    )
    assert proxy.with_param("/v2/a/blobs/x", "g", "a b&c") == "/v2/a/blobs/x?g=a%20b%26c"
    assert proxy.with_param("/v2/a?p=1&g=old", "g", "n") == "/v2/a?p=1&g=n"


async def test_https_router_in_front_of_https_regions(tmp_path: Path) -> None:
    """The router serves HTTPS (X-Forwarded-Proto https) and verifies HTTPS
    regions with --tls-ca; without that CA it refuses them (out of
    rotation, why in the table)."""
    pki_dir = tmp_path / "tls"
    ca, _ = pki.ensure_ca(pki_dir)
    crt, key = pki.issue(pki_dir, "node", ["127.0.0.1", "localhost"])
    rcrt, rkey = pki.issue(pki_dir, "router", ["127.0.0.1", "localhost"])
    region_ssl = pki.server_context(str(crt), str(key))
    router_ssl = pki.server_context(str(rcrt), str(rkey))
    client = ssl.create_default_context(cafile=str(ca))
    for sub in ("ok", "other"):
        (tmp_path / sub).mkdir()
    async with harness(
        tmp_path / "ok", region_ssl=region_ssl, router_ssl=router_ssl, tls_ca=str(ca)
    ) as h:
        h.set_rtts(a=0.005, b=0.040, c=0.120)
        assert h.url.startswith("https://")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as s:
            async with s.get(h.url + "/v2/app/tags/list") as r:
                assert r.status == 200 and r.headers["X-Meridian-Region"] == "a"
            d = compute(b"x")
            async with s.get(f"{h.url}/v2/app/blobs/{d}", allow_redirects=False) as r:
                assert r.status == 307
                assert r.headers["Location"].startswith("https://127.0.0.1:")
        assert h.regions["a"].headers_seen[0]["X-Forwarded-Proto"] == "https"
    async with harness(tmp_path / "other", region_ssl=region_ssl, up=False) as h:
        for r in h.router.table.regions.values():
            assert not r.up and "certificate" in r.reason.lower(), r.reason
        assert all(f.seen == [] for f in h.regions.values())
