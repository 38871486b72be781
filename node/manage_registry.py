"""The management API's registry resources (``cluster.registries``):

- ``GET /meridian/v1/registries``: the registries the caller manages (the
  owner: all, the default registry first)
- ``POST /meridian/v1/registries`` ``{"name", "sku", "location"?}``: create
  one (cluster owner; ``201``; the location defaults to this node's region)
- ``GET /meridian/v1/registries/{r}``: name, login server, tier and its
  limits, location, replicas, created, storage used and quota
- ``PATCH /meridian/v1/registries/{r}`` ``{"sku", "anonymous_pull",
  "public_access" | "default_action": "Allow"|"Deny", "storage_quota"}``
  (bytes, or null for the tier's): the owner; a service principal with
  ``Owner`` on the registry may change all but the tier
- ``DELETE /meridian/v1/registries/{r}``: everything in it, in every region
  (cluster owner; ``204``); the default registry cannot be deleted

Errors as the rest of the API: ``400 INVALID`` (a bad name, tier, location,
quota or field), ``404 NOT_FOUND``, ``409 ALREADY_EXISTS`` (the name is
taken, in any case), ``409 CONFLICT`` (a tier change the registry's content
or settings do not fit: the message says what to remove first).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from aiohttp import web

from cluster.auth.admin import Invalid
from cluster.registries import DoesNotFit, Registries, check_name, check_sku
from cluster.skus import Sku
from node.manage import Caller, ManageAPI, api_handler
from node.webhooks.records import hooks_prefix, parse_hook_key
from ocidist.errors import Code, RegistryError

PATH = "/meridian/v1/registries"
UPDATE_FIELDS = ("sku", "anonymous_pull", "public_access", "default_action", "storage_quota")
DEFAULT_ACTIONS = {"allow": True, "deny": False}


def _ops(api: ManageAPI) -> Registries:
    return Registries(api.ns, default_registry=api.default_registry, domain=api.domain)


def _host(api: ManageAPI, request: web.Request) -> str:
    fwd = api.gate.forwarded(request, "X-Forwarded-Host") if api.gate else None
    return fwd or request.host


def _name(api: ManageAPI, request: web.Request) -> str:
    raw = request.match_info["registry"]
    if raw.lower() == api.default_registry:
        return api.default_registry
    return check_name(raw)


async def _manager(api: ManageAPI, request: web.Request, reg: str) -> Caller:
    """The owner, or a principal that manages ``reg`` (an SP with Owner)."""
    c = await api.caller(request, reg)
    assert c is not None
    if not c.manage:
        raise RegistryError(
            Code.DENIED,
            f"{c.subject} may not manage registry {reg!r}: that takes the cluster owner or a "
            "service principal with the Owner role on it",
        )
    return c


@api_handler
async def list_registries(api: ManageAPI, request: web.Request) -> web.Response:
    c = await api.caller(request, None)
    assert c is not None
    items = _ops(api).list(_host(api, request))
    if c.kind not in ("owner", "open"):
        assert api.gate is not None
        mine = []
        for doc in items:
            p = await api.gate.identities.principal_for(c.kind, c.name, doc["name"])
            if p is not None and p.manage:
                mine.append(doc)
        items = mine
    return api.ok({"registries": items})


@api_handler
async def create_registry(api: ManageAPI, request: web.Request) -> web.Response:
    c = await api.owner(request)
    doc = await api.body(request, ("name", "sku", "location"))
    if "name" not in doc or "sku" not in doc:
        raise Invalid("give the registry's name and sku (Basic, Standard or Premium)")
    out = await _ops(api).create(doc["name"], doc["sku"], doc.get("location"), _host(api, request))
    api.audit(c, f"created registry {out['name']} ({out['sku']}, in {out['location']})")
    return api.ok(out, 201)


@api_handler
async def show_registry(api: ManageAPI, request: web.Request) -> web.Response:
    reg = _name(api, request)
    await _manager(api, request, reg)
    return api.ok(await _ops(api).show(reg, _host(api, request)))


@api_handler
async def update_registry(api: ManageAPI, request: web.Request) -> web.Response:
    reg = _name(api, request)
    c = await _manager(api, request, reg)
    doc: dict[str, Any] = await api.body(request, UPDATE_FIELDS)
    if "default_action" in doc:
        action = doc.pop("default_action")
        if not isinstance(action, str) or action.lower() not in DEFAULT_ACTIONS:
            raise Invalid("default_action must be Allow or Deny", {"default_action": action})
        if "public_access" in doc:
            raise Invalid("give public_access or default_action, not both")
        doc["public_access"] = DEFAULT_ACTIONS[action.lower()]
    if "sku" in doc and c.kind not in ("owner", "open"):
        raise RegistryError(
            Code.DENIED, "only the cluster owner changes a registry's tier: log in as owner"
        )
    if "sku" in doc:
        await _webhooks_fit(api, reg, check_sku(doc["sku"]))
    out = await _ops(api).update(reg, doc, _host(api, request))
    api.audit(c, f"updated registry {reg}: {', '.join(sorted(doc))}")
    return api.ok(out)


async def _webhooks_fit(api: ManageAPI, reg: str, tier: Sku) -> None:
    """A tier with fewer webhooks than the registry has is refused (the
    webhooks' records: ``node.webhooks.records``)."""
    if tier.webhooks is None:
        return
    hooks = [e for e in await api.ns.refresh(hooks_prefix(reg)) if parse_hook_key(e.key)]
    if len(hooks) > tier.webhooks:
        raise DoesNotFit(
            f"the {tier.name} tier allows {tier.webhooks} webhooks and {reg} has {len(hooks)}: "
            f"delete {len(hooks) - tier.webhooks} first (`meridian webhook delete`)",
            {"webhooks": len(hooks), "limit": tier.webhooks},
        )


@api_handler
async def delete_registry(api: ManageAPI, request: web.Request) -> web.Response:
    c = await api.owner(request)
    reg = _name(api, request)
    await _ops(api).delete(reg)
    api.audit(c, f"deleted registry {reg}")
    return api.done()


def add_routes(api: ManageAPI, app: web.Application) -> None:
    r = app.router
    r.add_get(PATH, partial(list_registries, api))
    r.add_post(PATH, partial(create_registry, api))
    one = PATH + "/{registry}"
    r.add_get(one, partial(show_registry, api))
    r.add_patch(one, partial(update_registry, api))
    r.add_delete(one, partial(delete_registry, api))
