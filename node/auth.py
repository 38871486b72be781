"""Authentication and authorization of the v2 API, and the token endpoint.

Clients speak the Docker token-authentication protocol:

1. A request without a usable token gets ``401 UNAUTHORIZED`` with
   ``WWW-Authenticate: Bearer realm="<the address the client used>/oauth2/token",
   service="<registry service>",scope="repository:<name>:<actions>"``. The
   realm comes from the request's own Host (or ``X-Forwarded-Host`` /
   ``X-Forwarded-Proto`` from the router), so it works through the router.
2. The client asks the token endpoint: ``GET /oauth2/token`` with Basic
   credentials (Docker's token flow), or ``POST /oauth2/token`` with
   ``grant_type=password`` or ``refresh_token`` (OAuth2, used by containerd
   and docker). It answers a short-lived access token listing what was
   granted (``cluster.auth.identities.Principal.grant``): the one it gave
   the same identity for the same registry and scopes in the last
   ``TOKEN_REUSE`` seconds, if the current key signed it (``expires_in``
   says what it has left; a refresh always gets a new one), so a cluster's
   nodes logging in at once with one pull secret cost one verification.
3. Every request then carries ``Authorization: Bearer <token>``; the gate
   checks the token (signature verified once, then cached), that its subject
   still exists and is enabled, and that it grants the action the endpoint
   needs. A token lacking the action gets a 401 naming the scope needed (the
   client fetches a token for it; an identity without the right gets a
   token without it and stops there).

The service name of a registry is its login server: ``<registry>.<domain>``
with ``--domain``, else the registry's name. A token is for one service, so
a token of another registry is refused.

Failed logins are limited per user name and per source address
(``TOOMANYREQUESTS`` with ``Retry-After``); no answer tells whether a user
name exists. Secrets never reach logs or error messages.

Network rules (a registry's ``network`` setting: ``public_access`` and
``allowed_cidrs``) are checked before anything else: with public access off,
only clients from an allowed CIDR get in; others get ``403 DENIED``.

Blob grants: a router redirecting a blob GET to a region cannot count on the
client re-sending its token to another host (Go clients drop
``Authorization`` on a cross-host redirect). So when the router asks
(``X-Meridian-Grant: want`` on its authorized HEAD), the node answers a
grant: a token for exactly that blob of that repository, valid for a
minute, that the router appends to the redirect as ``meridian_grant``. A
blob GET carrying a valid grant for its own repository and digest needs no
other credential (its subject must still be valid). An identity asking again
for the same blob within ``GRANT_REUSE`` seconds gets the same grant (still
valid for at least 40 s), so the nodes of a rollout, sharing one pull
secret, cost one signature and one verification per blob, not one each.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from cluster import registries
from cluster.auth import scopes as sc
from cluster.auth import tokens
from cluster.auth.access import (  # noqa: F401 - the node's names for them
    GRANT_HEADER,
    GRANT_PARAM,
    MAX_AUTH_HEADER,
    TOKEN_PATH,
    Access,
    Authorizer,
    required_scope,
)
from cluster.auth.identities import Principal
from cluster.namespace import Namespace
from ocidist.errors import Code, RegistryError
from ocidist.paths import Route, registry_for_host

GRANT_TTL = 60
# A grant is handed out again, to the same identity for the same blob, for this
# long after it was signed (so every grant handed out has >= 40 s left): a
# rollout's nodes share one pull secret, so one signature and one verification
# serve them all instead of one each per blob (an EdDSA sign and verify cost
# ~0.1 and ~0.4 ms; a 50-node rollout asked for 250 of each).
GRANT_REUSE = 20
# Likewise a login's access token: the same identity asking the same registry
# for the same scopes within this many seconds gets the token it got (>= 280 s
# left; ``expires_in`` says how long), so the router and the regions verify
# one signature for a rollout's nodes, not one per node (~0.4 ms each). A
# refresh always gets a new one.
TOKEN_REUSE = 20
FAILURES_ALLOWED = 10  # failed logins per user name, and per source, in the window
FAILURE_WINDOW = 60.0


@dataclass
class FailureLimiter:
    """Sliding-window count of failed logins per key (user name, address)."""

    allowed: int = FAILURES_ALLOWED
    window: float = FAILURE_WINDOW
    _seen: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))

    def _trim(self, key: str, now: float) -> deque[float]:
        q = self._seen[key]
        while q and now - q[0] > self.window:
            q.popleft()
        if not q:
            del self._seen[key]
            return deque()
        return q

    def retry_after(self, keys: list[str], now: float | None = None) -> int:
        """Seconds until a login for ``keys`` may be tried again; 0: now."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        for k in keys:
            q = self._trim(k, now)
            if len(q) >= self.allowed:
                wait = max(wait, self.window - (now - q[0]))
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, keys: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for k in keys:
            self._seen[k].append(now)
        if len(self._seen) > 100_000:  # bounded memory under a spray of names
            for k in list(self._seen)[:50_000]:
                del self._seen[k]


class Gate(Authorizer):
    """The node's authorization (``cluster.auth.access.Authorizer``, shared with
    the router), plus blob grants, the token endpoint and logins."""

    def __init__(self, ns: Namespace, **kw: Any) -> None:
        super().__init__(ns, **kw)  # domain, default_registry, trusted_proxies
        self.limiter = FailureLimiter()
        # Handed out again for a while (GRANT_REUSE, TOKEN_REUSE), while signed
        # by the current key: (kind, name, registry, repository, digest) and
        # (subject, kind, registry, service, scopes) -> (token, signed at, kid)
        self._grants: dict[tuple[str, str, str, str, str], tuple[str, float, str]] = {}
        self._tokens: dict[tuple[str, str, str, str, str], tuple[str, float, str]] = {}
        self._kid: tuple[str, float] = ("", 0.0)  # the signing key's id, and until when
        # Told of every login by password (request, registry, user name,
        # principal or None): the audit log (node.webhooks.service).
        self.on_login: Callable[[web.Request, str, str, Principal | None], None] | None = None

    # -- the request path ---------------------------------------------------------

    async def authorize(self, request: web.Request, reg: str, route: Route) -> Access:
        """``Authorizer.authorize``, or a blob GET's grant (``meridian_grant``)."""
        grant = request.query.get(GRANT_PARAM) if request.query_string else None  # no parse
        if grant is not None and route.kind == "blob" and request.method in ("GET", "HEAD"):
            self.check_network(request, reg)
            need = required_scope(route, request.method)
            return await self._blob_grant(request, reg, route, need, grant)
        return await super().authorize(request, reg, route)

    async def _blob_grant(
        self, request: web.Request, reg: str, route: Route, need: Any, grant: str
    ) -> Access:
        try:
            claims = await self.verifier.verify(grant, self.service_for(reg), token_type="blob")
        except tokens.InvalidToken:
            raise self.challenge(request, reg, need, "invalid or expired grant") from None
        target = f"{route.name}@{route.arg}"
        kind, _, name = str(claims["sub"]).partition(":")
        if (
            claims.get("reg") != reg
            or claims["access"] != [{"type": "blob", "name": target, "actions": ["pull"]}]
            or not await self.identities.still_valid(kind, name, reg)
        ):
            raise self.challenge(request, reg, need, "invalid or expired grant")
        return Access(kind, name, reg, {("repository", route.name): frozenset({sc.PULL})})

    async def blob_grant(self, access: Access, name: str, digest: str) -> str:
        """A one-minute token for exactly blob ``digest`` of ``name``: the one
        this identity got for it in the last ``GRANT_REUSE`` seconds, if any
        (a grant names only its subject and blob, so it is the same token;
        every use still checks the subject is valid)."""
        now = time.time()
        slot = (access.kind, access.name, access.registry, name, digest)
        hit = self._grants.get(slot)
        if hit is not None and now - hit[1] < GRANT_REUSE and hit[2] == self._signing_kid():
            return hit[0]
        key = await self.keys.ensure()
        grant = tokens.issue(
            key,
            subject=f"{access.kind}:{access.name}",
            kind=access.kind,
            registry=access.registry,
            service=self.service_for(access.registry),
            access=[{"type": "blob", "name": f"{name}@{digest}", "actions": ["pull"]}],
            ttl=GRANT_TTL,
            now=now,
            token_type="blob",
        )
        remember(self._grants, slot, (grant, now, key.kid))
        return grant

    def _signing_kid(self) -> str:
        """The current signing key's id, looked up at most once a second: a
        rotated key stops the reuse of what the old one signed within it."""
        kid, until = self._kid
        now = time.monotonic()
        if now >= until:
            key = self.keys.signing_key()
            kid = key.kid if key is not None else ""
            self._kid = (kid, now + 1.0)
        return kid

    async def principal(self, access: Access) -> Principal | None:
        return await self.identities.principal_for(access.kind, access.name, access.registry)

    # -- the token endpoint ---------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        reg = registry_for_host(
            self.forwarded(request, "X-Forwarded-Host") or request.host,
            self.domain,
            self.default_registry,
        )
        await registries.require(self.ns, reg, self.default_registry)  # 404 if it does not exist
        self.check_network(request, reg)
        service = self.service_for(reg)
        if request.method == "POST":
            form = await request.post()
            params: dict[str, Any] = {k: str(v) for k, v in form.items()}
            scope_values = [str(v) for v in form.getall("scope", [])]
        else:
            params = dict(request.query)
            scope_values = request.query.getall("scope", [])
        if params.get("service", service) != service:
            raise RegistryError(
                Code.DENIED, "this endpoint issues tokens for another service", status=400
            )
        requested = sc.parse_scopes(scope_values)
        principal, offline = await self._token_principal(request, reg, params)
        granted = principal.grant(requested)
        refreshed = request.method == "POST" and params.get("grant_type") == "refresh_token"
        access_token, issued = await self._access_token(
            principal, reg, service, [s.as_claim() for s in granted], fresh=refreshed
        )
        now = time.time()
        body: dict[str, Any] = {
            "access_token": access_token,
            "expires_in": int(issued) + tokens.TOKEN_TTL - int(now),  # exp - now, in s
            "issued_at": datetime.fromtimestamp(issued, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "scope": " ".join(str(s) for s in granted),
        }
        if request.method == "GET":
            body["token"] = access_token
        if offline and principal.kind != "anonymous":
            body["refresh_token"] = tokens.issue(
                await self.keys.ensure(),
                subject=principal.subject,
                kind=principal.kind,
                registry=reg,
                service=service,
                access=[],
                ttl=tokens.REFRESH_TTL,
                now=now,
                token_type="refresh",
            )
        return web.Response(
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _access_token(
        self, principal: Principal, reg: str, service: str, access: list[dict], *, fresh: bool
    ) -> tuple[str, float]:
        """An access token for ``principal`` with ``access`` in ``reg``, and
        when it was signed: the one handed out for the same in the last
        ``TOKEN_REUSE`` seconds unless ``fresh``."""
        now = time.time()
        slot = (principal.subject, principal.kind, reg, service, repr(access))
        hit = self._tokens.get(slot)
        if (
            not fresh
            and hit is not None
            and now - hit[1] < TOKEN_REUSE
            and hit[2] == self._signing_kid()
        ):
            return hit[0], hit[1]
        key = await self.keys.ensure()
        token = tokens.issue(
            key,
            subject=principal.subject,
            kind=principal.kind,
            registry=reg,
            service=service,
            access=access,
            now=now,
        )
        remember(self._tokens, slot, (token, now, key.kid))
        return token, now

    async def _token_principal(
        self, request: web.Request, reg: str, params: dict[str, Any]
    ) -> tuple[Principal, bool]:
        """Who asks for a token, and whether they want a refresh token."""
        grant = params.get("grant_type")
        if request.method == "POST" and grant == "refresh_token":
            try:
                claims = await self.verifier.verify(
                    str(params.get("refresh_token", "")),
                    self.service_for(reg),
                    token_type="refresh",
                )
            except tokens.InvalidToken:
                raise self._login_failed(request, reg) from None
            kind, _, name = str(claims["sub"]).partition(":")
            p = await self.identities.principal_for(kind, name, reg)
            if p is None or claims.get("reg") != reg:
                raise self._login_failed(request, reg)
            return p, True
        if request.method == "POST":
            if grant != "password":
                raise RegistryError(
                    Code.UNSUPPORTED, "grant_type must be password or refresh_token", status=400
                )
            username, password = str(params.get("username", "")), str(params.get("password", ""))
            offline = params.get("access_type") == "offline" or bool(params.get("client_id"))
        else:
            creds = basic_credentials(request.headers.get("Authorization", ""))
            if creds is None:
                anon = self.identities.anonymous(reg)
                if anon is not None:
                    return anon, False
                raise self.challenge(request, reg, None)
            username, password = creds
            offline = params.get("offline_token") == "true"
        return await self.login(request, reg, username, password), offline

    async def login(
        self, request: web.Request, reg: str, username: str, password: str, need: Any = None
    ) -> Principal:
        """The principal of these credentials, counting failures per user
        name and per source address (429 past the limit). ``need`` is the
        scope a failure's challenge names."""
        keys = [f"user:{reg}:{username}", f"addr:{self.source(request)}"]
        wait = self.limiter.retry_after(keys)
        if wait:
            raise RegistryError(
                Code.TOOMANYREQUESTS,
                "too many failed logins; retry later",
                headers={"Retry-After": str(wait)},
            )
        principal = await self.identities.authenticate(reg, username, password)
        if self.on_login is not None:
            self.on_login(request, reg, username, principal)
        if principal is None:
            self.limiter.failed(keys)
            raise self._login_failed(request, reg, need)
        return principal

    def _login_failed(self, request: web.Request, reg: str, need: Any = None) -> RegistryError:
        # One answer for every failure: unknown user, wrong password, disabled.
        return self.challenge(request, reg, need, "invalid credentials")


def remember(cache: dict[Any, Any], slot: Any, value: Any) -> None:
    """``cache[slot] = value``, the oldest entry out past ``tokens.CACHE_ENTRIES``."""
    cache.pop(slot, None)  # re-inserted last: the oldest go first
    cache[slot] = value
    if len(cache) > tokens.CACHE_ENTRIES:
        cache.pop(next(iter(cache)))


def basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value or len(value) > MAX_AUTH_HEADER:
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None
