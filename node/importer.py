"""Import: a server-side copy of an image from any OCI registry into a
registry of this cluster (``az acr import``'s twin).

The node that takes the call copies, in two phases:

1. **Fetch.** Resolve the source reference (``host[:port]/repo:tag`` or
   ``...@sha256:...``; https with certificate verification unless the
   source names ``http://`` explicitly), fetch its manifest with every
   manifest type in ``Accept`` and, for an index or manifest list, every
   child manifest (children first, at most ``MAX_MANIFESTS`` in all), each
   checked against its digest and parsed by ``node.manifests`` as a push
   is. Then every blob they reference goes into the node's blob store
   through its verified writer (hashed while it streams, committed under
   its digest only when whole and matching; a few at once). Bytes this
   region already holds are not fetched again. Nothing of this is visible:
   bytes no link references are invisible to the v2 API (and reclaimed
   after the grace period if the import fails).
2. **Commit.** Link the blobs in the target repository (``ns.link_blob``,
   which records this region's placement), then commit the manifests,
   children first, through ``Registry.commit_manifest`` -- the v2 manifest
   PUT's own path -- the top one with the target tag. Replication, reclaim
   and garbage collection see imported content exactly as pushed content,
   and usage (``meridian usage``) counts it as a push of the image: one
   push per manifest, as a client's push of the same image PUTs each one.
   If a commit fails, the links and records this import made are removed.

The source speaks the Docker token flow or Basic auth: a 401 challenge is
answered with a token fetched from its realm (with the given credentials,
else anonymously) or with Basic credentials. Credentials go only to the
source's own origin and its token realm, and never appear in a log line or
an error message (nor does anything the source says that contains them).

Bounds: ``REQUEST_TIMEOUT`` per manifest or token request, a blob stalled
for ``READ_TIMEOUT`` fails, the node's ``--max-blob-size``, manifests at
most ``node.manifests.MAX_MANIFEST_SIZE`` (4 MiB), ``MAX_IMPORTS`` imports
at once per node.

Errors (each one line; nothing is left behind): a bad source or image is
400, source content Meridian cannot store 400, a blob over the size limit
413, the target tag existing without ``force`` 409, the source not having
the image 404 ``SOURCE_NOT_FOUND``, the source refusing access 403
``SOURCE_DENIED``, a source that does not answer 502 ``SOURCE_UNREACHABLE``,
one that answers wrongly (5xx, a digest or size mismatch, a broken stream)
502 ``SOURCE_FAILED``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from cluster.auth.admin import AdminError, Exists, Invalid
from node import manifests as mf
from node.storage.base import BlobStore, DigestMismatch
from ocidist import mediatypes as mt
from ocidist.digests import check_name, check_tag, compute, parse_digest
from ocidist.errors import Code, RegistryError

if TYPE_CHECKING:
    from node.api import Registry

log = logging.getLogger("meridian.import")

ACCEPT = ", ".join((mt.OCI_INDEX, mt.OCI_MANIFEST, mt.DOCKER_LIST, mt.DOCKER_MANIFEST))
REQUEST_TIMEOUT = 30.0  # a manifest or token request, whole
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # a blob whose next bytes take longer than this fails
MAX_MANIFESTS = 256  # an index and its children (recursively) in one import
MAX_DEPTH = 3  # an index of indexes of images
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 << 10
MAX_CREDENTIAL = 4096
PARALLEL_BLOBS = 4
MAX_IMPORTS = 4  # at once on one node; more: 429
RETRY_AFTER = 30
WRITE_BATCH = 4 << 20
DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_API = "registry-1.docker.io"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::\d{1,5})?$"
)
_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_SOURCE_HELP = (
    "give REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:..., e.g. registry.example.com/lib/app:1"
)


class SourceNotFound(AdminError):
    status, code = 404, "SOURCE_NOT_FOUND"


class SourceDenied(AdminError):
    status, code = 403, "SOURCE_DENIED"


class SourceUnreachable(AdminError):
    status, code = 502, "SOURCE_UNREACHABLE"


class SourceFailed(AdminError):
    status, code = 502, "SOURCE_FAILED"


class TooLarge(AdminError):
    status, code = 413, "SIZE_INVALID"


# -- what to copy, and where -------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A parsed source reference."""

    scheme: str  # https, or http when named explicitly
    host: str  # host[:port] as given
    repo: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host in DOCKER_HUB else self.host

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.api_host}"

    @property
    def ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        prefix = "http://" if self.scheme == "http" else ""
        where = f"{prefix}{self.host}/{self.repo}"
        return f"{where}@{self.digest}" if self.digest else f"{where}:{self.tag}"


def _invalid(what: str, fn: Any, value: str) -> Any:
    try:
        return fn(value)
    except RegistryError:
        raise Invalid(f"{value!r} is not a valid {what}") from None


def parse_source(text: Any) -> Source:
    """``[http://|https://]host[:port]/repo[:tag][@digest]`` (no tag and no
    digest: ``latest``). Docker Hub is ``docker.io/library/x`` (or
    ``docker.io/x``); short names without a registry host are refused."""
    if not isinstance(text, str) or not text.strip():
        raise Invalid(f"give the source image: {_SOURCE_HELP}")
    t = text.strip()
    scheme = "https"
    m = _SCHEME.match(t)
    if m:
        scheme = m.group(1).lower()
        if scheme not in ("http", "https"):
            raise Invalid(
                f"the source's scheme must be https:// (default) or http://: {_SOURCE_HELP}"
            )
        t = t[m.end() :]
    host, sep, rest = t.partition("/")
    if "@" in host:  # user:password@host: never echoed
        raise Invalid("give the source's credentials as username and password, not in the source")
    if len(t) > 1024:
        raise Invalid("the source reference is longer than 1024 characters")
    registry_host = _HOST.match(host) and ("." in host or ":" in host or host == "localhost")
    if registry_host and not rest and (sep or m):
        raise Invalid(f"source {text!r} names no repository: {_SOURCE_HELP}")
    if not registry_host or not sep:
        raise Invalid(
            f"source {text!r} names no registry host ({host!r} is not one): {_SOURCE_HELP} "
            "(Docker Hub images are docker.io/library/NAME:TAG)"
        )
    digest = None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        _invalid("digest", parse_digest, digest)
    tag = None
    name, colon, maybe_tag = rest.rpartition(":")
    if colon and "/" not in maybe_tag:
        rest, tag = name, _invalid("tag", check_tag, maybe_tag)
    repo = _invalid("repository name", check_name, rest)
    if host in DOCKER_HUB and "/" not in repo:
        repo = "library/" + repo
    if tag is None and digest is None:
        tag = "latest"
    return Source(scheme, host, repo, tag, digest)


def parse_image(text: Any, src: Source) -> tuple[str, str | None]:
    """The target ``(repository, tag)``: ``REPO:TAG``; ``REPO`` keeps the
    source's tag (none when the source names only a digest); nothing keeps
    the source's repository too."""
    if text is None or text == "":
        return src.repo, src.tag
    if not isinstance(text, str):
        raise Invalid("image must be a string: REPO:TAG or REPO")
    if "@" in text:
        raise Invalid("the target image is REPO:TAG or REPO: the source's digest is kept as is")
    name, colon, tag = text.rpartition(":")
    if colon and "/" not in tag:
        return _invalid("repository name", check_name, name), _invalid("tag", check_tag, tag)
    return _invalid("repository name", check_name, text), src.tag


def _credential(doc: dict[str, Any], name: str) -> str | None:
    v = doc.get(name)
    if v is None or v == "":
        return None
    if not isinstance(v, str) or len(v) > MAX_CREDENTIAL or any(c in v for c in "\r\n\0"):
        raise Invalid(f"{name} must be a string of at most {MAX_CREDENTIAL} characters")
    return v


@dataclass
class Request:
    """A checked import request."""

    source: Source
    repo: str
    tag: str | None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    force: bool = False

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Request:
        src = parse_source(doc.get("source"))
        repo, tag = parse_image(doc.get("image"), src)
        username, password = _credential(doc, "username"), _credential(doc, "password")
        if (username is None) != (password is None):
            raise Invalid("give both username and password for the source, or neither")
        force = doc.get("force", False)
        if not isinstance(force, bool):
            raise Invalid("force must be true or false")
        return cls(src, repo, tag, username, password, force)

    @property
    def image(self) -> str:
        return f"{self.repo}:{self.tag}" if self.tag else self.repo


# -- the source registry -------------------------------------------------------------------


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme in lower case, parameters) of a ``WWW-Authenticate`` value."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): (q if q else u) for k, q, u in _PARAM.findall(rest)}
    return scheme.lower(), params


async def _read_upto(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body, at most ``limit`` bytes of it; and whether there was more."""
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > limit:
            return bytes(buf[:limit]), True
    return bytes(buf), False


def _origin(url: str) -> tuple[str, str]:
    u = urlsplit(url)
    return u.scheme, u.netloc.lower()


class SourceClient:
    """A small OCI client of one source repository: manifests and blobs,
    following redirects, answering 401 challenges."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        src: Source,
        username: str | None,
        password: str | None,
    ) -> None:
        self.session = session
        self.src = src
        self._user = username
        self._password = password
        self._auth: str | None = None  # the Authorization header for the source's origin

    # -- messages ---------------------------------------------------------------------

    def clean(self, text: str) -> str:
        """What the source said, on one line, short, without the credentials."""
        text = " ".join(str(text).split())
        secrets = [self._password or "", self._basic()[6:]]
        if self._user and len(self._user) >= 4:  # a name, but one that may identify
            secrets.append(self._user)
        for secret in filter(None, secrets):
            text = text.replace(secret, "***")
        return text[:200]

    def _basic(self) -> str:
        """``Basic <base64>`` of the credentials, or ""."""
        if self._user is None:
            return ""
        pair = f"{self._user}:{self._password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    async def _says(self, resp: aiohttp.ClientResponse) -> str:
        try:
            raw, _ = await _read_upto(resp, MAX_ERROR_BODY)
            err = json.loads(raw)["errors"][0]
            said = f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
        except (ValueError, KeyError, IndexError, TypeError, aiohttp.ClientError, TimeoutError):
            said = ""
        return f" ({self.clean(said)})" if said else ""

    def _unreachable(self, e: BaseException, url: str) -> AdminError:
        host = urlsplit(url).netloc
        if isinstance(e, aiohttp.ClientSSLError):
            hint = (
                "; a registry serving plain HTTP must be named http://..."
                if self.src.scheme == "https"
                else ""
            )
            return SourceUnreachable(
                f"TLS with {host} failed ({self.clean(str(getattr(e, 'os_error', e)))}){hint}"
            )
        if isinstance(e, TimeoutError):
            return SourceUnreachable(f"{host} did not answer in time: check the source, or retry")
        why = self.clean(str(e)) or type(e).__name__
        return SourceUnreachable(
            f"{host} does not answer ({why}): check the source's host and port"
        )

    # -- requests ---------------------------------------------------------------------

    async def _send(
        self, url: str, headers: dict[str, str], limits: aiohttp.ClientTimeout, *, auth: str | None
    ) -> aiohttp.ClientResponse:
        """GET ``url``, following redirects; ``auth`` goes only to the
        source's own origin (never to where a blob is redirected)."""
        origin = _origin(self.src.base_url)
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth is not None and _origin(url) == origin:
                h["Authorization"] = auth
            try:
                resp = await self.session.get(url, headers=h, allow_redirects=False, timeout=limits)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                raise self._unreachable(e, url) from None
            if resp.status not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location", "")
            resp.release()
            nxt = urljoin(url, location)
            if not location or urlsplit(nxt).scheme not in ("http", "https"):
                raise SourceFailed(f"{self.src.host} redirected to something that is no URL")
            if urlsplit(url).scheme == "https" and urlsplit(nxt).scheme == "http":
                raise SourceFailed(f"{self.src.host} redirected from https to plain http")
            url = nxt
        raise SourceFailed(f"{self.src.host} redirected more than {MAX_REDIRECTS} times")

    @asynccontextmanager
    async def get(
        self, path: str, headers: dict[str, str], limits: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer to ``GET path`` of the source, authenticated as the
        source asks (one fresh challenge per request: a token that expired
        meanwhile is fetched again)."""
        url = self.src.base_url + path
        resp = await self._send(url, headers, limits, auth=self._auth)
        if resp.status == 401:
            header = resp.headers.get("WWW-Authenticate", "")
            tried = self._auth
            resp.release()
            await self._authenticate(header, tried)
            resp = await self._send(url, headers, limits, auth=self._auth)
            if resp.status == 401:
                resp.release()
                raise self._denied()
        try:
            yield resp
        finally:
            resp.release()

    def _denied(self) -> SourceDenied:
        where = f"{self.src.host}/{self.src.repo}"
        if self._user is None:
            return SourceDenied(
                f"{where} requires credentials (or does not exist): give username and password"
            )
        return SourceDenied(
            f"{self.src.host} refused the credentials given for {self.src.repo} (or it does not "
            "exist there): check username and password"
        )

    async def _authenticate(self, header: str, tried: str | None) -> None:
        scheme, params = _challenge(header)
        basic = self._basic() or None
        if scheme == "basic":
            if basic is None or tried == basic:
                raise self._denied()
            self._auth = basic
            return
        if scheme != "bearer" or not params.get("realm"):
            raise SourceFailed(
                f"{self.src.host} asked for authentication this client does not speak "
                f"({self.clean(header) or 'no WWW-Authenticate challenge'})"
            )
        realm = params["realm"]
        rs = urlsplit(realm)
        if rs.scheme not in ("http", "https") or not rs.netloc:
            raise SourceFailed(f"{self.src.host}'s token realm is not a URL")
        if rs.scheme == "http" and self.src.scheme == "https":
            raise SourceFailed(f"{self.src.host}'s token realm is plain http: refused")
        query = {"scope": f"repository:{self.src.repo}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"Accept": "application/json"}
        if basic is not None:
            headers["Authorization"] = basic
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        try:
            async with self.session.get(realm, params=query, headers=headers, timeout=timeout) as r:
                if r.status in (401, 403):
                    raise self._denied()
                if r.status != 200:
                    raise SourceFailed(
                        f"{self.src.host}'s token endpoint answered HTTP {r.status}"
                        f"{await self._says(r)}"
                    )
                raw, _ = await _read_upto(r, MAX_ERROR_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise self._unreachable(e, realm) from None
        try:
            doc = json.loads(raw)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise SourceFailed(f"{self.src.host}'s token endpoint sent no token")
        if "Bearer " + token == tried:
            raise self._denied()  # the token it just refused
        self._auth = "Bearer " + token

    async def _fail(self, resp: aiohttp.ClientResponse, what: str) -> AdminError:
        said = await self._says(resp)
        if resp.status == 403:
            return SourceDenied(f"{self.src.host} denied access to {what}{said}")
        if resp.status == 429:
            return SourceFailed(f"{self.src.host} throttles requests{said}: retry later")
        return SourceFailed(f"{self.src.host} answered HTTP {resp.status} for {what}{said}")

    # -- content ------------------------------------------------------------------------

    async def manifest(self, ref: str, *, top: bool) -> tuple[bytes, str | None, str]:
        """(bytes, Content-Type, digest) of manifest ``ref``, checked
        against its digest (the reference's, else the source's
        ``Docker-Content-Digest``, else sha256 of the bytes)."""
        what = f"{self.src.repo}@{ref}" if ":" in ref else f"{self.src.repo}:{ref}"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        path = f"/v2/{self.src.repo}/manifests/{ref}"
        try:
            async with self.get(path, {"Accept": ACCEPT}, timeout) as r:
                if r.status == 404:
                    said = await self._says(r)
                    if top:
                        raise SourceNotFound(f"{self.src.host} has no {what}{said}")
                    raise SourceFailed(f"{self.src.host} lacks {what}, which its index lists")
                if r.status != 200:
                    raise await self._fail(r, what)
                if (r.content_length or 0) > mf.MAX_MANIFEST_SIZE:
                    raise self._too_big(what)
                body, more = await _read_upto(r, mf.MAX_MANIFEST_SIZE)
                if more:
                    raise self._too_big(what)
                content_type = r.headers.get("Content-Type")
                announced = r.headers.get("Docker-Content-Digest", "").strip()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise SourceFailed(f"reading {what} from {self.src.host} failed ({e!r:.100})") from None
        if ":" in ref:
            expected = ref
        else:
            try:
                parse_digest(announced)
                expected = announced
            except RegistryError:
                expected = compute(body, "sha256")
        actual = compute(body, expected.partition(":")[0])
        if actual != expected:
            raise SourceFailed(
                f"{self.src.host} sent a manifest for {what} whose digest is {actual}, not "
                f"{expected}: nothing was imported"
            )
        return body, content_type, expected

    def _too_big(self, what: str) -> AdminError:
        return SourceFailed(
            f"{self.src.host}'s manifest {what} is larger than {mf.MAX_MANIFEST_SIZE} bytes"
        )

    async def blob(self, digest: str, size: int, store: BlobStore) -> None:
        """Stream blob ``digest`` of ``size`` bytes into ``store``, verified
        (committed only when whole and matching its digest)."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
        )
        path = f"/v2/{self.src.repo}/blobs/{digest}"
        writer = await store.writer()
        committed = False
        try:
            async with self.get(path, {}, timeout) as r:
                if r.status == 404:
                    raise SourceFailed(
                        f"{self.src.host} lacks blob {digest}, which {self.src.repo}'s manifest "
                        "references"
                    )
                if r.status != 200:
                    raise await self._fail(r, f"blob {digest}")
                if r.content_length is not None and r.content_length != size:
                    raise self._short(digest, size, f"announced {r.content_length} bytes")
                got, batch, batched = 0, [], 0
                try:
                    async for chunk in r.content.iter_chunked(1 << 20):
                        got += len(chunk)
                        if got > size:
                            raise self._short(digest, size, "sent more bytes")
                        batch.append(chunk)
                        batched += len(chunk)
                        if batched >= WRITE_BATCH:
                            await writer.write(batch)
                            batch, batched = [], 0
                except (aiohttp.ClientError, TimeoutError) as e:
                    why = "stalled" if isinstance(e, TimeoutError) else f"broke ({e!r:.80})"
                    raise SourceFailed(
                        f"the transfer of blob {digest} from {self.src.host} {why}: retry"
                    ) from None
                if batch:
                    await writer.write(batch)
                if got != size:
                    raise self._short(digest, size, f"sent {got}")
            try:
                await writer.commit(digest)
            except DigestMismatch as e:
                raise SourceFailed(
                    f"{self.src.host} sent bytes for blob {digest} that hash to {e.actual}: "
                    "nothing was imported"
                ) from None
            committed = True
        finally:
            if not committed:
                await asyncio.shield(writer.abort())

    def _short(self, digest: str, size: int, how: str) -> SourceFailed:
        return SourceFailed(
            f"{self.src.host} {how} for blob {digest}, whose descriptor says {size}: "
            "nothing was imported"
        )


# -- the copy ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one import copies: manifests children first, blobs by digest."""

    manifests: list[tuple[str, bytes, str | None]] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)

    def has(self, digest: str) -> bool:
        return any(d == digest for d, _, _ in self.manifests)


def _platforms(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
        out = []
        for m in doc.get("manifests") or []:
            p = m.get("platform") or {}
            if p.get("os") and p.get("architecture"):
                out.append("/".join(x for x in (p["os"], p["architecture"], p.get("variant")) if x))
        return out
    except (ValueError, AttributeError, TypeError):
        return []


class Importer:
    """Copies images into the registries of the node whose v2 API is
    ``registry``."""

    def __init__(self, registry: Registry, max_blob_size: int = 0) -> None:
        self.registry = registry
        self.ns = registry.ns
        self.max_blob_size = max_blob_size
        self.running = 0

    @property
    def _local(self) -> BlobStore:
        # The region's own store: a read-through store's ``stat`` also
        # answers for bytes held in other regions.
        return getattr(self.registry.store, "local", self.registry.store)

    async def _check_tag(self, reg: str, req: Request) -> None:
        if not req.tag or req.force:
            return
        ns = self.ns
        if ns.tag(reg, req.repo, req.tag) or await ns.fresh_tag(reg, req.repo, req.tag):
            raise Exists(
                f"{req.repo}:{req.tag} exists already in registry {reg}: overwrite it with "
                '"force": true (meridian import --force)',
                {"image": req.image},
            )

    async def run(self, reg: str, req: Request) -> dict[str, Any]:
        """Copy ``req`` into registry ``reg``. Its manifests commit through
        the push's path, with the push's webhook events; the management
        call is what the audit log records."""
        await self._check_tag(reg, req)
        guard = self.registry.guard
        if reg != self.registry.default_registry:  # one write of the tier's rate
            guard.count(reg, await guard.admit(reg), True)
        if self.running >= MAX_IMPORTS:
            raise RegistryError(
                Code.TOOMANYREQUESTS,
                f"{MAX_IMPORTS} imports run on this node already; retry shortly",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        self.running += 1
        start = time.monotonic()
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                client = SourceClient(session, req.source, req.username, req.password)
                plan = await self._plan(client)
                self._check_quota(reg, plan)
                copied, nbytes = await self._fetch_blobs(client, reg, plan)
            await self._check_tag(reg, req)
            await self._commit(reg, req, plan)
        finally:
            self.running -= 1
        digest, body, media_type = plan.manifests[-1]
        rec = self.ns.manifest(reg, req.repo, digest)
        out = {
            "registry": reg,
            "source": str(req.source),
            "image": req.image,
            "repository": req.repo,
            "tag": req.tag,
            "digest": digest,
            "media_type": rec.media_type if rec is not None else media_type,
            "manifests": len(plan.manifests),
            "blobs": len(plan.blobs),
            "blobs_copied": copied,
            "bytes_copied": nbytes + sum(len(b) for _, b, _ in plan.manifests),
            "platforms": plan.platforms,
            "seconds": round(time.monotonic() - start, 3),
        }
        log.info(
            "imported %s into %s/%s (%s): %d manifests, %d blobs (%d copied), %d bytes",
            out["source"], reg, req.image, digest, out["manifests"], out["blobs"], copied,
            out["bytes_copied"],
        )  # fmt: skip
        return out

    async def _plan(self, client: SourceClient) -> Plan:
        plan = Plan()
        body, ctype, digest = await client.manifest(client.src.ref, top=True)
        await self._walk(client, plan, body, ctype, digest, 0)
        plan.platforms = _platforms(body)
        return plan

    async def _walk(
        self,
        client: SourceClient,
        plan: Plan,
        body: bytes,
        ctype: str | None,
        digest: str,
        depth: int,
    ) -> None:
        try:
            parsed = mf.parse(body, ctype, digest)
        except RegistryError as e:
            reason = (e.detail or {}).get("reason") if isinstance(e.detail, dict) else None
            raise Invalid(
                f"{client.src} cannot be imported: manifest {digest}: {e.message}"
                + (f" ({client.clean(reason)})" if reason else "")
            ) from None
        for child in parsed.required_manifests:
            if plan.has(child):
                continue
            if depth + 1 > MAX_DEPTH or len(plan.manifests) + 1 >= MAX_MANIFESTS:
                raise Invalid(
                    f"{client.src} has more than {MAX_MANIFESTS} manifests or indexes nested "
                    f"deeper than {MAX_DEPTH}: not imported"
                )
            cbody, ctype2, cdigest = await client.manifest(child, top=False)
            if len(cbody) != parsed.sizes[child]:
                raise SourceFailed(
                    f"{client.src.host}'s manifest {child} is {len(cbody)} bytes, its index says "
                    f"{parsed.sizes[child]}"
                )
            await self._walk(client, plan, cbody, ctype2, cdigest, depth + 1)
        for d in parsed.required_blobs:
            size = parsed.sizes[d]
            if self.max_blob_size and size > self.max_blob_size:
                raise TooLarge(
                    f"{client.src} has a blob of {size} bytes ({d}), more than this registry "
                    f"accepts ({self.max_blob_size})"
                )
            plan.blobs[d] = size
        plan.manifests.append((digest, body, ctype))

    def _check_quota(self, reg: str, plan: Plan) -> None:
        """The registry's storage quota holds what the import adds (as a
        push's upload completions and manifest PUT check it)."""
        ns = self.ns
        new = sum(s for d, s in plan.blobs.items() if not ns.references(reg, d))
        new += sum(len(b) for d, b, _ in plan.manifests if not ns.references(reg, d))
        self.registry.guard.check_storage(reg, plan.manifests[-1][0], new)

    async def _held_here(self, reg: str, digest: str, size: int) -> bool:
        if self.ns.region not in self.ns.placements(reg, digest):
            return False
        return await self._local.stat(digest) == size

    async def _fetch_blobs(self, client: SourceClient, reg: str, plan: Plan) -> tuple[int, int]:
        todo = [(d, s) for d, s in plan.blobs.items() if not await self._held_here(reg, d, s)]
        gate = asyncio.Semaphore(PARALLEL_BLOBS)

        async def one(d: str, size: int) -> None:
            async with gate:
                await client.blob(d, size, self._local)

        try:
            async with asyncio.TaskGroup() as tg:
                for d, size in todo:
                    tg.create_task(one(d, size))
        except BaseExceptionGroup as eg:
            # The first error says what went wrong; the others were cancelled.
            raise _first(eg) from None
        return len(todo), sum(s for _, s in todo)

    async def _commit(self, reg: str, req: Request, plan: Plan) -> None:
        """Link the blobs, then commit the manifests, children first."""
        ns, repo = self.ns, req.repo
        linked: list[str] = []
        created: list[str] = []
        try:
            for d, size in plan.blobs.items():
                was = ns.blob_size(reg, repo, d)
                await ns.link_blob(reg, repo, d, size)  # and this region's placement
                if was is None:
                    linked.append(d)
            *children, top = plan.manifests
            for d, body, ctype in children:
                if ns.manifest(reg, repo, d) is None:
                    await self.registry.commit_manifest(reg, repo, body, ctype, d, [])
                    created.append(d)
            d, body, ctype = top
            existed = ns.manifest(reg, repo, d) is not None
            tags = [req.tag] if req.tag else []
            await self.registry.commit_manifest(reg, repo, body, ctype, d, tags)
            if not existed:
                created.append(d)
        except BaseException:
            await asyncio.shield(self._undo(reg, repo, created, linked))
            raise
        # Usage counts the import as a client's push of the image: one push
        # per manifest (skopeo PUTs each child, then the index), also for a
        # child this repository held already. A failed import (undone) counts none.
        for _ in plan.manifests:
            self.registry.usage.push(reg)

    async def _undo(self, reg: str, repo: str, created: list[str], linked: list[str]) -> None:
        """Remove what a failed commit made (records, then links)."""
        try:
            for d in reversed(created):
                await self.ns.delete_manifest(reg, repo, d)
            for d in linked:
                await self.ns.unlink_blob(reg, repo, d)
        except Exception as e:  # the namespace is what failed: the collector removes them
            log.warning("import into %s/%s: could not undo its partial commit: %s", reg, repo, e)


def _first(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return eg.exceptions[0]
