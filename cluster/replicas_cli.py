"""The ``meridian`` verbs for replications, regions and usage, over a node's
management API (``node/manage_replicas.py``):

- ``meridian replication create|list|delete --registry R [--location REGION]``:
  a registry's replications (``az acr replication``); ``meridian
  replication`` alone, or ``meridian replication status``, is the cluster's
  replication status (every region's backlog and lag, ``cluster.admin``);
- ``meridian region remove NAME [--force] --yes``: decommission a region
  (cluster owner);
- ``meridian usage --registry R``: bytes stored, GiB-days, pushes, pulls
  and bytes served, per region and in total.

Server, registry, credentials, ``--output`` and exit codes as every
management verb (``cluster.manage_cli``).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

from cluster import manage_cli as mc
from cluster.preflight import USAGE, CliError, answer

REPLICATION_COLUMNS: list[mc.Column] = [
    ("Region", lambda d: d["region"]),
    ("Home", lambda d: d["home"]),
    ("Status", lambda d: d["status"]),
    ("PendingItems", lambda d: d["pending_items"]),
    ("PendingBytes", lambda d: d["pending_bytes"]),
]
USAGE_COLUMNS: list[mc.Column] = [
    ("Region", lambda d: d["region"]),
    ("StoredBytes", lambda d: d["stored_bytes"]),
    ("GiBDays", lambda d: f"{d['gib_days']:.6g}"),
    ("Pushes", lambda d: d["pushes"]),
    ("Pulls", lambda d: d["pulls"]),
    ("BytesServed", lambda d: d["bytes_served"]),
]


def _confirmed(ctx: mc.Ctx, what: str) -> None:
    if not ctx.args.yes:
        raise CliError(f"{what} cannot be undone: add --yes to go ahead", USAGE)


def _region(text: str) -> str:
    if not text or "/" in text:
        raise CliError(f"{text!r} is not a region name: see `meridian regions`", USAGE)
    return text


def replication_create(ctx: mc.Ctx) -> None:
    body = {"location": _region(ctx.args.location)}
    mc.one(ctx, ctx.api.call("POST", ctx.reg_path("replications"), body), REPLICATION_COLUMNS)
    ctx.notes.append(
        f"{ctx.args.location} now replicates {ctx.registry()}: watch it sync with "
        f"`meridian replication list --registry {ctx.registry()}`"
    )


def replication_list(ctx: mc.Ctx) -> None:
    doc = ctx.api.call("GET", ctx.reg_path("replications"))
    mc.many(ctx, doc["replications"], REPLICATION_COLUMNS, doc)


def replication_delete(ctx: mc.Ctx) -> None:
    region = _region(ctx.args.location)
    _confirmed(ctx, f"deleting the replication of {ctx.registry()} in {region} (its copy goes)")
    ctx.api.call("DELETE", ctx.reg_path("replications", region))
    ctx.notes.append(
        f"{region} no longer replicates {ctx.registry()}: its reclaimer removes the copy once "
        "another replica region holds every byte of it"
    )


def region_remove(ctx: mc.Ctx) -> None:
    name = _region(ctx.args.name)
    _confirmed(ctx, f"removing region {name}")
    query = "?force=true" if ctx.args.force else ""
    path = f"{mc.API}/regions/{urllib.parse.quote(name, safe='')}{query}"
    doc = ctx.api.call("DELETE", path)
    removed = doc.get("removed") or {}
    columns: list[mc.Column] = [
        ("Region", lambda d: d["region"]),
        ("Placements", lambda _d: removed.get("placements")),
        ("Registries", lambda _d: removed.get("registries")),
        ("Nodes", lambda _d: removed.get("nodes")),
    ]
    mc.one(ctx, doc, columns)


def usage_show(ctx: mc.Ctx) -> None:
    doc = ctx.api.call("GET", ctx.reg_path("usage"))
    rows = list(doc["regions"])
    if ctx.args.output == "table":
        rows.append({"region": "(total)", **doc["total"]})
    mc.many(ctx, rows, USAGE_COLUMNS, doc)


def _replication(sub: Any, common: mc.Parser, _: mc.Parser) -> None:
    p = sub.add_parser("create", parents=[common], help="replicate the registry to a region")
    p.add_argument("--location", "-l", required=True, help="the region (see `meridian regions`)")
    p.set_defaults(run=replication_create)
    sub.add_parser(
        "list", parents=[common], help="its regions: ready, syncing (with backlog) or down"
    ).set_defaults(run=replication_list)
    p = sub.add_parser("delete", parents=[common], help="stop replicating to a region")
    p.add_argument("--location", "-l", required=True, help="the region")
    p.add_argument("--yes", "-y", action="store_true", help="do it (its copy is reclaimed)")
    p.set_defaults(run=replication_delete)


def _region_group(sub: Any, _: mc.Parser, cluster_common: mc.Parser) -> None:
    p = sub.add_parser(
        "remove",
        parents=[cluster_common],
        help="decommission a region: it leaves the namespace, the router and every status",
    )
    p.add_argument("name", help="the region")
    p.add_argument(
        "--force", action="store_true", help="even while its nodes are registered as alive"
    )
    p.add_argument("--yes", "-y", action="store_true", help="do it")
    p.set_defaults(run=region_remove)


GROUPS: dict[str, tuple[Callable[[Any, mc.Parser, mc.Parser], None], str]] = {
    "replication": (
        _replication,
        "a registry's replications: create, list, delete (`meridian replication status`, "
        "or no verb: every region's replication backlog)",
    ),
    "region": (_region_group, "the cluster's regions: remove (cluster owner)"),
}

STATUS_FLAGS = ("--json", "--etcd", "--node")


def _status_view(argv: list[str]) -> bool:
    """Whether ``meridian replication ARGV`` is the cluster status view: no
    verb, ``status``, or (as before replications had verbs) ``list`` with
    the status view's flags and no registry."""
    if not argv or argv[0] == "status":
        return True
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return True
    if argv[0] != "list" or any(a.startswith("--registry") for a in argv):
        return False
    return any(a.split("=", 1)[0] in STATUS_FLAGS or a.startswith("--etcd-") for a in argv)


def replication_main(argv: list[str]) -> int:
    if _status_view(argv):
        from cluster.admin import replication_main as status_main

        return status_main(argv[1:] if argv[:1] in (["status"], ["list"]) else argv)
    return mc.group_main("replication", argv)


def usage_main(argv: list[str]) -> int:
    p = mc.Parser(
        prog="meridian usage",
        description="a registry's usage per region and in total: bytes stored, GiB-days, "
        "pushes, pulls and bytes served",
        parents=[mc.common_flags(registry=True)],
    )
    p.set_defaults(run=usage_show)
    args = p.parse_args(argv)
    return answer("meridian usage", lambda: mc.run(args))
