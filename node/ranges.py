"""HTTP byte ranges for blob answers (RFC 9110 section 14), in one place.

Every blob GET/HEAD -- served by ``sendfile`` from the local disk or
streamed while read-through fetches it -- goes through ``select_range``:

- one ``bytes`` range: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n`` (unit
  case-insensitive, digits only); an end past the blob is clipped;
- a range unit we do not know is ignored (14.2: the whole blob, 200), as is
  a malformed or multi-range specifier (a server may ignore those; several
  ranges would need multipart/byteranges, which no registry client asks for);
- a valid range that is not satisfiable (14.1.1: a first-pos at or past the
  size, or a suffix of zero bytes, ``bytes=-0``) is ``416`` with
  ``Content-Range: bytes */<size>`` and the OCI JSON error body;
- ``If-Range`` that does not name the blob's ETag (a strong validator,
  ``"<digest>"``) turns the range off (13.1.5).

Off-the-shelf parsers were considered: aiohttp's ``BaseRequest.http_range``
answers ``bytes=-0`` with the whole body and cannot tell an unknown unit from
a malformed one; werkzeug's ``parse_range_header`` also reads ``-0`` as
``0-`` (and would be a new dependency for twenty lines).

The PATCH upload's ``Content-Range`` (``<start>-<end>[/<total>]``, the OCI
distribution spec's form) is parsed here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ocidist.errors import Code, RegistryError

_DIGITS = re.compile(r"^[0-9]+$")
_UNIT = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def not_satisfiable(value: str, size: int) -> RegistryError:
    return RegistryError(
        Code.RANGE_INVALID,
        "range not satisfiable",
        detail={"Range": value, "size": size},
        status=416,
        headers={"Content-Range": f"bytes */{size}"},
    )


def parse_range(value: str | None, size: int) -> ByteRange | None:
    """The single byte range ``value`` asks of a ``size``-byte blob, or None
    to send it whole. Raises the 416 ``RegistryError`` when unsatisfiable."""
    if value is None:
        return None
    unit, eq, spec = value.strip().partition("=")
    if not eq or not _UNIT.match(unit) or unit.lower() != "bytes":
        return None  # no unit we know (or no ranges-specifier at all)
    items = [s.strip() for s in spec.split(",")]
    items = [s for s in items if s]  # a list may hold empty elements
    if len(items) != 1:
        return None
    first, dash, last = items[0].partition("-")
    if not dash or (first and not _DIGITS.match(first)) or (last and not _DIGITS.match(last)):
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            raise not_satisfiable(value, size)
        if size == 0:
            return None  # satisfiable, but there is nothing to cut: send it whole
        return ByteRange(max(size - suffix, 0), size - 1)
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None  # invalid (14.1.1): ignored
    if start >= size:
        raise not_satisfiable(value, size)
    return ByteRange(start, size - 1 if end is None else min(end, size - 1))


def _etags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def if_range_allows(if_range: str | None, etag: str) -> bool:
    """Whether a Range may be honoured given ``If-Range`` (13.1.5): only a
    strong match with the current ETag keeps it; a date (we send no
    Last-Modified) or another tag means the whole blob."""
    if if_range is None:
        return True
    return if_range.strip() == etag


def none_match(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` names the blob (weak comparison, 13.1.2): answer 304."""
    if if_none_match is None:
        return False
    tags = _etags(if_none_match)
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def select_range(
    range_header: str | None, if_range: str | None, size: int, etag: str
) -> ByteRange | None:
    """The range to send for a blob GET: None for the whole blob."""
    if range_header is None or not if_range_allows(if_range, etag):
        return None
    return parse_range(range_header, size)


# -- upload chunks ----------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?([0-9]+)-([0-9]+)(?:/([0-9]+|\*))?$")


@dataclass(frozen=True, slots=True)
class ChunkRange:
    start: int
    end: int  # inclusive
    total: int | None  # None: not given, or ``*``


def parse_content_range(value: str) -> ChunkRange | None:
    """A PATCH's ``Content-Range: <start>-<end>[/<total>|/*]``; None if malformed."""
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None
    total = m.group(3)
    return ChunkRange(
        int(m.group(1)), int(m.group(2)), None if total in (None, "*") else int(total)
    )
