"""Media types of the OCI image-spec and Docker's schema 2."""

from __future__ import annotations

import functools
from collections.abc import Iterable

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES
SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
# Layers a registry need not hold: clients pull them from their ``urls``.
NON_DISTRIBUTABLE = frozenset(
    {
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
BLOB = "application/octet-stream"


def accepted(headers: Iterable[str]) -> tuple[str, ...]:
    """The media types of a request's ``Accept`` header values, parameters
    dropped. Remembered per distinct header (clients send the same few on
    every request; the bound keeps odd ones from growing it)."""
    return _accepted(tuple(headers))


@functools.lru_cache(maxsize=256)
def _accepted(headers: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a.split(";")[0].strip() for h in headers for a in h.split(",") if a.strip())


def acceptable(media_type: str, accept: Iterable[str]) -> bool:
    """Whether a client sending ``accept`` can take ``media_type``. No Accept
    header means anything (OCI clients); Docker's legacy clients that list
    only schema2 types do not get an OCI index they cannot parse."""
    if not accept:
        return True
    for a in accept:
        if a in ("*/*", media_type, "application/*", "application/json"):
            return True
    return False
