"""The management API of webhooks and audit records (issue 13), under
``/meridian/v1/registries/{r}/``:

- ``GET|POST .../webhooks``: list; create (``name``, ``uri``, ``actions``,
  ``scope``, ``headers``, ``status``, ``location``; the answer holds the
  generated signing secret, shown this once). A registry has at most its
  tier's number of webhooks (``cluster.skus``: Basic 2, Standard 10,
  Premium 500; 409 past it, however many creates race: ``_create``).
  ``location`` is a region of the cluster (one
  the registry is replicated to, when its replicas are set); default the
  registry's location, else the region of the node answering.
- ``GET|PATCH|DELETE .../webhooks/{name}``: show (header values and the
  secret only with ``?secret=true``), change (any of the create fields, and
  ``rotate_secret: true`` for a new secret, shown in that answer), delete
  (its queued events and its delivery records go with it);
- ``POST .../webhooks/{name}/ping``: send a signed ``ping`` event now, from
  the node answering; the answer and the delivery record say what the
  receiver answered and how fast;
- ``GET .../webhooks/{name}/events``: events still queued (``pending``) and
  the recent deliveries (request sent, status, latency, attempts, outcome),
  newest first; ``?top=N``;
- ``GET .../audit``: the registry's audit records (``node.audit``), oldest
  first; ``?since=`` (unix seconds or ISO 8601), ``identity=``,
  ``action=``, ``top=``; ``format=jsonl`` answers JSON lines
  (``application/x-ndjson``) for log shippers.
- ``GET /meridian/v1/audit``: the cluster's own records (service principals,
  registries created and deleted), for the cluster owner.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from cluster import skus
from cluster.auth.admin import AdminError, Busy, Exists, Invalid, NotFound
from cluster.kv import Compare, Delete, Entry, Put
from cluster.namespace import Conflict, Namespace
from node import audit
from node.manage import PREFIX, ManageAPI, api_handler
from node.webhooks import records as rec
from node.webhooks.delivery import delivery_record, history_key, send
from node.webhooks.events import payload
from node.webhooks.service import Activity

FIELDS = ("name", "uri", "actions", "scope", "headers", "status", "location")
UPDATE_FIELDS = ("uri", "actions", "scope", "headers", "status", "location", "rotate_secret")
MAX_TOP = 1000
CREATE_ATTEMPTS = 32  # a create that lost to another re-counts; each round one wins


class TooMany(AdminError):
    status, code = 409, "LIMIT_EXCEEDED"


def _activity(api: ManageAPI) -> Activity:
    activity = api.node.registry.activity if api.node is not None else None
    if activity is None:
        raise Invalid("this node runs without webhooks")
    return activity


async def _stored_hook(api: ManageAPI, reg: str, name: str) -> tuple[Entry, rec.Webhook]:
    """A webhook as the store holds it now (and its entry, to compare on)."""
    entry = await api.ns.kv.get(rec.hook_key(reg, name))
    if entry is None:
        raise NotFound(f"no webhook {name!r}: list them with `meridian webhook list`")
    return entry, rec.Webhook.from_json(entry.value)


def _location(api: ManageAPI, reg: str, given: object) -> str:
    ns = api.ns
    config = ns.registry_config(reg)
    if given is None or given == "":
        given = config.get("location") or ns.region
    if not isinstance(given, str):
        raise Invalid("location is a region's name")
    regions = set(ns.regions()) | {ns.region}
    if given not in regions:
        raise Invalid(
            f"no region {given!r} in this cluster: the regions are {', '.join(sorted(regions))}"
        )
    replicas = ns.registry_replicas(reg)
    if replicas is not None and given not in replicas:
        raise Invalid(
            f"registry {reg!r} is not replicated to {given!r}: a webhook's location is one of "
            f"its replicas ({', '.join(sorted(replicas))})"
        )
    return given


def _check_count(ns: Namespace, reg: str, existing: int) -> None:
    sku = skus.of_config(ns.registry_config(reg))
    if sku.webhooks is not None and existing >= sku.webhooks:
        raise TooMany(
            f"registry {reg!r} has {existing} webhooks, the most its {sku.name} tier allows "
            f"({sku.webhooks}): delete one, or move to a higher tier with "
            f"`meridian registry update {reg} --sku ...`",
            {"limit": sku.webhooks, "sku": sku.name},
        )


async def _create(ns: Namespace, reg: str, hook: rec.Webhook) -> None:
    """Count and write in one transaction: it holds only if the registry's
    webhook guard is unchanged since the read that counted (every create
    rewrites it), so concurrent creates -- on any node -- commit one at a
    time and never pass the tier's count. One that lost counts again."""
    key, guard = rec.hook_key(reg, hook.name), rec.hooks_guard_key(reg)
    for attempt in range(CREATE_ATTEMPTS):
        # The webhooks and the guard at one revision: a create after it moved the guard.
        entries = await ns.refresh(rec.hooks_and_guard(reg))
        guard_rev = next((e.mod_revision for e in entries if e.key == guard), 0)
        _check_count(ns, reg, sum(1 for e in entries if rec.parse_hook_key(e.key)))
        try:  # through the cache: this node's next push sees the webhook
            await ns.commit(
                [Compare(key, 0), Compare(guard, guard_rev)],
                [Put(key, hook.to_json()), Put(guard, hook.name.encode())],
            )
            return
        except Conflict:
            if await ns.kv.get(key) is not None:
                raise Exists(
                    f"webhook {hook.name!r} exists already in {reg!r}: pick another name"
                ) from None
        await asyncio.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # another create won
    raise Busy(f"webhooks of {reg!r} are being created at this very moment: retry")


@api_handler
async def list_hooks(api: ManageAPI, request: web.Request) -> web.Response:
    reg, _ = await api.manager(request)
    hooks = sorted(_activity(api).hooks.of(reg), key=lambda h: h.name)
    return api.ok({"webhooks": [h.public() for h in hooks]})


@api_handler
async def create_hook(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    doc = await api.body(request, FIELDS)
    name = rec.check_hook_name(doc.get("name"))
    hook = rec.Webhook(
        name=name,
        location=_location(api, reg, doc.get("location")),
        uri=rec.check_uri(doc.get("uri")),
        actions=rec.check_actions(doc.get("actions")),
        scope=rec.check_scope(doc.get("scope")),
        headers=rec.check_headers(doc.get("headers")),
        status=rec.check_status(doc.get("status", "enabled")),
        secret=rec.new_secret(),
        created=rec.now(),
    )
    await _create(api.ns, reg, hook)
    api.audit(c, f"created webhook {reg}/{name} ({','.join(hook.actions)} -> {hook.location})")
    return api.ok(hook.public(secret=True), 201)


def _name(request: web.Request) -> str:
    return rec.check_hook_name(request.match_info["name"])


@api_handler
async def show_hook(api: ManageAPI, request: web.Request) -> web.Response:
    reg, _ = await api.manager(request)
    name = _name(request)
    _, hook = await _stored_hook(api, reg, name)
    secret = request.query.get("secret", "").lower() in ("1", "true", "yes")
    return api.ok(hook.public(secret=secret))


@api_handler
async def update_hook(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name = _name(request)
    doc = await api.body(request, UPDATE_FIELDS)
    if not doc:
        raise Invalid(f"nothing to change: give any of {', '.join(UPDATE_FIELDS)}")
    key = rec.hook_key(reg, name)
    for _ in range(8):
        entry, hook = await _stored_hook(api, reg, name)
        changes: dict[str, Any] = {}
        if "uri" in doc:
            changes["uri"] = rec.check_uri(doc["uri"])
        if "actions" in doc:
            changes["actions"] = rec.check_actions(doc["actions"])
        if "scope" in doc:
            changes["scope"] = rec.check_scope(doc["scope"])
        if "headers" in doc:
            changes["headers"] = rec.check_headers(doc["headers"])
        if "status" in doc:
            changes["status"] = rec.check_status(doc["status"])
        if "location" in doc:
            changes["location"] = _location(api, reg, doc["location"])
        rotate = doc.get("rotate_secret")
        if rotate not in (None, True, False):
            raise Invalid("rotate_secret is true or false")
        if rotate:
            changes["secret"] = rec.new_secret()
        new = rec.Webhook(**{**hook.__dict__, **changes})
        try:
            await api.ns.commit([Compare(key, entry.mod_revision)], [Put(key, new.to_json())])
        except Conflict:
            continue
        api.audit(c, f"updated webhook {reg}/{name}: {', '.join(sorted(doc))}")
        return api.ok(new.public(secret=bool(rotate)))
    raise AdminError("the webhook kept changing under this update: retry")


async def _delete_prefix(ns: Namespace, prefix: str) -> None:
    entries = await ns.refresh(prefix)
    for i in range(0, len(entries), 100):
        await ns.kv.txn([], [Delete(e.key) for e in entries[i : i + 100]])


@api_handler
async def delete_hook(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name = _name(request)
    key = rec.hook_key(reg, name)
    entry, hook = await _stored_hook(api, reg, name)
    try:
        await api.ns.commit([Compare(key, entry.mod_revision)], [Delete(key)])
    except Conflict:
        raise Busy("the webhook changed meanwhile: look again and retry") from None
    await _delete_prefix(api.ns, rec.events_prefix(reg, hook.location, name))
    await _delete_prefix(api.ns, rec.deliveries_prefix(reg, hook.location, name))
    api.audit(c, f"deleted webhook {reg}/{name}")
    return api.done()


@api_handler
async def ping_hook(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name = _name(request)
    _, hook = await _stored_hook(api, reg, name)
    activity = _activity(api)
    doc = payload("ping", registry=reg, region=api.ns.region)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        sent = await send(session, hook, doc, activity.timeout)
    outcome = "delivered" if sent["result"] == "ok" else "failed"
    await api.ns.kv.txn(
        [],
        [
            Put(
                history_key(reg, hook.location, name, doc["id"]),
                delivery_record(doc, sent, outcome, 1),
            )
        ],
    )
    api.audit(c, f"pinged webhook {reg}/{name}")
    return api.ok(
        {
            "id": doc["id"],
            "outcome": outcome,
            "status": sent["response"]["status"],
            "error": sent["response"]["error"],
            "latency_ms": sent["latency_ms"],
        }
    )


def _top(request: web.Request, default: int) -> int:
    raw = request.query.get("top")
    if raw is None:
        return default
    try:
        top = int(raw)
    except ValueError:
        top = -1
    if not 1 <= top <= MAX_TOP:
        raise Invalid(f"top is a number from 1 to {MAX_TOP}")
    return top


@api_handler
async def hook_events(api: ManageAPI, request: web.Request) -> web.Response:
    reg, _ = await api.manager(request)
    name = _name(request)
    _, hook = await _stored_hook(api, reg, name)
    top = _top(request, 50)
    out: list[dict[str, Any]] = []
    pending = await api.ns.refresh(rec.events_prefix(reg, hook.location, name))
    for e in sorted(pending, key=lambda e: e.mod_revision, reverse=True):
        try:
            ev = json.loads(e.value)
            doc = ev["payload"]
        except (ValueError, KeyError, TypeError):
            continue
        out.append(
            {
                "id": doc.get("id"),
                "action": doc.get("action"),
                "time": ev.get("created"),
                "outcome": "pending",
                "request": {"method": "POST", "uri": hook.uri, "body": doc},
                "response": None,
            }
        )
    done = await api.ns.refresh(rec.deliveries_prefix(reg, hook.location, name))
    for e in reversed(done):
        try:
            out.append(json.loads(e.value))
        except ValueError:
            continue
    return api.ok({"webhook": name, "location": hook.location, "events": out[:top]})


# -- audit -------------------------------------------------------------------------


def _since(raw: str | None) -> float:
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise Invalid(
            f"since is unix seconds or an ISO 8601 time (2030-01-01T00:00:00Z), not {raw[:40]!r}"
        ) from None


async def _audit_answer(
    api: ManageAPI, request: web.Request, registry: str | None
) -> web.StreamResponse:
    action = request.query.get("action", "")
    if action and action not in audit.ACTIONS:
        raise Invalid(f"action is one of {', '.join(audit.ACTIONS)}")
    items = await audit.read(
        api.ns,
        registry,
        since=_since(request.query.get("since")),
        identity=request.query.get("identity", ""),
        action=action,
        limit=_top(request, audit.DEFAULT_LIMIT),
    )
    fmt = request.query.get("format", "json")
    if fmt == "jsonl":
        return web.Response(
            text=audit.records(items),
            content_type="application/x-ndjson",
            headers=api.headers(),
        )
    if fmt != "json":
        raise Invalid("format is json or jsonl")
    return api.ok({"registry": registry, "records": items, "now": time.time()})


@api_handler
async def registry_audit(api: ManageAPI, request: web.Request) -> web.StreamResponse:
    reg, _ = await api.manager(request)
    return await _audit_answer(api, request, reg)


@api_handler
async def cluster_audit(api: ManageAPI, request: web.Request) -> web.StreamResponse:
    await api.owner(request)
    return await _audit_answer(api, request, None)


def add_routes(api: ManageAPI, app: web.Application) -> None:
    r = app.router
    base = PREFIX + "/registries/{registry}"
    r.add_get(base + "/webhooks", functools.partial(list_hooks, api))
    r.add_post(base + "/webhooks", functools.partial(create_hook, api))
    r.add_get(base + "/webhooks/{name}", functools.partial(show_hook, api))
    r.add_patch(base + "/webhooks/{name}", functools.partial(update_hook, api))
    r.add_delete(base + "/webhooks/{name}", functools.partial(delete_hook, api))
    r.add_post(base + "/webhooks/{name}/ping", functools.partial(ping_hook, api))
    r.add_get(base + "/webhooks/{name}/events", functools.partial(hook_events, api))
    r.add_get(base + "/audit", functools.partial(registry_audit, api))
    r.add_get(PREFIX + "/audit", functools.partial(cluster_audit, api))
