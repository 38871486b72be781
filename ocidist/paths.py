"""The URL grammar of the ``/v2/`` API and registry selection by ``Host``.

``parse`` splits a path below ``/v2/`` from the right: repository names may
nest and may contain any of the endpoints' words (``a/blobs/b/manifests/c``
is repository ``a/blobs/b``). It checks nothing but the shape; callers
validate the name and the reference with ``ocidist.digests``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from ocidist.errors import Code, RegistryError

PREFIX = "/v2/"
API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
API_HEADERS = {API_VERSION_HEADER: API_VERSION}

_PATH = re.compile(
    r"^(?P<name>.+)/(?:"
    r"(?P<tags>tags/list)"
    r"|manifests/(?P<ref>[^/]+)"
    r"|blobs/uploads/?(?P<upload>.*)"
    r"|blobs/(?P<digest>[^/]+)"
    r"|referrers/(?P<subject>[^/]+)"
    r")$"
)
_REGISTRY_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

Kind = Literal["base", "catalog", "tags", "manifest", "uploads", "upload", "blob", "referrers"]


@dataclass(frozen=True, slots=True)
class Route:
    """One request target of the API: ``kind``, the repository ``name``
    (empty for ``base`` and ``catalog``) and the kind's argument (a
    reference, digest, upload id or subject; empty otherwise)."""

    kind: Kind
    name: str = ""
    arg: str = ""


@functools.lru_cache(maxsize=4096)
def parse(path: str) -> Route | None:
    """``path`` is what follows ``/v2/``; None when it names no endpoint.
    Remembered for the paths asked most (a pull asks the same few again and
    again); the bound keeps a stream of odd paths from growing it."""
    if path == "":
        return Route("base")
    if path == "_catalog":
        return Route("catalog")
    m = _PATH.match(path)
    if not m:
        return None
    name = m.group("name")
    if m.group("tags"):
        return Route("tags", name)
    if (ref := m.group("ref")) is not None:
        return Route("manifest", name, ref)
    if (upload := m.group("upload")) is not None:
        return Route("upload", name, upload) if upload else Route("uploads", name)
    if (digest := m.group("digest")) is not None:
        return Route("blob", name, digest)
    return Route("referrers", name, m.group("subject"))


@functools.lru_cache(maxsize=1024)
def registry_for_host(host: str | None, domain: str, default: str) -> str:
    """The registry a request is for: the first label of ``Host`` when it
    is ``<label>.<domain>``, else ``default``. A label that is not a valid
    registry name is refused, since it would reach into other keys."""
    if domain:
        h = (host or "").rsplit(":", 1)[0].lower()
        suffix = "." + domain
        if h.endswith(suffix) and h != suffix[1:]:
            label = h[: -len(suffix)]
            if not _REGISTRY_LABEL.match(label):
                raise RegistryError(Code.NAME_INVALID, "invalid registry name in Host", {"host": h})
            return label
    return default


def normalize_domain(domain: str) -> str:
    return domain.lower().lstrip(".")
