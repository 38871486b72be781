"""``meridian webhook ...`` and ``meridian audit ...``, over a node's
management API (``node/manage_webhooks.py``), with the framework and exit
codes of ``cluster.manage_cli``.

- ``webhook create --name NAME --uri URL --actions push,delete,replicated
  [--scope 'repo:tag*'] [--location REGION] [--headers k=v ...]
  [--status enabled|disabled]``: prints the signing secret once;
- ``webhook list``, ``show --name NAME [--secret]``, ``update --name NAME
  [--uri] [--actions] [--scope] [--headers] [--status] [--location]
  [--rotate-secret]``, ``delete --name NAME``, ``ping --name NAME``,
  ``list-events --name NAME [--top N]``;
- ``audit list [--since 1h|ISO|unix] [--identity WHO] [--action ACTION]
  [--top N] [--cluster]`` and ``audit export`` (the same records as JSON
  lines, for log shippers).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from cluster.manage_cli import API, Column, Ctx, Parser, many, one, shown_once
from cluster.preflight import USAGE, CliError

ACTIONS = ("push", "delete", "quarantine", "chart_push", "chart_delete", "replicated")
AUDIT_ACTIONS = ("push", "pull", "delete", "login", "manage")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "" if ts is None else str(ts)
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


COLUMNS: list[Column] = [
    ("Name", lambda d: d["name"]),
    ("Location", lambda d: d["location"]),
    ("Status", lambda d: d["status"]),
    ("Actions", lambda d: d["actions"]),
    ("Scope", lambda d: d.get("scope") or "(all)"),
    ("Uri", lambda d: d["uri"]),
]
EVENT_COLUMNS: list[Column] = [
    ("Id", lambda d: d.get("id")),
    ("Action", lambda d: d.get("action")),
    ("Time", lambda d: _when(d.get("time"))),
    ("Outcome", lambda d: d.get("outcome")),
    ("Status", lambda d: (d.get("response") or {}).get("status")),
    ("Error", lambda d: (d.get("response") or {}).get("error")),
    ("LatencyMs", lambda d: d.get("latency_ms")),
    ("Attempts", lambda d: d.get("attempts")),
]
PING_COLUMNS: list[Column] = [
    ("Id", lambda d: d["id"]),
    ("Outcome", lambda d: d["outcome"]),
    ("Status", lambda d: d["status"]),
    ("Error", lambda d: d["error"]),
    ("LatencyMs", lambda d: d["latency_ms"]),
]
AUDIT_COLUMNS: list[Column] = [
    ("Time", lambda d: d.get("time", "")[:19] + "Z"),
    ("Action", lambda d: d.get("action")),
    ("Identity", lambda d: d.get("identity")),
    ("Outcome", lambda d: d.get("outcome")),
    ("Repository", lambda d: d.get("repository")),
    ("Target", lambda d: d.get("target")),
    ("Count", lambda d: d.get("count")),
    ("Region", lambda d: d.get("region")),
    ("Source", lambda d: d.get("source")),
    ("Detail", lambda d: d.get("detail")),
]


def _actions(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    out = [a.strip() for v in values for a in v.split(",") if a.strip()]
    bad = [a for a in out if a not in ACTIONS]
    if bad or not out:
        raise CliError(
            f"unknown action {bad[0]!r}: choose from {', '.join(ACTIONS)}"
            if bad
            else f"give at least one action of {', '.join(ACTIONS)}",
            USAGE,
        )
    return out


def _headers(values: list[str] | None) -> dict[str, str] | None:
    if values is None:
        return None
    out: dict[str, str] = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k.strip():
            raise CliError(f"a header is NAME=VALUE, got {v[:40]!r}", USAGE)
        out[k.strip()] = val
    return out


def _hook_path(ctx: Ctx, *more: str) -> str:
    return ctx.reg_path("webhooks", ctx.args.name, *more)


def create(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {
        "name": a.name,
        "uri": a.uri,
        "actions": _actions(a.actions),
        "status": a.status,
    }
    if a.scope is not None:
        body["scope"] = a.scope
    if a.location:
        body["location"] = a.location
    if a.headers is not None:
        body["headers"] = _headers(a.headers)
    doc = ctx.api.call("POST", ctx.reg_path("webhooks"), body)
    one(ctx, doc, COLUMNS + [("Secret", lambda d: d["secret"])])
    shown_once(ctx, "the signing secret is (again: `meridian webhook show --secret`)")


def list_(ctx: Ctx) -> None:
    doc = ctx.api.call("GET", ctx.reg_path("webhooks"))
    many(ctx, doc["webhooks"], COLUMNS, doc)


def show(ctx: Ctx) -> None:
    path = _hook_path(ctx) + ("?secret=true" if ctx.args.secret else "")
    doc = ctx.api.call("GET", path)
    cols = COLUMNS + [
        ("Headers", lambda d: d.get("headers")),
        ("Created", lambda d: _when(d.get("created"))),
    ]
    if ctx.args.secret:
        cols = cols + [("Secret", lambda d: d.get("secret"))]
    one(ctx, doc, cols)


def update(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {}
    for key, value in (
        ("uri", a.uri),
        ("actions", _actions(a.actions)),
        ("scope", a.scope),
        ("headers", _headers(a.headers)),
        ("status", a.status),
        ("location", a.location),
    ):
        if value is not None:
            body[key] = value
    if a.rotate_secret:
        body["rotate_secret"] = True
    if not body:
        raise CliError(
            "nothing to change: give --uri, --actions, --scope, --headers, --status, "
            "--location or --rotate-secret",
            USAGE,
        )
    doc = ctx.api.call("PATCH", _hook_path(ctx), body)
    cols = COLUMNS + ([("Secret", lambda d: d["secret"])] if a.rotate_secret else [])
    one(ctx, doc, cols)
    if a.rotate_secret:
        shown_once(ctx, "the new signing secret is")


def delete(ctx: Ctx) -> None:
    ctx.api.call("DELETE", _hook_path(ctx))


def ping(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("POST", _hook_path(ctx, "ping")), PING_COLUMNS)


def list_events(ctx: Ctx) -> None:
    path = _hook_path(ctx, "events") + f"?top={ctx.args.top}"
    doc = ctx.api.call("GET", path)
    many(ctx, doc["events"], EVENT_COLUMNS, doc)


# -- audit ------------------------------------------------------------------------------


def since(text: str) -> float:
    """``30m``, ``2h``, ``7d`` (ago), unix seconds, or an ISO 8601 time."""
    t = text.strip()
    if t and t[-1] in UNITS and t[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(t[:-1]) * UNITS[t[-1]]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration ago (30m, 2h, 7d), unix seconds or an ISO 8601 time, got {text!r}"
        ) from None


def _audit_path(ctx: Ctx, fmt: str) -> str:
    a = ctx.args
    query: dict[str, Any] = {"format": fmt, "top": a.top}
    if a.since is not None:
        query["since"] = f"{a.since:.3f}"
    if a.identity:
        query["identity"] = a.identity
    if a.action:
        query["action"] = a.action
    base = API + "/audit" if a.cluster else ctx.reg_path("audit")
    return base + "?" + urllib.parse.urlencode(query)


def audit_list(ctx: Ctx) -> None:
    doc = ctx.api.call("GET", _audit_path(ctx, "json"))
    many(ctx, doc["records"], AUDIT_COLUMNS, doc)


def audit_export(ctx: Ctx) -> None:
    # The same records as JSON lines (the API's own format=jsonl).
    doc = ctx.api.call("GET", _audit_path(ctx, "json"))
    for r in doc["records"]:
        print(json.dumps(r, separators=(",", ":")))


# -- parsers -----------------------------------------------------------------------------


def _hook_flags(p: argparse.ArgumentParser, *, creating: bool) -> None:
    p.add_argument("--uri", required=creating, help="the receiver's http(s) URL")
    p.add_argument(
        "--actions",
        nargs="+",
        required=creating,
        metavar="ACTION",
        help=f"what fires it, comma- or space-separated: {', '.join(ACTIONS)}",
    )
    p.add_argument(
        "--scope",
        help="which repositories and tags, as ACR: 'repo:*', 'repo:v1*', 'team/*:*'; "
        "'repo' alone is repo:latest; empty: everything",
    )
    p.add_argument("--headers", nargs="+", metavar="NAME=VALUE", help="headers sent with it")
    p.add_argument(
        "--status",
        choices=("enabled", "disabled"),
        default="enabled" if creating else None,
    )
    p.add_argument(
        "--location",
        help="the region that delivers it (default: the registry's location, else the "
        "server's region); replicated fires when an image is whole there",
    )


def _name(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--name", required=True, help="the webhook's name (5-50 letters/digits)")


def _webhook(sub: Any, common: Parser, _: Parser) -> None:
    p = sub.add_parser("create", parents=[common], help="create a webhook (prints its secret)")
    _name(p)
    _hook_flags(p, creating=True)
    p.set_defaults(run=create)
    sub.add_parser("list", parents=[common], help="the registry's webhooks").set_defaults(run=list_)
    p = sub.add_parser("show", parents=[common], help="one webhook")
    _name(p)
    p.add_argument("--secret", action="store_true", help="show its secret and header values")
    p.set_defaults(run=show)
    p = sub.add_parser("update", parents=[common], help="change a webhook")
    _name(p)
    _hook_flags(p, creating=False)
    p.add_argument("--rotate-secret", action="store_true", help="a new signing secret")
    p.set_defaults(run=update)
    for verb, fn, help_ in (
        ("delete", delete, "delete a webhook (and its queued events)"),
        ("ping", ping, "send it a signed ping event now"),
    ):
        p = sub.add_parser(verb, parents=[common], help=help_)
        _name(p)
        p.set_defaults(run=fn)
    p = sub.add_parser(
        "list-events",
        parents=[common],
        help="queued events and recent deliveries: request, status, latency",
    )
    _name(p)
    p.add_argument("--top", type=int, default=50, help="at most this many (newest first)")
    p.set_defaults(run=list_events)


def _audit(sub: Any, common: Parser, _: Parser) -> None:
    for verb, fn, help_ in (
        ("list", audit_list, "audit records: who did what, where, when, the outcome"),
        ("export", audit_export, "the same records as JSON lines, for log shippers"),
    ):
        p = sub.add_parser(verb, parents=[common], help=help_)
        p.add_argument("--since", type=since, help="30m, 2h, 7d (ago), unix seconds or ISO 8601")
        p.add_argument("--identity", help="only this identity (owner, sp:ID, token:NAME, ...)")
        p.add_argument("--action", choices=AUDIT_ACTIONS)
        p.add_argument("--top", type=int, default=1000, help="at most this many (the newest)")
        p.add_argument(
            "--cluster",
            action="store_true",
            help="the cluster's own records (service principals, registries; owner only)",
        )
        p.set_defaults(run=fn)


GROUPS = {
    "webhook": (_webhook, "a registry's webhooks: create, list, show, update, delete, ping"),
    "audit": (_audit, "a registry's audit records: list, export (JSON lines)"),
}
