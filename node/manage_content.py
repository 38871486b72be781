"""Content management (ACR's ``az acr repository``/``manifest``/``config
retention``): repositories, tags, manifests, their locks and the retention
of untagged manifests, under ``/meridian/v1/registries/{r}/``.

A repository name is nested (``team/app/web``), so it travels as the
``repository`` query parameter, never as path components:

- ``GET .../repositories``: every repository with its tag and manifest
  counts and last update;
- ``GET|PATCH|DELETE .../repository?repository=R``: show one (with its
  lock attributes), change its attributes (``write_enabled``,
  ``delete_enabled``, ``read_enabled``, ``list_enabled``), delete it whole
  (with one webhook ``delete`` event naming the repository, as ACR's);
- ``GET .../tags?repository=R[&orderby=time_desc|time_asc|name][&top=N]``:
  tags with digest, size, media type, created, last update, attributes;
- ``GET|DELETE .../tag?repository=R&tag=T``: one tag; untag (the manifest
  stays);
- ``GET .../manifests?repository=R``: every manifest, untagged ones too;
- ``GET|PATCH|DELETE .../manifest?repository=R&reference=TAG|DIGEST``: a
  manifest (its record, its tags, the manifest as stored), its attributes
  (of the tag when the reference is a tag, of the manifest when it is a
  digest, as ``az acr repository update --image`` does), delete it with its
  tags;
- ``GET|PATCH .../retention``: ``{"enabled", "days"}`` of the registry's
  untagged-manifest retention (Premium, and the tierless default registry).

Locks follow ACR: ``write_enabled: false`` refuses pushes onto the tag (or
into the repository) and deletes; ``delete_enabled: false`` refuses
deletes; ``read_enabled: false`` refuses manifest GETs through it;
``list_enabled: false`` leaves it out of tag lists and the catalog (here
too). Writes and deletes are enforced in the namespace's transactions
(``Namespace.check_write``/``check_delete`` plus a compare on the
repository's lock guard), for the v2 API and this one alike; a refusal here
is ``409 LOCKED`` with the command that unlocks, on the v2 API ``403
DENIED``. Changes take the registry's managers (``ManageAPI.manager``);
the reads of repositories, tags and manifests also answer whoever may pull
the repository (``_reader``: as the v2 catalog filters).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cluster import registries, skus
from cluster.auth.admin import AdminError, Invalid, NotFound, check_bool, check_registry, iso
from cluster.namespace import LOCK_ATTRS, Conflict, Lock, Locked, ManifestRecord, RepoState
from node.manage import ManageAPI, api_handler
from ocidist.digests import check_name, check_tag, parse_digest
from ocidist.errors import Code, RegistryError

ORDERS = ("time_desc", "time_asc", "name")
MAX_RETENTION_DAYS = 365


class LockedError(AdminError):
    status, code = 409, "LOCKED"


class Raced(AdminError):
    status, code = 409, "CONFLICT"


Handler = Callable[[ManageAPI, web.Request], Awaitable[web.StreamResponse]]


def _route(api: ManageAPI, fn: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    wrapped = api_handler(fn)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await wrapped(api, request)

    return handle


# -- reading the namespace ------------------------------------------------------


def _param(request: web.Request, name: str, what: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise Invalid(f"give the {what} as ?{name}=")
    return value


READ = frozenset({"pull", "metadata_read"})
Reader = Callable[[str], bool]


async def _reader(api: ManageAPI, request: web.Request) -> tuple[str, Reader]:
    """The registry and which repositories the caller may read: all for its
    managers, else those its identity may pull (a service principal with
    AcrPull, a token whose scope map reads them: as the v2 catalog)."""
    reg = check_registry(request.match_info["registry"])
    c = await api.caller(request, reg)
    assert c is not None
    if reg != api.default_registry and await registries.known(api.ns, reg) is None:
        raise NotFound(registries.unknown(reg), {"registry": reg})
    if c.manage:
        return reg, lambda _repo: True
    principal = None
    if api.gate is not None:
        principal = await api.gate.identities.principal_for(c.kind, c.name, reg)
    if principal is None or not principal.grants:
        raise RegistryError(
            Code.DENIED,
            f"{c.subject} may not read registry {reg!r}: that takes pull rights or the Owner role",
        )
    return reg, lambda repo: bool(principal.actions(repo) & READ)


async def _repo(
    api: ManageAPI, reg: str, request: web.Request, may: Reader | None = None
) -> tuple[str, RepoState]:
    name = check_name(_param(request, "repository", "repository name"))
    if may is not None and not may(name):
        raise RegistryError(
            Code.DENIED, f"the caller may not read repository {name!r}: that takes pull rights"
        )
    await api.ns.caught_up()
    rs = api.ns.repo(reg, name)
    if rs is None or not rs.manifests:
        raise NotFound(
            f"repository {name!r} not found in registry {reg!r}: list them with "
            "`meridian repository list`"
        )
    return name, rs


def _lock_attrs(api: ManageAPI, reg: str, repo: str, ref: str | None) -> dict[str, bool]:
    return api.ns.lock(reg, repo, ref).to_dict()


def _tag_row(api: ManageAPI, reg: str, repo: str, rs: RepoState, tag: str) -> dict[str, Any]:
    digest = rs.tags[tag]
    rec = rs.manifests.get(digest)
    created, updated = rec.tag_times(tag) if rec is not None else (0.0, 0.0)
    return {
        "name": tag,
        "digest": digest,
        "size": rec.size if rec is not None else None,
        "media_type": rec.media_type if rec is not None else None,
        "created": iso(created),
        "last_update": iso(updated),
        **_lock_attrs(api, reg, repo, tag),
        "_t": updated,
    }


def _tags_of(rs: RepoState) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tag in rs.sorted_tags():
        out.setdefault(rs.tags[tag], []).append(tag)
    return out


def _manifest_row(
    api: ManageAPI, reg: str, repo: str, rec: ManifestRecord, tags: list[str]
) -> dict[str, Any]:
    return {
        "digest": rec.digest,
        "media_type": rec.media_type,
        "artifact_type": rec.artifact_type,
        "size": rec.size,
        "tags": tags,
        "subject": rec.subject,
        "manifests": list(rec.manifests),
        "created": iso(rec.first_pushed or rec.created),
        "last_update": iso(rec.created),
        **_lock_attrs(api, reg, repo, rec.digest),
    }


def _repo_row(reg: str, repo: str, rs: RepoState) -> dict[str, Any]:
    recs = rs.manifests.values()
    return {
        "registry": reg,
        "name": repo,
        "tag_count": len(rs.tags),
        "manifest_count": len(rs.manifests),
        "created": iso(min((r.first_pushed or r.created for r in recs), default=None)),
        "last_update": iso(max((r.created for r in recs), default=None)),
    }


def _resolve(
    api: ManageAPI, reg: str, repo: str, rs: RepoState, ref: str
) -> tuple[ManifestRecord, str | None]:
    """The manifest a reference names, and the tag when it is one."""
    if ":" in ref:
        parse_digest(ref)
        rec = rs.manifests.get(ref)
        if rec is None:
            raise NotFound(
                f"manifest {ref} not found in {repo}: list them with "
                f"`meridian repository show-manifests --repository {repo}`"
            )
        return rec, None
    check_tag(ref)
    digest = rs.tags.get(ref)
    rec = rs.manifests.get(digest) if digest else None
    if rec is None:
        raise NotFound(
            f"tag {ref!r} not found in {repo}: list them with "
            f"`meridian repository show-tags --repository {repo}`"
        )
    return rec, ref


async def _set_attrs(
    api: ManageAPI, request: web.Request, reg: str, repo: str, ref: str | None
) -> Lock:
    """Change the attributes the request's body names; NotFound if the
    repository, tag or manifest went meanwhile."""
    fields = tuple(f"{a}_enabled" for a in LOCK_ATTRS)
    doc = await api.body(request, fields)
    attrs = {k: check_bool(k, v) for k, v in doc.items()}
    if not attrs:
        raise Invalid(f"nothing to change: give one or more of {', '.join(fields)}")
    write, delete, read, list_ = (attrs.get(f) for f in fields)
    change = api.ns.set_lock(reg, repo, ref, write=write, delete=delete, read=read, list_=list_)
    lock = await _locked(change)
    if lock is None:
        raise NotFound(f"{ref or 'repository ' + repo} is gone from registry {reg!r}")
    return lock


async def _locked(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except Locked as e:
        raise LockedError(str(e)) from None
    except Conflict:
        raise Raced("the repository changed while this ran: try again") from None


async def _observed(
    api: ManageAPI, request: web.Request, reg: str, repo: str, ref: str, call: Awaitable[Any]
) -> Any:
    """A tag or manifest delete with the webhook events and audit record a
    v2 DELETE of it gets (``node.webhooks``), when the node has them."""
    activity = api.node.registry.activity if api.node is not None else None
    info = activity.before_delete(reg, repo, ref) if activity is not None else None
    try:
        done = await _locked(call)
    except AdminError as e:
        if activity is not None and info is not None:
            activity.delete_failed(request, info, e.code)
        raise
    if done and activity is not None and info is not None:
        await activity.deleted(request, info)
    return done


# -- repositories ----------------------------------------------------------------


async def list_repositories(api: ManageAPI, request: web.Request) -> web.Response:
    reg, may = await _reader(api, request)
    await api.ns.caught_up()
    rows = []
    for name in api.ns.repos(reg):
        rs = api.ns.repo(reg, name)
        if rs is not None and may(name) and api.ns.listed(reg, name):
            row = _repo_row(reg, name, rs)
            del row["registry"]
            rows.append(row)
    return api.ok({"registry": reg, "repositories": rows})


async def show_repository(api: ManageAPI, request: web.Request) -> web.Response:
    reg, may = await _reader(api, request)
    name, rs = await _repo(api, reg, request, may)
    return api.ok({**_repo_row(reg, name, rs), **_lock_attrs(api, reg, name, None)})


async def update_repository(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name, _ = await _repo(api, reg, request)
    lock = await _set_attrs(api, request, reg, name, None)
    api.audit(c, f"set attributes of repository {reg}/{name}: {json.dumps(lock.to_dict())}")
    rs = api.ns.repo(reg, name)
    assert rs is not None
    return api.ok({**_repo_row(reg, name, rs), **lock.to_dict()})


async def delete_repository(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name, rs = await _repo(api, reg, request)
    counts = {"tags": len(rs.tags), "manifests": len(rs.manifests)}
    activity = api.node.registry.activity if api.node is not None else None
    events = activity.repository_delete_events(request, reg, name) if activity else []
    if await _locked(api.ns.delete_repository(reg, name, events)) is None:
        raise NotFound(f"repository {name!r} is gone")
    api.audit(c, f"deleted repository {reg}/{name}")
    return api.ok({"registry": reg, "name": name, "deleted": counts})


# -- tags ----------------------------------------------------------------------------


async def list_tags(api: ManageAPI, request: web.Request) -> web.Response:
    reg, may = await _reader(api, request)
    order = request.query.get("orderby", "name")
    if order not in ORDERS:
        raise Invalid(f"orderby must be one of {', '.join(ORDERS)}, not {order[:40]!r}")
    top = request.query.get("top")
    limit = None
    if top is not None:
        if not top.isdigit() or int(top) < 1:
            raise Invalid(f"top must be a whole number of at least 1, not {top[:40]!r}")
        limit = int(top)
    name, rs = await _repo(api, reg, request, may)
    rows = [_tag_row(api, reg, name, rs, t) for t in api.ns.listed_tags(reg, name)]
    if order != "name":
        rows.sort(key=lambda r: (r["_t"], r["name"]), reverse=order == "time_desc")
    for r in rows:
        del r["_t"]
    return api.ok({"registry": reg, "repository": name, "tags": rows[:limit]})


async def show_tag(api: ManageAPI, request: web.Request) -> web.Response:
    reg, may = await _reader(api, request)
    name, rs = await _repo(api, reg, request, may)
    tag = check_tag(_param(request, "tag", "tag"))
    _resolve(api, reg, name, rs, tag)
    row = _tag_row(api, reg, name, rs, tag)
    del row["_t"]
    return api.ok({"registry": reg, "repository": name, **row})


async def untag(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name, rs = await _repo(api, reg, request)
    tag = check_tag(_param(request, "tag", "tag"))
    _resolve(api, reg, name, rs, tag)
    if not await _observed(api, request, reg, name, tag, api.ns.delete_tag(reg, name, tag)):
        raise NotFound(f"tag {tag!r} is gone from {name}")
    api.audit(c, f"untagged {reg}/{name}:{tag}")
    return api.done()


# -- manifests ------------------------------------------------------------------------


async def list_manifests(api: ManageAPI, request: web.Request) -> web.Response:
    reg, may = await _reader(api, request)
    name, rs = await _repo(api, reg, request, may)
    tags = _tags_of(rs)
    rows = [
        _manifest_row(api, reg, name, rec, tags.get(d, []))
        for d, rec in sorted(rs.manifests.items(), key=lambda kv: (-kv[1].created, kv[0]))
    ]
    return api.ok({"registry": reg, "repository": name, "manifests": rows})


async def show_manifest(api: ManageAPI, request: web.Request) -> web.Response:
    reg, may = await _reader(api, request)
    name, rs = await _repo(api, reg, request, may)
    rec, tag = _resolve(api, reg, name, rs, _param(request, "reference", "tag or digest"))
    doc = _manifest_row(api, reg, name, rec, _tags_of(rs).get(rec.digest, []))
    if tag is not None:
        doc["tag"] = {"name": tag, **_lock_attrs(api, reg, name, tag)}
    assert api.node is not None
    body = await api.node.registry._manifest_body(rec)
    try:
        doc["manifest"] = json.loads(body)
    except ValueError:
        doc["manifest"] = None
    return api.ok({"registry": reg, "repository": name, **doc})


async def update_manifest(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name, rs = await _repo(api, reg, request)
    rec, tag = _resolve(api, reg, name, rs, _param(request, "reference", "tag or digest"))
    ref = tag if tag is not None else rec.digest
    lock = await _set_attrs(api, request, reg, name, ref)
    where = f"{reg}/{name}{'@' if tag is None else ':'}{ref}"
    api.audit(c, f"set attributes of {where}: {json.dumps(lock.to_dict())}")
    kind = "tag" if tag is not None else "manifest"
    return api.ok({"registry": reg, "repository": name, kind: ref, **lock.to_dict()})


async def delete_manifest(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    name, rs = await _repo(api, reg, request)
    rec, _ = _resolve(api, reg, name, rs, _param(request, "reference", "tag or digest"))
    tags = _tags_of(rs).get(rec.digest, [])
    deleting = api.ns.delete_manifest(reg, name, rec.digest)
    if not await _observed(api, request, reg, name, rec.digest, deleting):
        raise NotFound(f"manifest {rec.digest} is gone from {name}")
    api.audit(c, f"deleted manifest {reg}/{name}@{rec.digest}")
    return api.ok({"registry": reg, "repository": name, "digest": rec.digest, "tags": tags})


# -- retention ------------------------------------------------------------------------


def _retention_doc(reg: str, config: dict) -> dict[str, Any]:
    policy = config.get("retention") or {}
    return {
        "registry": reg,
        "enabled": bool(policy.get("enabled", False)),
        "days": int(policy.get("days", 7)),
        "sku": skus.of_config(config).name,
    }


async def _registry_config(api: ManageAPI, reg: str) -> dict:
    await api.ns.caught_up()
    st = api.ns.cache.registries.get(reg)
    config = dict(st.config) if st is not None else {}
    if not config and reg != api.default_registry:
        raise NotFound(f"registry {reg!r} not found: create it with `meridian registry create`")
    return config


async def show_retention(api: ManageAPI, request: web.Request) -> web.Response:
    reg, _ = await api.manager(request)
    return api.ok(_retention_doc(reg, await _registry_config(api, reg)))


async def update_retention(api: ManageAPI, request: web.Request) -> web.Response:
    reg, c = await api.manager(request)
    doc = await api.body(request, ("days", "enabled"))
    if not doc:
        raise Invalid("nothing to change: give days and/or enabled")
    if "enabled" in doc:
        check_bool("enabled", doc["enabled"])
    days = doc.get("days")
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or not 0 <= days <= MAX_RETENTION_DAYS
    ):
        raise Invalid(f"days must be a whole number from 0 to {MAX_RETENTION_DAYS}")
    config = await _registry_config(api, reg)
    sku = skus.of_config(config)
    if doc.get("enabled") and not sku.retention:
        raise Invalid(
            f"retention needs the Premium tier; registry {reg!r} is {sku.name}: "
            f"`meridian registry update {reg} --sku Premium` first"
        )

    def change(config: dict) -> dict:
        policy = dict(config.get("retention") or {"enabled": False, "days": 7})
        policy.update(doc)
        return {**config, "retention": policy}

    written = await api.ns.update_registry_config(reg, change)
    api.audit(c, f"set retention of {reg}: {json.dumps(doc, sort_keys=True)}")
    return api.ok(_retention_doc(reg, written))


def add_routes(api: ManageAPI, app: web.Application) -> None:
    base = "/meridian/v1/registries/{registry}/"
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "repositories", list_repositories),
        ("GET", "repository", show_repository),
        ("PATCH", "repository", update_repository),
        ("DELETE", "repository", delete_repository),
        ("GET", "tags", list_tags),
        ("GET", "tag", show_tag),
        ("DELETE", "tag", untag),
        ("GET", "manifests", list_manifests),
        ("GET", "manifest", show_manifest),
        ("PATCH", "manifest", update_manifest),
        ("DELETE", "manifest", delete_manifest),
        ("GET", "retention", show_retention),
        ("PATCH", "retention", update_retention),
    ]
    for method, path, fn in routes:
        app.router.add_route(method, base + path, _route(api, fn))
