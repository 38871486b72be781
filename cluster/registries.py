"""Registries as resources: records, validation, operations, and what the
data plane checks of them (existence, operation rates, storage quota).

A registry exists when it is the node's default registry (``--registry``,
``default``: always there, no tier, no limits, held in every region), or
when ``registry create`` wrote its config (``/meridian/reg/<r>/config``):

    {"sku": "Basic"|"Standard"|"Premium", "location": <home region>,
     "created": <unix time>, "replicas": [<location>, ...],
     "state": "deleting"            (only while a delete runs),
     "storage_quota": <bytes>       (optional, below the tier's storage),
     "anonymous_pull", "network"    (cluster.auth.admin's settings)}

Names are ACR's: 5-50 letters or digits, unique whatever their case (kept
in lower case, as host names are). Creation is one transaction that holds
only if the config key is still as read (absent, or a config without a
tier that identity settings wrote earlier), so two racing creates cannot
both succeed. ``replicas`` starts as ``[location]``: a registry lives in
its home region until replications are added.

Deleting marks the config ``state: deleting`` first (every node's data
plane then refuses the registry), removes every key under
``/meridian/reg/<r>/`` in transactions of at most ``TXN_BATCH`` operations,
and the config key last; a delete interrupted half-way is finished by
deleting again. The bytes go afterwards: each region's reclaimer removes
what no registry references any more (content another registry references
stays).

Limits (``cluster.skus``, one table) on the data plane, per registry: read
(GET/HEAD) and write (POST/PUT/PATCH/DELETE) operations per minute, counted
per node (a node with ``--workers N``: each process counts its own
connections against the limit divided by N) over a sliding window of 60
one-second buckets (past the limit: ``429 TOOMANYREQUESTS`` with
``Retry-After``, the seconds until a slot frees); storage: an upload
completion or manifest push that would bring the bytes the registry
references past its quota (the tier's, or a lower ``storage_quota``) is
refused with ``403 DENIED``. Use is counted by the namespace cache as keys
change (``Namespace.stored_bytes``), never by a scan. The default registry's
requests skip all of this after one string comparison.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable
from typing import Any

from cluster import skus
from cluster.auth.admin import AdminError, Busy, Exists, Invalid, NotFound, check_bool
from cluster.auth.identities import SP_PREFIX
from cluster.kv import Compare, Delete, Put
from cluster.namespace import REG, TXN_BATCH, Conflict, Namespace, config_key
from ocidist.errors import Code, RegistryError

NAME_RE = re.compile(r"^[A-Za-z0-9]{5,50}$")
NAME_RULE = "5-50 letters or digits"
DELETING = "deleting"
DELETE_PASSES = 20  # ranges of leftovers a delete reads before giving up (racing writers)
WINDOW = 60  # seconds: the operation limits are per minute
SKU_CHOICES = "Basic, Standard or Premium"


class DoesNotFit(AdminError):
    """A change the registry's current content or settings do not allow."""

    status, code = 409, "CONFLICT"


def check_name(name: object) -> str:
    """A registry name as ACR takes it, in lower case."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise Invalid(f"invalid registry name {shown}: use {NAME_RULE}", {"name": name})
    return name.lower()


def check_sku(name: object) -> skus.Sku:
    sku = skus.parse(str(name)) if isinstance(name, str) else None
    if sku is None:
        raise Invalid(f"unknown SKU {name!r}: use {SKU_CHOICES}", {"sku": name})
    return sku


def check_quota(value: object) -> int | None:
    """``storage_quota``: bytes (a positive integer), or None to clear it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise Invalid(
            "storage_quota must be a number of bytes above 0 (or null to use the tier's)",
            {"storage_quota": value},
        )
    return value


def created(config: dict) -> bool:
    """Whether ``registry create`` made this config (it names a tier)."""
    return bool(config.get("sku"))


def live(config: dict) -> bool:
    return created(config) and config.get("state") != DELETING


def quota_of(config: dict) -> int | None:
    """Bytes the registry may hold: its tier's, or a lower ``storage_quota``."""
    tier = skus.of_config(config).storage_bytes
    own = config.get("storage_quota")
    if isinstance(own, int) and not isinstance(own, bool) and own > 0:
        return own if tier is None else min(own, tier)
    return tier


def human(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def unknown(reg: str, deleting: bool = False) -> str:
    if deleting:
        return f"registry {reg!r} is being deleted"
    return (
        f"registry {reg!r} does not exist: create it with "
        f"`meridian registry create {reg} --sku Basic`"
    )


async def known(ns: Namespace, reg: str) -> dict | None:
    """The config of ``reg`` if it was created and is not being deleted
    (read from the store once when this node's cache has none)."""
    config = ns.registry_config(reg)
    if not config:
        config = await ns.fresh_registry_config(reg)
    return config if live(config) else None


async def require(ns: Namespace, reg: str, default_registry: str) -> None:
    """Refuse a data-plane request for a registry that does not exist."""
    if reg != default_registry and await known(ns, reg) is None:
        deleting = ns.registry_config(reg).get("state") == DELETING
        raise RegistryError(Code.NAME_UNKNOWN, unknown(reg, deleting), {"registry": reg})


# -- the data plane's limits ---------------------------------------------------------


class Window:
    """Operations in the last minute, in 60 one-second buckets (a sliding
    window at one-second resolution): O(1) per operation, no allocation."""

    __slots__ = ("counts", "last", "limit", "total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts = [0] * WINDOW
        self.last = 0  # the second last counted
        self.total = 0

    def _advance(self, second: int) -> None:
        if second - self.last >= WINDOW:
            self.counts = [0] * WINDOW
            self.total = 0
        else:
            for s in range(self.last + 1, second + 1):
                i = s % WINDOW
                self.total -= self.counts[i]
                self.counts[i] = 0
        self.last = max(self.last, second)

    def take(self, now: float) -> int:
        """Count one operation and answer 0, or answer the whole seconds
        until one is allowed (nothing counted)."""
        second = int(now)
        if second > self.last:
            self._advance(second)
        if self.total < self.limit:
            self.counts[second % WINDOW] += 1
            self.total += 1
            return 0
        freed = 0
        for s in range(self.last - WINDOW + 1, self.last + 1):
            freed += self.counts[s % WINDOW]
            if self.total - freed < self.limit:
                return max(1, math.ceil(s + WINDOW - now))
        return WINDOW


class Limits:
    """One registry's tier as this node enforces it."""

    __slots__ = ("config", "quota", "reads", "sku", "writes")

    def __init__(self, config: dict, old: Limits | None = None, workers: int = 1) -> None:
        self.config = config
        self.sku = skus.of_config(config)
        self.quota = quota_of(config)
        reads, writes = self.sku.read_ops_per_min, self.sku.write_ops_per_min
        self.reads = self._window(reads, old.reads if old else None, workers)
        self.writes = self._window(writes, old.writes if old else None, workers)

    @staticmethod
    def _window(limit: int | None, old: Window | None, workers: int = 1) -> Window | None:
        if limit is None:
            return None
        if workers > 1:  # one of a node's processes (--workers): its share
            limit = max(1, limit // workers)
        if old is None:
            return Window(limit)
        old.limit = limit  # a tier change keeps what was counted
        return old


class Guard:
    """What a node's v2 API checks of a registry: that it exists, its
    operation rates, its storage quota. Nothing for the default registry."""

    def __init__(self, ns: Namespace, default_registry: str) -> None:
        self.ns = ns
        self.default_registry = default_registry
        self._limits: dict[str, Limits] = {}
        # The node's processes (node --workers): each counts its own
        # connections against this share of every limit.
        self.workers = 1

    async def admit(self, reg: str) -> Limits:
        """The registry's limits; ``NAME_UNKNOWN`` if it does not exist."""
        lim = self._limits.get(reg)
        config = self.ns.registry_config(reg)
        if lim is not None and lim.config is config:
            return lim  # the hot path: two dict lookups and an identity check
        await require(self.ns, reg, self.default_registry)
        config = self.ns.registry_config(reg)
        lim = self._limits[reg] = Limits(config, lim, self.workers)
        return lim

    @staticmethod
    def count(reg: str, lim: Limits, write: bool, now: float | None = None) -> None:
        window = lim.writes if write else lim.reads
        if window is None:
            return
        wait = window.take(time.monotonic() if now is None else now)
        if wait:
            kind = "write" if write else "read"
            tier = lim.sku.write_ops_per_min if write else lim.sku.read_ops_per_min
            raise RegistryError(
                Code.TOOMANYREQUESTS,
                f"registry {reg} allows {tier} {kind} operations per minute on its "
                f"{lim.sku.name} tier: retry in {wait} s, or raise the tier with "
                f"`meridian registry update {reg} --sku ...`",
                {"registry": reg, "limit": tier, "kind": kind},
                headers={"Retry-After": str(wait)},
            )

    def check_storage(self, reg: str, digest: str, size: int) -> None:
        """Refuse storing ``size`` new bytes under ``digest`` in ``reg`` when
        that would pass its quota (nothing new if it already references it)."""
        if reg == self.default_registry:
            return
        lim = self._limits.get(reg)
        if lim is None or lim.quota is None or self.ns.references(reg, digest):
            return
        used = self.ns.stored_bytes(reg)
        if used + size > lim.quota:
            raise RegistryError(
                Code.DENIED,
                f"registry {reg} is over its storage quota ({human(used + size)} of "
                f"{human(lim.quota)} with this push): delete images or raise the tier with "
                f"`meridian registry update {reg} --sku ...`",
                {"registry": reg, "stored": used, "pushed": size, "quota": lim.quota},
            )


# -- the management operations -------------------------------------------------------


class Registries:
    """Create, list, show, update and delete registries (the management
    API's ``/meridian/v1/registries``). Checks first, then one
    compare-and-swap; an error is an :class:`AdminError` and changed nothing."""

    def __init__(self, ns: Namespace, *, default_registry: str, domain: str) -> None:
        self.ns = ns
        self.default_registry = default_registry
        self.domain = domain

    def login_server(self, reg: str, host: str) -> str:
        """``<reg>.<domain>`` (with the port the caller used, if any), else
        the address the caller used."""
        if self.domain and reg != self.default_registry:
            _, colon, port = host.rpartition(":")
            suffix = f":{port}" if colon and port.isdigit() and not host.endswith("]") else ""
            return f"{reg}.{self.domain}{suffix}"
        return host

    def view(self, reg: str, config: dict, host: str) -> dict[str, Any]:
        default = reg == self.default_registry
        sku = skus.of_config(config)
        replicas = config.get("replicas")
        net = config.get("network") if isinstance(config.get("network"), dict) else {}
        return {
            "name": reg,
            "default": default,
            "login_server": self.login_server(reg, host),
            "domain": self.domain or None,
            "sku": None if default else sku.name,
            "limits": sku.to_dict(),
            "location": config.get("location"),
            "replicas": sorted(replicas) if isinstance(replicas, list) and replicas else None,
            "created": config.get("created"),
            "state": config.get("state", "ready"),
            "anonymous_pull": config.get("anonymous_pull") is True,
            "public_access": net.get("public_access", True) is not False,
            "storage": {
                "used": self.ns.stored_bytes(reg),
                "quota": quota_of(config),
                "storage_quota": config.get("storage_quota"),
            },
        }

    def list(self, host: str) -> list[dict[str, Any]]:
        default = self.default_registry
        out = [self.view(default, self.ns.registry_config(default), host)]
        for reg, st in sorted(self.ns.cache.registries.items()):
            if reg != self.default_registry and created(st.config):
                out.append(self.view(reg, st.config, host))
        return out

    async def _config(self, reg: str) -> dict:
        """The config of an existing registry (deleting ones too), fresh."""
        if reg == self.default_registry:
            return self.ns.registry_config(reg)
        entry = await self.ns.kv.get(config_key(reg))
        config = json.loads(entry.value) if entry is not None else {}
        if not created(config):
            raise NotFound(unknown(reg), {"registry": reg})
        return config

    async def show(self, reg: str, host: str) -> dict[str, Any]:
        return self.view(reg, await self._config(reg), host)

    def _regions(self) -> set[str]:
        return set(self.ns.regions()) | {self.ns.region}

    async def create(self, name: object, sku: object, location: object, host: str) -> dict:
        reg = check_name(name)
        tier = check_sku(sku)
        if location is None or location == "":
            location = self.ns.region
        regions = self._regions()
        if not isinstance(location, str) or location not in regions:
            raise Invalid(
                f"unknown location {location!r}: use one of the cluster's regions "
                f"({', '.join(sorted(regions))}; see `meridian regions`)",
                {"location": location},
            )
        if reg == self.default_registry:
            raise Exists(f"registry {reg!r} exists: it is this cluster's default registry")
        key = config_key(reg)
        entry = await self.ns.kv.get(key)
        config = json.loads(entry.value) if entry is not None else {}
        if created(config):
            what = "is being deleted: finish with `meridian registry delete " + reg + " --yes`"
            raise Exists(
                f"registry {reg!r} "
                + (what if config.get("state") == DELETING else "exists already")
                + " (names are unique whatever their case)",
                {"registry": reg},
            )
        config.update(
            sku=tier.name, location=location, created=round(time.time(), 3), replicas=[location]
        )
        config.pop("state", None)
        rev = entry.mod_revision if entry is not None else 0
        try:
            await self.ns.commit([Compare(key, rev)], [Put(key, json.dumps(config).encode())])
        except Conflict:
            raise Exists(f"registry {reg!r} was created meanwhile", {"registry": reg}) from None
        return self.view(reg, config, host)

    async def update(self, reg: str, changes: dict[str, Any], host: str) -> dict:
        """``sku``, ``anonymous_pull``, ``public_access``, ``storage_quota``."""
        if not changes:
            raise Invalid(
                "nothing to change: give sku, anonymous_pull, public_access or storage_quota"
            )
        tier = check_sku(changes["sku"]) if "sku" in changes else None
        anon = (
            check_bool("anonymous_pull", changes["anonymous_pull"])
            if "anonymous_pull" in changes
            else None
        )
        public = (
            check_bool("public_access", changes["public_access"])
            if "public_access" in changes
            else None
        )
        quota = check_quota(changes.get("storage_quota"))
        if reg == self.default_registry and (tier is not None or "storage_quota" in changes):
            raise Invalid(
                f"{reg!r} is the default registry: it has no tier and no quota; create a "
                "registry with `meridian registry create` for one"
            )

        def change(config: dict) -> dict:
            if reg != self.default_registry and not live(config):
                raise NotFound(unknown(reg, config.get("state") == DELETING), {"registry": reg})
            if tier is not None:
                config["sku"] = tier.name
            if anon is not None:
                config["anonymous_pull"] = anon
            if public is not None:
                if public is False and not skus.of_config(config).network_rules:
                    raise Invalid(
                        f"network rules need the Premium tier and registry {reg!r} is "
                        f"{config.get('sku')}: raise it with `meridian registry update {reg} "
                        "--sku Premium`",
                        {"sku": config.get("sku")},
                    )
                net = dict(config.get("network") or {})
                net["public_access"] = public
                config["network"] = net
            if "storage_quota" in changes:
                if quota is None:
                    config.pop("storage_quota", None)
                else:
                    config["storage_quota"] = quota
            self._fits(reg, config)
            return config

        try:
            config = await self.ns.update_registry_config(reg, change)
        except Conflict:
            raise Busy("the registry changed concurrently several times: retry") from None
        return self.view(reg, config, host)

    def _fits(self, reg: str, config: dict) -> None:
        """Refuse a config its tier does not allow, saying what to remove."""
        sku = skus.of_config(config)
        if not sku.geo_replication:
            extra = sorted(set(config.get("replicas") or []) - {config.get("location")})
            if extra:
                raise DoesNotFit(
                    f"the {sku.name} tier has no geo-replication and {reg} is replicated to "
                    f"{', '.join(extra)}: remove those first with `meridian replication delete "
                    f"--registry {reg} --location REGION`",
                    {"replicas": extra},
                )
        net = config.get("network") or {}
        if not sku.network_rules and (
            net.get("public_access") is False or net.get("allowed_cidrs")
        ):
            raise DoesNotFit(
                f"network rules need the Premium tier and {reg} has some: remove them first "
                f"(`meridian network-rule remove`, `meridian settings update --registry {reg} "
                "--public-access true`)",
                {"network": net},
            )
        quota, used = quota_of(config), self.ns.stored_bytes(reg)
        if quota is not None and used > quota:
            raise DoesNotFit(
                f"{reg} stores {human(used)}, more than {human(quota)}: delete images first "
                "(or choose a larger tier or quota)",
                {"stored": used, "quota": quota},
            )

    async def delete(self, reg: str) -> None:
        if reg == self.default_registry:
            raise Invalid(f"{reg!r} is the cluster's default registry: it cannot be deleted")

        def mark(config: dict) -> dict:
            if not created(config):
                raise NotFound(unknown(reg), {"registry": reg})
            config["state"] = DELETING
            return config

        try:
            await self.ns.update_registry_config(reg, mark)
        except Conflict:
            raise Busy("the registry changed concurrently several times: retry") from None
        key = config_key(reg)
        prefix = f"{REG}{reg}/"
        await self._remove(prefix, lambda k: k != key)
        entry = await self.ns.kv.get(key)
        if entry is not None:
            await self.ns.commit([Compare(key, entry.mod_revision)], [Delete(key)])
        # A write that raced the delete (a node that had not seen "deleting" yet).
        await self._remove(prefix, lambda k: True)
        await self._drop_roles(reg)

    async def _drop_roles(self, reg: str) -> None:
        """Service principals lose their roles on the deleted registry, so a
        registry created later under its name does not inherit them."""
        for key in sorted(self.ns.records(SP_PREFIX)):
            for _ in range(DELETE_PASSES):
                raw = await self.ns.fresh_record(key)
                rec = json.loads(raw) if raw else {}
                if reg not in (rec.get("roles") or {}):
                    break
                rec["roles"] = {r: v for r, v in rec["roles"].items() if r != reg}
                try:
                    await self.ns.replace_record(key, json.dumps(rec).encode(), raw)
                    break
                except Conflict:
                    await asyncio.sleep(0.05)  # let the watch deliver the other change

    async def _remove(self, prefix: str, keep_going: Callable[[str], bool]) -> None:
        for _ in range(DELETE_PASSES):
            keys = [e.key for e in await self.ns.refresh(prefix) if keep_going(e.key)]
            if not keys:
                return
            for i in range(0, len(keys), TXN_BATCH):
                await self.ns.commit([], [Delete(k) for k in keys[i : i + TXN_BATCH]])
        raise Busy("content kept being written while the registry was deleted: delete again")
