"""Digest and name grammar from the OCI specs.

Everything a client sends that will become a path or a key passes through
here first, so a malformed value is a 400 and never reaches the disk.
"""

from __future__ import annotations

import functools
import hashlib
import re

from ocidist.errors import Code, RegistryError

# Registered algorithms we accept, with the exact length of the hex encoding.
ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_HEX = re.compile(r"^[a-f0-9]+$")

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
NAME_MAX = 255


@functools.lru_cache(maxsize=4096)  # valid digests only: a refusal raises, and is not kept
def parse_digest(value: str, *, code: Code = Code.DIGEST_INVALID) -> tuple[str, str]:
    """Split and validate ``alg:hex``; raise the given error code if malformed
    or of an algorithm we do not support."""
    m = _DIGEST.match(value or "")
    if not m:
        raise RegistryError(code, "invalid digest", detail={"digest": value})
    alg, enc = m.group(1), m.group(2)
    if alg not in ALGORITHMS:
        raise RegistryError(code, f"unsupported digest algorithm {alg!r}", detail={"digest": value})
    if len(enc) != ALGORITHMS[alg] or not _HEX.match(enc):
        raise RegistryError(code, "invalid digest encoding", detail={"digest": value})
    return alg, enc


def is_digest(value: str) -> bool:
    try:
        parse_digest(value)
    except RegistryError:
        return False
    return True


def new_hasher(algorithm: str) -> hashlib._Hash:
    return hashlib.new(algorithm)


def compute(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@functools.lru_cache(maxsize=4096)  # valid names only: a refusal raises, and is not kept
def check_name(name: str) -> str:
    if len(name) > NAME_MAX or not NAME_RE.match(name):
        raise RegistryError(Code.NAME_INVALID, detail={"name": name})
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.match(tag):
        raise RegistryError(Code.TAG_INVALID, "invalid tag", detail={"tag": tag}, status=400)
    return tag
