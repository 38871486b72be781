"""Shared helpers for the OCI Distribution API tests (tests/test_api_*.py).

Content builders (blobs, image manifests, indexes, artifacts) that keep the
exact bytes they will push, a thin aiohttp client that returns whole
responses, error assertions, and fixture factories for a node shared by one
test module.

The client logs in as the cluster owner by default, as a real client does
(``loadtest.ocipush.TokenAuth``: a 401 Bearer challenge is answered with a
token for its scope and the request sent again), so what a test sees is the
answer to its own request, never the challenge.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from loadtest.ocipush import TokenAuth
from ocidist.mediatypes import (  # noqa: F401 - the tests' vocabulary, re-exported
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
)
from ocidist.mediatypes import DOCKER_LAYER_GZIP as DOCKER_LAYER
from ocidist.mediatypes import OCI_LAYER_GZIP as OCI_LAYER
from tests.procs import OWNER_LOGIN, NodeProcess

OCI_NONDIST_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
EMPTY_JSON = b"{}"
MIB = 1 << 20


# -- digests and names -----------------------------------------------------


def digest(data: bytes, alg: str = "sha256") -> str:
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


def unknown_digest(alg: str = "sha256") -> str:
    """A well-formed digest of content nobody pushed."""
    return digest(uuid.uuid4().bytes, alg)


def repo_name(prefix: str = "t") -> str:
    """A repository name unique to the calling test."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def blob_bytes(size: int = 1024) -> bytes:
    return os.urandom(size)


# -- content builders -------------------------------------------------------


def encode(doc: Any, indent: int | None = None) -> bytes:
    """JSON bytes as a client would push them (key order kept, not canonical)."""
    return json.dumps(doc, indent=indent).encode()


def descriptor(
    content: bytes, media_type: str, alg: str = "sha256", /, **extra: Any
) -> dict[str, Any]:
    """A descriptor of ``content``; ``extra`` adds fields (``data``, ``urls``...)."""
    return {"mediaType": media_type, "digest": digest(content, alg), "size": len(content), **extra}


@dataclass
class Manifest:
    """A manifest's exact bytes, plus what must be pushed before it."""

    body: bytes
    media_type: str
    blobs: list[bytes] = field(default_factory=list)
    children: list[Manifest] = field(default_factory=list)
    alg: str = "sha256"

    @property
    def digest(self) -> str:
        return digest(self.body, self.alg)

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.body)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return descriptor(self.body, self.media_type, self.alg, **extra)


def config_bytes() -> bytes:
    """A unique image config (so every image built here has its own digest)."""
    return encode(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Labels": {"nonce": uuid.uuid4().hex}},
        }
    )


def image(
    layers: int | list[bytes] = 1,
    *,
    media_type: str = OCI_MANIFEST,
    config: bytes | None = None,
    config_type: str | None = None,
    layer_type: str | None = None,
    alg: str = "sha256",
    subject: Manifest | None = None,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    indent: int | None = None,
) -> Manifest:
    """An image manifest (OCI or Docker schema2) with its config and layers."""
    docker = media_type == DOCKER_MANIFEST
    layer_data = [blob_bytes(512 + i) for i in range(layers)] if isinstance(layers, int) else layers
    config = config_bytes() if config is None else config
    config_type = config_type or (DOCKER_CONFIG if docker else OCI_CONFIG)
    layer_type = layer_type or (DOCKER_LAYER if docker else OCI_LAYER)
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    doc["config"] = descriptor(config, config_type, alg)
    doc["layers"] = [descriptor(d, layer_type, alg) for d in layer_data]
    if subject is not None:
        doc["subject"] = subject.descriptor()
    if annotations is not None:
        doc["annotations"] = annotations
    doc.update(extra or {})
    return Manifest(encode(doc, indent), media_type, [config, *layer_data], alg=alg)


def index(
    children: list[Manifest],
    *,
    media_type: str = OCI_INDEX,
    subject: Manifest | None = None,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    indent: int | None = None,
) -> Manifest:
    """An OCI image index or Docker manifest list over ``children``."""
    platforms = [{"architecture": a, "os": "linux"} for a in ("amd64", "arm64", "s390x", "386")]
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    doc["manifests"] = [
        c.descriptor(platform=platforms[i % len(platforms)]) for i, c in enumerate(children)
    ]
    if subject is not None:
        doc["subject"] = subject.descriptor()
    if annotations is not None:
        doc["annotations"] = annotations
    doc.update(extra or {})
    return Manifest(encode(doc, indent), media_type, children=list(children))


def artifact(
    subject: Manifest | None,
    artifact_type: str | None = "application/vnd.example.sbom.v1",
    *,
    layers: list[bytes] | None = None,
    config: bytes = EMPTY_JSON,
    config_type: str = OCI_EMPTY,
    annotations: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    indent: int | None = None,
) -> Manifest:
    """An OCI artifact manifest (image manifest with the empty config by default)."""
    return image(
        [] if layers is None else layers,
        config=config,
        config_type=config_type,
        layer_type="application/vnd.example.payload.v1",
        subject=subject,
        artifact_type=artifact_type,
        annotations=annotations,
        extra=extra,
        indent=indent,
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- HTTP -------------------------------------------------------------------


@dataclass
class Resp:
    method: str
    url: str
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def location(self) -> str:
        return self.headers["Location"]

    def codes(self) -> list[str]:
        try:
            return [e.get("code") for e in self.json()["errors"]]
        except (ValueError, KeyError, TypeError):
            return []

    def __repr__(self) -> str:
        hdrs = {k: v for k, v in self.headers.items() if k not in ("Date", "Server")}
        return f"<{self.method} {self.url} -> {self.status} {hdrs} {self.body[:600]!r}>"


def owner_auth() -> TokenAuth:
    """Credentials of the cluster owner of the nodes the tests start."""
    return TokenAuth(*OWNER_LOGIN)


class Client:
    """One aiohttp session against a node. Paths are sent exactly as given
    (no client-side normalisation of ``..`` or ``//``); no Accept or
    Content-Type header is added unless the test sets it. ``auth``: who it
    logs in as (default the owner); None sends every request as given."""

    def __init__(
        self, base: str, session: aiohttp.ClientSession, auth: TokenAuth | None = None
    ) -> None:
        self.base = base.rstrip("/")
        self.session = session
        self.auth = auth
        self.host: str | None = None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        base: str,
        auth: TokenAuth | None | Literal["owner"] = "owner",
        *,
        host: str | None = None,
        source: str | None = None,
    ) -> AsyncIterator[Client]:
        """``host``: the Host every request names (a registry selected by
        Host); ``source``: the loopback address to connect from (what the
        node sees as the client's address)."""
        auth = owner_auth() if auth == "owner" else auth
        async with aiohttp.ClientSession(
            skip_auto_headers=("Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=60),
            middlewares=() if auth is None else (auth,),
            headers={"Host": host} if host else None,
            connector=aiohttp.TCPConnector(local_addr=(source, 0)) if source else None,
        ) as s:
            c = cls(base, s, auth)
            c.host = host
            yield c

    async def auth_headers(self, method: str, path: str) -> dict[str, str]:
        """The ``Authorization`` header this client sends with ``method
        path``, for requests written by hand (``raw_exchange``)."""
        if self.auth is None:
            return {}
        return await self.auth.authorization(
            self.session, method, str(self.url(path)), host=self.host
        )

    def url(self, path: str) -> URL:
        if path.startswith(("http://", "https://")):
            return URL(path, encoded=True)
        return URL(self.base + path, encoded=True)

    async def req(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        params: Any = None,
    ) -> Resp:
        async with self.session.request(
            method,
            self.url(path),
            headers=headers,
            data=data,
            params=params,
            allow_redirects=False,
        ) as r:
            body = await r.read()
            return Resp(method, str(r.url), r.status, r.headers, body)

    async def get(self, path: str, **kw: Any) -> Resp:
        return await self.req("GET", path, **kw)

    async def head(self, path: str, **kw: Any) -> Resp:
        return await self.req("HEAD", path, **kw)

    async def put(self, path: str, **kw: Any) -> Resp:
        return await self.req("PUT", path, **kw)

    async def post(self, path: str, **kw: Any) -> Resp:
        return await self.req("POST", path, **kw)

    async def patch(self, path: str, **kw: Any) -> Resp:
        return await self.req("PATCH", path, **kw)

    async def delete(self, path: str, **kw: Any) -> Resp:
        return await self.req("DELETE", path, **kw)

    # -- protocol steps that tests build on ---------------------------------

    async def push_blob(self, repo: str, data: bytes, alg: str = "sha256") -> str:
        """Monolithic upload (single POST ?digest=); returns the digest."""
        d = digest(data, alg)
        r = await self.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, data=data)
        assert r.status == 201, r
        return d

    async def start_upload(self, repo: str) -> Resp:
        r = await self.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status == 202, r
        return r

    async def put_manifest(
        self,
        repo: str,
        ref: str,
        body: bytes,
        media_type: str | None = OCI_MANIFEST,
        params: Any = None,
    ) -> Resp:
        headers = {"Content-Type": media_type} if media_type else {}
        return await self.put(
            f"/v2/{repo}/manifests/{ref}", data=body, headers=headers, params=params
        )

    async def push(self, repo: str, m: Manifest, ref: str | None = None) -> Resp:
        """Push ``m`` with everything it references (children by digest first)."""
        for child in m.children:
            await self.push(repo, child)
        for b in m.blobs:
            await self.push_blob(repo, b, m.alg)
        r = await self.put_manifest(repo, ref or m.digest, m.body, m.media_type)
        assert r.status == 201, r
        return r


def assert_error(r: Resp, status: int, *codes: str) -> None:
    """``r`` is an OCI error response with ``status`` and (for bodies) one of ``codes``."""
    assert r.status == status, r
    assert r.headers.get("Docker-Distribution-API-Version") == "registry/2.0", r
    if r.method == "HEAD":
        assert r.body == b"", r
        return
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    errors = r.json()["errors"]
    assert isinstance(errors, list) and errors, r
    for e in errors:
        assert isinstance(e.get("code"), str) and isinstance(e.get("message"), str), r
    if codes:
        assert errors[0]["code"] in codes, r


def blob_path(repo: str, d: str) -> str:
    return f"/v2/{repo}/blobs/{d}"


def manifest_path(repo: str, ref: str) -> str:
    return f"/v2/{repo}/manifests/{ref}"


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    """An async generator body: aiohttp sends it with chunked transfer encoding."""
    for i in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[i : i + size]


async def raw_exchange(hostport: str, request: bytes, *, shut_write: bool = True) -> bytes:
    """Send ``request`` bytes over a fresh TCP connection and return all bytes
    the server sends back before closing (empty if it closed without answering)."""
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        if shut_write and writer.can_write_eof():
            writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(), 30)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


# -- registries ---------------------------------------------------------------


def create_registry(
    base_url: str, name: str, sku: str = "Premium", location: str | None = None
) -> dict[str, Any]:
    """Create registry ``name`` through a node's management API, as the
    owner (a registry other than the default exists only once created:
    ``cluster.registries``); Premium: every feature. Returns its record."""
    body: dict[str, Any] = {"name": name, "sku": sku}
    if location:
        body["location"] = location
    req = urllib.request.Request(
        base_url.rstrip("/") + "/meridian/v1/registries",
        json.dumps(body).encode(),
        {
            "Content-Type": "application/json",
            "Authorization": "Basic " + b64(":".join(OWNER_LOGIN).encode()),
        },
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# -- fixtures ---------------------------------------------------------------


def module_node_fixture(name: str = "api", *extra: str) -> Any:
    """A node shared by every test of one module (tests use unique repos);
    bind it as ``reg_node = module_node_fixture()`` in the module. ``extra``
    are more ``meridian node`` flags."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
        n = NodeProcess(tmp_path_factory.mktemp(name) / "data", extra=extra).start()
        try:
            yield n
        finally:
            n.stop()

    return fixture


def client_fixture() -> Any:
    """A ``Client`` on the module's ``reg_node``, one per test (per event loop)."""

    @pytest.fixture
    async def fixture(reg_node: NodeProcess) -> AsyncIterator[Client]:
        async with Client.connect(reg_node.url) as c:
            yield c

    return fixture
