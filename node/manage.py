"""The management API every node serves, under ``/meridian/v1/``: identities
and access (``cluster.auth.admin``). Writes go to the namespace, so any
region takes them and every region sees them.

JSON in and out. Errors are OCI-style ``{"errors": [{"code", "message",
"detail"}]}``: ``400 INVALID`` (a bad name, role, action, pattern, CIDR or
field), ``404 NOT_FOUND``, ``409 ALREADY_EXISTS`` / ``IN_USE`` /
``CONFLICT``, ``401 UNAUTHORIZED`` (no or wrong credentials; with a
``WWW-Authenticate: Bearer ... scope="registry:manage:*"`` challenge),
``403 DENIED`` (authenticated, not allowed), ``429 TOOMANYREQUESTS`` (too
many failed logins), ``503 UNAVAILABLE`` (the namespace is unreachable).

Who may call it:

- a caller authenticates with Basic credentials (checked like a login at the
  token endpoint, failures counted by the same limiter) or with a bearer
  token from ``/oauth2/token`` that holds ``registry:manage:*`` (granted
  only to principals that manage the registry: ``Principal.manage``);
- the cluster owner manages everything; service principals are cluster-wide
  and only the owner manages them;
- a service principal with the role ``Owner`` on a registry manages that
  registry's tokens, scope maps, admin user and settings;
- with ``--no-auth`` the API is open to anyone, and every answer says so in
  a ``Warning`` header.

Generated secrets appear only in the body of the answer that created them
(``Cache-Control: no-store``); nothing here logs a secret or a request body.

Routes (``{r}``: a registry name):

- ``GET /meridian/v1/whoami``: auth on or off, the registry the request's
  Host selects, and who the credentials name (if any were sent)
- ``GET|POST /meridian/v1/serviceprincipals``,
  ``GET|DELETE /meridian/v1/serviceprincipals/{id}``
- ``GET|POST /meridian/v1/registries/{r}/tokens``,
  ``GET|PATCH|DELETE .../tokens/{name}``, ``POST .../tokens/{name}/passwords``
- ``GET|POST /meridian/v1/registries/{r}/scopemaps``,
  ``GET|PATCH|DELETE .../scopemaps/{name}``
- ``GET|PATCH /meridian/v1/registries/{r}/admin``, ``POST .../admin/passwords``
- ``GET|PATCH /meridian/v1/registries/{r}/settings``
- ``GET|POST /meridian/v1/registries/{r}/networkrules``,
  ``DELETE .../networkrules?cidr=<cidr>``
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from aiohttp import web

from cluster import registries
from cluster.auth import tokens
from cluster.auth.admin import (
    REGISTRY_RE,
    Admin,
    AdminError,
    Invalid,
    NotFound,
    check_registry,
)
from cluster.auth.identities import Principal
from cluster.namespace import Namespace
from node.auth import MAX_AUTH_HEADER, Gate, basic_credentials
from node.config import NodeConfig
from ocidist.errors import Code, RegistryError
from ocidist.paths import normalize_domain, registry_for_host

if TYPE_CHECKING:
    from node.api import Registry

log = logging.getLogger("meridian.manage")

# (registry, client address) of the management call this task serves: what
# ``ManageAPI.audit`` records besides the caller (set by ``caller``).
_CALL: ContextVar[tuple[str | None, str]] = ContextVar("meridian_manage_call", default=(None, ""))


@dataclass(frozen=True)
class NodeContext:
    """What the management API needs of the node it runs in."""

    cfg: NodeConfig
    registry: Registry  # the v2 API: its namespace, blob store and uploads


PREFIX = "/meridian/v1"
MANAGE_NEED = ("registry", "manage", "*")
MAX_BODY = 64 << 10
OPEN_WARNING = (
    '299 meridian "authentication is off (--no-auth): this management API is open to '
    'anyone who can reach this node"'
)

Handler = Callable[["ManageAPI", web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Caller:
    """Who calls: ``kind`` owner, sp, admin, token, or open (--no-auth)."""

    kind: str
    name: str
    manage: bool = False

    @property
    def subject(self) -> str:
        return "anyone (--no-auth)" if self.kind == "open" else f"{self.kind}:{self.name}"


def api_handler(fn: Handler) -> Handler:
    """Answers an :class:`AdminError` as the API's JSON error."""

    @functools.wraps(fn)
    async def handler(self: ManageAPI, request: web.Request) -> web.StreamResponse:
        try:
            return await fn(self, request)
        except AdminError as e:
            err: dict[str, Any] = {"code": e.code, "message": e.message}
            if e.detail is not None:
                err["detail"] = e.detail
            return web.json_response({"errors": [err]}, status=e.status, headers=self.headers())

    return handler


# Modules holding more of the API, each with ``add_routes(api, app)``: their
# handlers are functions ``(api, request)`` wrapped by ``api_handler`` and use
# this class's ``caller``/``owner``/``manager``/``body``/``ok``/``done``.
EXTENSIONS: tuple[str, ...] = (
    "node.manage_registry",
    "node.manage_replicas",
    "node.manage_webhooks",
    "node.manage_import",
    "node.manage_content",
)


class ManageAPI:
    def __init__(
        self,
        ns: Namespace,
        gate: Gate | None,
        *,
        default_registry: str,
        domain: str,
        node: NodeContext | None = None,
    ) -> None:
        self.ns = ns
        self.admin = Admin(ns)
        self.gate = gate
        self.default_registry = default_registry
        self.domain = normalize_domain(domain)
        self.node = node  # the node's data plane, for what works on content

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(f"{PREFIX}/whoami", self.whoami)
        sps = f"{PREFIX}/serviceprincipals"
        r.add_get(sps, self.list_sps)
        r.add_post(sps, self.create_sp)
        r.add_get(sps + "/{id}", self.get_sp)
        r.add_delete(sps + "/{id}", self.delete_sp)
        reg = PREFIX + "/registries/{registry}"
        r.add_get(reg + "/tokens", self.list_tokens)
        r.add_post(reg + "/tokens", self.create_token)
        r.add_get(reg + "/tokens/{name}", self.get_token)
        r.add_patch(reg + "/tokens/{name}", self.update_token)
        r.add_delete(reg + "/tokens/{name}", self.delete_token)
        r.add_post(reg + "/tokens/{name}/passwords", self.renew_token)
        r.add_get(reg + "/scopemaps", self.list_scope_maps)
        r.add_post(reg + "/scopemaps", self.create_scope_map)
        r.add_get(reg + "/scopemaps/{name}", self.get_scope_map)
        r.add_patch(reg + "/scopemaps/{name}", self.update_scope_map)
        r.add_delete(reg + "/scopemaps/{name}", self.delete_scope_map)
        r.add_get(reg + "/admin", self.get_admin)
        r.add_patch(reg + "/admin", self.update_admin)
        r.add_post(reg + "/admin/passwords", self.renew_admin)
        r.add_get(reg + "/settings", self.get_settings)
        r.add_patch(reg + "/settings", self.update_settings)
        r.add_get(reg + "/networkrules", self.list_network_rules)
        r.add_post(reg + "/networkrules", self.add_network_rule)
        r.add_delete(reg + "/networkrules", self.remove_network_rule)
        for name in EXTENSIONS:
            importlib.import_module(name).add_routes(self, app)

    # -- answers ---------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        h = {"Cache-Control": "no-store"}
        if self.gate is None:
            h["Warning"] = OPEN_WARNING
        return h

    def ok(self, data: Any, status: int = 200) -> web.Response:
        return web.json_response(data, status=status, headers=self.headers())

    def done(self) -> web.Response:
        return web.Response(status=204, headers=self.headers())

    def audit(self, caller: Caller, what: str) -> None:
        """A management change: logged, and an audit record of the registry
        the call is about (the cluster's own for service principals)."""
        # Names and roles only: never a secret, never a request body.
        log.info("management: %s by %s", what, caller.subject)
        activity = self.node.registry.activity if self.node is not None else None
        if activity is not None:
            reg, source = _CALL.get()
            activity.managed(reg, caller.subject, what, source)

    # -- who calls -------------------------------------------------------------

    def _challenge(
        self,
        request: web.Request,
        reg: str,
        message: str = "authentication required",
        error: str | None = None,
    ) -> RegistryError:
        assert self.gate is not None
        return self.gate.challenge(request, reg, MANAGE_NEED, message, error)

    async def caller(
        self, request: web.Request, reg: str | None, *, required: bool = True
    ) -> Caller | None:
        """The authenticated caller (for ``reg``'s rights; None: cluster
        level), or None when ``required`` is false and no credentials came."""
        gate = self.gate
        _CALL.set((reg, gate.source(request) if gate is not None else request.remote or ""))
        if gate is None:
            return Caller("open", "", manage=True)
        realm = reg or self.default_registry
        header = request.headers.get("Authorization", "")
        if len(header) > MAX_AUTH_HEADER:
            raise self._challenge(request, realm, "authorization header too long")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            creds = basic_credentials(header)
            if creds is None:
                raise self._challenge(request, realm, "malformed Basic credentials")
            p = await self._login(request, realm, *creds)
            return Caller(p.kind, p.name, p.manage)
        if scheme.lower() == "bearer" and value.strip():
            return await self._bearer(request, reg, value.strip())
        if not required and not header:
            return None
        raise self._challenge(request, realm)

    async def _login(self, request: web.Request, reg: str, user: str, password: str) -> Principal:
        assert self.gate is not None
        return await self.gate.login(request, reg, user, password, MANAGE_NEED)

    async def _bearer(self, request: web.Request, reg: str | None, token: str) -> Caller:
        gate = self.gate
        assert gate is not None
        realm = reg or self.default_registry
        try:  # which registry's service it claims; verified right below
            treg = str(jwt.decode(token, options={"verify_signature": False}).get("reg", ""))
        except jwt.PyJWTError:
            treg = ""
        invalid = self._challenge(request, realm, "invalid or expired token", "invalid_token")
        if not REGISTRY_RE.match(treg):
            raise invalid
        try:
            claims = await gate.verifier.verify(token, gate.service_for(treg))
        except tokens.InvalidToken:
            raise invalid from None
        kind, _, name = str(claims["sub"]).partition(":")
        if claims.get("reg") != treg:
            raise invalid
        if reg is not None and treg != reg and kind != "owner":
            raise self._challenge(
                request, realm, f"this token is for registry {treg!r}", "invalid_token"
            )
        # Its current rights: a role taken away counts at once.
        principal = await gate.identities.principal_for(kind, name, reg or treg)
        if principal is None:
            raise invalid
        scoped = any(
            isinstance(a, dict)
            and (a.get("type"), a.get("name")) == MANAGE_NEED[:2]
            and "*" in (a.get("actions") or [])
            for a in claims.get("access", [])
        )
        if not scoped:
            if principal.manage:
                raise self._challenge(request, realm, "insufficient scope", "insufficient_scope")
            raise self._denied(Caller(kind, name), reg)
        return Caller(kind, name, principal.manage)

    @staticmethod
    def _denied(caller: Caller, reg: str | None) -> RegistryError:
        if reg is None:
            why = "only the cluster owner manages service principals: log in as owner"
        else:
            why = (
                f"{caller.subject} may not manage registry {reg!r}: that takes the cluster "
                "owner or a service principal with the Owner role on it"
            )
        return RegistryError(Code.DENIED, why)

    async def owner(self, request: web.Request) -> Caller:
        c = await self.caller(request, None)
        assert c is not None
        if c.kind not in ("owner", "open"):
            raise self._denied(c, None)
        return c

    async def manager(self, request: web.Request) -> tuple[str, Caller]:
        reg = check_registry(request.match_info["registry"])
        c = await self.caller(request, reg)
        assert c is not None
        if not c.manage:
            raise self._denied(c, reg)
        if reg != self.default_registry and await registries.known(self.ns, reg) is None:
            raise NotFound(registries.unknown(reg), {"registry": reg})
        return reg, c

    async def body(self, request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
        buf = bytearray()
        async for chunk in request.content.iter_any():
            buf += chunk
            if len(buf) > MAX_BODY:
                raise Invalid(f"request body larger than {MAX_BODY} bytes")
        if not buf.strip():
            return {}
        try:
            doc = json.loads(buf)
        except ValueError:
            raise Invalid("request body is not JSON") from None
        if not isinstance(doc, dict):
            raise Invalid("request body must be a JSON object")
        unknown = sorted(set(doc) - set(allowed))
        if unknown:
            raise Invalid(
                f"unknown field(s) {', '.join(unknown)}: accepted are {', '.join(allowed)}",
                {"fields": unknown},
            )
        return doc

    # -- whoami ----------------------------------------------------------------

    @api_handler
    async def whoami(self, request: web.Request) -> web.Response:
        host = self.gate.forwarded(request, "X-Forwarded-Host") if self.gate else None
        reg = registry_for_host(host or request.host, self.domain, self.default_registry)
        out: dict[str, Any] = {"auth": self.gate is not None, "registry": reg}
        c = await self.caller(request, reg, required=False)
        if c is not None and c.kind != "open":
            out.update(kind=c.kind, name=c.name, manage=c.manage)
        return self.ok(out)

    # -- service principals ----------------------------------------------------

    @api_handler
    async def list_sps(self, request: web.Request) -> web.Response:
        await self.owner(request)
        return self.ok({"serviceprincipals": self.admin.list_sps()})

    @api_handler
    async def create_sp(self, request: web.Request) -> web.Response:
        c = await self.owner(request)
        doc = await self.body(request, ("id", "roles"))
        sp = await self.admin.create_sp(doc.get("id"), doc.get("roles"))
        self.audit(c, f"created service principal {sp['id']} with roles {json.dumps(sp['roles'])}")
        return self.ok(sp, 201)

    @api_handler
    async def get_sp(self, request: web.Request) -> web.Response:
        await self.owner(request)
        return self.ok(await self.admin.get_sp(request.match_info["id"]))

    @api_handler
    async def delete_sp(self, request: web.Request) -> web.Response:
        c = await self.owner(request)
        await self.admin.delete_sp(request.match_info["id"])
        self.audit(c, f"deleted service principal {request.match_info['id']}")
        return self.done()

    # -- tokens ----------------------------------------------------------------

    @api_handler
    async def list_tokens(self, request: web.Request) -> web.Response:
        reg, _ = await self.manager(request)
        return self.ok({"tokens": self.admin.list_tokens(reg)})

    @api_handler
    async def create_token(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("name", "scope_map", "status", "expiry"))
        tok = await self.admin.create_token(
            reg,
            doc.get("name"),
            doc.get("scope_map"),
            doc.get("status", "enabled"),
            doc.get("expiry"),
        )
        self.audit(c, f"created token {reg}/{tok['name']} (scope map {tok['scope_map']})")
        return self.ok(tok, 201)

    @api_handler
    async def get_token(self, request: web.Request) -> web.Response:
        reg, _ = await self.manager(request)
        return self.ok(await self.admin.get_token(reg, request.match_info["name"]))

    @api_handler
    async def update_token(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("scope_map", "status", "expiry"))
        tok = await self.admin.update_token(reg, request.match_info["name"], doc)
        self.audit(c, f"updated token {reg}/{tok['name']}: {', '.join(sorted(doc))}")
        return self.ok(tok)

    @api_handler
    async def renew_token(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("name",))
        tok = await self.admin.renew_token(reg, request.match_info["name"], doc.get("name"))
        self.audit(c, f"renewed {doc.get('name')} of token {reg}/{tok['name']}")
        return self.ok(tok)

    @api_handler
    async def delete_token(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        await self.admin.delete_token(reg, request.match_info["name"])
        self.audit(c, f"deleted token {reg}/{request.match_info['name']}")
        return self.done()

    # -- scope maps ------------------------------------------------------------

    @api_handler
    async def list_scope_maps(self, request: web.Request) -> web.Response:
        reg, _ = await self.manager(request)
        return self.ok({"scopemaps": self.admin.list_scope_maps(reg)})

    @api_handler
    async def create_scope_map(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("name", "actions", "description"))
        smap = await self.admin.create_scope_map(
            reg, doc.get("name"), doc.get("actions"), doc.get("description", "")
        )
        self.audit(c, f"created scope map {reg}/{smap['name']}")
        return self.ok(smap, 201)

    @api_handler
    async def get_scope_map(self, request: web.Request) -> web.Response:
        reg, _ = await self.manager(request)
        return self.ok(await self.admin.get_scope_map(reg, request.match_info["name"]))

    @api_handler
    async def update_scope_map(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("actions", "add", "remove", "description"))
        smap = await self.admin.update_scope_map(reg, request.match_info["name"], **doc)
        self.audit(c, f"updated scope map {reg}/{smap['name']}")
        return self.ok(smap)

    @api_handler
    async def delete_scope_map(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        await self.admin.delete_scope_map(reg, request.match_info["name"])
        self.audit(c, f"deleted scope map {reg}/{request.match_info['name']}")
        return self.done()

    # -- the admin user --------------------------------------------------------

    @api_handler
    async def get_admin(self, request: web.Request) -> web.Response:
        reg, _ = await self.manager(request)
        return self.ok(await self.admin.admin_user(reg))

    @api_handler
    async def update_admin(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("enabled",))
        if "enabled" not in doc:
            raise Invalid("nothing to change: give enabled (true or false)")
        out = await self.admin.set_admin_enabled(reg, doc["enabled"])
        self.audit(c, f"{'enabled' if out['enabled'] else 'disabled'} the admin user of {reg}")
        return self.ok(out)

    @api_handler
    async def renew_admin(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("name",))
        out = await self.admin.renew_admin(reg, doc.get("name"))
        self.audit(c, f"renewed {doc.get('name')} of the admin user of {reg}")
        return self.ok(out)

    # -- settings --------------------------------------------------------------

    @api_handler
    async def get_settings(self, request: web.Request) -> web.Response:
        reg, _ = await self.manager(request)
        return self.ok(await self.admin.settings(reg))

    @api_handler
    async def update_settings(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("anonymous_pull", "public_access", "allowed_cidrs"))
        out = await self.admin.update_settings(reg, **doc)
        self.audit(c, f"changed settings of {reg}: {json.dumps(doc, sort_keys=True)}")
        return self.ok(out)

    @staticmethod
    def _rules(settings: dict) -> dict:
        return {
            "registry": settings["registry"],
            "public_access": settings["public_access"],
            "networkrules": [{"cidr": c} for c in settings["allowed_cidrs"]],
        }

    @api_handler
    async def list_network_rules(self, request: web.Request) -> web.Response:
        reg, _ = await self.manager(request)
        return self.ok(self._rules(await self.admin.settings(reg)))

    @api_handler
    async def add_network_rule(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        doc = await self.body(request, ("cidr",))
        out = await self.admin.add_network_rule(reg, doc.get("cidr"))
        self.audit(c, f"allowed network {doc.get('cidr')} in {reg}")
        return self.ok(self._rules(out), 201)

    @api_handler
    async def remove_network_rule(self, request: web.Request) -> web.Response:
        reg, c = await self.manager(request)
        cidr = request.query.get("cidr")
        if cidr is None:
            raise Invalid("give the network to remove as ?cidr=")
        await self.admin.remove_network_rule(reg, cidr)
        self.audit(c, f"removed allowed network {cidr} from {reg}")
        return self.done()


def add_routes(
    app: web.Application,
    ns: Namespace,
    gate: Gate | None,
    *,
    default_registry: str,
    domain: str,
    node: NodeContext | None = None,
) -> ManageAPI:
    api = ManageAPI(ns, gate, default_registry=default_registry, domain=domain, node=node)
    api.add_routes(app)
    return api
