"""The OCI Distribution v1.1 API of one node.

One catch-all route feeds ``Registry.dispatch``, which splits the path from
the right (repository names may nest and contain any of the verbs' words),
validates the name before anything else, and calls the handler.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import IO
from urllib.parse import quote, urlencode

from aiohttp import web

from cluster.kv import KVUnavailable, Put
from cluster.namespace import MAX_TAGS_PER_PUSH, BlobsGone, Locked, ManifestRecord, Namespace
from cluster.registries import Guard
from node import manifests as mf
from node import ranges
from node.auth import GRANT_HEADER, Access, Gate
from node.sendfile import send_file_range
from node.storage.base import BlobNotFound, BlobStore, BlobUnavailable, StorageFull
from node.uploads import Upload, UploadManager
from node.usage import Counters
from node.webhooks.service import ACCESS, Activity
from ocidist import mediatypes as mt
from ocidist import paths
from ocidist.digests import check_name, check_tag, compute, is_digest, parse_digest
from ocidist.errors import (
    Code,
    RegistryError,
    blob_unknown,
    manifest_unknown,
    name_unknown,
    unavailable,
    unsupported,
)
from ocidist.paths import (
    API_HEADERS,
    normalize_domain,
    registry_for_host,
)

log = logging.getLogger("meridian.node")

MAX_PAGE = 10000


class ManifestCache:
    """Recently served manifest bodies by digest, bounded in bytes."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, digest: str) -> bytes | None:
        body = self.items.get(digest)
        if body is not None:
            self.items.move_to_end(digest)
        return body

    def put(self, digest: str, body: bytes) -> None:
        if digest in self.items or len(body) > self.max_bytes // 8:
            return
        self.items[digest] = body
        self.used += len(body)
        while self.used > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.used -= len(old)


def _page_args(request: web.Request) -> tuple[int | None, str | None]:
    n_raw = request.query.get("n")
    n: int | None = None
    if n_raw is not None:
        try:
            n = int(n_raw)
        except ValueError:
            n = -1
        if n < 0:
            raise RegistryError(Code.PAGINATION_NUMBER_INVALID, detail={"n": n_raw})
        n = min(n, MAX_PAGE)
    return n, request.query.get("last")


def _paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    if last:
        import bisect

        start = bisect.bisect_right(items, last)
    else:
        start = 0
    if n is None:
        return items[start:], False
    page = items[start : start + n]
    return page, start + n < len(items)


@functools.lru_cache(maxsize=4096)
def _manifest_headers(media_type: str, digest: str) -> dict[str, str]:
    """A manifest's response headers, made once per manifest (never mutate
    the dict: ``web.Response`` copies it). The API version header is the
    request wrapper's (``node.app.observe_requests``), as for every answer."""
    return {
        "Content-Type": media_type,
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
    }


@functools.lru_cache(maxsize=4096)
def _blob_headers(digest: str) -> dict[str, str]:
    """A blob's response headers, made once per blob (copy before changing)."""
    return {
        **API_HEADERS,
        "Docker-Content-Digest": digest,
        "Content-Type": mt.BLOB,
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
    }


class Registry:
    def __init__(
        self,
        ns: Namespace,
        store: BlobStore,
        uploads: UploadManager,
        *,
        default_registry: str = "default",
        domain: str = "",
        gate: Gate | None = None,
    ) -> None:
        self.ns = ns
        self.gate = gate  # None: the open mode (--no-auth)
        self.store = store
        self.uploads = uploads
        self.default_registry = default_registry
        self.domain = normalize_domain(domain)
        self.manifest_cache = ManifestCache()
        self.guard = Guard(ns, default_registry)  # registries' existence and limits
        self.activity: Activity | None = None  # webhooks and audit (node.webhooks)
        self.usage = Counters()  # pushes, pulls, bytes served per registry (node.usage)

    # -- routing -----------------------------------------------------------

    def registry_for(self, request: web.Request) -> str:
        return registry_for_host(request.host, self.domain, self.default_registry)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """The ``/v2/{path}`` route's handler."""
        return await self.serve(request, request.match_info["path"])

    async def serve(self, request: web.Request, path: str) -> web.StreamResponse:
        """Answer a request for ``/v2/<path>`` (``path`` decoded)."""
        method = request.method
        route = paths.parse(path)
        if route is None:
            raise RegistryError(Code.UNSUPPORTED, "no such endpoint", {"path": path}, status=404)
        kind = route.kind
        name = check_name(route.name) if route.name else ""
        reg = self.registry_for(request)
        # A registry must exist (the default one always does: no lookup).
        lim = None if reg == self.default_registry else await self.guard.admit(reg)
        access = await self.gate.authorize(request, reg, route) if self.gate else None
        if lim is not None:  # its tier's operations per minute
            self.guard.count(reg, lim, method not in ("GET", "HEAD"))
        request[ACCESS] = access
        if kind == "base":
            if method in ("GET", "HEAD"):
                return web.json_response({}, headers=API_HEADERS)
            raise unsupported(method)
        if kind == "catalog":
            if method != "GET":
                raise unsupported(method)
            return await self.catalog(request, reg, access)
        if kind == "tags":
            if method != "GET":
                raise unsupported(method)
            return self.tags_list(request, reg, name)
        if kind == "manifest":
            if method in ("GET", "HEAD"):
                return await self.get_manifest(request, reg, name, route.arg)
            if method == "PUT":
                resp = await self.put_manifest(request, reg, name, route.arg)
                self.usage.push(reg)
                return resp
            if method == "DELETE":
                if self.activity is not None:
                    return await self._observed_delete(request, reg, name, route.arg)
                return await self.delete_manifest(reg, name, route.arg)
            raise unsupported(method)
        if kind == "uploads":
            if method == "POST":
                return await self.start_upload(request, reg, name, access)
            raise unsupported(method)
        if kind == "upload":
            up = await self.uploads.get(route.arg, reg, name)
            if method == "GET":
                async with up.lock:  # settle a PATCH still writing
                    return self._upload_status(up, 204)
            if method == "PATCH":
                return await self.patch_upload(request, up)
            if method == "PUT":
                return await self.finish_upload(request, up)
            if method == "DELETE":
                await self.uploads.cancel(up)
                return web.Response(status=204)
            raise unsupported(method)
        if kind == "blob":
            if method in ("GET", "HEAD"):
                resp = await self.get_blob(request, reg, name, route.arg)
                if access is not None and request.headers.get(GRANT_HEADER) == "want":
                    assert self.gate is not None
                    if resp.status in (200, 206):
                        grant = await self.gate.blob_grant(access, name, route.arg)
                        resp.headers[GRANT_HEADER] = grant
                return resp
            if method == "DELETE":
                return await self.delete_blob(reg, name, route.arg)
            raise unsupported(method)
        if method != "GET":
            raise unsupported(method)
        return await self.referrers(request, reg, name, route.arg)

    # -- listing -----------------------------------------------------------

    async def _reader(self, access: Access | None) -> Callable[[str], bool]:
        """Whether the caller may read a repository (by its identity's
        current rights, not only the scopes its token names)."""
        if access is None or self.gate is None:
            return lambda _repo: True
        principal = await self.gate.principal(access)
        if principal is None:
            return lambda _repo: False
        return lambda repo: bool(principal.actions(repo) & {"pull", "metadata_read"})

    async def catalog(self, request: web.Request, reg: str, access: Access | None) -> web.Response:
        """Only the repositories the caller may read are listed."""
        n, last = _page_args(request)
        may_read = await self._reader(access)
        visible = [r for r in self.ns.repos(reg) if may_read(r) and self.ns.listed(reg, r)]
        repos, more = _paginate(visible, n, last)
        headers = {}
        if more and repos:
            q = urlencode({"n": n, "last": repos[-1]})
            headers["Link"] = f'</v2/_catalog?{q}>; rel="next"'
        return web.json_response({"repositories": repos}, headers=headers)

    def tags_list(self, request: web.Request, reg: str, name: str) -> web.Response:
        if not self.ns.repo_exists(reg, name):
            raise name_unknown(name)
        n, last = _page_args(request)
        tags, more = _paginate(self.ns.listed_tags(reg, name), n, last)
        headers = {}
        if more and tags:
            q = urlencode({"n": n, "last": tags[-1]})
            headers["Link"] = f'</v2/{name}/tags/list?{q}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def referrers(
        self, request: web.Request, reg: str, name: str, subject: str
    ) -> web.Response:
        parse_digest(subject)
        records = self.ns.referrers(reg, name, subject)
        headers = {}
        want = request.query.getall("artifactType", [])
        if want:
            records = [r for r in records if r.artifact_type in want]
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                mf.referrer_descriptor(
                    r, await self._manifest_body(r) if r.annotations_elided else None
                )
                for r in records
            ],
        }
        # The spec fixes this Content-Type exactly: no charset parameter.
        headers["Content-Type"] = mt.OCI_INDEX
        return web.Response(body=json.dumps(body).encode(), headers=headers)

    # -- manifests ---------------------------------------------------------

    async def _resolve(self, reg: str, name: str, ref: str) -> ManifestRecord:
        if ":" in ref:
            parse_digest(ref)
            digest: str | None = ref
        else:
            check_tag(ref)
            digest = self.ns.tag(reg, name, ref) or await self.ns.fresh_tag(reg, name, ref)
        rec = None
        if digest is not None:
            rec = self.ns.manifest(reg, name, digest) or await self.ns.fresh_manifest(
                reg, name, digest
            )
        if rec is None:
            if not self.ns.repo_exists(reg, name):
                raise name_unknown(name)
            raise manifest_unknown(ref)
        return rec

    async def _manifest_body(self, rec: ManifestRecord) -> bytes:
        body = self.manifest_cache.get(rec.digest)
        if body is None:
            try:
                body = await self.store.read_all(rec.digest)
            except BlobUnavailable as e:
                raise unavailable(f"manifest {e}") from e
            except BlobNotFound:
                raise RegistryError(
                    Code.MANIFEST_UNKNOWN,
                    "manifest bytes are not in this region yet",
                    detail={"digest": rec.digest},
                ) from None
            self.manifest_cache.put(rec.digest, body)
        return body

    async def get_manifest(
        self, request: web.Request, reg: str, name: str, ref: str
    ) -> web.Response:
        rec = await self._resolve(reg, name, ref)
        try:
            self.ns.check_read(reg, name, (ref, rec.digest) if ref != rec.digest else (ref,))
        except Locked as e:
            raise RegistryError(Code.DENIED, str(e)) from None
        accept = mt.accepted(request.headers.getall("Accept", []))
        if not mf.acceptable(rec.media_type, accept):
            raise RegistryError(
                Code.MANIFEST_UNKNOWN,
                f"manifest is {rec.media_type}, which the Accept header does not allow",
                detail={"mediaType": rec.media_type, "accept": accept},
            )
        headers = _manifest_headers(rec.media_type, rec.digest)
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(rec.size)})
        body = await self._manifest_body(rec)
        if self.activity is not None:
            self.activity.pulled(request, reg, name)
        self.usage.pull(reg, len(body))
        return web.Response(body=body, headers=headers)

    async def _read_limited(self, request: web.Request, limit: int) -> bytes:
        declared = request.content_length
        if declared is not None and declared > limit:
            raise RegistryError(
                Code.SIZE_INVALID,
                f"body larger than the {limit}-byte limit",
                detail={"limit": limit, "size": declared},
                status=413,
            )
        buf = bytearray()
        async for chunk in request.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise RegistryError(
                    Code.SIZE_INVALID,
                    f"body larger than the {limit}-byte limit",
                    detail={"limit": limit},
                    status=413,
                )
        return bytes(buf)

    async def put_manifest(
        self, request: web.Request, reg: str, name: str, ref: str
    ) -> web.Response:
        body = await self._read_limited(request, mf.MAX_MANIFEST_SIZE)
        if not body:
            raise mf.manifest_invalid("empty body")
        tags: list[str] = []
        if ":" in ref:
            alg, _ = parse_digest(ref)
            digest = compute(body, alg)
            if digest != ref:
                raise RegistryError(Code.DIGEST_INVALID, detail={"expected": ref, "actual": digest})
            tags = [check_tag(t) for t in request.query.getall("tag", [])]
            if len(tags) > MAX_TAGS_PER_PUSH:
                raise RegistryError(
                    Code.TAG_INVALID,
                    f"at most {MAX_TAGS_PER_PUSH} tags in one push",
                    detail={"tags": len(tags)},
                )
        else:
            tags = [check_tag(ref)]
            digest = compute(body, "sha256")
        rec = await self.commit_manifest(
            reg, name, body, request.headers.get("Content-Type"), digest, tags, request
        )
        headers = {
            "Location": f"/v2/{name}/manifests/{digest}",
            "Docker-Content-Digest": digest,
        }
        if rec.subject:
            headers["OCI-Subject"] = rec.subject
        if ":" in ref and tags:
            headers["OCI-Tag"] = ", ".join(tags)
        return web.Response(status=201, headers=headers)

    async def commit_manifest(
        self,
        reg: str,
        name: str,
        body: bytes,
        content_type: str | None,
        digest: str,
        tags: list[str],
        request: web.Request | None = None,
    ) -> ManifestRecord:
        """Check a manifest whose ``digest`` the caller verified (everything
        it references is linked in the repository, with the sizes its
        descriptors give), store its bytes and commit its record and
        ``tags``: the manifest PUT's path, which ``node.importer`` takes too.
        The push's webhook events commit with the record (``request``: the
        client's, for their payload and the audit record)."""
        parsed = mf.parse(body, content_type, digest)
        missing_blobs = [
            d for d in parsed.required_blobs if self.ns.blob_size(reg, name, d) is None
        ]
        missing_manifests = [
            d for d in parsed.required_manifests if self.ns.manifest(reg, name, d) is None
        ]
        if missing_blobs or missing_manifests:
            raise RegistryError(
                Code.MANIFEST_BLOB_UNKNOWN,
                detail={"blobs": missing_blobs, "manifests": missing_manifests},
            )
        stored = {d: self.ns.blob_size(reg, name, d) for d in parsed.required_blobs}
        for d in parsed.required_manifests:
            rec = self.ns.manifest(reg, name, d)
            stored[d] = rec.size if rec is not None else None
        wrong = [
            {"digest": d, "size": parsed.sizes[d], "stored": size}
            for d, size in stored.items()
            if size != parsed.sizes[d]
        ]
        if wrong:
            raise RegistryError(
                Code.MANIFEST_BLOB_UNKNOWN,
                "a descriptor's size does not match the content stored under its digest",
                detail={"sizes": wrong},
            )
        self.guard.check_storage(reg, digest, len(body))
        await self.store.put_bytes(digest, body)
        events = None
        if self.activity is not None:
            events = self.activity.push_events(request, reg, name, parsed.record, tags)
        try:
            await self.ns.put_manifest(
                reg,
                name,
                parsed.record,
                tags,
                parsed.required_blobs,
                parsed.required_manifests,
                events.in_txn if events is not None else (),
            )
        except Locked as e:
            raise RegistryError(Code.DENIED, str(e)) from None
        except BlobsGone as e:
            raise RegistryError(
                Code.MANIFEST_BLOB_UNKNOWN, detail={"blobs": e.digests, "manifests": []}
            ) from None
        self.manifest_cache.put(digest, body)
        if self.activity is not None and events is not None:
            await self.activity.pushed(request, reg, name, parsed.record, tags, events)
        return parsed.record

    async def _observed_delete(
        self, request: web.Request, reg: str, name: str, ref: str
    ) -> web.Response:
        """A manifest or tag DELETE with its webhook events (written before
        the answer) and its audit record."""
        assert self.activity is not None
        activity = self.activity
        info = activity.before_delete(reg, name, ref)
        try:
            resp = await self.delete_manifest(
                reg, name, ref, lambda tags: activity.delete_events(request, info, tags)
            )
        except RegistryError as e:
            activity.delete_failed(request, info, str(e.code))
            raise
        await activity.deleted(request, info)
        return resp

    async def delete_manifest(
        self,
        reg: str,
        name: str,
        ref: str,
        events: Callable[[list[str]], list[Put]] | None = None,
    ) -> web.Response:
        """``events(tags removed)``: puts committed with the delete."""
        try:
            return await self._delete_manifest(reg, name, ref, events)
        except Locked as e:
            raise RegistryError(Code.DENIED, str(e)) from None

    async def _delete_manifest(
        self,
        reg: str,
        name: str,
        ref: str,
        events: Callable[[list[str]], list[Put]] | None = None,
    ) -> web.Response:
        if ":" in ref:
            parse_digest(ref)
            if not await self.ns.delete_manifest(reg, name, ref, events):
                if not self.ns.repo_exists(reg, name):
                    raise name_unknown(name)
                raise manifest_unknown(ref)
        else:
            check_tag(ref)
            if not await self.ns.delete_tag(reg, name, ref, events([ref]) if events else ()):
                if not self.ns.repo_exists(reg, name):
                    raise name_unknown(name)
                raise manifest_unknown(ref)
        return web.Response(status=202)

    # -- blobs -------------------------------------------------------------

    async def get_blob(
        self, request: web.Request, reg: str, name: str, digest: str
    ) -> web.StreamResponse:
        """A blob GET or HEAD. Every answer -- from the local disk with
        ``sendfile``, or streamed while read-through fetches the bytes --
        takes its status, Range and validators from ``node.ranges``."""
        parse_digest(digest)
        size = self.ns.blob_size(reg, name, digest)
        if size is None:
            raise blob_unknown(digest)
        headers = dict(_blob_headers(digest))
        etag = headers["ETag"]
        if ranges.none_match(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        rng = ranges.select_range(
            request.headers.get("Range"), request.headers.get("If-Range"), size, etag
        )
        if request.method == "HEAD" and rng is None:
            headers["Content-Length"] = str(size)
            return web.Response(status=200, headers=headers)
        if rng is not None:
            headers["Content-Range"] = rng.content_range(size)
        status = 200 if rng is None else 206
        offset, length = (0, size) if rng is None else (rng.start, rng.length)
        if request.method == "HEAD":
            if await self.store.stat(digest) is None:
                raise self._bytes_elsewhere(digest)
            headers["Content-Length"] = str(length)
            return web.Response(status=status, headers=headers)
        self.usage.served(reg, length)
        url = await self.store.redirect_url(digest)
        if url is not None:
            # A signed storage URL expires within minutes: never cache the redirect.
            headers.pop("Content-Range", None)
            headers.update({"Location": url, "Cache-Control": "no-store"})
            return web.Response(status=307, headers=headers)
        fobj = await self._open_local(digest)
        if fobj is not None:
            with fobj:
                return await self._send_file(request, status, headers, fobj, offset, length)
        return await self._send_stream(request, status, headers, digest, offset, length)

    @staticmethod
    def _bytes_elsewhere(digest: str) -> RegistryError:
        return RegistryError(
            Code.BLOB_UNKNOWN,
            "blob bytes are not in this region yet",
            detail={"digest": digest},
        )

    async def _open_local(self, digest: str) -> IO[bytes] | None:
        path = self.store.local_path(digest)
        if path is None:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(None, open, path, "rb")
        except FileNotFoundError:
            return None

    async def _send_file(
        self,
        request: web.Request,
        status: int,
        headers: dict[str, str],
        fobj: IO[bytes],
        offset: int,
        length: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        await resp.prepare(request)
        await send_file_range(request, resp, fobj, offset, length)
        await resp.write_eof()
        return resp

    async def _send_stream(
        self,
        request: web.Request,
        status: int,
        headers: dict[str, str],
        digest: str,
        offset: int,
        length: int,
    ) -> web.StreamResponse:
        try:
            async with self.store.open(digest, offset, length) as reader:
                resp = web.StreamResponse(status=status, headers=headers)
                resp.content_length = reader.length
                await resp.prepare(request)
                try:
                    async for data in reader:
                        await resp.write(data)
                except BlobUnavailable as e:
                    # Headers are gone: the only honest signal left is a short body.
                    log.warning("read-through of %s failed mid-stream: %s", digest, e)
                    if request.transport is not None:
                        request.transport.close()
                    return resp
                await resp.write_eof()
                return resp
        except BlobNotFound:
            raise self._bytes_elsewhere(digest) from None
        except BlobUnavailable as e:
            raise unavailable(str(e)) from e

    async def delete_blob(self, reg: str, name: str, digest: str) -> web.Response:
        parse_digest(digest)
        if not await self.ns.unlink_blob(reg, name, digest):
            raise blob_unknown(digest)
        return web.Response(status=202, headers={"Docker-Content-Digest": digest})

    # -- uploads -----------------------------------------------------------

    def _upload_status(self, up: Upload, status: int) -> web.Response:
        end = up.size - 1 if up.size > 0 else 0
        return web.Response(
            status=status,
            headers={
                "Location": f"/v2/{up.repo}/blobs/uploads/{up.id}",
                "Range": f"0-{end}",
                "Docker-Upload-UUID": up.id,
                "Content-Length": "0",
            },
        )

    def _created(self, name: str, digest: str) -> web.Response:
        return web.Response(
            status=201,
            headers={
                "Location": f"/v2/{name}/blobs/{quote(digest)}",
                "Docker-Content-Digest": digest,
                "Content-Length": "0",
            },
        )

    async def _mount(
        self, reg: str, name: str, digest: str, source: str | None, access: Access | None
    ) -> bool:
        """Link a blob of another repository, if the caller may read it
        there (no escalation: a mount never reaches what a pull could not)."""
        may_read = await self._reader(access)
        if source is not None:
            try:
                check_name(source)
            except RegistryError:
                return False
            size = self.ns.blob_size(reg, source, digest) if may_read(source) else None
        else:
            size = None
            for repo in sorted(self.ns.repos_with_blob(reg, digest)):
                if not may_read(repo):
                    continue
                size = self.ns.blob_size(reg, repo, digest)
                if size is not None:
                    break
        # Only bytes held here: linking records this region's placement.
        # (The store may read through to other regions; its ``stat`` then
        # answers for bytes held elsewhere too.)
        if size is None or self.ns.region not in self.ns.placements(reg, digest):
            return False
        if await self.store.stat(digest) is None:
            return False
        await self.ns.link_blob(reg, name, digest, size)
        return True

    async def start_upload(
        self, request: web.Request, reg: str, name: str, access: Access | None = None
    ) -> web.Response:
        mount = request.query.get("mount")
        if mount is not None and is_digest(mount):
            if await self._mount(reg, name, mount, request.query.get("from"), access):
                return self._created(name, mount)
        digest = request.query.get("digest")
        if digest is not None:
            parse_digest(digest)
            up = await self.uploads.create(reg, name)
            try:
                await self._append(request, up)
                self.guard.check_storage(reg, digest, up.size)
                size = await self.uploads.finish(up, digest)
                await self.ns.link_blob(reg, name, digest, size)
            finally:
                await self.uploads.cancel(up)  # no session URL was given out
            return self._created(name, digest)
        up = await self.uploads.create(reg, name)
        return self._upload_status(up, 202)

    async def _append(self, request: web.Request, up: Upload) -> int:
        limit = request.content_length
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            limit = None
        appended = await self.uploads.append(up, request.content.iter_any(), limit)
        if limit is not None and appended != limit:
            raise RegistryError(Code.SIZE_INVALID, detail={"declared": limit, "received": appended})
        return appended

    def _check_range(self, request: web.Request, up: Upload) -> None:
        cr = request.headers.get("Content-Range")
        if cr is None:
            return
        m = ranges.parse_content_range(cr)
        if m is None:
            raise RegistryError(
                Code.RANGE_INVALID, "malformed Content-Range", detail={"Content-Range": cr}
            )
        start, end = m.start, m.end
        if start != up.size or end < start:
            raise RegistryError(
                Code.RANGE_INVALID,
                f"chunk must start at offset {up.size}",
                detail={"Content-Range": cr, "offset": up.size},
                headers={
                    "Range": f"0-{max(up.size - 1, 0)}",
                    "Location": f"/v2/{up.repo}/blobs/uploads/{up.id}",
                    "Docker-Upload-UUID": up.id,
                },
            )
        length = request.content_length
        if length is not None and length != end - start + 1:
            raise RegistryError(
                Code.RANGE_INVALID,
                "Content-Length does not match Content-Range",
                detail={"Content-Range": cr, "Content-Length": length},
            )
        if m.total is not None:
            # A total (not ``*``) must hold this chunk and agree with the
            # total an earlier chunk of the session declared.
            if m.total <= end or (up.total is not None and m.total != up.total):
                raise RegistryError(
                    Code.RANGE_INVALID,
                    "Content-Range total contradicts the chunk or an earlier total",
                    detail={"Content-Range": cr, "total": up.total},
                )
            up.total = m.total

    async def patch_upload(self, request: web.Request, up: Upload) -> web.Response:
        async with up.lock:
            self._check_range(request, up)
            await self._append(request, up)
            return self._upload_status(up, 202)

    async def finish_upload(self, request: web.Request, up: Upload) -> web.Response:
        digest = request.query.get("digest")
        if not digest:
            raise RegistryError(Code.DIGEST_INVALID, "digest query parameter is required")
        parse_digest(digest)
        async with up.lock:
            if up.committed is None:
                self._check_range(request, up)
                if request.can_read_body:
                    await self._append(request, up)
            self.guard.check_storage(up.registry, digest, up.size)
            size = await self.uploads.finish(up, digest)
            await self.ns.link_blob(up.registry, up.repo, digest, size)
            await self.uploads.cancel(up)
        return self._created(up.repo, digest)


def map_store_errors(exc: Exception) -> RegistryError | None:
    if isinstance(exc, KVUnavailable):
        return unavailable("the registry namespace is unreachable; retry shortly")
    if isinstance(exc, StorageFull):
        return RegistryError(
            Code.STORAGE_FULL,
            "the registry's storage is full: nothing was stored; delete content or add space",
        )
    if isinstance(exc, BlobUnavailable):  # blob storage unreachable or refusing: retry
        return unavailable(f"blob storage: {exc}")
    return None
