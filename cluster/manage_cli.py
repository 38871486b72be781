"""The ``meridian`` verbs for identities and access, over a node's management
API (``node/manage.py``):

- ``meridian login [SERVER]`` / ``meridian logout [SERVER]``: credentials
  stored as docker stores them (``cluster.dockerconfig``), verified first by
  getting a token from the server's token endpoint;
- ``meridian sp create|list|show|delete``: service principals (cluster
  owner only);
- ``meridian token create|list|show|update|renew|delete``,
  ``meridian scope-map create|list|show|update|delete``,
  ``meridian credential show|enable|disable|renew`` (the admin user),
  ``meridian settings show|update`` (anonymous pull, public access),
  ``meridian network-rule list|add|remove``: one registry's.

The server: ``--server URL`` (or ``MERIDIAN_SERVER``), else the one last
logged in to, else a node of the ``meridian up`` running here
(``cluster.discovery``). The registry: ``--registry`` (or
``MERIDIAN_REGISTRY``), else the one given at login, else the one the
server's host name selects. Requests carry the stored credentials.

Output: ``--output table`` (default), ``json`` (the API's document) or
``tsv`` (no header). Generated secrets are printed once, by the command that
made them; a line on stderr says so. Every mistake is one line on stderr
and an exit code (``cluster.preflight``): 2 usage or invalid input, 4 no
server answering, 5 not logged in / credentials refused / not allowed,
6 not found, 7 exists already or in use, 1 anything else.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import ipaddress
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cluster import discovery, dockerconfig
from cluster.auth import admin
from cluster.auth import scopes as sc
from cluster.auth.identities import BUILTIN_SCOPE_MAPS
from cluster.preflight import (
    CONFLICT,
    DENIED,
    FAILED,
    NO_CLUSTER,
    NOT_FOUND,
    OK,
    USAGE,
    CliError,
    answer,
)

API = "/meridian/v1"
TIMEOUT = 30.0
OUTPUTS = ("table", "json", "tsv")


class Parser(argparse.ArgumentParser):
    """A usage mistake is one line (and exit code 2), as every other mistake."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE)


# -- where, who ---------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str  # scheme://host[:port]
    host: str  # host[:port]: the key of docker's auths


def parse_server(text: str) -> Server:
    """A URL, or ``host[:port]`` (http on loopback, https elsewhere, as docker
    treats loopback registries)."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        name = urllib.parse.urlsplit("//" + text).hostname or ""
        text = ("http://" if _loopback(name) else "https://") + text
    u = urllib.parse.urlsplit(text)
    if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
        raise CliError(
            f"{text!r} is not a server: give a URL such as https://registry.example.com "
            "or host:port",
            USAGE,
        )
    return Server(f"{u.scheme}://{u.netloc}", u.netloc)


def _loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def find_server(flag: str) -> Server:
    if flag:
        return parse_server(flag)
    cur = dockerconfig.current()
    if cur is not None:
        return Server(cur[1]["url"], cur[0])
    state = discovery.running_up()
    regions = (state or {}).get("regions") or {}
    for r in regions.values():  # a node: the router serves the v2 API only
        if isinstance(r, dict) and r.get("node"):
            return parse_server(str(r["node"]))
    raise CliError(
        "no server: pass --server URL (or set MERIDIAN_SERVER), log in with "
        "`meridian login URL`, or start a local cluster with `meridian up`",
        NO_CLUSTER,
    )


# -- the API ---------------------------------------------------------------------


class Api:
    def __init__(self, server: Server, creds: tuple[str, str] | None, stored: bool = True) -> None:
        self.server = server
        self.creds = creds
        self.stored = stored  # the credentials come from the docker config (not a login)

    def headers(self, creds: tuple[str, str] | None) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if creds is not None:
            h["Authorization"] = "Basic " + base64.b64encode(":".join(creds).encode()).decode()
        return h

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        anonymous: bool = False,
        creds: tuple[str, str] | None = None,
        timeout: float = TIMEOUT,
    ) -> Any:
        """The answer's JSON (None for 204); an error is a :class:`CliError`.
        Sends the stored credentials, or ``creds``, or none (``anonymous``);
        waits ``timeout`` seconds at most for an answer."""
        use = None if anonymous else (creds or self.creds)
        headers = self.headers(use)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.server.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise self.refused(e, path, use) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise self.unreachable(e) from None
        return json.loads(raw) if raw else None

    def unreachable(self, e: Exception) -> CliError:
        why = getattr(e, "reason", None) or e
        return CliError(
            f"{self.server.url} does not answer ({str(why)[:120] or type(why).__name__}); "
            "is it running? check --server",
            NO_CLUSTER,
        )

    def refused(
        self, e: urllib.error.HTTPError, path: str, creds: tuple[str, str] | None
    ) -> CliError:
        try:
            err = json.loads(e.read())["errors"][0]
            code, message = str(err.get("code", "")), str(err.get("message", ""))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, OSError):
            code, message = "", ""
        message = " ".join(message.split())
        host = self.server.host
        if e.code == 401:
            if creds is None:
                return CliError(f"not logged in to {host}: run `meridian login {host}`", DENIED)
            what = "the stored credentials" if self.stored else "the credentials"
            todo = f"run `meridian login {host}` again" if self.stored else "check them"
            return CliError(
                f"{host} refused {what} of {creds[0]!r} ({message or 'HTTP 401'}): {todo}",
                DENIED,
            )
        if e.code in (403, 429):
            retry = e.headers.get("Retry-After") if e.code == 429 else None
            return CliError(message + (f" (in {retry} s)" if retry else ""), DENIED)
        if e.code == 404 and code != "NOT_FOUND":
            return CliError(
                f"{self.server.url} does not serve Meridian's management API ({path} answered "
                "404): point --server at a Meridian node",
                NO_CLUSTER,
            )
        codes = {400: USAGE, 404: NOT_FOUND, 409: CONFLICT}
        if e.code in codes:
            return CliError(message or f"HTTP {e.code}", codes[e.code])
        return CliError(
            f"{host} answered HTTP {e.code}{': ' + message if message else ''}; retry shortly",
            FAILED,
        )


@dataclass
class Ctx:
    args: argparse.Namespace
    server: Server
    api: Api
    _registry: str = ""
    notes: list[str] = field(default_factory=list)

    def registry(self) -> str:
        """``--registry``, else the one given at login, else the one the
        server's host name selects (asked of the server)."""
        if not self._registry:
            saved = dockerconfig.known(self.server.host) or {}
            reg = getattr(self.args, "registry", "") or saved.get("registry", "")
            if not reg:
                reg = str(self.api.call("GET", API + "/whoami", anonymous=True)["registry"])
            self._registry = checked(admin.check_registry, reg)
        return self._registry

    def reg_path(self, *parts: str) -> str:
        quoted = "/".join(urllib.parse.quote(p, safe="") for p in parts)
        return f"{API}/registries/{self.registry()}/{quoted}"


def checked(fn: Callable[..., Any], *args: Any) -> Any:
    """A local check of what goes into a URL path, with the server's message."""
    try:
        return fn(*args)
    except admin.AdminError as e:
        raise CliError(e.message, USAGE) from None


# -- output ------------------------------------------------------------------------


Column = tuple[str, Callable[[dict], Any]]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}={_cell(x)}" for k, x in v.items())
    return str(v)


def emit(fmt: str, doc: Any, rows: list[dict], columns: list[Column]) -> None:
    if fmt == "json":
        print(json.dumps(doc, indent=2))
        return
    cells = [[_cell(get(r)) for _, get in columns] for r in rows]
    if fmt == "tsv":
        for c in cells:
            print("\t".join(c))
        return
    heads = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    for line in [heads, ["-" * w for w in widths], *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _password(i: int) -> Callable[[dict], Any]:
    def get(d: dict) -> Any:
        pw = d.get("passwords") or []
        return pw[i]["value"] if i < len(pw) else None

    return get


SP_COLUMNS: list[Column] = [
    ("Id", lambda d: d["id"]),
    ("Roles", lambda d: d["roles"]),
    ("Created", lambda d: d.get("created")),
]
TOKEN_COLUMNS: list[Column] = [
    ("Name", lambda d: d["name"]),
    ("ScopeMap", lambda d: d["scope_map"]),
    ("Status", lambda d: d["status"]),
    ("Expiry", lambda d: d.get("expiry")),
    ("Created", lambda d: d.get("created")),
]
SMAP_COLUMNS: list[Column] = [
    ("Name", lambda d: d["name"]),
    ("Builtin", lambda d: d["builtin"]),
    ("Actions", lambda d: d["actions"]),
    ("Description", lambda d: d.get("description")),
]
ADMIN_COLUMNS: list[Column] = [
    ("Username", lambda d: d["username"]),
    ("Enabled", lambda d: d["enabled"]),
]
SETTINGS_COLUMNS: list[Column] = [
    ("Registry", lambda d: d["registry"]),
    ("AnonymousPull", lambda d: d["anonymous_pull"]),
    ("PublicAccess", lambda d: d["public_access"]),
    ("AllowedCidrs", lambda d: d["allowed_cidrs"]),
]
RULE_COLUMNS: list[Column] = [("Cidr", lambda d: d["cidr"])]


def _with_passwords(columns: list[Column], doc: dict) -> list[Column]:
    names = [p["name"] for p in doc.get("passwords") or []]
    return columns + [(n.capitalize(), _password(i)) for i, n in enumerate(names)]


def shown_once(ctx: Ctx, what: str) -> None:
    ctx.notes.append(f"{what} shown only now: store it safely")


# -- the verbs ----------------------------------------------------------------------


def one(ctx: Ctx, doc: dict, columns: list[Column]) -> None:
    emit(ctx.args.output, doc, [doc], columns)


def many(ctx: Ctx, items: list[dict], columns: list[Column], doc: Any = None) -> None:
    emit(ctx.args.output, items if doc is None else doc, items, columns)


def _roles(ctx: Ctx, values: list[str]) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for v in values:
        reg, sep, role = v.rpartition("=")
        reg = reg if sep else ctx.registry()
        roles.setdefault(reg, []).append(role)
    return roles


def sp_create(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {"roles": _roles(ctx, a.role)}
    if a.id:
        body["id"] = checked(admin.check_name, "service principal", a.id)
    doc = ctx.api.call("POST", API + "/serviceprincipals", body)
    one(ctx, doc, SP_COLUMNS + [("Secret", lambda d: d["secret"])])
    shown_once(ctx, "the client secret is")


def sp_list(ctx: Ctx) -> None:
    many(ctx, ctx.api.call("GET", API + "/serviceprincipals")["serviceprincipals"], SP_COLUMNS)


def _sp_path(ctx: Ctx) -> str:
    return f"{API}/serviceprincipals/{checked(admin.check_name, 'service principal', ctx.args.id)}"


def sp_show(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("GET", _sp_path(ctx)), SP_COLUMNS)


def sp_delete(ctx: Ctx) -> None:
    ctx.api.call("DELETE", _sp_path(ctx))


def _expiry(a: argparse.Namespace) -> tuple[bool, Any]:
    """(given, value) of the expiry flags."""
    if getattr(a, "no_expiration", False):
        return True, None
    if a.expiration_in_days is not None:
        if a.expiration_in_days <= 0:
            raise CliError("--expiration-in-days must be more than 0", USAGE)
        return True, time.time() + a.expiration_in_days * 86400
    if a.expiration:
        return True, a.expiration
    return False, None


def _token_path(ctx: Ctx, *more: str) -> str:
    return ctx.reg_path("tokens", checked(admin.check_name, "token", ctx.args.name), *more)


def token_create(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {
        "name": checked(admin.check_name, "token", a.name),
        "scope_map": a.scope_map,
        "status": a.status,
    }
    given, expiry = _expiry(a)
    if given:
        body["expiry"] = expiry
    doc = ctx.api.call("POST", ctx.reg_path("tokens"), body)
    one(ctx, doc, _with_passwords(TOKEN_COLUMNS, doc))
    shown_once(ctx, "each password is")


def token_list(ctx: Ctx) -> None:
    many(ctx, ctx.api.call("GET", ctx.reg_path("tokens"))["tokens"], TOKEN_COLUMNS)


def token_show(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("GET", _token_path(ctx)), TOKEN_COLUMNS)


def token_update(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {}
    if a.scope_map:
        body["scope_map"] = a.scope_map
    if a.status:
        body["status"] = a.status
    given, expiry = _expiry(a)
    if given:
        body["expiry"] = expiry
    if not body:
        raise CliError(
            "nothing to change: give --scope-map, --status, --expiration(-in-days) or "
            "--no-expiration",
            USAGE,
        )
    one(ctx, ctx.api.call("PATCH", _token_path(ctx), body), TOKEN_COLUMNS)


def token_renew(ctx: Ctx) -> None:
    which = "password1" if ctx.args.password1 else "password2"
    doc = ctx.api.call("POST", _token_path(ctx, "passwords"), {"name": which})
    one(ctx, doc, _with_passwords(TOKEN_COLUMNS[:1], doc))
    shown_once(ctx, f"the new {which} is")


def token_delete(ctx: Ctx) -> None:
    ctx.api.call("DELETE", _token_path(ctx))


def _actions(pairs: list[list[str]] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pattern, *acts in pairs or []:
        if not acts:
            raise CliError(f"give the actions for repository {pattern!r}", USAGE)
        out.setdefault(pattern, []).extend(acts)
    return out


def _smap_path(ctx: Ctx) -> str:
    name = ctx.args.name
    if name not in BUILTIN_SCOPE_MAPS:
        checked(admin.check_name, "scope map", name)
    return ctx.reg_path("scopemaps", name)


def smap_create(ctx: Ctx) -> None:
    a = ctx.args
    body = {"name": a.name, "actions": _actions(a.repository), "description": a.description or ""}
    one(ctx, ctx.api.call("POST", ctx.reg_path("scopemaps"), body), SMAP_COLUMNS)


def smap_list(ctx: Ctx) -> None:
    many(ctx, ctx.api.call("GET", ctx.reg_path("scopemaps"))["scopemaps"], SMAP_COLUMNS)


def smap_show(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("GET", _smap_path(ctx)), SMAP_COLUMNS)


def smap_update(ctx: Ctx) -> None:
    a = ctx.args
    body: dict[str, Any] = {}
    if a.add_repository:
        body["add"] = _actions(a.add_repository)
    if a.remove_repository:
        body["remove"] = _actions(a.remove_repository)
    if a.description is not None:
        body["description"] = a.description
    if not body:
        raise CliError(
            "nothing to change: give --add-repository, --remove-repository or --description",
            USAGE,
        )
    one(ctx, ctx.api.call("PATCH", _smap_path(ctx), body), SMAP_COLUMNS)


def smap_delete(ctx: Ctx) -> None:
    ctx.api.call("DELETE", _smap_path(ctx))


def cred_show(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("GET", ctx.reg_path("admin")), ADMIN_COLUMNS)


def _cred_enabled(ctx: Ctx, on: bool) -> None:
    doc = ctx.api.call("PATCH", ctx.reg_path("admin"), {"enabled": on})
    one(ctx, doc, _with_passwords(ADMIN_COLUMNS, doc))
    if doc.get("passwords"):
        shown_once(ctx, "each password is")


def cred_enable(ctx: Ctx) -> None:
    _cred_enabled(ctx, True)


def cred_disable(ctx: Ctx) -> None:
    _cred_enabled(ctx, False)


def cred_renew(ctx: Ctx) -> None:
    which = "password1" if ctx.args.password1 else "password2"
    doc = ctx.api.call("POST", ctx.reg_path("admin", "passwords"), {"name": which})
    one(ctx, doc, _with_passwords(ADMIN_COLUMNS[:1], doc))
    shown_once(ctx, f"the new {which} is")


def settings_show(ctx: Ctx) -> None:
    one(ctx, ctx.api.call("GET", ctx.reg_path("settings")), SETTINGS_COLUMNS)


def settings_update(ctx: Ctx) -> None:
    a = ctx.args
    body = {
        k: v
        for k, v in (("anonymous_pull", a.anonymous_pull), ("public_access", a.public_access))
        if v is not None
    }
    if not body:
        raise CliError("nothing to change: give --anonymous-pull or --public-access", USAGE)
    one(ctx, ctx.api.call("PATCH", ctx.reg_path("settings"), body), SETTINGS_COLUMNS)


def rule_list(ctx: Ctx) -> None:
    doc = ctx.api.call("GET", ctx.reg_path("networkrules"))
    many(ctx, doc["networkrules"], RULE_COLUMNS, doc)


def rule_add(ctx: Ctx) -> None:
    doc = ctx.api.call("POST", ctx.reg_path("networkrules"), {"cidr": ctx.args.cidr})
    many(ctx, doc["networkrules"], RULE_COLUMNS, doc)


def rule_remove(ctx: Ctx) -> None:
    cidr = urllib.parse.quote(ctx.args.cidr, safe="")
    ctx.api.call("DELETE", ctx.reg_path("networkrules") + f"?cidr={cidr}")


# -- the parsers -----------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("true", "on", "yes", "1"):
        return True
    if v in ("false", "off", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def common_flags(registry: bool) -> Parser:
    p = Parser(add_help=False)
    p.add_argument(
        "--server",
        default=os.environ.get("MERIDIAN_SERVER", ""),
        help="a Meridian node's URL (env MERIDIAN_SERVER; default: the server of the last "
        "`meridian login`, else a node of the running `meridian up`)",
    )
    if registry:
        p.add_argument(
            "--registry",
            default=os.environ.get("MERIDIAN_REGISTRY", ""),
            help="the registry (env MERIDIAN_REGISTRY; default: the one given at login, else "
            "the one the server's host name selects)",
        )
    p.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default=os.environ.get("MERIDIAN_OUTPUT", "table"),
        help="table (default), json (the API's document) or tsv (no header)",
    )
    return p


def _expiry_flags(p: argparse.ArgumentParser, *, clearable: bool) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--expiration-in-days", type=float, help="expires this many days from now")
    g.add_argument("--expiration", help="expires at this time (ISO 8601, e.g. 2030-01-01T00:00Z)")
    if clearable:
        g.add_argument("--no-expiration", action="store_true", help="never expires")


def _which_password(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--password1", action="store_true", help="regenerate password1")
    g.add_argument("--password2", action="store_true", help="regenerate password2")


Verb = tuple[Callable[[Ctx], None], bool, str]  # handler, registry-level, help


def _sp(sub: Any, reg_common: Parser, cluster_common: Parser) -> None:
    p = sub.add_parser("create", parents=[reg_common], help="create a service principal")
    p.add_argument("--id", help="its client id (default: generated)")
    p.add_argument(
        "--role",
        action="append",
        required=True,
        help="a role (AcrPull, AcrPush, AcrDelete, Owner) on --registry, or REGISTRY=ROLE; "
        "repeatable",
    )
    p.set_defaults(run=sp_create)
    sub.add_parser("list", parents=[cluster_common], help="list them").set_defaults(run=sp_list)
    for verb, fn in (("show", sp_show), ("delete", sp_delete)):
        p = sub.add_parser(verb, parents=[cluster_common], help=f"{verb} one")
        p.add_argument("id")
        p.set_defaults(run=fn)


def _token(sub: Any, common: Parser, _: Parser) -> None:
    p = sub.add_parser("create", parents=[common], help="create a token (two passwords)")
    p.add_argument("name")
    p.add_argument(
        "--scope-map",
        required=True,
        help="what it may do: a scope map, or _repositories_pull|push|admin",
    )
    p.add_argument("--status", choices=admin.STATUSES, default="enabled")
    _expiry_flags(p, clearable=False)
    p.set_defaults(run=token_create)
    sub.add_parser("list", parents=[common], help="list tokens").set_defaults(run=token_list)
    for verb, fn in (("show", token_show), ("delete", token_delete)):
        p = sub.add_parser(verb, parents=[common], help=f"{verb} a token")
        p.add_argument("name")
        p.set_defaults(run=fn)
    p = sub.add_parser("update", parents=[common], help="change scope map, status or expiry")
    p.add_argument("name")
    p.add_argument("--scope-map")
    p.add_argument("--status", choices=admin.STATUSES)
    _expiry_flags(p, clearable=True)
    p.set_defaults(run=token_update)
    p = sub.add_parser("renew", parents=[common], help="regenerate one of its passwords")
    p.add_argument("name")
    _which_password(p)
    p.set_defaults(run=token_renew)


def _scope_map(sub: Any, common: Parser, _: Parser) -> None:
    actions = ", ".join(sc.SCOPE_MAP_ACTIONS)
    p = sub.add_parser("create", parents=[common], help="create a scope map")
    p.add_argument("name")
    p.add_argument(
        "--repository",
        nargs="+",
        action="append",
        required=True,
        metavar=("PATTERN", "ACTION"),
        help=f"a repository (or prefix/*) and its actions ({actions}); repeatable",
    )
    p.add_argument("--description")
    p.set_defaults(run=smap_create)
    sub.add_parser("list", parents=[common], help="list scope maps").set_defaults(run=smap_list)
    for verb, fn in (("show", smap_show), ("delete", smap_delete)):
        p = sub.add_parser(verb, parents=[common], help=f"{verb} a scope map")
        p.add_argument("name")
        p.set_defaults(run=fn)
    p = sub.add_parser("update", parents=[common], help="add or remove actions")
    p.add_argument("name")
    for flag in ("--add-repository", "--remove-repository"):
        p.add_argument(flag, nargs="+", action="append", metavar=("PATTERN", "ACTION"))
    p.add_argument("--description")
    p.set_defaults(run=smap_update)


def _credential(sub: Any, common: Parser, _: Parser) -> None:
    for verb, fn, help_ in (
        ("show", cred_show, "the admin user's name and whether it is enabled"),
        ("enable", cred_enable, "enable the admin user (its passwords are shown the first time)"),
        ("disable", cred_disable, "disable the admin user"),
    ):
        sub.add_parser(verb, parents=[common], help=help_).set_defaults(run=fn)
    p = sub.add_parser("renew", parents=[common], help="regenerate one of its passwords")
    _which_password(p)
    p.set_defaults(run=cred_renew)


def _settings(sub: Any, common: Parser, _: Parser) -> None:
    sub.add_parser("show", parents=[common], help="the registry's access settings").set_defaults(
        run=settings_show
    )
    p = sub.add_parser("update", parents=[common], help="change them")
    p.add_argument("--anonymous-pull", type=parse_bool, metavar="true|false")
    p.add_argument(
        "--public-access",
        type=parse_bool,
        metavar="true|false",
        help="false: only clients from the network rules' CIDRs get in",
    )
    p.set_defaults(run=settings_update)


def _network_rule(sub: Any, common: Parser, _: Parser) -> None:
    sub.add_parser("list", parents=[common], help="the allowed networks").set_defaults(
        run=rule_list
    )
    for verb, fn in (("add", rule_add), ("remove", rule_remove)):
        p = sub.add_parser(verb, parents=[common], help=f"{verb} an allowed network")
        p.add_argument("cidr", help="an address or CIDR, e.g. 10.0.0.0/8")
        p.set_defaults(run=fn)


GROUPS: dict[str, tuple[Callable[[Any, Parser, Parser], None], str]] = {
    "sp": (_sp, "service principals (cluster owner only)"),
    "token": (_token, "a registry's repository-scoped tokens"),
    "scope-map": (_scope_map, "a registry's scope maps (what tokens may do)"),
    "credential": (_credential, "a registry's admin user"),
    "settings": (_settings, "a registry's anonymous pull and public access"),
    "network-rule": (_network_rule, "the networks a registry accepts clients from"),
}


# Verb groups kept in modules of their own, imported only when they run:
# group -> module with a ``GROUPS`` dict shaped as the one above.
GROUP_MODULES: dict[str, str] = {
    "registry": "cluster.registry_cli",
    "replication": "cluster.replicas_cli",
    "region": "cluster.replicas_cli",
    "repository": "cluster.content_cli",
    "manifest": "cluster.content_cli",
    "config": "cluster.content_cli",
    "webhook": "cluster.webhook_cli",
    "audit": "cluster.webhook_cli",
}


def _group(group: str) -> tuple[Callable[[Any, Parser, Parser], None], str]:
    if group in GROUP_MODULES:
        import importlib

        return importlib.import_module(GROUP_MODULES[group]).GROUPS[group]
    return GROUPS[group]


def group_main(group: str, argv: list[str]) -> int:
    add, help_ = _group(group)
    p = Parser(prog=f"meridian {group}", description=help_)
    sub = p.add_subparsers(dest="verb", required=True, parser_class=Parser)
    add(sub, common_flags(registry=True), common_flags(registry=False))
    args = p.parse_args(argv)
    prog = f"meridian {group} {args.verb}"
    return answer(prog, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    server = find_server(args.server)
    api = Api(server, dockerconfig.credentials(server.host, server.url))
    ctx = Ctx(args, server, api)
    args.run(ctx)
    for note in ctx.notes:
        print(f"meridian: {note}", file=sys.stderr)
    return OK


# -- login, logout --------------------------------------------------------------------


def _challenge_service(header: str) -> str | None:
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    for part in params.split(","):
        k, _, v = part.strip().partition("=")
        if k == "service":
            return v.strip('"')
    return ""


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if args.password is not None:
        print(
            "meridian: --password shows in the process list; prefer --password-stdin",
            file=sys.stderr,
        )
        return args.password
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask the password on: pipe it with --password-stdin", USAGE)
    return getpass.getpass("Password: ")


def verify_login(api: Api, creds: tuple[str, str]) -> bool:
    """Get a token with ``creds`` as docker would (``/v2/``'s challenge, then
    the token endpoint, always on the server itself). False: the server
    has authentication off."""
    req = urllib.request.Request(api.server.url + "/v2/", headers=api.headers(None))
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT):
            return False  # 200 without credentials: auth is off
    except urllib.error.HTTPError as e:
        service = _challenge_service(e.headers.get("WWW-Authenticate", ""))
        if e.code != 401 or service is None:
            raise CliError(
                f"{api.server.url}/v2/ answered HTTP {e.code}, not a registry's challenge: "
                "point at a Meridian node or router",
                NO_CLUSTER,
            ) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise api.unreachable(e) from None
    query = urllib.parse.urlencode({"service": service} if service else {})
    api.call("GET", "/oauth2/token" + (f"?{query}" if query else ""), creds=creds)
    return True


def login_main(argv: list[str]) -> int:
    p = Parser(
        prog="meridian login",
        description="log in to a Meridian server; the credentials are stored where docker, "
        "podman and skopeo read them",
    )
    p.add_argument("server", nargs="?", default=os.environ.get("MERIDIAN_SERVER", ""))
    p.add_argument(
        "-u",
        "--username",
        help="owner, a service principal's id, a token's name, or the registry's name "
        "(its admin user)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("-p", "--password")
    g.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--registry", default="", help="the registry the verbs manage by default")
    args = p.parse_args(argv)
    return answer("meridian login", lambda: _login(args))


def _login(args: argparse.Namespace) -> int:
    server = find_server(args.server)
    user = args.username
    if not user:
        if args.password_stdin or not sys.stdin.isatty():
            raise CliError("give the user name with --username", USAGE)
        user = input("Username: ").strip()
    if args.registry:
        checked(admin.check_registry, args.registry)
    password = _read_password(args)
    if not user or not password:
        raise CliError("a user name and a password are needed", USAGE)
    api = Api(server, (user, password), stored=False)
    if not verify_login(api, (user, password)):
        who = api.call("GET", API + "/whoami", anonymous=True)
        dockerconfig.remember(server.host, server.url, args.registry or who["registry"])
        print(
            f"{server.host} has authentication off (--no-auth): nothing stored; the "
            "meridian verbs will use this server"
        )
        return OK
    try:
        who = api.call("GET", API + "/whoami")
    except CliError as e:
        if e.code != NO_CLUSTER:  # a router: no management API behind it
            raise
        who = {}
    registry = args.registry or str(who.get("registry", ""))
    path = dockerconfig.store(server.host, user, password)
    dockerconfig.remember(server.host, server.url, registry)
    helper = dockerconfig.creds_store(server.host)
    if helper:
        print(
            f"meridian: note: {path} names the credential helper {helper!r}; docker asks it, "
            "not this file",
            file=sys.stderr,
        )
    kind = f" ({who['kind']})" if who.get("kind") else ""
    print(
        f"Login Succeeded: {server.host} as {user}{kind}"
        + (f", registry {registry}" if registry else "")
    )
    return OK


def logout_main(argv: list[str]) -> int:
    p = Parser(prog="meridian logout", description="forget the stored credentials of a server")
    p.add_argument("server", nargs="?", default=os.environ.get("MERIDIAN_SERVER", ""))
    args = p.parse_args(argv)
    return answer("meridian logout", lambda: _logout(args))


def _logout(args: argparse.Namespace) -> int:
    server = find_server(args.server)
    if dockerconfig.forget(server.host, server.url):
        print(f"Removed login credentials for {server.host}")
    else:
        print(f"Not logged in to {server.host}")
    return OK
