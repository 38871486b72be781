"""A small OCI Distribution client for seeding benchmark content, and the
client side of registry authentication (the Docker token flow).

Only what the harness needs: blob uploads (POST then PUT ``?digest=``, single
POST monolithic, chunked PATCH), blob HEAD/GET, manifest PUT/GET/HEAD, and
image building: random layers that are real gzip'd tar files, an OCI image
config whose ``rootfs.diff_ids`` match them, the image manifest, and an OCI
image layout directory on disk (what ``skopeo copy oci:DIR ...`` reads).

Authentication (:class:`TokenAuth`) is what a real client does: a request
answered ``401`` with ``WWW-Authenticate: Bearer realm=...,service=...,
scope=...`` is sent again with ``Authorization: Bearer <token>``, the token
fetched from the realm with Basic credentials for exactly that scope and
kept per (host, scope) until shortly before it expires. A request whose body
cannot be sent twice (a stream) gets its token first. It plugs into an
aiohttp session as a client middleware (``middlewares=[auth]``) and offers
the same steps to a synchronous client (``TokenAuth.send``). A registry that
never challenges (Distribution here) sees no difference.

Layers are gzip streams at level 0 (stored deflate blocks): valid gzip that
every tool recognises as compressed (so skopeo does not recompress it on push)
and costs no CPU to build; random content keeps them incompressible anyway.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import random
import re
import tarfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.payload import AsyncIterablePayload
from yarl import URL

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from ocidist.mediatypes import (
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)

MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST))


class OciError(RuntimeError):
    def __init__(self, what: str, status: int, body: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(size: int, seed: int | str | None = None) -> bytes:
    """``size`` random bytes; reproducible for a given seed (None: fresh)."""
    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class Layer:
    data: bytes  # the gzip'd tar, as stored in the registry
    diff_id: str  # digest of the uncompressed tar

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)


def tar_gzip(payload: bytes, name: str = "payload.bin") -> tuple[bytes, str]:
    """A reproducible tar holding one file, gzip'd at level 0 (no CPU spent
    compressing random bytes), and its diff_id (digest of the plain tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=0, mtime=0), sha256_digest(raw)


def make_layer(size: int, seed: int | str | None = None, name: str = "payload.bin") -> Layer:
    """A layer: a tar holding one file of ``size`` random bytes, gzip'd (level 0)."""
    return Layer(*tar_gzip(random_bytes(size, seed), name))


@dataclass
class Image:
    config: bytes
    manifest: bytes
    layers: list[Layer] = field(default_factory=list)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    def blobs(self) -> list[tuple[str, bytes]]:
        """(digest, bytes) of every blob the manifest references, config last."""
        out = [(layer.digest, layer.data) for layer in self.layers]
        out.append((self.config_digest, self.config))
        return out

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for _, b in self.blobs()) + len(self.manifest)


def build_image(layers: list[Layer], annotations: dict[str, str] | None = None) -> Image:
    """An OCI image (config + manifest) over ``layers``."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": "meridian loadtest"} for _ in layers],
    }
    config_bytes = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    manifest_bytes = image_manifest(
        (sha256_digest(config_bytes), len(config_bytes)),
        [(layer.digest, len(layer.data)) for layer in layers],
        annotations,
    )
    return Image(config_bytes, manifest_bytes, list(layers))


def image_manifest(
    config: tuple[str, int],
    layers: list[tuple[str, int]],
    annotations: dict[str, str] | None = None,
) -> bytes:
    """The canonical bytes of an OCI image manifest over a config and layers,
    each given as (digest, size)."""
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size} for digest, size in layers
        ],
    }
    if annotations:
        manifest["annotations"] = annotations
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def random_image(n_layers: int, layer_size: int, seed: int | str | None = None) -> Image:
    """An image of ``n_layers`` random layers of about ``layer_size`` bytes each."""
    if seed is None:
        seed = random.SystemRandom().getrandbits(64)
    return build_image([make_layer(layer_size, f"{seed}-{i}") for i in range(n_layers)])


def write_oci_layout(directory: Path, image: Image, ref: str = "latest") -> Path:
    """Write ``image`` as an OCI image layout (for ``skopeo copy oci:DIR:ref``)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for digest, data in [*image.blobs(), (image.manifest_digest, image.manifest)]:
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


# -- authentication (the Docker token flow, client side) -------------------------------

_PARAM = re.compile(r'(\w+)="([^"]*)"')
_REPO_PATH = re.compile(r"^/v2/(.+)/(?:blobs|manifests|tags|referrers)/")
EXPIRY_MARGIN = 30.0  # a cached token this close to expiry is fetched anew


@dataclass(frozen=True)
class Challenge:
    """A ``WWW-Authenticate: Bearer`` challenge."""

    realm: str
    service: str = ""
    scope: str = ""
    error: str = ""

    @classmethod
    def parse(cls, header: str | None) -> Challenge | None:
        scheme, _, rest = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        params = dict(_PARAM.findall(rest))
        if not params.get("realm"):
            return None
        return cls(params["realm"], params.get("service", ""), params.get("scope", ""),
                   params.get("error", ""))  # fmt: skip


def request_scope(method: str, path: str) -> str | None:
    """The scope a request needs, decided as a Docker client decides it
    before it asks (GET/HEAD pull, DELETE delete, anything else pull,push);
    ``""`` for ``/v2/`` (any token), None when the path names no repository."""
    if path.rstrip("/") == "/v2":
        return ""
    if path == "/v2/_catalog":
        return "registry:catalog:*"
    m = _REPO_PATH.match(path)
    if m is None:
        return None
    action = {"GET": "pull", "HEAD": "pull", "DELETE": "delete"}.get(method, "pull,push")
    return f"repository:{m.group(1)}:{action}"


@dataclass(frozen=True)
class _Realm:
    """Where one registry (a Host) hands out tokens."""

    challenge: Challenge
    via: str  # scheme://host:port the registry's requests went to

    def token_request(self, scope: str) -> tuple[str, dict[str, str]]:
        """URL and extra headers of a token request. A realm on the Host the
        client named, reached at another address (a registry selected by
        Host on a loopback node), is asked at that address, as after a DNS
        lookup."""
        query = {"service": self.challenge.service} if self.challenge.service else {}
        if scope:
            query["scope"] = scope
        url = _with_query(self.challenge.realm, **query) if query else self.challenge.realm
        realm = urlsplit(url)
        via = urlsplit(self.via)
        if realm.netloc == via.netloc:
            return url, {}
        return urlunsplit((via.scheme, via.netloc, realm.path, realm.query, "")), {
            "Host": realm.netloc
        }


class TokenAuth:
    """Credentials (None: anonymous) and the tokens fetched with them, one
    per (registry Host, scope). An aiohttp client middleware; ``send`` does
    the same for urllib."""

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self.username = username
        self.password = password
        self._realms: dict[str, _Realm] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.fetched = 0  # tokens fetched so far

    @classmethod
    def owner_from_env(cls) -> TokenAuth | None:
        """The cluster owner with ``$MERIDIAN_OWNER_PASSWORD``; None when unset."""
        password = os.environ.get(OWNER_PASSWORD_ENV)
        return cls(OWNER, password) if password else None

    def __repr__(self) -> str:  # never the password
        return f"TokenAuth({self.username!r})"

    @property
    def userpass(self) -> str:
        """``user:password``, as skopeo's ``--creds`` takes them."""
        return f"{self.username}:{self.password}"

    # -- the steps, shared by both clients -------------------------------------------

    def _basic(self) -> dict[str, str]:
        if self.username is None:
            return {}
        basic = b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}

    def cached(self, host: str, scope: str | None) -> str | None:
        hit = self._tokens.get((host, scope)) if scope is not None else None
        if hit is None or hit[1] - time.monotonic() < EXPIRY_MARGIN:
            return None
        return hit[0]

    def _learn(self, host: str, header: str | None, url: str) -> Challenge | None:
        challenge = Challenge.parse(header)
        if challenge is not None:
            parts = urlsplit(url)
            self._realms[host] = _Realm(challenge, f"{parts.scheme}://{parts.netloc}")
        return challenge

    def _store(self, host: str, scope: str, status: int, body: bytes) -> str | None:
        if status != 200:
            return None
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            ttl = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            return None
        if not isinstance(token, str) or not token:
            return None
        self.fetched += 1
        self._tokens[(host, scope)] = (token, time.monotonic() + ttl)
        return token

    # -- aiohttp ---------------------------------------------------------------------

    async def __call__(self, req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if "Authorization" in req.headers:  # the caller's own credentials
            return await handler(req)
        host = req.headers.get("Host") or _netloc(str(req.url))
        scope = request_scope(req.method, req.url.path)
        token = self.cached(host, scope)
        if token is None and scope is not None and isinstance(req.body, AsyncIterablePayload):
            # A stream cannot be sent twice: its token first.
            token = await self._prefetch(req.session, req.url, host, scope)
        if token is not None:
            req.headers["Authorization"] = f"Bearer {token}"
        resp = await handler(req)
        if resp.status != 401 or getattr(req.body, "consumed", False):
            return resp
        challenge = self._learn(host, resp.headers.get("WWW-Authenticate"), str(req.url))
        if challenge is None:
            return resp
        fresh = await self._fetch(req.session, host, challenge.scope, stale=token)
        if fresh is None:
            return resp
        resp.release()
        req.headers["Authorization"] = f"Bearer {fresh}"
        return await handler(req)

    async def authorization(
        self, session: aiohttp.ClientSession, method: str, url: str, host: str | None = None
    ) -> dict[str, str]:
        """The ``Authorization`` header this client would send with
        ``method url`` (to ``host``, default the URL's) for requests written
        by hand; {} if none is needed."""
        yurl = URL(url, encoded=True)
        host, scope = host or _netloc(url), request_scope(method, yurl.path)
        if scope is None:
            return {}
        token = self.cached(host, scope) or await self._prefetch(session, yurl, host, scope)
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _fetch(
        self, session: aiohttp.ClientSession, host: str, scope: str, stale: str | None = None
    ) -> str | None:
        """A token for ``scope``: one fetch at a time per (host, scope), so
        requests challenged together share it; ``stale`` (the token just
        refused) is never the answer."""
        async with self._locks.setdefault((host, scope), asyncio.Lock()):
            current = self.cached(host, scope)
            if current is not None and current != stale:
                return current
            url, headers = self._realms[host].token_request(scope)
            async with session.get(
                URL(url, encoded=True), headers={**headers, **self._basic()}, middlewares=()
            ) as r:
                return self._store(host, scope, r.status, await r.read())

    async def _prefetch(
        self, session: aiohttp.ClientSession, url: URL, host: str, scope: str
    ) -> str | None:
        """A token before sending; learns the realm from ``GET /v2/`` first
        if need be (None: the registry wants none)."""
        if host not in self._realms:
            ping = url.with_path("/v2/").with_query(None)
            async with session.get(ping, headers={"Host": host}, middlewares=()) as r:
                await r.read()
                if r.status != 401 or self._learn(host, r.headers.get("WWW-Authenticate"),
                                                  str(url)) is None:  # fmt: skip
                    return None
        return await self._fetch(session, host, scope)

    # -- urllib ----------------------------------------------------------------------

    def send(
        self, req: urllib.request.Request, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        """``req`` (with a body that can be sent twice) through urllib,
        answering a Bearer challenge once."""
        host = req.get_header("Host") or _netloc(req.full_url)
        own = req.has_header("Authorization")  # the caller's own credentials
        token = self.cached(host, request_scope(req.get_method(), urlsplit(req.full_url).path))
        if token is not None and not own:
            req.add_header("Authorization", f"Bearer {token}")
        status, headers, body = urlopen_whole(req, timeout)
        if own or status != 401:
            return status, headers, body
        challenge = self._learn(host, headers.get("WWW-Authenticate"), req.full_url)
        if challenge is None:
            return status, headers, body
        url, extra = self._realms[host].token_request(challenge.scope)
        token_req = urllib.request.Request(url, headers={**extra, **self._basic()})
        got = urlopen_whole(token_req, timeout)
        fresh = self._store(host, challenge.scope, got[0], got[2])
        if fresh is None:
            return status, headers, body
        req.add_header("Authorization", f"Bearer {fresh}")
        return urlopen_whole(req, timeout)


def bearer_header(url: str, auth: TokenAuth | None = None) -> dict[str, str]:
    """``Authorization`` for pulling ``url`` many times with a tool that
    cannot answer a challenge (wrk, ab, curl): a token for its scope (valid
    for minutes: enough for one load-generator run), fetched after a HEAD of
    ``url``; ``auth`` defaults to the owner in the environment. {} when the
    registry wants none or no credentials are known."""
    auth = auth or TokenAuth.owner_from_env()
    if auth is None:
        return {}
    auth.send(urllib.request.Request(url, method="HEAD"), timeout=30)
    token = auth.cached(_netloc(url), request_scope("HEAD", urlsplit(url).path))
    return {"Authorization": f"Bearer {token}"} if token else {}


def _netloc(url: str) -> str:
    """The Host a client names for ``url``: its authority as written."""
    return urlsplit(url).netloc


def urlopen_whole(req: urllib.request.Request, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of ``req``, error statuses included."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


class OciClient:
    """Minimal OCI Distribution client on an aiohttp session (authenticated
    when the session has a :class:`TokenAuth` middleware)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    def url(self, path: str) -> str:
        return f"{self.base_url}/v2/{path}"

    def _location(self, resp: aiohttp.ClientResponse) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise OciError("upload: no Location header", resp.status, "")
        return urljoin(self.base_url + "/", loc)

    async def ping(self) -> int:
        async with self.session.get(f"{self.base_url}/v2/") as resp:
            await resp.read()
            return resp.status

    # -- blobs ---------------------------------------------------------------

    async def blob_size(self, repo: str, digest: str) -> int | None:
        """Size from HEAD, or None if the repo does not have the blob."""
        async with self.session.head(self.url(f"{repo}/blobs/{digest}")) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise OciError(f"HEAD blob {digest}", resp.status, await resp.text())
            return int(resp.headers.get("Content-Length", "-1"))

    async def get_blob(self, repo: str, digest: str) -> bytes:
        async with self.session.get(self.url(f"{repo}/blobs/{digest}")) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise OciError(f"GET blob {digest}", resp.status, body.decode(errors="replace"))
            return body

    async def start_upload(self, repo: str) -> str:
        async with self.session.post(self.url(f"{repo}/blobs/uploads/")) as resp:
            body = await resp.text()
            if resp.status != 202:
                raise OciError(f"POST upload in {repo}", resp.status, body)
            return self._location(resp)

    async def _finish(self, location: str, digest: str, data: bytes | None) -> str:
        headers = {"Content-Type": "application/octet-stream"}
        if data is not None:
            headers["Content-Length"] = str(len(data))
        else:
            headers["Content-Length"] = "0"
        async with self.session.put(
            _with_query(location, digest=digest), data=data or b"", headers=headers
        ) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise OciError(f"PUT upload {digest}", resp.status, body)
            got = resp.headers.get("Docker-Content-Digest", digest)
            if got != digest:
                raise OciError(f"PUT upload {digest}: server says {got}", resp.status, body)
            return digest

    async def upload_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """POST to open an upload, then PUT the whole body with ``?digest=``."""
        digest = digest or sha256_digest(data)
        location = await self.start_upload(repo)
        return await self._finish(location, digest, data)

    async def upload_blob_monolithic(
        self, repo: str, data: bytes, digest: str | None = None
    ) -> str:
        """Single ``POST ?digest=`` with the body. Registries may answer 202
        instead (they need not support it); then the body is PUT as usual."""
        digest = digest or sha256_digest(data)
        async with self.session.post(
            _with_query(self.url(f"{repo}/blobs/uploads/"), digest=digest),
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            body = await resp.text()
            if resp.status == 201:
                return digest
            if resp.status != 202:
                raise OciError(f"POST monolithic {digest}", resp.status, body)
            location = self._location(resp)
        return await self._finish(location, digest, data)

    async def upload_blob_chunked(
        self, repo: str, data: bytes, chunk_size: int, digest: str | None = None
    ) -> str:
        """POST, PATCH the body in ``chunk_size`` pieces, then ``PUT ?digest=``."""
        digest = digest or sha256_digest(data)
        location = await self.start_upload(repo)
        offset = 0
        while offset < len(data):
            chunk = data[offset : offset + chunk_size]
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Length": str(len(chunk)),
            }
            async with self.session.patch(location, data=chunk, headers=headers) as resp:
                body = await resp.text()
                if resp.status != 202:
                    raise OciError(f"PATCH upload at {offset}", resp.status, body)
                location = self._location(resp)
            offset += len(chunk)
        return await self._finish(location, digest, None)

    async def ensure_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256_digest(data)
        if await self.blob_size(repo, digest) == len(data):
            return digest
        return await self.upload_blob(repo, data, digest)

    # -- manifests -----------------------------------------------------------

    async def put_manifest(
        self,
        repo: str,
        ref: str,
        manifest: bytes,
        media_type: str = OCI_MANIFEST,
        response_headers: dict[str, str] | None = None,
    ) -> str:
        """PUT a manifest; its digest. ``response_headers``, if given, gets
        the answer's headers (e.g. a router's ``X-Meridian-Region``)."""
        digest = sha256_digest(manifest)
        async with self.session.put(
            self.url(f"{repo}/manifests/{ref}"),
            data=manifest,
            headers={"Content-Type": media_type},
        ) as resp:
            body = await resp.text()
            if response_headers is not None:
                response_headers.update(resp.headers)
            if resp.status != 201:
                raise OciError(f"PUT manifest {repo}:{ref}", resp.status, body)
            got = resp.headers.get("Docker-Content-Digest", digest)
            if got != digest:
                raise OciError(f"PUT manifest {repo}:{ref}: server says {got}", 201, body)
            return digest

    async def get_manifest(
        self, repo: str, ref: str, accept: str = MANIFEST_ACCEPT
    ) -> tuple[bytes, str, str]:
        """(body, content type, digest header) of a manifest."""
        async with self.session.get(
            self.url(f"{repo}/manifests/{ref}"), headers={"Accept": accept}
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise OciError(
                    f"GET manifest {repo}:{ref}", resp.status, body.decode(errors="replace")
                )
            return (
                body,
                resp.headers.get("Content-Type", ""),
                resp.headers.get("Docker-Content-Digest", ""),
            )

    async def manifest_digest(self, repo: str, ref: str) -> str | None:
        async with self.session.head(
            self.url(f"{repo}/manifests/{ref}"), headers={"Accept": MANIFEST_ACCEPT}
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise OciError(f"HEAD manifest {repo}:{ref}", resp.status, "")
            return resp.headers.get("Docker-Content-Digest")

    async def push_image(self, repo: str, tag: str, image: Image) -> str:
        """Upload every blob the image needs (skipping present ones), then the
        manifest under ``tag``; returns the manifest digest."""
        for digest, data in image.blobs():
            await self.ensure_blob(repo, data, digest)
        return await self.put_manifest(repo, tag, image.manifest)
