"""Manifests answered by the router itself, from a bounded cache.

A manifest is immutable by its digest and the router holds the namespace
(watch-fed), so a manifest ``GET``/``HEAD`` -- by digest, or by tag through
the namespace's tag table -- needs no hop to a region once the router has
the bytes. The router answers one itself only when a node would answer
``200`` with the same bytes and headers; any other case is proxied as
before, so every refusal and error still comes from a node, unchanged:

- the reference resolves in the router's namespace to a manifest record of
  that repository (a tag moved, a manifest deleted: as soon as the watch
  sees it, the new digest is looked up, or the request is proxied);
- the registry exists and is not being deleted (``cluster.registries``);
- authorization is the node's own decision (``cluster.auth.access``:
  network rules, bearer token, subject still valid, ``pull`` scope; no
  valid token: proxied, the node answers the challenge);
- no read lock on the repository, the tag or the digest
  (``Namespace.check_read``);
- the client's ``Accept`` takes the manifest's media type;
- the registry's tier allows another read this minute (the router keeps its
  own window, as each node does; over it the router answers the ``429``).

The bytes: a manifest ``GET`` the router proxied and a region answered
``200`` is kept when its body hashes to its digest, matches the record's
size and is at most ``ITEM_MAX`` bytes; least recently used manifests go
first past ``--manifest-cache`` bytes (0 turns the cache off). Authorized
GETs of a manifest whose bytes a proxied GET is fetching wait for it and
are answered from the cache (``shared_miss``): a rollout right after a push
costs one proxied GET, not one per node that asks before the bytes arrive. ``HEAD``
needs no bytes (the record's size), and is answered for any manifest record
the router sees. A blob ``HEAD`` (without ``Range``, ``If-None-Match`` or a
blob grant) is answered the same way from the namespace: the blob linked
into the repository, its size.

Answers carry the node's headers (``Content-Type`` the record's media type,
``Docker-Content-Digest``, ``ETag``, ``Content-Length``, the API version),
plus ``X-Meridian-Region`` (the region the proxy would have chosen, which
the pull is accounted to) and ``X-Meridian-Cache: hit``.

Accounting: a ``GET`` answered here counts a pull and its bytes for the
usage records (``cluster.usage``) of that region, flushed every
``--usage-interval`` seconds like a node's, and a pull audit record
(``cluster.audit``: counted per minute, registry, repository, identity and
source address, written every ``--audit-flush-interval`` seconds under the
name ``router-<host>-<port>-<region>`` with that region).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter, Gauge

from cluster.audit import AuditLog, identity_of
from cluster.auth.access import GRANT_HEADER, GRANT_PARAM, Access, Authorizer
from cluster.namespace import Locked, ManifestRecord, Namespace
from cluster.registries import Guard, Limits
from cluster.usage import Counters, UsageRecorder
from ocidist import mediatypes as mt
from ocidist.digests import TAG_RE, compute, is_digest
from ocidist.errors import RegistryError
from ocidist.mediatypes import acceptable, accepted
from ocidist.paths import API_HEADERS, Route

if TYPE_CHECKING:
    from cluster.router.table import RegionTable

log = logging.getLogger("meridian.router")

ITEM_MAX = 256 << 10  # manifests larger than this are never cached

CACHE = Counter(
    "meridian_router_manifest_cache_total",
    "Manifest GET/HEAD the router answered from its cache (hit) or proxied (miss)",
    ["result"],
)
CACHE_BYTES = Gauge(
    "meridian_router_manifest_cache_bytes",
    "Bytes of manifests cached",
    multiprocess_mode="livesum",  # every router process (--workers) has its own cache
)
_HIT = CACHE.labels("hit")
_MISS = CACHE.labels("miss")


class Entry:
    """A cached manifest: its bytes and its answer's headers."""

    __slots__ = ("body", "get_headers", "head_headers")

    def __init__(self, rec: ManifestRecord, body: bytes) -> None:
        self.body = body
        base = {
            "Content-Type": rec.media_type,
            "Docker-Content-Digest": rec.digest,
            "ETag": f'"{rec.digest}"',
            **API_HEADERS,
            "X-Meridian-Cache": "hit",
        }
        self.get_headers = base
        self.head_headers = {**base, "Content-Length": str(rec.size)}


class ManifestBytes:
    """Manifest bytes by digest, least recently used first out past
    ``max_bytes``; only bytes that hash to their digest get in."""

    def __init__(self, max_bytes: int, item_max: int = ITEM_MAX) -> None:
        self.max_bytes = max_bytes
        self.item_max = item_max
        self.used = 0
        self.items: OrderedDict[str, Entry] = OrderedDict()

    def get(self, digest: str) -> Entry | None:
        e = self.items.get(digest)
        if e is not None:
            self.items.move_to_end(digest)
        return e

    def put(self, rec: ManifestRecord, body: bytes) -> bool:
        """Keep ``body`` as ``rec``'s bytes if it is them (hash and size)."""
        n = len(body)
        if n > self.item_max or n > self.max_bytes or n != rec.size or rec.digest in self.items:
            return False
        alg = rec.digest.partition(":")[0]
        try:
            if compute(body, alg) != rec.digest:
                log.warning("a region's manifest bytes do not match %s: not cached", rec.digest)
                return False
        except ValueError:  # an algorithm hashlib lacks
            return False
        self.items[rec.digest] = Entry(rec, body)
        self.used += n
        while self.used > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.used -= len(old.body)
        CACHE_BYTES.set(self.used)
        return True


class ManifestAnswers:
    """Answers manifest GET/HEAD from the cache when a node would answer
    200 (see the module docstring); ``None`` means: proxy it."""

    def __init__(
        self,
        ns: Namespace,
        table: RegionTable,
        *,
        domain: str,
        default_registry: str,
        max_bytes: int,
        usage_interval: float = 60.0,
        audit_flush: float = 60.0,
        name: str = "router",
    ) -> None:
        self.ns = ns
        self.table = table
        self.default_registry = default_registry
        self.auth = Authorizer(ns, domain=domain, default_registry=default_registry)
        self.guard = Guard(ns, default_registry)
        self.bytes = ManifestBytes(max_bytes)
        self.usage_interval = usage_interval
        # region -> the pulls answered here, flushed into its usage records
        self.recorders: dict[str, UsageRecorder] = {}
        self.audit_flush = audit_flush
        self.name = name  # of this router in audit records (with the region)
        self.audits: dict[str, AuditLog] = {}  # region -> pulls answered here
        self.hits = 0
        # digest -> done when the proxied GET fetching its bytes is over (shared_miss)
        self._fetching: dict[str, asyncio.Future[None]] = {}

    @property
    def enabled(self) -> bool:
        return self.bytes.max_bytes > 0

    # -- the request path --------------------------------------------------------

    def resolve(self, reg: str, name: str, ref: str) -> ManifestRecord | None:
        """The manifest record ``ref`` names in the router's namespace."""
        if ":" in ref:
            if not is_digest(ref):
                return None
            digest: str | None = ref
        else:
            if not TAG_RE.match(ref):
                return None
            digest = self.ns.tag(reg, name, ref)
        return self.ns.manifest(reg, name, digest) if digest else None

    async def _admitted(
        self, request: web.Request, reg: str, route: Route
    ) -> tuple[Access, Limits | None] | None:
        """The node's checks before any handler: the registry exists (not
        being deleted) and the request is authorized; None: proxy it."""
        lim = None
        if reg != self.default_registry:
            try:
                lim = await self.guard.admit(reg)
            except RegistryError:
                return None
        try:
            return await self.auth.authorize(request, reg, route), lim
        except RegistryError:
            return None  # the node answers the refusal

    def _counted(self, reg: str, lim: Limits | None) -> None:
        if lim is not None:
            self.guard.count(reg, lim, False)  # 429 past the tier's reads per minute
        self.hits += 1
        _HIT.inc()

    async def answer(
        self, request: web.Request, reg: str, name: str, ref: str, route: Route
    ) -> web.Response | None:
        """A manifest GET or HEAD, or None."""
        rec = self.resolve(reg, name, ref)
        if rec is None:
            return None
        get = request.method == "GET"
        entry = self.bytes.get(rec.digest)
        if entry is None:
            if get:
                return None  # see shared_miss
            entry = Entry(rec, b"")  # HEAD: the record's size is enough
        ok = await self._admitted(request, reg, route)
        if ok is None:
            return None
        access, lim = ok
        try:
            self.ns.check_read(reg, name, (ref, rec.digest) if ref != rec.digest else (ref,))
        except Locked:
            return None  # the node's 403
        accept = request.headers.getall("Accept", ())
        if accept and not acceptable(rec.media_type, accepted(accept)):
            return None
        self._counted(reg, lim)
        region = self._region(reg, rec.digest)
        if not get:
            return web.Response(headers={**entry.head_headers, "X-Meridian-Region": region})
        self._counters(region).pull(reg, len(entry.body))
        self._audit(region).pull(reg, name, identity_of(access), self.auth.source(request))
        return web.Response(
            body=entry.body, headers={**entry.get_headers, "X-Meridian-Region": region}
        )

    async def shared_miss(
        self, request: web.Request, reg: str, name: str, ref: str, route: Route
    ) -> tuple[web.Response | None, str | None]:
        """A manifest GET ``answer`` did not answer. When its bytes are not
        cached but a proxied GET is fetching them now, wait for it and answer
        from the cache: the nodes of a rollout asking at once for an image
        pushed an instant ago cost one proxied GET. Returns (the answer,
        None), or (None, digest) when this request is to fetch them -- the
        caller proxies it, ``learn``s and then calls ``fetched(digest)`` --
        or (None, None): proxy it."""
        rec = self.resolve(reg, name, ref)
        if rec is None or rec.digest in self.bytes.items:
            return None, None  # answer() said no for another reason
        cacheable = rec.size <= min(self.bytes.item_max, self.bytes.max_bytes)
        if cacheable and await self._admitted(request, reg, route) is None:
            cacheable = False  # the node refuses it: no use waiting, nor fetching for others
        pending = self._fetching.get(rec.digest) if cacheable else None
        if pending is not None:
            await asyncio.shield(pending)
        if cacheable and rec.digest in self.bytes.items:  # fetched in the meantime
            hit = await self.answer(request, reg, name, ref, route)
            if hit is not None:
                return hit, None
        _MISS.inc()
        if cacheable and pending is None and rec.digest not in self._fetching:
            self._fetching[rec.digest] = asyncio.get_running_loop().create_future()
            return None, rec.digest
        return None, None

    def fetched(self, digest: str) -> None:
        """The proxied GET ``shared_miss`` named for ``digest`` is over."""
        fut = self._fetching.pop(digest, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def blob_head(
        self, request: web.Request, reg: str, name: str, digest: str, route: Route
    ) -> web.Response | None:
        """A blob HEAD from the namespace (linked into the repository, its
        size), as the node answers one without Range or If-None-Match; None
        for anything else (a grant, a conditional or ranged HEAD)."""
        h = request.headers
        if (
            "Range" in h
            or "If-None-Match" in h
            or GRANT_HEADER in h
            or GRANT_PARAM in request.query
            or not is_digest(digest)
        ):
            return None
        size = self.ns.blob_size(reg, name, digest)
        if size is None:
            return None
        ok = await self._admitted(request, reg, route)
        if ok is None:
            return None
        self._counted(reg, ok[1])
        places = self.ns.placements(reg, digest)
        return web.Response(
            headers={
                **API_HEADERS,
                "Docker-Content-Digest": digest,
                "Content-Type": mt.BLOB,
                "Accept-Ranges": "bytes",
                "ETag": f'"{digest}"',
                "Cache-Control": "max-age=31536000",
                "Content-Length": str(size),
                "X-Meridian-Cache": "hit",
                "X-Meridian-Region": self._region(reg, digest, places),
            }
        )

    def learn(self, reg: str, name: str, resp: web.StreamResponse) -> None:
        """Keep the bytes of a region's ``200`` to a proxied manifest GET."""
        if not self.enabled or resp.status != 200 or not isinstance(resp, web.Response):
            return
        body = resp.body
        digest = resp.headers.get("Docker-Content-Digest")
        if not isinstance(body, bytes) or not digest:
            return
        rec = self.ns.manifest(reg, name, digest)
        if rec is not None:
            self.bytes.put(rec, body)

    def _region(self, reg: str, digest: str, places: dict[str, int] | None = None) -> str:
        """The region a proxied GET would go to first (the pull's region)."""
        if places is None:
            places = self.ns.placements(reg, digest)
        cands = self.table.within(
            self.table.ranked(list(places) if places else None),
            self.ns.registry_replicas(reg),
            only=False,
        )
        return cands[0].name if cands else ""

    # -- accounting ------------------------------------------------------------------

    def _counters(self, region: str) -> Counters:
        r = self.recorders.get(region)
        if r is None:
            r = self.recorders[region] = UsageRecorder(
                self.ns,
                Counters(),
                self.usage_interval,
                self.default_registry,
                region=region,
                counted_only=True,
            )
            r.start()
        return r.counters

    def _audit(self, region: str) -> AuditLog:
        a = self.audits.get(region)
        if a is None:
            a = self.audits[region] = AuditLog(
                self.ns,
                f"{self.name}-{region}",
                flush_interval=self.audit_flush,
                region=region,
                prunes=False,
            )
            a.start()
        return a

    async def close(self) -> None:
        """Stop, and write what was counted (a clean stop loses nothing)."""
        for r in list(self.recorders.values()):
            await r.close()
        for a in list(self.audits.values()):
            await a.close()
