"""The v2 API's authorization decision, shared by the node
(``node.auth.Gate``, which adds the token endpoint, logins and blob grants)
and the router (``cluster.router.cache``, which answers manifests from its
cache only when this decision lets the request through).

``Authorizer.authorize`` is the whole decision for a request with a bearer
token: the registry's network rules (``public_access``/``allowed_cidrs``,
the client's address being the peer, or the last ``X-Forwarded-For`` hop a
trusted proxy appended), the token's signature, service and registry
(verified once, then remembered until it expires), its subject still
existing and enabled, and the scope the endpoint needs. Anonymous pull is a
token too (the token endpoint issues one when the registry allows it), so
it goes through the same path. A refusal is a ``RegistryError``: the 401
challenge naming the scope, or 403 for the network rules.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cluster.auth import scopes as sc
from cluster.auth import tokens
from cluster.auth.identities import Identities
from cluster.namespace import Namespace
from ocidist.errors import Code, RegistryError
from ocidist.paths import Route

TOKEN_PATH = "/oauth2/token"
# A blob grant (node.auth issues them): a HEAD or GET with this header set to
# "want" gets a one-minute token for that blob back in it; a GET with the
# token in this query parameter needs no other credential.
GRANT_HEADER = "X-Meridian-Grant"
GRANT_PARAM = "meridian_grant"
MAX_AUTH_HEADER = tokens.MAX_TOKEN_BYTES + 16


@dataclass(frozen=True, slots=True)
class Access:
    """What a request may do: its principal's subject and granted scopes."""

    kind: str
    name: str
    registry: str
    granted: dict[tuple[str, str], frozenset[str]]

    def allows(self, typ: str, name: str, action: str) -> bool:
        acts = self.granted.get((typ, name), frozenset())
        return action in acts or "*" in acts


def required_scope(route: Route, method: str) -> tuple[str, str, str] | None:
    """(type, name, action) an endpoint needs; None for ``/v2/`` itself,
    which needs any valid token (that is how clients check a login)."""
    if route.kind == "base":
        return None
    if route.kind == "catalog":
        return ("registry", "catalog", "*")
    if route.kind in ("uploads", "upload"):
        return ("repository", route.name, sc.PUSH)
    if method in ("GET", "HEAD"):
        return ("repository", route.name, sc.PULL)
    if method == "DELETE":
        return ("repository", route.name, sc.DELETE)
    return ("repository", route.name, sc.PUSH)


def access_of(claims: dict[str, Any], kind: str, name: str, reg: str) -> Access:
    granted: dict[tuple[str, str], frozenset[str]] = {}
    for a in claims.get("access", []):
        if isinstance(a, dict) and isinstance(a.get("actions"), list):
            key = (str(a.get("type")), str(a.get("name")))
            granted[key] = granted.get(key, frozenset()) | frozenset(map(str, a["actions"]))
    return Access(kind, name, reg, granted)


class Authorizer:
    """Who may do what on the v2 API (see the module docstring)."""

    def __init__(
        self,
        ns: Namespace,
        *,
        domain: str,
        default_registry: str,
        trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
    ) -> None:
        self.ns = ns
        self.domain = domain
        self.default_registry = default_registry
        self.trusted_proxies = trusted_proxies or []
        self.identities = Identities(ns)
        self.keys = tokens.KeyRing(ns)
        self.verifier = tokens.Verifier(self.keys)
        self._accesses: dict[tuple[str, str], tuple[Access, float]] = {}

    # -- naming -------------------------------------------------------------

    def service_for(self, reg: str) -> str:
        return f"{reg}.{self.domain}" if self.domain else reg

    def source(self, request: web.Request) -> str:
        """The client's address: the peer, or the last hop a trusted proxy
        (the router) appended to ``X-Forwarded-For``."""
        peer = request.remote or ""
        fwd = request.headers.get("X-Forwarded-For")
        if fwd and self._trusted(peer):
            return fwd.split(",")[-1].strip()
        return peer

    def _trusted(self, addr: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def forwarded(self, request: web.Request, header: str) -> str | None:
        """An ``X-Forwarded-*`` header, believed only from a trusted proxy."""
        value = request.headers.get(header)
        return value if value and self._trusted(request.remote or "") else None

    def realm(self, request: web.Request) -> str:
        host = self.forwarded(request, "X-Forwarded-Host") or request.host
        scheme = self.forwarded(request, "X-Forwarded-Proto") or request.scheme
        return f"{scheme}://{host}{TOKEN_PATH}"

    def challenge(
        self,
        request: web.Request,
        reg: str,
        need: tuple[str, str, str] | None,
        message: str = "authentication required",
        error: str | None = None,
    ) -> RegistryError:
        parts = [f'realm="{self.realm(request)}"', f'service="{self.service_for(reg)}"']
        detail = None
        if need is not None:
            typ, name, action = need
            actions = "pull,push" if action == sc.PUSH else action
            parts.append(f'scope="{typ}:{name}:{actions}"')
            detail = [{"Type": typ, "Name": name, "Action": action}]
        if error:
            parts.append(f'error="{error}"')
        return RegistryError(
            Code.UNAUTHORIZED,
            message,
            detail,
            headers={"WWW-Authenticate": "Bearer " + ",".join(parts)},
        )

    # -- the decision -------------------------------------------------------------

    def check_network(self, request: web.Request, reg: str) -> None:
        rules = self.identities.registry_settings(reg).get("network") or {}
        if rules.get("public_access", True) is not False:
            return
        try:
            ip = ipaddress.ip_address(self.source(request))
        except ValueError:
            ip = None
        for cidr in rules.get("allowed_cidrs", []):
            try:
                if ip is not None and ip in ipaddress.ip_network(cidr, strict=False):
                    return
            except ValueError:
                continue
        raise RegistryError(
            Code.DENIED,
            "this registry accepts clients from its allowed networks only",
            {"source": self.source(request)},
        )

    async def authorize(self, request: web.Request, reg: str, route: Route) -> Access:
        """The request's ``Access``, or the ``RegistryError`` refusing it."""
        self.check_network(request, reg)
        need = required_scope(route, request.method)
        header = request.headers.get("Authorization", "")
        if len(header) > MAX_AUTH_HEADER:
            raise self.challenge(request, reg, need, "authorization header too long")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise self.challenge(request, reg, need)
        access = await self._access(token.strip(), reg)
        if access is None or not await self.identities.still_valid(access.kind, access.name, reg):
            raise self.challenge(request, reg, need, "invalid or expired token", "invalid_token")
        if need is not None and not access.allows(*need):
            raise self.challenge(request, reg, need, "insufficient scope", "insufficient_scope")
        return access

    async def _access(self, token: str, reg: str) -> Access | None:
        """What a verified token grants in ``reg``, remembered until the
        token expires (the hot path: one dict lookup per request)."""
        now = time.time()
        hit = self._accesses.get((token, reg))
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            claims = await self.verifier.verify(token, self.service_for(reg))
        except tokens.InvalidToken:
            return None
        if claims.get("reg") != reg:
            return None
        kind, _, name = str(claims["sub"]).partition(":")
        access = access_of(claims, kind, name, reg)
        self._accesses[(token, reg)] = (access, float(claims["exp"]))
        if len(self._accesses) > tokens.CACHE_ENTRIES:
            self._accesses.pop(next(iter(self._accesses)))
        return access
