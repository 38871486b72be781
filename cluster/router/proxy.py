"""What the router does with one request: proxying, retries, hedging, blob
redirects, upload pinning.

- **blob GET**: ``307 Temporary Redirect`` to a region's own URL, so the
  bytes never pass through the router. The candidates are the healthy
  regions that hold a complete copy per the namespace's placements, nearest
  first (``RegionTable.holders_first``); the router asks the first ``HEAD``
  for the blob (hedged like any read, below) and redirects to the first that
  answers ``200``, so a client is never sent to a region that just died or
  hangs (``--no-verify-redirects`` saves that round trip and trusts the
  table). Only when no healthy region holds the blob per placements (the
  router's copy of the namespace is behind, or every holder is out of
  rotation) does the redirect go to the nearest region that answers
  ``HEAD`` with ``200``, which may be reading the bytes through from a
  holder it can still reach;
- **every other read** (manifests, tags, catalog, referrers, ``/v2/``, blob
  HEAD): proxied, with retries on the next best region when a region fails
  (connection error, timeout, 5xx, or a 404 from a region that does not hold
  content the namespace places elsewhere) and a hedge: when the first region
  has not answered within about its p95 latency, the same request goes to
  the next one and the first answer wins;
- **writes**: proxied to the nearest healthy region (retried elsewhere only
  when nothing was sent). An upload's ``Location`` is rewritten to the
  chosen region's absolute URL plus ``meridian_region=<region>``, so the
  upload's data goes to that region directly; an upload URL that reaches the
  router anyway is proxied to the region that owns the session (the
  ``meridian_region`` parameter, else a table of recent sessions, else by
  asking the regions).

The router parses the request target with the OCI grammar
(``ocidist.paths``) and answers what it can judge itself without asking a
region: a path that names no endpoint (``404 UNSUPPORTED``), an invalid
repository name or registry label in ``Host`` (``400 NAME_INVALID``). Such
answers, and any error the router makes itself, never count against a
region: only a region's own failures (transport errors, timeouts, 5xx) do.
The request target may be in origin form (``/v2/...``) or absolute form
(``http://host/v2/...``, RFC 9112 3.2.2); either way the region gets the
origin form, and for the absolute form the target's authority is the host.

Registries selected by host name (``--domain``): the client's ``Host`` is
forwarded unchanged (and ``X-Forwarded-Host`` set to it), so a node picks the
registry exactly as it would for a direct request. A redirect or a direct
upload URL would reach the region under the region's own host name, so for a
registry named by the host the router proxies blob GETs and keeps upload
URLs pointing at itself (still pinned to the session's region).

Every proxied request carries ``Host`` and ``X-Forwarded-Host`` (the address
the client used), ``X-Forwarded-Proto`` (``https`` when the router serves
TLS) and ``X-Forwarded-For`` with the client's address appended: a node's
``401`` challenge names the router's own token endpoint as its realm, and
its failed-login limits and network rules see the real client (nodes take
``X-Forwarded-For`` only from ``--trusted-proxies``).

Authentication (nodes with auth on): the token endpoint (``GET``/``POST
/oauth2/token``) is proxied to the nearest region, the next one when a
region fails (never hedged: one login, one attempt at a time); neither its
body nor the ``Authorization`` header is ever logged. A token any region
issued is good in every region. A blob GET's verifying ``HEAD`` carries the
client's ``Authorization`` and ``X-Meridian-Grant: want``; the region's
grant (a one-minute token for that one blob) goes into the redirect as
``meridian_grant=...``, because Go clients (containerd, docker) drop
``Authorization`` on a redirect to another host. A ``401`` to that ``HEAD``
is the client's answer (with the region's challenge), not a redirect.
``--no-verify-redirects`` cannot get a grant without the ``HEAD``: a blob GET
that carries ``Authorization`` is verified anyway; the flag saves the round
trip for clients without credentials only.

Shared verifying ``HEAD``s: a blob GET whose bearer token the router's own
authorization decision (``cluster.auth.access``) accepts, arriving while a
``HEAD`` for the same blob of the same repository, for the same identity
from the same address, to the same candidate regions is in flight, waits
for that ``HEAD`` and takes its answer (region and grant) instead of asking
again -- when it is a ``200`` from a region still in rotation; anything else
and it asks itself. That answer was given after the request arrived, so it
is as fresh as the request's own ``HEAD`` would be: a region that died or
hangs is never chosen from an older answer (no answer is kept once its
``HEAD`` is over; a time-based reuse would send clients to a region killed
an instant ago until its next failed probe). In a rollout, the nodes that
ask for a layer at the same moment cost one ``HEAD`` (and one grant) for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter
from yarl import URL

from cluster.auth.access import GRANT_HEADER, GRANT_PARAM, TOKEN_PATH
from cluster.namespace import Namespace, place_key, tag_key
from cluster.router.cache import ManifestAnswers
from cluster.router.config import RouterConfig
from cluster.router.table import Region, RegionTable
from cluster.workers import worker_suffix
from ocidist import paths
from ocidist.digests import TAG_RE, check_name, is_digest
from ocidist.errors import Code, RegistryError
from ocidist.paths import API_HEADERS, normalize_domain, registry_for_host

log = logging.getLogger("meridian.router")

PIN = "meridian_region"  # query parameter naming the region an URL belongs to
TOKEN_BODY_MAX = 64 << 10  # a token request's form body, at most
TOKEN_ATTEMPT_MIN = 5.0  # seconds a region may take to issue a token (a slow hash)
BUFFER_MAX = 4 << 20  # responses up to this size are read whole (retryable)
MANIFEST_MAX = 4 << 20
STREAM_CHUNK = 256 << 10
FRESH_READ_TIMEOUT = 0.5  # a cache miss may ask etcd, this long at most

_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
        "content-length",
    }
)
_RESP_DROP = _HOP | {"date", "server"}

ROUTED = Counter(
    "meridian_router_requests_total",
    "Requests the router sent to a region, by how (proxy, redirect)",
    ["region", "action"],
)
RETRIES = Counter("meridian_router_retries_total", "Requests retried on another region", ["why"])
HEDGES = Counter("meridian_router_hedges_total", "Hedged reads (second region asked)")
SHARED = Counter(
    "meridian_router_shared_heads_total",
    "Blob redirects that took the answer of an identical verifying HEAD in flight",
)
FAILED = Counter(
    "meridian_router_failed_total", "Requests the router answered with its own error", ["code"]
)


def error_response(err: RegistryError) -> web.Response:
    """The router's own answer: the OCI error body (counted by code)."""
    FAILED.labels(str(err.code)).inc()
    headers = {**API_HEADERS, **err.headers}
    if err.status == 503:
        headers.setdefault("Retry-After", "1")
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=headers
    )


def _error(status: int, code: Code, message: str, detail: object = None) -> web.Response:
    return error_response(RegistryError(code, message, detail, status=status))


def target(request: web.Request) -> str:
    """The request target in origin form (path and query, as encoded by the
    client), whatever form the client sent it in."""
    return request.rel_url.raw_path_qs


def target_host(request: web.Request) -> str:
    """The host the request is for: the authority of an absolute-form target
    (RFC 9112 3.2.2: it overrides ``Host``), else ``Host``."""
    if not request.raw_path.startswith("/"):
        authority = request.url.raw_authority
        if authority:
            return authority
    return request.host


class _Body:
    """A request body forwarded as a stream; remembers whether any of it was
    read (a request whose body has started cannot be sent again)."""

    __slots__ = ("content", "started")

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self.content = content
        self.started = False

    async def stream(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self.content.iter_chunked(STREAM_CHUNK):
            yield chunk


@dataclass(slots=True)
class _Up:
    """A region's answer: the response (headers read) and, when small, its
    whole body (``None``: still to be streamed, then released)."""

    region: Region
    resp: aiohttp.ClientResponse
    body: bytes | None
    elapsed: float


_CONNECT_ERRORS = (aiohttp.ClientConnectorError,)
_TRANSPORT_ERRORS = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,
    OSError,
    TimeoutError,
)


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect: {e.os_error or e}"
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}"


class _OwnError(Exception):
    """An error the router made itself while sending to a region (a bug, a
    URL it could not build): never the region's failure."""


def _region_failure(e: BaseException) -> bool:
    return isinstance(e, _TRANSPORT_ERRORS) and not isinstance(e, aiohttp.InvalidURL)


# -- the proxy -----------------------------------------------------------------


class Proxy:
    """Routes requests to regions (see the module docstring). The namespace
    state it reads (``synced_once``, ``etcd_ok``) is kept up to date by the
    application (``cluster.router.app.Router``)."""

    def __init__(self, cfg: RouterConfig, ns: Namespace, table: RegionTable) -> None:
        self.cfg = cfg
        self.ns = ns
        self.table = table
        self.domain = normalize_domain(cfg.domain)
        self.uploads: OrderedDict[str, str] = OrderedDict()  # upload id -> region
        self.synced_once = False
        self.etcd_ok: bool | None = None  # did the last check reach the namespace store?
        self.requests = 0
        self.retries = 0
        self.hedges = 0
        self.shared_heads = 0
        self.errors = 0
        # Verifying HEADs in flight (see _redirect_blob): key -> (region, grant) or None
        self._heads: dict[tuple, asyncio.Future[tuple[Region, str | None] | None]] = {}
        self._routed: dict[tuple[str, str], Counter] = {}
        # Manifest GET/HEAD answered from the router's cache (cluster.router.cache).
        self.manifests = ManifestAnswers(
            ns,
            table,
            domain=self.domain,
            default_registry=cfg.registry,
            max_bytes=cfg.manifest_cache,
            usage_interval=cfg.usage_interval,
            audit_flush=cfg.audit_flush_interval,
            name=f"router-{socket.gethostname()}-{cfg.port}{worker_suffix()}",
        )

    # -- registry selection (as the node's) -----------------------------------

    def registry_for(self, request: web.Request) -> str:
        """The registry the request is for (``RegistryError`` NAME_INVALID for
        a Host whose label is no registry name)."""
        return registry_for_host(target_host(request), self.domain, self.cfg.registry)

    # -- entry point -------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        try:
            return await self._handle(request)
        except RegistryError as e:
            return error_response(e)
        except _OwnError as e:
            # The router's own fault: logged, answered 500, held against no region.
            self.errors += 1
            log.error("%s %s: %s", request.method, request.path, e, exc_info=e.__cause__)
            return _error(500, Code.UNAVAILABLE, "internal error in the router", str(e))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/v2":
            route: paths.Route | None = paths.Route("base")
        elif path.startswith(paths.PREFIX):
            route = paths.parse(path[len(paths.PREFIX) :])
        else:
            route = None
        if route is None:
            # Nothing a region would serve either: answered here, never proxied.
            raise RegistryError(Code.UNSUPPORTED, "no such endpoint", {"path": path}, status=404)
        kind = route.kind
        # Judged here as the node judges them, in the same order.
        name = check_name(route.name) if route.name else ""
        reg = self.registry_for(request) if kind != "base" else self.cfg.registry
        if not self.table.regions:
            why = "no regions known yet" if self.synced_once else "namespace not loaded yet"
            return _error(503, Code.UNAVAILABLE, f"the router has {why}; retry shortly")
        method = request.method
        host_named = reg != self.cfg.registry
        pin = request.query.get(PIN)
        if kind == "uploads":
            if method == "POST":
                return await self._start_upload(request, reg, pin, host_named)
            return await self._read_or_write(request, self.table.nearest())
        if kind == "upload":
            return await self._upload(request, name, route.arg, pin, host_named)
        cached = kind == "manifest" and method in ("GET", "HEAD") and self.manifests.enabled
        fetching: str | None = None  # the digest whose bytes this GET fetches for others
        if cached and not pin:
            hit = await self.manifests.answer(request, reg, name, route.arg, route)
            if hit is None and method == "GET":
                hit, fetching = await self.manifests.shared_miss(
                    request, reg, name, route.arg, route
                )
            if hit is not None:
                return hit
        try:
            return await self._route(request, reg, name, route, pin, host_named, cached)
        finally:
            if fetching is not None:
                self.manifests.fetched(fetching)

    async def _route(
        self,
        request: web.Request,
        reg: str,
        name: str,
        route: paths.Route,
        pin: str | None,
        host_named: bool,
        cached: bool,
    ) -> web.StreamResponse:
        """What ``_handle`` does not answer itself: to the regions."""
        kind, method = route.kind, request.method
        if kind == "blob" and method == "HEAD" and self.manifests.enabled and not pin:
            hit = await self.manifests.blob_head(request, reg, name, route.arg, route)
            if hit is not None:
                return hit
        holders: list[str] | None = None
        replicas = await self._replicas(reg)
        if kind == "blob":
            holders = await self._holders(reg, route.arg)
            if method == "GET" and self.cfg.redirect_blobs and not host_named:
                cands = self.table.within(self.table.holders_first(holders), replicas, only=False)
                cands = self._pinned(pin, cands)
                return await self._redirect_blob(request, reg, route, cands, holders)
        elif kind == "manifest" and method in ("GET", "HEAD"):
            ref = route.arg
            found = ref if ":" in ref else await self._tag(reg, name, ref)
            if found:
                holders = await self._holders(reg, found)
        write = method not in ("GET", "HEAD")
        cands = self.table.within(self.table.ranked(holders), replicas, only=write)
        resp = await self._read_or_write(request, self._pinned(pin, cands), holders)
        if cached and method == "GET":
            self.manifests.learn(reg, name, resp)
        return resp

    async def _fresh(self, coro: Awaitable[object]) -> object:
        """A read straight from the store, for what the watch-fed cache does
        not know (yet): content pushed an instant ago, or never. Bounded;
        skipped while the store is unreachable."""
        if self.etcd_ok is False:
            with contextlib.suppress(BaseException):
                coro.close()  # type: ignore[attr-defined]
            return None
        try:
            return await asyncio.wait_for(coro, FRESH_READ_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception:
            return None

    async def _replicas(self, reg: str) -> set[str] | None:
        """The regions that hold ``reg`` (None: every region). A registry
        whose config this router has not seen yet (created an instant ago)
        is read from the store once."""
        if reg != self.cfg.registry and not self.ns.registry_config(reg):
            await self._fresh(self.ns.fresh_registry_config(reg))
        return self.ns.registry_replicas(reg)

    async def _holders(self, reg: str, digest: str) -> list[str] | None:
        places = self.ns.placements(reg, digest)
        if places:
            return list(places)
        if not is_digest(digest):
            return None
        prefix = place_key(reg, digest, "")
        entries = await self._fresh(self.ns.refresh(prefix))
        if not entries:
            return None
        return [e.key[len(prefix) :] for e in entries]  # type: ignore[attr-defined]

    async def _tag(self, reg: str, name: str, tag: str) -> str | None:
        found = self.ns.tag(reg, name, tag)
        if found is None and TAG_RE.match(tag):
            entry = await self._fresh(self.ns.kv.get(tag_key(reg, name, tag)))
            if entry is not None:
                found = entry.value.decode(errors="replace")  # type: ignore[attr-defined]
        return found

    def _pinned(self, pin: str | None, cands: list[Region]) -> list[Region]:
        if not pin:
            return cands
        r = self.table.entry(pin)
        if r is None or not r.base:
            return cands
        return [r] + [c for c in cands if c is not r]

    # -- forwarding ----------------------------------------------------------

    def _headers(self, request: web.Request, with_length: bool = True) -> CIMultiDict[str]:
        h: CIMultiDict[str] = CIMultiDict()
        for k, v in request.headers.items():
            if k.lower() not in _HOP:
                h.add(k, v)
        host = target_host(request)
        h["Host"] = host
        h["X-Forwarded-Host"] = host
        h["X-Forwarded-Proto"] = request.scheme
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        h["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        if with_length and request.content_length is not None and not _chunked(request):
            h["Content-Length"] = str(request.content_length)
        return h

    def _count(self, region: Region, action: str) -> None:
        c = self._routed.get((region.name, action))
        if c is None:
            c = self._routed[(region.name, action)] = ROUTED.labels(region.name, action)
        c.inc()
        region.routed += 1
        if action == "redirect":
            region.redirected += 1

    def _sender(
        self,
        method: str,
        raw_path: str,
        headers: CIMultiDict[str],
        data: object = None,
        *,
        buffer: bool = True,
        expect100: bool = False,
    ) -> Callable[[Region], Awaitable[_Up]]:
        async def send(region: Region) -> _Up:
            assert region.session is not None
            t0 = time.perf_counter()
            body = data() if callable(data) else data
            resp = await region.session.request(
                method,
                URL(region.base + raw_path, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                expect100=expect100,
            )
            try:
                elapsed = time.perf_counter() - t0
                length = resp.content_length
                if buffer and (
                    method == "HEAD"
                    or resp.status in (204, 304)
                    or (length is not None and length <= BUFFER_MAX)
                ):
                    content = await resp.read()
                    resp.release()
                    return _Up(region, resp, content, elapsed)
                return _Up(region, resp, None, elapsed)
            except BaseException:
                resp.release()
                raise

        return send

    async def _race(
        self,
        cands: list[Region],
        send: Callable[[Region], Awaitable[_Up]],
        *,
        hedge: bool,
        retry_404: Callable[[Region], bool] | None = None,
        latency_sample: bool = True,
    ) -> tuple[_Up | None, str]:
        """Send an idempotent request to ``cands`` in order: the next one
        when one fails, or (``hedge``) when the newest has not answered
        within its hedging delay. The first good answer wins; the others
        are cancelled. Returns (answer, "") or, when no region gave a good
        one, (the last bad answer or None, why)."""
        loop = asyncio.get_running_loop()
        last_timeout = self.cfg.request_timeout
        pending: dict[asyncio.Task[_Up], tuple[Region, float, float]] = {}
        fallback: _Up | None = None
        why = "no region could be reached"
        i = 0
        newest: tuple[Region, float] | None = None

        def launch() -> None:
            nonlocal i, newest
            r = cands[i]
            i += 1
            now = loop.time()
            limit = r.attempt_timeout(last_timeout) if i < len(cands) else last_timeout
            t = asyncio.ensure_future(send(r))
            pending[t] = (r, now, now + limit)
            newest = (r, now)

        if not cands:
            return None, "no region has a usable endpoint"
        launch()
        try:
            while pending:
                now = loop.time()
                wake = min(d for _, _, d in pending.values())
                hedge_at = None
                if hedge and i < len(cands) and newest is not None:
                    hedge_at = newest[1] + newest[0].hedge_delay()
                    wake = min(wake, hedge_at)
                done, _ = await asyncio.wait(
                    pending, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
                )
                now = loop.time()
                failed_now = False
                for t in done:
                    r, started, _ = pending.pop(t)
                    exc = t.exception()
                    if exc is not None and not _region_failure(exc):
                        if fallback is not None and fallback.body is None:
                            fallback.resp.release()
                        raise _OwnError(f"sending to {r.name}: {_describe(exc)}") from exc
                    if exc is not None:
                        failed_now = True
                        fatal = isinstance(exc, _CONNECT_ERRORS + (TimeoutError,)) or isinstance(
                            exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
                        )
                        why = f"{r.name}: {_describe(exc)}"
                        self.table.report_error(r, why, fatal=fatal)
                        continue
                    up = t.result()
                    status = up.resp.status
                    bad = status >= 500 or (
                        status == 404 and retry_404 is not None and retry_404(r)
                    )
                    if not bad:
                        self.table.report_ok(r, up.elapsed if latency_sample else None)
                        return up, ""
                    failed_now = True
                    if status >= 500:
                        why = f"{r.name} answered {status}"
                        self.table.report_error(r, why, fatal=False)
                    else:
                        why = f"{r.name} does not hold it"
                        self.table.report_ok(r, None)
                    if fallback is not None and fallback.body is None:
                        fallback.resp.release()
                    fallback = up
                # attempts past their deadline: judged hung
                for t, (r, started, deadline) in list(pending.items()):
                    if now >= deadline:
                        t.cancel()
                        del pending[t]
                        why = f"{r.name}: no answer in {now - started:.2f}s"
                        self.table.report_error(r, why, fatal=True)
                        failed_now = True
                if i < len(cands) and (
                    not pending or failed_now or (hedge_at is not None and now >= hedge_at)
                ):
                    if pending:
                        self.hedges += 1
                        HEDGES.inc()
                    else:
                        self.retries += 1
                        RETRIES.labels("failure").inc()
                    launch()
            return fallback, why
        finally:
            for t, (r, started, _) in pending.items():
                if t.done():
                    if not t.cancelled() and t.exception() is None and t.result().body is None:
                        t.result().resp.release()
                    continue
                t.cancel()
                self.table.report_slow(r, loop.time() - started)
            for t in pending:
                with contextlib.suppress(BaseException):
                    await t

    async def _respond(
        self, request: web.Request, up: _Up, action: str = "proxy", rewrite: Callable | None = None
    ) -> web.StreamResponse:
        """The region's answer, to the client: whole, or streamed."""
        resp = up.resp
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in resp.headers.items():
            if k.lower() not in _RESP_DROP:
                headers.add(k, v)
        headers["X-Meridian-Region"] = up.region.name
        if up.region.node:
            headers["X-Meridian-Node"] = up.region.node
        if rewrite is not None:
            rewrite(headers)
        self._count(up.region, action)
        if up.body is not None:
            if request.method == "HEAD" or resp.status in (204, 304):
                if resp.content_length is not None and resp.status not in (204, 304):
                    headers["Content-Length"] = str(resp.content_length)
                return web.Response(status=resp.status, headers=headers)
            return web.Response(status=resp.status, headers=headers, body=up.body)
        try:
            out = web.StreamResponse(status=resp.status, headers=headers)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_chunked(STREAM_CHUNK):
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            resp.release()

    # -- reads and plain writes -----------------------------------------------

    async def _read_or_write(
        self,
        request: web.Request,
        cands: list[Region],
        holders: list[str] | None = None,
    ) -> web.StreamResponse:
        method = request.method
        if method in ("GET", "HEAD", "OPTIONS"):
            retry_404 = None
            if holders:
                held = set(holders)

                def retry_404(r: Region) -> bool:
                    return r.name not in held

            send = self._sender(method, target(request), self._headers(request))
            up, why = await self._race(
                cands, send, hedge=self.cfg.hedge, retry_404=retry_404, latency_sample=True
            )
            if up is None:
                return _error(503, Code.UNAVAILABLE, "no region could answer; retry shortly", why)
            return await self._respond(request, up)
        return await self._write(request, cands)

    async def _write(
        self,
        request: web.Request,
        cands: list[Region],
        rewrite: Callable[[_Up], Callable | None] | None = None,
        *,
        strict: bool = False,
    ) -> web.StreamResponse:
        """Proxy a write to the first region that takes it, moving on to the
        next when the connection fails before any of the body was sent (a
        streamed body waits for the region's ``100 Continue``, so a region
        that is gone -- even behind a proxy that accepts the connection --
        is found out before the client's bytes are consumed; a manifest is
        buffered and can be sent again). ``strict``: one region only (an
        upload session's)."""
        method = request.method
        headers = self._headers(request)
        data: object = None
        body: _Body | None = None
        if request.body_exists:
            length = request.content_length
            if (
                method == "PUT"
                and "/manifests/" in request.path
                and length is not None
                and length <= MANIFEST_MAX
            ):
                data = await request.read()
            else:
                body = _Body(request.content)
                data = body.stream
        why = "no region could be reached"
        for n, r in enumerate(cands[:1] if strict else cands):
            if n:
                self.retries += 1
                RETRIES.labels("write").inc()
            send = self._sender(method, target(request), headers, data, expect100=body is not None)
            try:
                up = await send(r)
            except Exception as e:
                why = f"{r.name}: {_describe(e)}"
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise  # the client went away: not the region's fault
                if not _region_failure(e):
                    raise _OwnError(f"sending to {r.name}: {_describe(e)}") from e
                self.table.report_error(r, why, fatal=True)
                sent = body is not None and body.started
                if not sent and isinstance(e, aiohttp.ClientConnectionError):
                    continue
                return _error(
                    502 if sent else 503,
                    Code.UNAVAILABLE,
                    f"region {r.name} failed during the request; retry",
                    why,
                )
            if up.resp.status < 500 or up.resp.status == 503:
                self.table.report_ok(r, None)
            else:
                self.table.report_error(r, f"{r.name} answered {up.resp.status}", fatal=False)
            return await self._respond(request, up, rewrite=rewrite(up) if rewrite else None)
        return _error(503, Code.UNAVAILABLE, "no region could take the request; retry shortly", why)

    # -- blobs ---------------------------------------------------------------

    async def _head_key(
        self, request: web.Request, reg: str, route: paths.Route, cands: list[Region]
    ) -> tuple | None:
        """What makes two blob GETs' verifying HEADs the same question: the
        same blob of the same repository, asked of the same regions in the
        same order, for the same identity from the same address (the
        router's own authorization decision, ``cluster.auth.access``, names
        the identity behind a bearer token); None when the request is not
        one the router can judge so (no valid bearer token: the region
        answers it)."""
        try:
            access = await self.manifests.auth.authorize(request, reg, route)
        except RegistryError:
            return None  # its own HEAD: the region answers the refusal
        source = self.manifests.auth.source(request)
        who = (access.kind, access.name, access.registry, source, target_host(request))
        return (route.name, route.arg, who, tuple(r.key for r in cands))

    async def _redirect_blob(
        self,
        request: web.Request,
        reg: str,
        route: paths.Route,
        cands: list[Region],
        holders: list[str] | None,
    ) -> web.StreamResponse:
        credentials = "Authorization" in request.headers
        if not self.cfg.verify_redirects and not credentials:
            dest = next((r for r in cands if r.up), cands[0] if cands else None)
            return self._redirect(request, dest, None)
        key = await self._head_key(request, reg, route, cands) if credentials else None
        if key is None:
            return await self._verified_redirect(request, cands, holders)
        shared = self._heads.get(key)
        if shared is not None:
            # The same HEAD is in flight: its answer, given after this request
            # arrived, is as fresh as this request's own would be.
            got = await asyncio.shield(shared)
            if got is not None and got[0].up:
                self.shared_heads += 1
                SHARED.inc()
                return self._redirect(request, *got)
            return await self._verified_redirect(request, cands, holders)
        fut = asyncio.get_running_loop().create_future()
        self._heads[key] = fut
        try:
            return await self._verified_redirect(request, cands, holders, fut)
        finally:
            if not fut.done():
                fut.set_result(None)  # no 200 (or this request was cancelled)
            del self._heads[key]

    async def _verified_redirect(
        self,
        request: web.Request,
        cands: list[Region],
        holders: list[str] | None,
        answer: asyncio.Future[tuple[Region, str | None] | None] | None = None,
    ) -> web.StreamResponse:
        """Redirect to the first region that answers the blob's ``HEAD`` with
        200 (and, for a client with credentials, checks them and grants the
        blob); ``answer`` learns that region and grant (None: no 200)."""
        credentials = "Authorization" in request.headers
        # The region answers HEAD for the blob (and, for a
        # client with credentials, checks them and grants the blob).
        held = set(holders or ())

        def retry_404(r: Region) -> bool:
            return bool(held) and r.name not in held

        headers = self._headers(request, with_length=False)
        headers.popall("Range", None)
        headers.popall(GRANT_HEADER, None)
        if credentials:
            headers[GRANT_HEADER] = "want"
        send = self._sender("HEAD", target(request), headers)
        up, why = await self._race(
            cands, send, hedge=self.cfg.hedge, retry_404=retry_404, latency_sample=True
        )
        if up is None:
            return _error(503, Code.UNAVAILABLE, "no region could answer; retry shortly", why)
        if up.resp.status == 200:
            dest = up.region
            grant = up.resp.headers.get(GRANT_HEADER)
            if answer is not None:
                answer.set_result((dest, grant))
        elif up.resp.status == 401:
            return self._unauthorized(up)
        else:
            # Not there (404) or refused: let the region answer the GET
            # itself, with its error body.
            return await self._read_or_write(
                request, [up.region] + [r for r in cands if r is not up.region]
            )
        return self._redirect(request, dest, grant)

    def _redirect(
        self, request: web.Request, dest: Region | None, grant: str | None
    ) -> web.StreamResponse:
        if dest is None:
            return _error(503, Code.UNAVAILABLE, "no region is known", None)
        self._count(dest, "redirect")
        location = target(request)
        headers = {**API_HEADERS, "X-Meridian-Region": dest.name, "Content-Length": "0"}
        if dest.node:
            headers["X-Meridian-Node"] = dest.node
        if grant:
            location = with_param(location, GRANT_PARAM, grant)
            headers["Cache-Control"] = "no-store"  # the grant expires in a minute
        headers["Location"] = dest.base + location
        return web.Response(status=307, headers=headers)

    def _unauthorized(self, up: _Up) -> web.Response:
        """The region's ``401`` to a verifying ``HEAD``, as the answer to the
        client's GET: its challenge (the realm is this router's token
        endpoint: the region saw ``X-Forwarded-Host``) and an error body."""
        headers: CIMultiDict[str] = CIMultiDict(API_HEADERS)
        for v in up.resp.headers.getall("WWW-Authenticate", []):
            headers.add("WWW-Authenticate", v)
        headers["X-Meridian-Region"] = up.region.name
        self._count(up.region, "proxy")
        body = RegistryError(Code.UNAUTHORIZED, "authentication required").body()
        return web.Response(status=401, headers=headers, body=body, content_type="application/json")

    # -- the token endpoint ------------------------------------------------------

    async def token(self, request: web.Request) -> web.StreamResponse:
        """``GET``/``POST /oauth2/token`` and the management API
        (``/meridian/v1/...`` of the nodes: every region serves it, writes go
        to the namespace), proxied to the nearest region that answers; on a
        region's failure (connection error, timeout, 5xx) the next one. A
        write is retried only when the region could not be reached: one that
        timed out may have done it. Neither the body nor ``Authorization``
        is logged."""
        self.requests += 1
        try:
            return await self._token(request)
        except RegistryError as e:
            return error_response(e)
        except _OwnError as e:
            self.errors += 1
            log.error("%s %s: %s", request.method, request.path, e)
            return _error(500, Code.UNAVAILABLE, "internal error in the router", str(e))

    async def _token(self, request: web.Request) -> web.StreamResponse:
        if not self.table.regions:
            why = "no regions known yet" if self.synced_once else "namespace not loaded yet"
            return _error(503, Code.UNAVAILABLE, f"the router has {why}; retry shortly")
        data: bytes | None = None
        idempotent = request.method in ("GET", "HEAD") or request.path == TOKEN_PATH
        if request.method not in ("GET", "HEAD"):
            if (request.content_length or 0) > TOKEN_BODY_MAX:
                raise RegistryError(Code.SIZE_INVALID, "token request too large", status=413)
            buf = bytearray()
            async for chunk in request.content.iter_chunked(STREAM_CHUNK):
                buf += chunk
                if len(buf) > TOKEN_BODY_MAX:
                    raise RegistryError(Code.SIZE_INVALID, "token request too large", status=413)
            data = bytes(buf)
        headers = self._headers(request, with_length=False)
        send = self._sender(request.method, target(request), headers, data)
        cands = self.table.ranked(None)
        why = "no region could be reached"
        for n, r in enumerate(cands):
            if r.session is None:
                continue
            if n:
                self.retries += 1
                RETRIES.labels("token").inc()
            last = n == len(cands) - 1
            limit = self.cfg.request_timeout
            if not last:
                limit = min(limit, max(TOKEN_ATTEMPT_MIN, r.attempt_timeout(limit)))
            try:
                up = await asyncio.wait_for(send(r), limit)
            except Exception as e:
                if not _region_failure(e):
                    raise _OwnError(f"sending to {r.name}: {_describe(e)}") from e
                why = f"{r.name}: {_describe(e)}"
                fatal = not isinstance(e, TimeoutError)
                self.table.report_error(r, why, fatal=fatal)
                if not idempotent and not fatal:
                    break  # it may have been done: the client decides
                continue
            if up.resp.status >= 500 and (idempotent or up.resp.status == 503):
                why = f"{r.name} answered {up.resp.status}"
                self.table.report_error(r, why, fatal=False)
                if up.body is None:
                    up.resp.release()
                continue
            self.table.report_ok(r, None)
            return await self._respond(request, up)
        return _error(503, Code.UNAVAILABLE, "no region could answer; retry shortly", why)

    # -- uploads -------------------------------------------------------------

    def _remember(self, upload_id: str, region: str) -> None:
        self.uploads[upload_id] = region
        self.uploads.move_to_end(upload_id)
        while len(self.uploads) > 100_000:
            self.uploads.popitem(last=False)

    def _location_rewriter(self, host_named: bool) -> Callable[[_Up], Callable | None]:
        """Rewrite an upload ``Location`` to the session's region (absolute,
        so the data goes there directly) or, for a registry named by the
        Host, to the router itself -- pinned to the region either way."""
        direct = self.cfg.direct_uploads and not host_named

        def for_answer(up: _Up) -> Callable | None:
            region = up.region

            def rewrite(headers: CIMultiDict[str]) -> None:
                loc = headers.get("Location")
                if not loc or "/blobs/uploads/" not in loc:
                    return
                if loc.startswith(region.base + "/"):
                    loc = loc[len(region.base) :]
                if not loc.startswith("/v2/"):
                    return
                path, _, query = loc.partition("?")
                upload_id = path.rsplit("/", 1)[-1]
                if upload_id:
                    self._remember(upload_id, region.key)
                params = [p for p in query.split("&") if p and not p.startswith(PIN + "=")]
                params.append(f"{PIN}={quote(region.key, safe='')}")
                loc = f"{path}?{'&'.join(params)}"
                headers["Location"] = (region.base + loc) if direct else loc

            return rewrite

        return for_answer

    async def _start_upload(
        self, request: web.Request, reg: str, pin: str | None, host_named: bool
    ) -> web.StreamResponse:
        mount = request.query.get("mount")
        holders = await self._holders(reg, mount) if mount else None
        replicas = await self._replicas(reg)  # a push goes to a replica region
        cands = self.table.within(self.table.ranked(holders), replicas, only=True)
        cands = self._pinned(pin, cands)
        return await self._write(request, cands, self._location_rewriter(host_named))

    async def _upload(
        self, request: web.Request, name: str, upload_id: str, pin: str | None, host_named: bool
    ) -> web.StreamResponse:
        owner: Region | None = None
        if pin:
            owner = self.table.entry(pin)
            if owner is None or not owner.base:
                return _error(
                    404,
                    Code.BLOB_UPLOAD_UNKNOWN,
                    "the upload URL names a region this router does not know",
                    {"uuid": upload_id, "region": pin},
                )
        else:
            known = self.uploads.get(upload_id)
            owner = self.table.entry(known) if known else None
            if owner is None:
                owner = await self._find_upload(request, name, upload_id)
            if owner is None:
                return _error(
                    404, Code.BLOB_UPLOAD_UNKNOWN, "no region has this upload", {"uuid": upload_id}
                )
        # The session's node; out of rotation, its region's healthy nodes
        # (nodes sharing a data dir share the session) before it.
        cands = [owner]
        if not owner.up:
            cands = [m for m in self.table.nearest() if m.up and m.name == owner.name] + cands
        return await self._write(request, cands, self._location_rewriter(host_named), strict=True)

    async def _find_upload(self, request: web.Request, name: str, upload_id: str) -> Region | None:
        """Ask every region whether it has the session (GET of the upload URL)."""
        headers = self._headers(request, with_length=False)
        path = request.rel_url.raw_path

        async def ask(r: Region) -> Region | None:
            assert r.session is not None
            try:
                async with r.session.get(
                    URL(r.base + path, encoded=True),
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=2.0),
                ) as resp:
                    await resp.read()
                    return r if resp.status == 204 else None
            except (aiohttp.ClientError, OSError, TimeoutError):
                return None

        regions = [r for r in self.table.nearest() if r.session is not None]
        for fut in asyncio.as_completed([ask(r) for r in regions]):
            r = await fut
            if r is not None:
                self._remember(upload_id, r.key)
                return r
        return None


def with_param(raw_target: str, name: str, value: str) -> str:
    """``raw_target`` (path and query, encoded) with query parameter
    ``name`` set to ``value`` (URL-encoded), replacing any it had."""
    path, _, query = raw_target.partition("?")
    params = [p for p in query.split("&") if p and not p.startswith(name + "=")]
    params.append(f"{name}={quote(value, safe='')}")
    return f"{path}?{'&'.join(params)}"


def _chunked(request: web.Request) -> bool:
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()
