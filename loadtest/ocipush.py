"""A small OCI Distribution client for seeding benchmark content.

Only what the harness needs: blob uploads (POST then PUT ``?digest=``, single
POST monolithic, chunked PATCH), blob HEAD/GET, manifest PUT/GET/HEAD, and
image building: random layers that are real gzip'd tar files, an OCI image
config whose ``rootfs.diff_ids`` match them, the image manifest, and an OCI
image layout directory on disk (what ``skopeo copy oci:DIR ...`` reads).

Layers are gzip streams at level 0 (stored deflate blocks): valid gzip that
every tool recognises as compressed (so skopeo does not recompress it on push)
and costs no CPU to build; random content keeps them incompressible anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import aiohttp

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


class OciClient:
    """Minimal OCI Distribution client on an aiohttp session (no auth)."""

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
