"""The ``meridian`` verbs for a registry's content, over a node's management
API (``node/manage_content.py``), as ``az acr repository``/``manifest``/
``config retention`` do:

- ``meridian repository list|show|show-tags|show-manifests|update|untag|delete``;
- ``meridian manifest list|show|update|delete``, which take an image as
  ``REPO:TAG`` or ``REPO@DIGEST``;
- ``meridian config retention show|update``: the retention of untagged
  manifests.

Destructive verbs (``delete``, ``untag``) want ``--yes``. Server, registry,
output and exit codes as the other verbs (``cluster.manage_cli``).
"""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable
from typing import Any

from cluster.manage_cli import Column, Ctx, Parser, many, one, parse_bool
from cluster.preflight import USAGE, CliError

REPO_COLUMNS: list[Column] = [
    ("Name", lambda d: d["name"]),
    ("Tags", lambda d: d["tag_count"]),
    ("Manifests", lambda d: d["manifest_count"]),
    ("LastUpdate", lambda d: d.get("last_update")),
]
ATTRS = {  # ACR's changeable attributes, and what false refuses
    "write": "false: no push onto it and no delete",
    "delete": "false: no delete",
    "read": "false: no manifest GET through it",
    "list": "false: left out of tag lists and the catalog",
}
ATTR_COLUMNS: list[Column] = [
    (f"{k.capitalize()}Enabled", lambda d, k=k: d[f"{k}_enabled"]) for k in ATTRS
]
REPO_SHOW_COLUMNS: list[Column] = [
    *REPO_COLUMNS,
    ("Created", lambda d: d.get("created")),
    *ATTR_COLUMNS,
]
TAG_COLUMNS: list[Column] = [("Name", lambda d: d["name"])]
TAG_DETAIL_COLUMNS: list[Column] = [
    ("Name", lambda d: d["name"]),
    ("Digest", lambda d: d["digest"]),
    ("Size", lambda d: d["size"]),
    ("MediaType", lambda d: d["media_type"]),
    ("Created", lambda d: d["created"]),
    ("LastUpdate", lambda d: d["last_update"]),
    *ATTR_COLUMNS,
]
MANIFEST_COLUMNS: list[Column] = [
    ("Digest", lambda d: d["digest"]),
    ("Tags", lambda d: d["tags"]),
    ("MediaType", lambda d: d["media_type"]),
    ("ArtifactType", lambda d: d.get("artifact_type")),
    ("Size", lambda d: d["size"]),
    ("Created", lambda d: d["created"]),
    ("LastUpdate", lambda d: d["last_update"]),
    *ATTR_COLUMNS,
]
RETENTION_COLUMNS: list[Column] = [
    ("Registry", lambda d: d["registry"]),
    ("Status", lambda d: "enabled" if d["enabled"] else "disabled"),
    ("Days", lambda d: d["days"]),
]


def _path(ctx: Ctx, what: str, **query: str) -> str:
    q = urllib.parse.urlencode({k: v for k, v in query.items() if v})
    return ctx.reg_path(what) + (f"?{q}" if q else "")


def split_image(text: str) -> tuple[str, str]:
    """``REPO:TAG`` or ``REPO@DIGEST`` -> (repository, reference)."""
    repo, at, digest = text.partition("@")
    if at:
        if not repo or not digest:
            raise CliError(f"{text!r} is not REPO@DIGEST (e.g. team/app@sha256:...)", USAGE)
        return repo, digest
    repo, colon, tag = text.rpartition(":")
    if not colon or not repo or not tag or "/" in tag:
        raise CliError(
            f"{text!r} names no tag or digest: give REPO:TAG or REPO@DIGEST (e.g. team/app:v1)",
            USAGE,
        )
    return repo, tag


def _confirm(ctx: Ctx, what: str) -> None:
    if not ctx.args.yes:
        raise CliError(f"this deletes {what} and cannot be undone: add --yes to go ahead", USAGE)


def _attrs(ctx: Ctx) -> dict[str, bool]:
    body = {f"{k}_enabled": getattr(ctx.args, f"{k}_enabled") for k in ATTRS}
    body = {k: v for k, v in body.items() if v is not None}
    if not body:
        flags = ", ".join(f"--{k}-enabled" for k in ATTRS)
        raise CliError(f"nothing to change: give one or more of {flags}", USAGE)
    return body


# -- repository ------------------------------------------------------------------------


def repo_list(ctx: Ctx) -> None:
    doc = ctx.api.call("GET", _path(ctx, "repositories"))
    many(ctx, doc["repositories"], REPO_COLUMNS, doc)


def repo_show(ctx: Ctx) -> None:
    doc = ctx.api.call("GET", _path(ctx, "repository", repository=ctx.args.repository))
    one(ctx, doc, REPO_SHOW_COLUMNS)


def repo_show_tags(ctx: Ctx) -> None:
    a = ctx.args
    query = {"repository": a.repository, "orderby": a.orderby or ""}
    if a.top is not None:
        query["top"] = str(a.top)
    doc = ctx.api.call("GET", _path(ctx, "tags", **query))
    if a.detail:
        many(ctx, doc["tags"], TAG_DETAIL_COLUMNS, doc)
    else:
        many(ctx, doc["tags"], TAG_COLUMNS, [t["name"] for t in doc["tags"]])


def repo_show_manifests(ctx: Ctx) -> None:
    doc = ctx.api.call("GET", _path(ctx, "manifests", repository=ctx.args.repository))
    many(ctx, doc["manifests"], MANIFEST_COLUMNS, doc)


def repo_update(ctx: Ctx) -> None:
    a = ctx.args
    body = _attrs(ctx)
    if a.image:
        repo, ref = split_image(a.image)
        doc = ctx.api.call("PATCH", _path(ctx, "manifest", repository=repo, reference=ref), body)
        one(ctx, doc, [("Image", lambda d: a.image), *ATTR_COLUMNS])
        return
    doc = ctx.api.call("PATCH", _path(ctx, "repository", repository=a.repository), body)
    one(ctx, doc, REPO_SHOW_COLUMNS)


def repo_untag(ctx: Ctx) -> None:
    repo, tag = split_image(ctx.args.image)
    if "@" in ctx.args.image:
        raise CliError("untag takes REPO:TAG (a digest has no tag to remove)", USAGE)
    ctx.api.call("DELETE", _path(ctx, "tag", repository=repo, tag=tag))


def repo_delete(ctx: Ctx) -> None:
    a = ctx.args
    if a.image:
        _confirm(ctx, f"the manifest {a.image} names and all its tags")
        _manifest_delete(ctx, a.image)
        return
    _confirm(ctx, f"repository {a.repository}: every tag and manifest in it")
    doc = ctx.api.call("DELETE", _path(ctx, "repository", repository=a.repository))
    one(
        ctx,
        doc,
        [
            ("Name", lambda d: d["name"]),
            ("DeletedTags", lambda d: d["deleted"]["tags"]),
            ("DeletedManifests", lambda d: d["deleted"]["manifests"]),
        ],
    )


# -- manifest -----------------------------------------------------------------------------


def manifest_list(ctx: Ctx) -> None:
    repo_show_manifests(ctx)


def manifest_show(ctx: Ctx) -> None:
    repo, ref = split_image(ctx.args.image)
    doc = ctx.api.call("GET", _path(ctx, "manifest", repository=repo, reference=ref))
    one(ctx, doc, MANIFEST_COLUMNS)


def manifest_update(ctx: Ctx) -> None:
    ctx.args.repository = None
    repo_update(ctx)


def _manifest_delete(ctx: Ctx, image: str) -> None:
    repo, ref = split_image(image)
    doc = ctx.api.call("DELETE", _path(ctx, "manifest", repository=repo, reference=ref))
    one(ctx, doc, [("Digest", lambda d: d["digest"]), ("DeletedTags", lambda d: d["tags"])])


def manifest_delete(ctx: Ctx) -> None:
    _confirm(ctx, f"the manifest {ctx.args.image} names and all its tags")
    _manifest_delete(ctx, ctx.args.image)


# -- config retention -----------------------------------------------------------------------


def retention_show(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("GET", _path(ctx, "retention")), RETENTION_COLUMNS)


def retention_update(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {}
    if a.days is not None:
        body["days"] = a.days
    if a.status is not None:
        body["enabled"] = a.status == "enabled"
    if not body:
        raise CliError("nothing to change: give --days and/or --status", USAGE)
    one(ctx, ctx.api.call("PATCH", _path(ctx, "retention"), body), RETENTION_COLUMNS)


# -- the parsers ------------------------------------------------------------------------------


def _whole(lo: int, hi: int | None) -> Callable[[str], int]:
    span = f"{lo}..{hi}" if hi is not None else f"at least {lo}"

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < lo or (hi is not None and int(text) > hi):
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text!r}")
        return int(text)

    return parse


def _attr_flags(p: argparse.ArgumentParser) -> None:
    for attr, what in ATTRS.items():
        p.add_argument(f"--{attr}-enabled", type=parse_bool, metavar="true|false", help=what)


def _yes(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="do it (it cannot be undone)")


def _repository(sub: Any, common: Parser, _: Parser) -> None:
    sub.add_parser("list", parents=[common], help="the registry's repositories").set_defaults(
        run=repo_list
    )
    for verb, fn, help_ in (
        ("show", repo_show, "a repository: counts, times, attributes"),
        ("show-manifests", repo_show_manifests, "its manifests, untagged ones too"),
    ):
        p = sub.add_parser(verb, parents=[common], help=help_)
        p.add_argument("--repository", required=True)
        p.set_defaults(run=fn)
    p = sub.add_parser("show-tags", parents=[common], help="its tags")
    p.add_argument("--repository", required=True)
    p.add_argument("--orderby", choices=("time_desc", "time_asc", "name"))
    p.add_argument("--top", type=_whole(1, None), help="only the first N")
    p.add_argument(
        "--detail", action="store_true", help="digest, size, times and attributes of each"
    )
    p.set_defaults(run=repo_show_tags)
    p = sub.add_parser(
        "update", parents=[common], help="lock or unlock a repository, a tag or a manifest"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--repository")
    g.add_argument("--image", help="REPO:TAG (the tag) or REPO@DIGEST (the manifest)")
    _attr_flags(p)
    p.set_defaults(run=repo_update)
    p = sub.add_parser("untag", parents=[common], help="remove a tag (the manifest stays)")
    p.add_argument("--image", required=True, help="REPO:TAG")
    p.set_defaults(run=repo_untag)
    p = sub.add_parser(
        "delete", parents=[common], help="delete a repository, or a manifest and its tags"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--repository")
    g.add_argument("--image", help="REPO:TAG or REPO@DIGEST: that manifest and all its tags")
    _yes(p)
    p.set_defaults(run=repo_delete)


def _manifest(sub: Any, common: Parser, _: Parser) -> None:
    p = sub.add_parser("list", parents=[common], help="a repository's manifests")
    p.add_argument("--repository", required=True)
    p.set_defaults(run=manifest_list)
    for verb, fn, help_ in (
        ("show", manifest_show, "a manifest: record, tags, attributes, its JSON (-o json)"),
        ("update", manifest_update, "lock or unlock it (the tag, or by digest the manifest)"),
        ("delete", manifest_delete, "delete it with all its tags"),
    ):
        p = sub.add_parser(verb, parents=[common], help=help_)
        p.add_argument("image", help="REPO:TAG or REPO@DIGEST")
        if verb == "update":
            _attr_flags(p)
        if verb == "delete":
            _yes(p)
        p.set_defaults(run=fn)


def _config(sub: Any, common: Parser, _: Parser) -> None:
    r = sub.add_parser("retention", help="retention of untagged manifests (Premium)")
    rsub = r.add_subparsers(dest="action", required=True, parser_class=Parser)
    rsub.add_parser("show", parents=[common], help="the policy").set_defaults(run=retention_show)
    p = rsub.add_parser("update", parents=[common], help="change it")
    p.add_argument(
        "--days", type=_whole(0, 365), help="keep untagged manifests this many days (0..365)"
    )
    p.add_argument("--status", choices=("enabled", "disabled"))
    p.set_defaults(run=retention_update)


GROUPS = {
    "repository": (_repository, "a registry's repositories, tags and their locks"),
    "manifest": (_manifest, "a repository's manifests: show, lock, delete"),
    "config": (_config, "registry policies: retention of untagged manifests"),
}
