"""Builders of OCI content for tests, made locally (nothing is ever pulled).

- ``build_image``: a single-arch image of N random layers (real tar files,
  gzip'd) of given sizes and a valid config whose ``rootfs.diff_ids`` are the
  digests of the uncompressed tars; OCI or Docker schema2 media types.
- ``build_index``: a multi-arch OCI index (or Docker manifest list) over one
  image per platform (default linux/amd64 + linux/arm64/v8).
- ``build_artifact``: an OCI artifact manifest (empty config, ``artifactType``,
  optional ``subject``).
- ``write_layout`` / ``read_layout`` / ``verify_layout``: OCI image layout
  directories on disk (what ``skopeo copy oci:DIR:REF`` reads and writes).
- ``Registry``: a tiny synchronous HTTP client (urllib) to push and fetch
  blobs and manifests, for what the CLI tools cannot push; it logs in as
  the cluster owner by default (``loadtest.ocipush.TokenAuth``).

Layers are gzip streams at level 0 (stored deflate blocks): valid gzip that
every tool treats as compressed (so none recompresses it) at no CPU cost;
random content keeps them incompressible anyway. Everything is reproducible
from ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode, urljoin

from loadtest.ocipush import TokenAuth, tar_gzip, urlopen_whole
from ocidist.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)
from tests.procs import OWNER_LOGIN

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES)
DEFAULT_PLATFORMS: tuple[tuple[str, str, str | None], ...] = (
    ("linux", "amd64", None),
    ("linux", "arm64", "v8"),
)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: object) -> bytes:
    """Compact JSON with sorted keys: the same object always has one digest."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _rng(seed: int | str | None) -> random.Random:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "big")
    return random.Random(seed)


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Layer(Blob):
    diff_id: str = ""  # digest of the uncompressed tar


def make_layer(
    size: int,
    seed: int | str | None = None,
    *,
    media_type: str = OCI_LAYER_GZIP,
    name: str = "payload.bin",
) -> Layer:
    """A layer: a tar holding one file of ``size`` random bytes, gzip'd."""
    data, diff_id = tar_gzip(_rng(seed).randbytes(size), name)
    return Layer(data, media_type, diff_id)


@dataclass
class Image:
    """An image (or artifact) manifest and the blobs it references."""

    manifest: bytes
    media_type: str
    config: Blob
    layers: list[Blob] = field(default_factory=list)
    platform: dict[str, str] | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    def descriptor(self, **extra: object) -> dict[str, object]:
        d: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform:
            d["platform"] = dict(self.platform)
        d.update(extra)
        return d

    def blobs(self) -> list[Blob]:
        """Every blob the manifest references: layers first, config last."""
        return [*self.layers, self.config]

    def manifests(self) -> list[tuple[str, bytes, str]]:
        """(digest, body, media type) of every manifest, children first."""
        return [(self.digest, self.manifest, self.media_type)]

    def all_blobs(self) -> list[Blob]:
        return self.blobs()

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs()) + self.size


@dataclass
class Index:
    """A multi-platform index (OCI image index or Docker manifest list)."""

    manifest: bytes
    media_type: str
    images: list[Image]

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def manifests(self) -> list[tuple[str, bytes, str]]:
        out = [m for img in self.images for m in img.manifests()]
        return [*out, (self.digest, self.manifest, self.media_type)]

    def all_blobs(self) -> list[Blob]:
        seen: dict[str, Blob] = {}
        for img in self.images:
            for b in img.blobs():
                seen.setdefault(b.digest, b)
        return list(seen.values())

    def image_for(self, arch: str) -> Image:
        for img in self.images:
            if img.platform and img.platform.get("architecture") == arch:
                return img
        raise KeyError(arch)

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.all_blobs()) + sum(len(m[1]) for m in self.manifests())


def build_image(
    layer_sizes: Sequence[int] = (4096,),
    *,
    arch: str = "amd64",
    os_name: str = "linux",
    variant: str | None = None,
    seed: int | str | None = None,
    docker: bool = False,
    annotations: dict[str, str] | None = None,
) -> Image:
    """A single-arch image of ``len(layer_sizes)`` random layers, each a tar
    holding one file of that many bytes. ``docker``: Docker schema2 media
    types instead of OCI."""
    rng = _rng(seed)
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    layers = [
        make_layer(size, rng.getrandbits(64), media_type=layer_type, name=f"layer{i}.bin")
        for i, size in enumerate(layer_sizes)
    ]
    config: dict[str, object] = {
        "architecture": arch,
        "os": os_name,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/layer0.bin"], "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": f"meridian tests layer {i}"}
            for i in range(len(layers))
        ],
    }
    if variant:
        config["variant"] = variant
    config_blob = Blob(canonical(config), DOCKER_CONFIG if docker else OCI_CONFIG)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    platform = {"architecture": arch, "os": os_name}
    if variant:
        platform["variant"] = variant
    return Image(canonical(manifest), media_type, config_blob, list(layers), platform)


def build_index(
    layer_sizes: Sequence[int] = (4096,),
    *,
    platforms: Iterable[tuple[str, str, str | None]] = DEFAULT_PLATFORMS,
    seed: int | str | None = None,
    docker: bool = False,
    annotations: dict[str, str] | None = None,
) -> Index:
    """One image per platform (each with its own random layers) and the
    index over them: an OCI image index, or a Docker manifest list."""
    rng = _rng(seed)
    images = [
        build_image(
            layer_sizes,
            arch=arch,
            os_name=os_name,
            variant=variant,
            seed=rng.getrandbits(64),
            docker=docker,
        )
        for os_name, arch, variant in platforms
    ]
    media_type = DOCKER_LIST if docker else OCI_INDEX
    index: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [img.descriptor() for img in images],
    }
    if annotations and not docker:
        index["annotations"] = dict(annotations)
    return Index(canonical(index), media_type, images)


def build_artifact(
    artifact_type: str,
    files: dict[str, bytes],
    *,
    subject: Image | Index | None = None,
    annotations: dict[str, str] | None = None,
    layer_type: str = "application/octet-stream",
) -> Image:
    """An OCI artifact: the empty config, one layer per file (titled by its
    name), ``artifactType`` and, if given, a ``subject``."""
    config = Blob(b"{}", OCI_EMPTY)
    layers = [Blob(data, layer_type) for data in files.values()]
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config.descriptor(),
        "layers": [
            b.descriptor(annotations={"org.opencontainers.image.title": name})
            for b, name in zip(layers, files, strict=True)
        ],
    }
    if subject is not None:
        manifest["subject"] = {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return Image(canonical(manifest), OCI_MANIFEST, config, layers)


# -- OCI image layouts ------------------------------------------------------


def write_layout(directory: Path, refs: dict[str, Image | Index]) -> Path:
    """Write an OCI image layout holding ``refs`` (ref name -> content)."""
    directory = Path(directory)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entries = []
    for ref, item in refs.items():
        for b in item.all_blobs():
            _write_blob(blobs, b.digest, b.data)
        for digest, body, _ in item.manifests():
            _write_blob(blobs, digest, body)
        entries.append(
            {
                "mediaType": item.media_type,
                "digest": item.digest,
                "size": item.size,
                "annotations": {REF_NAME: ref},
            }
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def _write_blob(blobs: Path, digest: str, data: bytes) -> None:
    path = blobs / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)


@dataclass
class LayoutRef:
    """One manifest of a layout: what ``index.json`` (or a parent) names."""

    media_type: str
    digest: str
    size: int
    body: bytes

    @property
    def doc(self) -> dict:
        return json.loads(self.body)


class Layout:
    """Read side of an OCI image layout directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.index = json.loads((self.dir / "index.json").read_text())

    def blob_path(self, digest: str) -> Path:
        alg, enc = digest.split(":", 1)
        return self.dir / "blobs" / alg / enc

    def blob(self, digest: str) -> bytes:
        data = self.blob_path(digest).read_bytes()
        if sha256_digest(data) != digest:
            raise AssertionError(f"layout blob {digest} does not hash to its name")
        return data

    def refs(self) -> dict[str, LayoutRef]:
        out = {}
        for d in self.index.get("manifests", []):
            name = (d.get("annotations") or {}).get(REF_NAME, "")
            out[name] = self._ref(d)
        return out

    def ref(self, name: str) -> LayoutRef:
        refs = self.refs()
        if name in refs:
            return refs[name]
        if name == "" and len(refs) == 1:
            return next(iter(refs.values()))
        raise KeyError(f"{name!r} not in {sorted(refs)} of {self.dir}")

    def _ref(self, d: dict) -> LayoutRef:
        body = self.blob(d["digest"])
        if len(body) != d["size"]:
            raise AssertionError(f"{d['digest']}: size {len(body)} != descriptor {d['size']}")
        return LayoutRef(d["mediaType"], d["digest"], d["size"], body)

    def children(self, ref: LayoutRef) -> list[LayoutRef]:
        """Child manifests of an index (empty for an image)."""
        return [self._ref(d) for d in ref.doc.get("manifests", [])]

    def walk(self, ref: LayoutRef) -> Iterator[str]:
        """Every digest reachable from ``ref`` (itself included), verifying
        each blob's bytes against its digest."""
        yield ref.digest
        doc = ref.doc
        for child in self.children(ref):
            yield from self.walk(child)
        descriptors = [doc["config"], *doc.get("layers", [])] if "config" in doc else []
        for d in descriptors:
            data = self.blob(d["digest"])
            if len(data) != d["size"]:
                raise AssertionError(f"{d['digest']}: size {len(data)} != {d['size']}")
            yield d["digest"]


def read_layout(directory: Path) -> Layout:
    return Layout(directory)


def verify_layout(directory: Path) -> int:
    """Check that every blob of a layout hashes to its file name; returns
    how many there are."""
    n = 0
    for path in (Path(directory) / "blobs" / "sha256").iterdir():
        if file_sha256(path) != path.name:
            raise AssertionError(f"{path} does not hash to its name")
        n += 1
    return n


def file_sha256(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- a tiny synchronous registry client ---------------------------------------


class HTTPStatusError(RuntimeError):
    def __init__(self, what: str, status: int, body: bytes) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:500]!r}")
        self.status = status
        self.body = body


class Registry:
    """Push and fetch over the OCI Distribution API with urllib. ``auth``:
    who it logs in as (default the cluster owner); None: never."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 60,
        auth: TokenAuth | None | Literal["owner"] = "owner",
    ) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.auth = TokenAuth(*OWNER_LOGIN) if auth == "owner" else auth

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        url = path if path.startswith("http") else urljoin(self.base + "/", path.lstrip("/"))
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        if self.auth is None:
            return urlopen_whole(req, self.timeout)
        return self.auth.send(req, self.timeout)

    def push_blob(self, repo: str, blob: Blob) -> None:
        status, hdrs, body = self.request("HEAD", f"/v2/{repo}/blobs/{blob.digest}")
        if status == 200:
            return
        status, hdrs, body = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        if status != 202:
            raise HTTPStatusError(f"POST upload {repo}", status, body)
        loc = urljoin(self.base + "/", hdrs["Location"])
        sep = "&" if "?" in loc else "?"
        status, hdrs, body = self.request(
            "PUT",
            f"{loc}{sep}{urlencode({'digest': blob.digest})}",
            blob.data,
            {"Content-Type": "application/octet-stream"},
        )
        if status != 201:
            raise HTTPStatusError(f"PUT blob {blob.digest}", status, body)

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        status, hdrs, resp = self.request(
            "PUT", f"/v2/{repo}/manifests/{ref}", body, {"Content-Type": media_type}
        )
        if status != 201:
            raise HTTPStatusError(f"PUT manifest {repo}:{ref}", status, resp)
        return hdrs.get("Docker-Content-Digest", "")

    def push(self, repo: str, tag: str, item: Image | Index) -> str:
        """Every blob, every child manifest by digest, then ``item`` as ``tag``."""
        for b in item.all_blobs():
            self.push_blob(repo, b)
        *children, top = item.manifests()
        for digest, body, media_type in children:
            self.put_manifest(repo, digest, body, media_type)
        return self.put_manifest(repo, tag, top[1], top[2])

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(body, Content-Type, Docker-Content-Digest)."""
        status, hdrs, body = self.request(
            "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}
        )
        if status != 200:
            raise HTTPStatusError(f"GET manifest {repo}:{ref}", status, body)
        return body, hdrs.get("Content-Type", ""), hdrs.get("Docker-Content-Digest", "")

    def get_blob(self, repo: str, digest: str) -> bytes:
        status, _, body = self.request("GET", f"/v2/{repo}/blobs/{digest}")
        if status != 200:
            raise HTTPStatusError(f"GET blob {repo}@{digest}", status, body)
        return body

    def tags(self, repo: str) -> list[str]:
        status, _, body = self.request("GET", f"/v2/{repo}/tags/list")
        if status != 200:
            raise HTTPStatusError(f"GET tags {repo}", status, body)
        return list(json.loads(body).get("tags") or [])
