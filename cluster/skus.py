"""Registry service tiers (SKUs) and what each allows: the one table of limits.

Modelled on Azure Container Registry's tiers. Every limit a tier sets is
enforced here and nowhere else decides it:

| limit | Basic | Standard | Premium |
| --- | --- | --- | --- |
| included storage (pushes past it are refused) | 10 GiB | 100 GiB | 500 GiB |
| read operations per minute (pull, HEAD, list) | 1,000 | 3,000 | 10,000 |
| write operations per minute (push, delete) | 100 | 500 | 2,000 |
| webhooks | 2 | 10 | 500 |
| geo-replication (replicas in other regions) | no | no | yes |
| network rules (allowed client networks) | no | no | yes |
| retention of untagged manifests (`config retention`) | no | no | yes |

Operation limits are counted per node, over a sliding minute: a region of
several nodes serves up to that many times the figure, as ACR's own limits
are approximate per region. The registry a node serves when the Host names
none (``--registry``, ``default``) has no tier: it is the operator's own and
has no limits, so benchmarks measure the registry, not a quota.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Sku:
    name: str
    storage_bytes: int | None  # None: unlimited
    read_ops_per_min: int | None
    write_ops_per_min: int | None
    webhooks: int | None
    geo_replication: bool
    network_rules: bool
    retention: bool = False  # of untagged manifests (node.manage_content)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "storage_bytes": self.storage_bytes,
            "read_ops_per_min": self.read_ops_per_min,
            "write_ops_per_min": self.write_ops_per_min,
            "webhooks": self.webhooks,
            "geo_replication": self.geo_replication,
            "network_rules": self.network_rules,
            "retention": self.retention,
        }


BASIC = Sku("Basic", 10 * GIB, 1_000, 100, 2, False, False)
STANDARD = Sku("Standard", 100 * GIB, 3_000, 500, 10, False, False)
PREMIUM = Sku("Premium", 500 * GIB, 10_000, 2_000, 500, True, True, retention=True)
# The default registry's: no tier, no limits, every feature.
UNLIMITED = Sku("Unlimited", None, None, None, None, True, True, retention=True)

SKUS: dict[str, Sku] = {s.name: s for s in (BASIC, STANDARD, PREMIUM)}


def parse(name: str) -> Sku | None:
    """The tier named ``name`` (any case), or None."""
    for sku in SKUS.values():
        if sku.name.lower() == str(name).lower():
            return sku
    return None


def of_config(config: dict | None) -> Sku:
    """The tier a registry's config names; none named: no limits."""
    sku = parse(str((config or {}).get("sku", "")))
    return sku if sku is not None else UNLIMITED
