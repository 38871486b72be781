"""Identities and what each may do, kept in the namespace.

- the cluster owner: user name ``owner``, at ``/meridian/auth/owner``;
  everything, in every registry.
- service principals: user name = client id, at ``/meridian/auth/sp/<id>``;
  their roles per registry (``AcrPull``, ``AcrPush``, ``AcrDelete``,
  ``Owner``).
- a registry's admin user: user name = the registry's name, at
  ``/meridian/reg/<r>/auth/admin``; pull, push and delete there; off by
  default.
- repository-scoped tokens: user name = the token's name, at
  ``/meridian/reg/<r>/auth/tokens/<name>``; their scope map's actions on
  matching repositories, while enabled and unexpired.
- anonymous: pull, when the registry's ``anonymous_pull`` setting is on.

Secrets are stored only as scrypt hashes (``cluster.auth.secrets``); the
admin user and tokens hold two passwords each, so one can be rotated while
the other still works. ``authenticate`` costs one hash whether or not the
user exists, so timing tells nothing about which names exist.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass, field

from cluster.auth import scopes as sc
from cluster.auth.secrets import DECOY, generate, hash_secret, verify_secret
from cluster.namespace import AUTH, REG, Conflict, Namespace

OWNER = "owner"
OWNER_PASSWORD_ENV = "MERIDIAN_OWNER_PASSWORD"
OWNER_KEY = AUTH + "owner"
SP_PREFIX = AUTH + "sp/"


def admin_key(reg: str) -> str:
    return f"{REG}{reg}/auth/admin"


def token_key(reg: str, name: str) -> str:
    return f"{REG}{reg}/auth/tokens/{name}"


def scope_map_key(reg: str, name: str) -> str:
    return f"{REG}{reg}/auth/scopemaps/{name}"


# ACR's built-in scope maps.
BUILTIN_SCOPE_MAPS: dict[str, dict[str, list[str]]] = {
    "_repositories_pull": {"*": ["content/read", "metadata/read"]},
    "_repositories_push": {"*": ["content/read", "content/write", "metadata/read"]},
    "_repositories_admin": {"*": list(sc.SCOPE_MAP_ACTIONS)},
}


@dataclass(frozen=True)
class Principal:
    """Who a request acts as, in one registry."""

    kind: str  # owner, sp, admin, token, anonymous
    name: str
    registry: str
    # repository pattern -> Docker actions; "*" matches every repository
    grants: dict[str, frozenset[str]] = field(default_factory=dict)
    manage: bool = False  # may manage the registry (and, as owner, the cluster)

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.name}"

    def actions(self, repository: str) -> frozenset[str]:
        out: set[str] = set()
        for pattern, acts in self.grants.items():
            if pattern == "*" or sc.pattern_matches(pattern, repository):
                out |= acts
        return frozenset(out)

    def may_list_catalog(self) -> bool:
        return self.kind != "anonymous" and bool(self.grants)

    def grant(self, requested: list[sc.Scope]) -> list[sc.Scope]:
        """The part of ``requested`` this principal holds (the Docker token
        specification: a token lists what was granted, possibly less)."""
        out = []
        for s in requested:
            if s.type == "repository":
                held = self.actions(s.name)
                acts = held if "*" in s.actions else held & set(s.actions)
                acts = acts & set(sc.REPOSITORY_ACTIONS) | (
                    acts & {"metadata_read", "metadata_write"}
                )
                if acts:
                    out.append(sc.Scope(s.type, s.name, tuple(sorted(acts))))
            elif (s.type, s.name) == sc.CATALOG and self.may_list_catalog():
                out.append(sc.Scope(s.type, s.name, ("*",)))
            elif (s.type, s.name) == sc.MANAGE and self.manage:
                out.append(sc.Scope(s.type, s.name, ("*",)))
        return out


def _json(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


@functools.lru_cache(maxsize=1024)
def _record(raw: bytes | None) -> dict | None:
    """``_json`` remembered per record: every request checks its subject is
    still valid, and the record's bytes are the same object until it changes.
    Read only: never mutate what it returns."""
    return _json(raw)


def _check_passwords(password: str, hashes: list[str]) -> bool:
    """Checks every stored hash (at most two) so timing does not tell which matched."""
    ok = False
    for h in hashes or [DECOY]:
        ok = verify_secret(password, h) or ok
    return ok


# Credentials verified a moment ago are not hashed again: containerd on every
# node of a Kubernetes cluster presents the same pull secret at once, and each
# slow hash costs ~50 ms of CPU (a 50-node rollout spent most of its server CPU
# there). Only successes are kept, under an HMAC (a key of this process) of the
# stored hashes and the password: a changed or removed secret changes the hashes
# and misses at once, a wrong password always pays the full hash, and neither
# the password nor a fast hash of it alone is kept.
VERIFIED_TTL = 300.0
VERIFIED_MAX = 10_000
_VERIFIED_KEY = os.urandom(32)
_verified: dict[bytes, float] = {}


def _verified_key(password: str, hashes: list[str]) -> bytes:
    mac = hmac.new(_VERIFIED_KEY, digestmod=hashlib.sha256)
    for h in hashes:
        mac.update(h.encode() + b"\0")
    mac.update(password.encode())
    return mac.digest()


async def _password_ok(password: str, hashes: list[str]) -> bool:
    """``_check_passwords`` off the event loop (a slow hash takes tens of
    milliseconds, which would stall every request of the region), or a
    success of the last ``VERIFIED_TTL`` seconds."""
    key = _verified_key(password, hashes) if hashes else b""
    now = time.monotonic()
    if key and _verified.get(key, 0.0) > now:
        return True
    ok = await asyncio.to_thread(_check_passwords, password, hashes)
    if ok and key:
        if len(_verified) >= VERIFIED_MAX:
            _verified.pop(next(iter(_verified)))
        _verified[key] = now + VERIFIED_TTL
    return ok


class Identities:
    """Reads identities from the namespace cache (a miss is read from the
    store once: an identity created an instant ago in another region)."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    async def _get(self, key: str) -> dict | None:
        return _json(await self.ns.fresh_record(key))

    def registry_settings(self, reg: str) -> dict:
        st = self.ns.cache.registries.get(reg)
        return st.config if st is not None else {}

    def anonymous(self, reg: str) -> Principal | None:
        if self.registry_settings(reg).get("anonymous_pull") is True:
            return Principal("anonymous", "", reg, {"*": frozenset({sc.PULL})})
        return None

    async def authenticate(self, reg: str, username: str, password: str) -> Principal | None:
        """The principal these credentials name in ``reg``, or None. One
        slow hash is always computed."""
        if not username or not password:
            await asyncio.to_thread(verify_secret, password or "x", DECOY)
            return None
        if username == OWNER:
            rec = await self._get(OWNER_KEY)
            if rec is None or not await _password_ok(password, rec.get("passwords", [])):
                return None
            return self.owner(reg)
        if username == reg:
            rec = await self._get(admin_key(reg))
            ok = await _password_ok(password, (rec or {}).get("passwords", []))
            if rec is None or not ok or rec.get("enabled") is not True:
                return None
            return self.admin(reg)
        sp = await self._get(SP_PREFIX + username) if _safe_name(username) else None
        if sp is not None:
            if not await _password_ok(password, sp.get("secrets", [])):
                return None
            return self.service_principal(reg, username, sp)
        tok = await self._get(token_key(reg, username)) if _safe_name(username) else None
        if tok is None:
            await _password_ok(password, [])
            return None
        if not await _password_ok(password, tok.get("passwords", [])):
            return None
        return await self.token(reg, username, tok)

    def owner(self, reg: str) -> Principal:
        everything = frozenset({*sc.REPOSITORY_ACTIONS, "metadata_read", "metadata_write"})
        return Principal("owner", OWNER, reg, {"*": everything}, manage=True)

    def admin(self, reg: str) -> Principal:
        return Principal("admin", reg, reg, {"*": frozenset(sc.REPOSITORY_ACTIONS)})

    def service_principal(self, reg: str, sp_id: str, rec: dict) -> Principal | None:
        roles = rec.get("roles", {}).get(reg, [])
        acts: set[str] = set()
        for role in roles:
            acts |= sc.ROLES.get(role, frozenset())
        manage = "manage" in acts
        acts.discard("manage")
        return Principal("sp", sp_id, reg, {"*": frozenset(acts)} if acts else {}, manage=manage)

    async def token(self, reg: str, name: str, rec: dict) -> Principal | None:
        if rec.get("status", "enabled") != "enabled":
            return None
        expiry = rec.get("expiry")
        if expiry is not None and float(expiry) <= time.time():
            return None
        smap_name = str(rec.get("scope_map", ""))
        smap = BUILTIN_SCOPE_MAPS.get(smap_name)
        if smap is None:
            d = await self._get(scope_map_key(reg, smap_name)) if _safe_name(smap_name) else None
            smap = (d or {}).get("actions", {})
        grants: dict[str, frozenset[str]] = {}
        for pattern, actions in smap.items():
            acts: set[str] = set()
            for a in actions:
                acts.update(sc.SCOPE_MAP_ACTIONS.get(a, ()))
            if acts:
                grants[pattern] = frozenset(acts)
        return Principal("token", name, reg, grants)

    async def still_valid(self, kind: str, name: str, reg: str) -> bool:
        """Whether a token's subject still exists and is enabled: a deleted
        service principal or a disabled token loses access at once, not when
        its last access token expires. Reads the cache only (hot path)."""
        if kind == "owner":
            return self.ns.record(OWNER_KEY) is not None
        if kind == "admin":
            return (_record(self.ns.record(admin_key(reg))) or {}).get("enabled") is True
        if kind == "sp":
            sp = _record(self.ns.record(SP_PREFIX + name))
            return sp is not None and bool(sp.get("roles", {}).get(reg))
        if kind == "token":
            tok = _record(self.ns.record(token_key(reg, name)))
            if tok is None or tok.get("status", "enabled") != "enabled":
                return False
            expiry = tok.get("expiry")
            return expiry is None or float(expiry) > time.time()
        if kind == "anonymous":
            return self.anonymous(reg) is not None
        return False

    async def principal_for(self, kind: str, name: str, reg: str) -> Principal | None:
        """Rebuild a principal from a token's subject (refresh tokens,
        catalog filtering), with its current permissions."""
        if not await self.still_valid(kind, name, reg):
            return None
        if kind == "owner":
            return self.owner(reg)
        if kind == "admin":
            return self.admin(reg)
        if kind == "sp":
            rec = await self._get(SP_PREFIX + name)
            return self.service_principal(reg, name, rec) if rec else None
        if kind == "token":
            rec = await self._get(token_key(reg, name))
            return await self.token(reg, name, rec) if rec else None
        if kind == "anonymous":
            return self.anonymous(reg)
        return None


def _safe_name(name: str) -> bool:
    """Identity names become key components: no separators, bounded."""
    return 0 < len(name) <= 128 and all(c.isalnum() or c in "-_." for c in name)


async def ensure_owner(ns: Namespace, password: str | None) -> str | None:
    """Create the cluster owner on first start: with ``password``
    (``MERIDIAN_OWNER_PASSWORD``), else a generated one, which is returned
    so the caller can show it once. Returns None when the owner existed
    already (a later start never changes it) or was created from
    ``password``. Safe when several nodes start at once: one creates it."""
    if await ns.fresh_record(OWNER_KEY) is not None:
        return None
    generated = None if password else generate()
    record = {"passwords": [hash_secret(password or generated or "")], "created": time.time()}
    try:
        await ns.put_record(OWNER_KEY, json.dumps(record).encode(), create=True)
    except Conflict:
        return None  # another node created it first
    return generated
