"""The topology of a local cluster (``meridian up --config FILE``): which
regions, how far each is from "this site" (where the router and the clients
run), and how far the regions are from each other.

A TOML (or JSON) file::

    # one [[region]] per region, nearest first or not: the router measures
    [[region]]
    name = "eastus"
    rtt_ms = 5              # round trip between this site and the region
    bandwidth = "1G"        # optional: bytes/s each way (K, M, G suffixes); 0 = no cap

    [[region]]
    name = "westeurope"
    rtt_ms = 40

    [[region]]
    name = "southeastasia"
    rtt_ms = 120

    # optional: the link between two regions (replication traffic, gRPC);
    # without one, a pair's round trip is the sum of their distances from
    # this site (as if their traffic went through it)
    [[link]]
    regions = ["eastus", "southeastasia"]
    rtt_ms = 110
    bandwidth = "50M"

JSON takes the same shape: ``{"region": [...], "link": [...]}``.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.units import parse_size

NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

# name, round trip from this site (ms): a site next to the first region.
DEFAULT_REGIONS: list[tuple[str, float]] = [
    ("eastus", 5),
    ("westeurope", 40),
    ("southeastasia", 120),
    ("westus2", 70),
    ("uksouth", 45),
    ("brazilsouth", 150),
    ("japaneast", 160),
    ("australiaeast", 200),
]
MAX_REGIONS = 32


class TopologyError(ValueError):
    """The topology file is wrong; the message says where and how."""


@dataclass(frozen=True)
class RegionSpec:
    name: str
    rtt_ms: float
    bandwidth: int = 0  # bytes/s each way between this site and the region; 0 = no cap


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    rtt_ms: float
    bandwidth: int = 0


@dataclass
class Topology:
    regions: list[RegionSpec]
    links: dict[frozenset[str], LinkSpec] = field(default_factory=dict)

    def region(self, name: str) -> RegionSpec:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def between(self, a: str, b: str) -> LinkSpec:
        """The link between regions ``a`` and ``b`` (explicit, or the default:
        the sum of their round trips from this site, no bandwidth cap)."""
        link = self.links.get(frozenset((a, b)))
        if link is not None:
            return link
        return LinkSpec(a, b, self.region(a).rtt_ms + self.region(b).rtt_ms)

    def first(self, n: int) -> Topology:
        if n < 1:
            raise TopologyError("--regions must be at least 1")
        if n > len(self.regions):
            raise TopologyError(f"--regions {n}: the topology has only {len(self.regions)} regions")
        keep = {r.name for r in self.regions[:n]}
        links = {k: v for k, v in self.links.items() if k <= keep}
        return Topology(self.regions[:n], links)

    def as_dict(self) -> dict[str, Any]:
        return {
            "region": [
                {"name": r.name, "rtt_ms": r.rtt_ms, "bandwidth": r.bandwidth} for r in self.regions
            ],
            "link": [
                {"regions": [lk.a, lk.b], "rtt_ms": lk.rtt_ms, "bandwidth": lk.bandwidth}
                for lk in self.links.values()
            ],
        }


def default(n: int = 3) -> Topology:
    if n < 1 or n > MAX_REGIONS:
        raise TopologyError(f"--regions must be between 1 and {MAX_REGIONS}")
    regions = [RegionSpec(name, float(rtt)) for name, rtt in DEFAULT_REGIONS[:n]]
    for i in range(len(regions), n):
        regions.append(RegionSpec(f"region{i + 1}", float(100 + 10 * i)))
    return Topology(regions)


def parse_rate(value: Any, where: str) -> int:
    """Bytes/s from 0, 1048576, "10M", "1.5G", "100K" (powers of 1024)."""
    if isinstance(value, bool):
        raise TopologyError(f"{where}: bandwidth must be a number or a string like '10M'")
    if isinstance(value, int | float):
        if value < 0:
            raise TopologyError(f"{where}: bandwidth must not be negative")
        return int(value)
    if not isinstance(value, str):
        raise TopologyError(f"{where}: bandwidth must be a number or a string like '10M'")
    try:
        rate = parse_size(value)
    except (ValueError, OverflowError):
        raise TopologyError(
            f"{where}: bad bandwidth {value!r} (use e.g. 100M, 1G or bytes/s)"
        ) from None
    if rate < 0:
        raise TopologyError(f"{where}: bandwidth must not be negative")
    return rate


def _table(entry: Any, where: str, keys: set[str]) -> dict[str, Any]:
    """``entry`` must be a table holding no other keys than ``keys``."""
    if not isinstance(entry, dict):
        raise TopologyError(f"{where}: must be a table")
    extra = set(entry) - keys
    if extra:
        raise TopologyError(f"{where}: unknown keys {', '.join(sorted(extra))}")
    return entry


def _rtt(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(f"{where}: rtt_ms must be a number of milliseconds")
    if value < 0 or value > 60_000:
        raise TopologyError(f"{where}: rtt_ms must be between 0 and 60000")
    return float(value)


def from_dict(doc: Any) -> Topology:
    if not isinstance(doc, dict):
        raise TopologyError("the topology must be a table with [[region]] entries")
    unknown = set(doc) - {"region", "link", "regions", "links"}
    if unknown:
        raise TopologyError(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    raw_regions = doc.get("region", doc.get("regions"))
    if not isinstance(raw_regions, list) or not raw_regions:
        raise TopologyError("the topology needs at least one [[region]]")
    if len(raw_regions) > MAX_REGIONS:
        raise TopologyError(f"at most {MAX_REGIONS} regions")
    regions: list[RegionSpec] = []
    seen: set[str] = set()
    for i, r in enumerate(raw_regions):
        where = f"region #{i + 1}"
        r = _table(r, where, {"name", "rtt_ms", "bandwidth"})
        name = r.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise TopologyError(
                f"{where}: name must be lower-case letters, digits and dashes (got {name!r})"
            )
        if name in seen:
            raise TopologyError(f"{where}: region {name!r} appears twice")
        seen.add(name)
        if "rtt_ms" not in r:
            raise TopologyError(f"region {name}: rtt_ms is required")
        regions.append(
            RegionSpec(
                name,
                _rtt(r["rtt_ms"], f"region {name}"),
                parse_rate(r.get("bandwidth", 0), f"region {name}"),
            )
        )
    links: dict[frozenset[str], LinkSpec] = {}
    raw_links = doc.get("link", doc.get("links", []))
    if not isinstance(raw_links, list):
        raise TopologyError("[[link]] entries must be a list")
    for i, lk in enumerate(raw_links):
        where = f"link #{i + 1}"
        lk = _table(lk, where, {"regions", "rtt_ms", "bandwidth"})
        pair = lk.get("regions")
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            raise TopologyError(f"{where}: regions must be a list of two region names")
        a, b = pair
        for name in (a, b):
            if name not in seen:
                raise TopologyError(f"{where}: unknown region {name!r}")
        if a == b:
            raise TopologyError(f"{where}: a link joins two different regions")
        key = frozenset((a, b))
        if key in links:
            raise TopologyError(f"{where}: the link {a}-{b} appears twice")
        if "rtt_ms" not in lk:
            raise TopologyError(f"{where}: rtt_ms is required")
        links[key] = LinkSpec(
            a,
            b,
            _rtt(lk["rtt_ms"], f"link {a}-{b}"),
            parse_rate(lk.get("bandwidth", 0), f"link {a}-{b}"),
        )
    return Topology(regions, links)


def load(path: str | Path) -> Topology:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TopologyError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() == ".json":
            doc = json.loads(raw)
        else:
            doc = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise TopologyError(f"{p}: not valid {kind}: {e}") from None
    try:
        return from_dict(doc)
    except TopologyError as e:
        raise TopologyError(f"{p}: {e}") from None
