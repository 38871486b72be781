"""The management API of replications, regions and usage (``node.manage``
extension; ``meridian replication|region|usage``, ``cluster/replicas_cli.py``).

Routes (``{r}``: a registry; managers of it, or the cluster owner):

- ``GET /meridian/v1/registries/{r}/replications``: every region that holds
  (or should hold) the registry: its ``status`` -- ``ready`` (holds
  everything), ``syncing`` (``pending_items``/``pending_bytes``: its backlog
  of this registry, ``node.replication.plan.backlog``) or ``down`` (no live
  node) -- and whether it is the registry's home ``location``;
- ``POST .../replications`` ``{"location": REGION}``: replicate the
  registry there too (Premium only; a known region; not one already), by
  compare-and-swap on its config: the region's replicator backfills it;
- ``DELETE .../replications/{region}``: stop replicating there (never the
  home location: delete the registry instead). The region's reclaimer drops
  its placements and then its bytes, but only those another replica region
  holds (``node.replication.reclaim.kept_digests``), and never bytes a
  registry it still replicates references;
- ``GET /meridian/v1/registries/{r}/usage``: per region and in total, bytes
  stored, GiB-days, pushes, pulls and bytes served (``node.usage``);
- ``DELETE /meridian/v1/regions/{region}[?force=true]`` (cluster owner):
  decommission a region (``Namespace.remove_region``): refused while one of
  its nodes is alive (409, unless ``force``) and while it is a registry's
  home location (409, naming them).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cluster import registries, skus
from cluster.auth.admin import Busy, Exists, InUse, Invalid, NotFound
from cluster.namespace import NODES, REG, Conflict, alive_key, region_key
from node.manage import PREFIX, api_handler
from node.replication.plan import backlog
from node.usage import FIELDS, add_recorder, close_region, figures, stored_in

if TYPE_CHECKING:
    from node.manage import ManageAPI

REGISTRY = PREFIX + "/registries/{registry}"


async def _config(api: ManageAPI, reg: str) -> dict:
    """The config of ``reg``, which ``api.manager`` found to exist (the
    default registry always does, with or without a config)."""
    if reg == api.default_registry:
        return dict(api.ns.registry_config(reg))
    config = await registries.known(api.ns, reg)
    if config is None:  # deleted since
        raise NotFound(registries.unknown(reg), {"registry": reg})
    return dict(config)


def _json(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def _swapped(call: Awaitable[Any]) -> Any:
    """A compare-and-swap that kept losing to other writers: 409, retry."""
    try:
        return await call
    except Conflict:
        raise Busy("the registry's settings changed while this ran: try again") from None


def _regions(api: ManageAPI) -> set[str]:
    return set(api.ns.regions()) | api.ns.alive_regions()


def _replicas(api: ManageAPI, config: dict) -> list[str]:
    """The regions that hold the registry: its ``replicas``, or (unset)
    every region."""
    replicas = config.get("replicas")
    if isinstance(replicas, list) and replicas:
        return sorted({str(r) for r in replicas})
    return sorted(_regions(api))


def _row(api: ManageAPI, reg: str, region: str, config: dict, alive: set[str]) -> dict:
    items = backlog(api.ns, region, reg)
    if region not in alive:
        status = "down"
    elif items:
        status = "syncing"
    else:
        status = "ready"
    return {
        "registry": reg,
        "region": region,
        "home": region == config.get("location"),
        "status": status,
        "pending_items": len(items),
        "pending_bytes": sum(i.size for i in items),
    }


def _check_region(api: ManageAPI, value: Any, what: str = "location") -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"give the {what}: a region name (see `meridian regions`)")
    known = _regions(api)
    if value not in known:
        raise Invalid(
            f"unknown location {value!r}: use one of the cluster's regions "
            f"({', '.join(sorted(known)) or 'none'}; see `meridian regions`)",
            {"location": value},
        )
    return value


@api_handler
async def list_replications(api: ManageAPI, request: web.Request) -> web.Response:
    reg, _ = await api.manager(request)
    config = await _config(api, reg)
    alive = api.ns.alive_regions()
    rows = [_row(api, reg, r, config, alive) for r in _replicas(api, config)]
    return api.ok({"registry": reg, "location": config.get("location"), "replications": rows})


@api_handler
async def create_replication(api: ManageAPI, request: web.Request) -> web.Response:
    reg, caller = await api.manager(request)
    doc = await api.body(request, ("location",))
    config = await _config(api, reg)
    if not skus.of_config(config).geo_replication:
        raise Invalid(
            f"replications need the Premium tier (registry {reg!r} is "
            f"{config.get('sku')}): `meridian registry update {reg} --sku Premium`"
        )
    region = _check_region(api, doc.get("location"))

    def add(current: dict) -> dict:
        replicas = current.get("replicas")
        if not isinstance(replicas, list) or not replicas:
            raise Exists(
                f"registry {reg!r} is held in every region (it sets no replicas): "
                f"{region} holds it already"
            )
        if region in replicas:
            raise Exists(f"{region} is already a replica of {reg!r}", {"region": region})
        if current.get("state") == registries.DELETING:
            raise NotFound(f"registry {reg!r} is being deleted")
        return {**current, "replicas": sorted({*replicas, region})}

    new = await _swapped(api.ns.update_registry_config(reg, add))
    api.audit(caller, f"added replication of {reg} to {region}")
    return api.ok(_row(api, reg, region, new, api.ns.alive_regions()), 201)


@api_handler
async def delete_replication(api: ManageAPI, request: web.Request) -> web.Response:
    reg, caller = await api.manager(request)
    region = request.match_info["region"]
    config = await _config(api, reg)
    if region == config.get("location"):
        raise Invalid(
            f"{region} is the home location of {reg!r}; its copy goes only with the "
            f"registry: `meridian registry delete {reg}`"
        )
    every = sorted(_regions(api))

    def remove(current: dict) -> dict:
        replicas = current.get("replicas")
        held = replicas if isinstance(replicas, list) and replicas else every
        if region not in held:
            raise NotFound(f"{region} is not a replica of {reg!r}", {"region": region})
        left = sorted(r for r in held if r != region)
        if not left:
            raise Invalid(f"{region} holds the last copy of {reg!r}: keep it")
        return {**current, "replicas": left}

    await _swapped(api.ns.update_registry_config(reg, remove))
    api.audit(caller, f"removed replication of {reg} from {region}")
    return api.done()


@api_handler
async def usage(api: ManageAPI, request: web.Request) -> web.Response:
    reg, _ = await api.manager(request)
    config = await _config(api, reg)
    records = api.ns.usage_records(reg)
    now = time.time()
    st = api.ns.cache.registries.get(reg)
    regions = set(_replicas(api, config)) | set(records)
    if st is not None:
        regions |= {r for places in st.placements.values() for r in places}
    rows = []
    for region in sorted(regions):
        rec = figures(records.get(region, {}), now)
        rows.append(
            {
                "region": region,
                "home": region == config.get("location"),
                "stored_bytes": stored_in(api.ns, reg, region),
                **rec,
            }
        )
    distinct = 0
    if st is not None:
        distinct = sum(
            next(iter(places.values()))
            for d, places in st.placements.items()
            if places and api.ns.references(reg, d)
        )
    total: dict[str, Any] = {
        "stored_bytes": distinct,
        "gib_days": float(f"{sum(r['gib_days'] for r in rows):.6g}"),  # as each row's
    }
    total.update({name: sum(r[name] for r in rows) for name in FIELDS})
    return api.ok(
        {
            "registry": reg,
            "sku": config.get("sku"),
            "location": config.get("location"),
            "as_of": round(now, 3),
            "regions": rows,
            "total": total,
        }
    )


@api_handler
async def remove_region(api: ManageAPI, request: web.Request) -> web.Response:
    caller = await api.owner(request)
    region = request.match_info["region"]
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    ns = api.ns
    nodes, _ = await ns.kv.range(region_key(region) + NODES)
    alive = await ns.kv.get(alive_key(region))
    record = await ns.kv.get(region_key(region))
    if record is None and not nodes and alive is None:
        raise NotFound(f"unknown region {region!r} (see `meridian regions`)", {"region": region})
    homes = []
    entries, _ = await ns.kv.range(REG)
    for e in entries:
        reg, _, rest = e.key[len(REG) :].partition("/")
        if rest == "config" and _json(e.value).get("location") == region:
            homes.append(reg)
    if homes:
        raise InUse(
            f"{region} is the home location of registry {', '.join(sorted(homes))}: "
            "delete those registries first",
            {"registries": sorted(homes)},
        )
    if (nodes or alive is not None) and not force:
        ids = sorted(e.key.rpartition("/")[2] for e in nodes)
        raise Busy(
            f"{region} has live nodes ({', '.join(ids) or 'its liveness key is held'}): "
            "stop its nodes first (or pass --force: nodes still running register again)",
            {"nodes": ids},
        )
    removed = await _swapped(ns.remove_region(region))
    await _swapped(close_region(ns, region))
    api.audit(caller, f"removed region {region}{' (forced)' if force else ''}")
    return api.ok({"region": region, "removed": removed})


def add_routes(api: ManageAPI, app: web.Application) -> None:
    r = app.router
    r.add_get(REGISTRY + "/replications", functools.partial(list_replications, api))
    r.add_post(REGISTRY + "/replications", functools.partial(create_replication, api))
    r.add_delete(REGISTRY + "/replications/{region}", functools.partial(delete_replication, api))
    r.add_get(REGISTRY + "/usage", functools.partial(usage, api))
    r.add_delete(PREFIX + "/regions/{region}", functools.partial(remove_region, api))
    node = api.node
    if node is not None:
        add_recorder(
            app,
            api.ns,
            node.registry.usage,
            interval=node.cfg.usage_interval,
            default_registry=api.default_registry,
        )
