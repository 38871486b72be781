"""``meridian registry create|list|show|update|delete``: registries as
resources (``cluster.registries``), over a node's management API
(``node/manage_registry.py``), with the framework and exit codes of
``cluster.manage_cli``.

- ``create NAME --sku Basic|Standard|Premium [--location REGION]``: when the
  server answers registries on host names (``--domain``), a note on stderr
  gives the ``/etc/hosts`` line clients need;
- ``list``, ``show NAME``;
- ``update NAME [--sku] [--anonymous-pull-enabled true|false]
  [--public-network-enabled true|false] [--storage-quota SIZE|none]``;
- ``delete NAME --yes`` (everything in it, in every region, for good).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Any

from cluster import registries, skus
from cluster.manage_cli import (
    API,
    Column,
    Ctx,
    Parser,
    checked,
    many,
    one,
    parse_bool,
)
from cluster.preflight import USAGE, CliError
from cluster.units import parse_size

PATH = API + "/registries"


def _size(n: Any) -> str:
    return registries.human(n) if isinstance(n, int) else "unlimited" if n is None else str(n)


COLUMNS: list[Column] = [
    ("Name", lambda d: d["name"]),
    ("LoginServer", lambda d: d["login_server"]),
    ("Sku", lambda d: d["sku"] or "(default: no tier)"),
    ("Location", lambda d: d.get("location")),
    ("Replicas", lambda d: d.get("replicas") or "every region"),
    ("Used", lambda d: _size(d["storage"]["used"])),
    ("Quota", lambda d: _size(d["storage"]["quota"])),
    ("State", lambda d: d.get("state")),
]
SHOW_COLUMNS: list[Column] = COLUMNS + [
    ("ReadsPerMin", lambda d: d["limits"]["read_ops_per_min"] or "unlimited"),
    ("WritesPerMin", lambda d: d["limits"]["write_ops_per_min"] or "unlimited"),
    ("Webhooks", lambda d: d["limits"]["webhooks"]),
    ("GeoReplication", lambda d: d["limits"]["geo_replication"]),
    ("NetworkRules", lambda d: d["limits"]["network_rules"]),
    ("AnonymousPull", lambda d: d["anonymous_pull"]),
    ("PublicAccess", lambda d: d["public_access"]),
    ("Created", lambda d: d.get("created")),
]


def _path(ctx: Ctx) -> str:
    name = checked(registries.check_name, ctx.args.name)
    return f"{PATH}/{urllib.parse.quote(name, safe='')}"


def hosts_line(server_url: str, login_server: str) -> str:
    """The ``/etc/hosts`` line that makes ``login_server`` reach the server."""
    host = urllib.parse.urlsplit(server_url).hostname or ""
    try:
        addr = "127.0.0.1" if host == "localhost" else str(ipaddress.ip_address(host))
    except ValueError:
        addr = "<the server's address>"
    name = urllib.parse.urlsplit("//" + login_server).hostname or login_server
    return f"{addr} {name}"


def create(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {"name": checked(registries.check_name, a.name), "sku": a.sku}
    if a.location:
        body["location"] = a.location
    doc = ctx.api.call("POST", PATH, body)
    one(ctx, doc, COLUMNS)
    if doc.get("domain"):
        ctx.notes.append(
            f"clients reach {doc['login_server']} once its name resolves: add the line "
            f"'{hosts_line(ctx.server.url, doc['login_server'])}' to /etc/hosts"
        )


def list_(ctx: Ctx) -> None:
    doc = ctx.api.call("GET", PATH)
    many(ctx, doc["registries"], COLUMNS, doc)


def show(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("GET", _path(ctx)), SHOW_COLUMNS)


def update(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {}
    if a.sku:
        body["sku"] = a.sku
    if a.anonymous_pull_enabled is not None:
        body["anonymous_pull"] = a.anonymous_pull_enabled
    if a.public_network_enabled is not None:
        body["public_access"] = a.public_network_enabled
    if a.storage_quota is not None:
        if a.storage_quota.strip().lower() in ("none", "tier"):
            body["storage_quota"] = None
        else:
            try:
                body["storage_quota"] = parse_size(a.storage_quota)
            except ValueError:
                raise CliError(
                    f"--storage-quota {a.storage_quota!r}: give a size such as 500M or 2G "
                    "(or none for the tier's)",
                    USAGE,
                ) from None
    if not body:
        raise CliError(
            "nothing to change: give --sku, --anonymous-pull-enabled, --public-network-enabled "
            "or --storage-quota",
            USAGE,
        )
    one(ctx, ctx.api.call("PATCH", _path(ctx), body), SHOW_COLUMNS)


def delete(ctx: Ctx) -> None:
    name = checked(registries.check_name, ctx.args.name)
    if not ctx.args.yes:
        raise CliError(
            f"this deletes every image of {name} in every region and cannot be undone: add --yes",
            USAGE,
        )
    ctx.api.call("DELETE", _path(ctx))


def _registry(sub: Any, _: Parser, common: Parser) -> None:
    tiers = "|".join(skus.SKUS)
    p = sub.add_parser("create", parents=[common], help="create a registry")
    p.add_argument("name", help=f"the registry's name: {registries.NAME_RULE}, unique")
    p.add_argument("--sku", required=True, metavar=tiers, help="its tier (see README: limits)")
    p.add_argument("--location", help="its home region (default: the server's region)")
    p.set_defaults(run=create)
    sub.add_parser("list", parents=[common], help="list registries").set_defaults(run=list_)
    p = sub.add_parser("show", parents=[common], help="a registry, its tier's limits, its use")
    p.add_argument("name")
    p.set_defaults(run=show)
    p = sub.add_parser("update", parents=[common], help="change tier, access or quota")
    p.add_argument("name")
    p.add_argument("--sku", metavar=tiers)
    p.add_argument("--anonymous-pull-enabled", type=parse_bool, metavar="true|false")
    p.add_argument(
        "--public-network-enabled",
        type=parse_bool,
        metavar="true|false",
        help="false: only clients from the network rules get in (Premium)",
    )
    p.add_argument(
        "--storage-quota",
        metavar="SIZE",
        help="at most this much stored (e.g. 1G, below the tier's); none: the tier's",
    )
    p.set_defaults(run=update)
    p = sub.add_parser("delete", parents=[common], help="delete a registry and all it holds")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="yes, delete every image, in every region")
    p.set_defaults(run=delete)


GROUPS = {"registry": (_registry, "registries: create, list, show, update, delete")}
