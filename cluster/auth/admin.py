"""Managing identities and access: the operations behind the management API
(``node/manage.py``) and the ``meridian`` CLI, over the namespace.

- service principals (cluster-wide): create (client id given or generated,
  a generated secret, roles per registry), list, show, delete;
- per registry: repository-scoped tokens (create with a scope map, status
  and expiry; two generated passwords, each renewable alone; update;
  delete), scope maps (create, list, update, delete; a scope map a token
  uses cannot be deleted), the admin user (enable, disable, show, renew a
  password) and the settings anonymous pull and network rules (in the
  registry's config, other keys kept).

Every input is checked before anything is written: names (letters, digits,
``-``, ``_``, ``.``; 1-64 characters; a letter or digit first), registry
names (as in ``Host``), roles (``scopes.ROLES``), scope-map actions
(``scopes.SCOPE_MAP_ACTIONS``), repository patterns (a repository name,
optionally ending in ``/*``), CIDRs, expiry times. A mistake, a duplicate or
a missing target raises an :class:`AdminError` saying what to do, and
changes nothing. Generated secrets are returned once, by the call that made
them; the namespace keeps only their scrypt hashes (``cluster.auth.secrets``).
Changes to an existing record compare-and-swap on its revision, so two
writers never lose each other's change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cluster import skus
from cluster.auth import scopes as sc
from cluster.auth.identities import (
    BUILTIN_SCOPE_MAPS,
    OWNER,
    SP_PREFIX,
    admin_key,
    scope_map_key,
    token_key,
)
from cluster.auth.secrets import generate, hash_secret
from cluster.namespace import REG, Conflict, Namespace, config_key
from ocidist.digests import NAME_MAX, NAME_RE

IDENTITY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REGISTRY_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")  # as ocidist.paths
PASSWORDS = ("password1", "password2")
STATUSES = ("enabled", "disabled")
MAX_PATTERNS = 100  # repository patterns in one scope map
MAX_RULES = 200  # allowed CIDRs of one registry
MAX_DESCRIPTION = 256
UPDATE_ATTEMPTS = 8

NAME_RULE = "1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"


class AdminError(Exception):
    """A request the operations refuse; nothing was changed."""

    status = 400
    code = "INVALID"

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Invalid(AdminError):
    pass


class NotFound(AdminError):
    status, code = 404, "NOT_FOUND"


class Exists(AdminError):
    status, code = 409, "ALREADY_EXISTS"


class InUse(AdminError):
    status, code = 409, "IN_USE"


class Busy(AdminError):
    status, code = 409, "CONFLICT"


# -- checks ------------------------------------------------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


def check_registry(reg: object) -> str:
    if not isinstance(reg, str) or not REGISTRY_RE.match(reg):
        raise Invalid(
            f"invalid registry name {_show(reg)}: use 1-63 lower-case letters, digits or '-', "
            "starting and ending with a letter or digit",
            {"registry": reg},
        )
    return reg


def check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not IDENTITY_NAME_RE.match(name):
        raise Invalid(f"invalid {what} name {_show(name)}: use {NAME_RULE}", {"name": name})
    return name


def check_password_name(which: object) -> int:
    if which not in PASSWORDS:
        raise Invalid(
            f"invalid password name {_show(which)}: use password1 or password2",
            {"name": which},
        )
    return PASSWORDS.index(str(which))


def check_roles(roles: object) -> dict[str, list[str]]:
    """``{registry: [role, ...]}`` with at least one role."""
    if not isinstance(roles, dict) or not roles:
        raise Invalid(
            'give at least one role on a registry, e.g. {"contoso": ["AcrPull"]}; '
            f"roles: {', '.join(sc.ROLES)}"
        )
    out: dict[str, list[str]] = {}
    for reg, names in roles.items():
        check_registry(reg)
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names:
            raise Invalid(f"give a list of roles for registry {reg!r}", {"registry": reg})
        for role in names:
            if role not in sc.ROLES:
                raise Invalid(
                    f"unknown role {_show(role)}: use one of {', '.join(sc.ROLES)}",
                    {"role": role},
                )
        out[reg] = sorted(set(names))
    return dict(sorted(out.items()))


def check_pattern(pattern: object) -> str:
    """A repository name, optionally ending in ``/*`` (``team-a/*``)."""
    base = pattern[:-2] if isinstance(pattern, str) and pattern.endswith("/*") else pattern
    if not isinstance(base, str) or len(base) > NAME_MAX or not NAME_RE.match(base):
        raise Invalid(
            f"invalid repository pattern {_show(pattern)}: use a repository name "
            "(lower-case components separated by '/'), optionally ending in /* "
            "(e.g. team-a/app or team-a/*)",
            {"repository": pattern},
        )
    return str(pattern)


def check_actions(actions: object, *, what: str = "actions") -> dict[str, list[str]]:
    """``{repository pattern: [scope-map action, ...]}``, each list non-empty."""
    if not isinstance(actions, dict):
        raise Invalid(
            f"{what} must map repository patterns to actions, e.g. "
            '{"team-a/*": ["content/read", "content/write"]}'
        )
    if len(actions) > MAX_PATTERNS:
        raise Invalid(f"at most {MAX_PATTERNS} repository patterns in one scope map")
    out: dict[str, list[str]] = {}
    for pattern, acts in actions.items():
        check_pattern(pattern)
        if isinstance(acts, str):
            acts = [acts]
        if not isinstance(acts, list) or not acts:
            raise Invalid(f"give the actions for {pattern!r}", {"repository": pattern})
        for a in acts:
            if a not in sc.SCOPE_MAP_ACTIONS:
                raise Invalid(
                    f"unknown action {_show(a)}: use one of {', '.join(sc.SCOPE_MAP_ACTIONS)}",
                    {"action": a},
                )
        out[pattern] = sorted(set(acts))
    return out


def check_status(status: object) -> str:
    if status not in STATUSES:
        raise Invalid(f"invalid status {_show(status)}: use enabled or disabled")
    return str(status)


def check_expiry(expiry: object, now: float | None = None) -> float | None:
    """None (never), an epoch time or an ISO 8601 time, in the future."""
    if expiry is None:
        return None
    when: float | None = None
    if isinstance(expiry, int | float) and not isinstance(expiry, bool):
        when = float(expiry)
    elif isinstance(expiry, str):
        try:
            dt = datetime.fromisoformat(expiry.replace("Z", "+00:00"))
        except ValueError:
            dt = None
        if dt is not None:
            when = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if when is None or not math.isfinite(when):
        raise Invalid(
            f"invalid expiry {_show(expiry)}: use an ISO 8601 time such as "
            "2030-01-01T00:00:00Z, seconds since the epoch, or null for none"
        )
    if when <= (time.time() if now is None else now):
        raise Invalid(f"expiry {_show(expiry)} is in the past: give a time in the future")
    return when


def check_cidr(cidr: object) -> str:
    try:
        if not isinstance(cidr, str):
            raise ValueError
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError:
        raise Invalid(
            f"invalid network {_show(cidr)}: use an address or CIDR such as 10.0.0.0/8",
            {"cidr": cidr},
        ) from None


def check_bool(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{what} must be true or false, not {_show(value)}")
    return value


def iso(ts: object) -> str | None:
    if not isinstance(ts, int | float):
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(raw: bytes | None) -> dict:
    try:
        d = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _dump(rec: dict) -> bytes:
    return json.dumps(rec, sort_keys=True).encode()


async def _hash(secret: str) -> str:
    # scrypt costs tens of milliseconds: off the event loop.
    return await asyncio.to_thread(hash_secret, secret)


def _passwords(names: tuple[str, ...], values: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"name": n, "value": v} for n, v in zip(names, values, strict=True)]


# -- the operations ------------------------------------------------------------


class Admin:
    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    async def _modify(
        self, key: str, change: Callable[[dict], dict], missing: Callable[[], AdminError]
    ) -> dict:
        """Apply ``change`` to the record at ``key`` (compare-and-swap,
        re-read and retried when another writer got in between)."""
        for attempt in range(UPDATE_ATTEMPTS):
            raw = await self.ns.fresh_record(key)
            if raw is None:
                raise missing()
            new = change(_json(raw))
            try:
                await self.ns.replace_record(key, _dump(new), raw)
            except Conflict:
                await asyncio.sleep(0.05 * (attempt + 1))  # let the watch deliver the change
                continue
            return new
        raise Busy("it was changed concurrently several times: retry")

    # -- service principals ---------------------------------------------------

    @staticmethod
    def _sp_view(sp_id: str, rec: dict) -> dict:
        return {"id": sp_id, "roles": rec.get("roles", {}), "created": iso(rec.get("created"))}

    def _token_names(self) -> dict[str, str]:
        """Token name -> a registry holding a token of that name."""
        out: dict[str, str] = {}
        for key in self.ns.records(REG):
            reg, _, rest = key[len(REG) :].partition("/")
            if rest.startswith("auth/tokens/"):
                out.setdefault(rest[len("auth/tokens/") :], reg)
        return out

    async def create_sp(self, sp_id: object, roles: object) -> dict:
        roles = check_roles(roles)
        if sp_id is None:
            sp_id = str(uuid.uuid4())
        sp_id = check_name("service principal", sp_id)
        if sp_id.lower() == OWNER:
            raise Invalid(f"{sp_id!r} is the cluster owner's user name: pick another id")
        token_reg = self._token_names().get(sp_id)
        if token_reg is not None:
            raise Exists(
                f"registry {token_reg!r} has a token named {sp_id!r}, which would share its "
                "user name: pick another id",
                {"id": sp_id},
            )
        if sp_id in self.ns.registries():
            raise Invalid(
                f"{sp_id!r} is a registry's name (its admin user's user name): pick another id"
            )
        secret = generate()
        now = time.time()
        rec = {"secrets": [await _hash(secret)], "roles": roles, "created": now}
        try:
            await self.ns.put_record(SP_PREFIX + sp_id, _dump(rec), create=True)
        except Conflict:
            raise Exists(
                f"service principal {sp_id!r} already exists: pick another id, or delete it first",
                {"id": sp_id},
            ) from None
        return {**self._sp_view(sp_id, rec), "secret": secret}

    def list_sps(self) -> list[dict]:
        return [
            self._sp_view(key[len(SP_PREFIX) :], _json(raw))
            for key, raw in sorted(self.ns.records(SP_PREFIX).items())
        ]

    def _sp_missing(self, sp_id: str) -> NotFound:
        return NotFound(f"no service principal {sp_id!r}: see `meridian sp list`", {"id": sp_id})

    async def get_sp(self, sp_id: object) -> dict:
        sp_id = check_name("service principal", sp_id)
        raw = await self.ns.fresh_record(SP_PREFIX + sp_id)
        if raw is None:
            raise self._sp_missing(sp_id)
        return self._sp_view(sp_id, _json(raw))

    async def delete_sp(self, sp_id: object) -> None:
        sp_id = check_name("service principal", sp_id)
        if not await self.ns.delete_record(SP_PREFIX + sp_id):
            raise self._sp_missing(sp_id)

    # -- scope maps -------------------------------------------------------------

    @staticmethod
    def _smap_view(reg: str, name: str, rec: dict, builtin: bool = False) -> dict:
        return {
            "name": name,
            "registry": reg,
            "builtin": builtin,
            "description": rec.get("description", ""),
            "actions": rec.get("actions", {}),
            "created": iso(rec.get("created")),
        }

    def _smap_missing(self, reg: str, name: str) -> NotFound:
        return NotFound(
            f"no scope map {name!r} in registry {reg!r}: see `meridian scope-map list`",
            {"registry": reg, "scope_map": name},
        )

    def _check_smap_name(self, name: object) -> str:
        if isinstance(name, str) and name in BUILTIN_SCOPE_MAPS:
            raise Invalid(f"{name!r} is a built-in scope map: it cannot be created or changed")
        return check_name("scope map", name)

    async def _smap_exists(self, reg: str, name: object) -> str:
        if isinstance(name, str) and name in BUILTIN_SCOPE_MAPS:
            return name
        name = check_name("scope map", name)
        if await self.ns.fresh_record(scope_map_key(reg, name)) is None:
            raise self._smap_missing(reg, name)
        return name

    async def create_scope_map(
        self, reg: str, name: object, actions: object, description: object = ""
    ) -> dict:
        check_registry(reg)
        name = self._check_smap_name(name)
        checked = check_actions(actions)
        if not checked:
            raise Invalid("give at least one repository pattern and its actions")
        desc = _description(description)
        rec = {"actions": checked, "description": desc, "created": time.time()}
        try:
            await self.ns.put_record(scope_map_key(reg, name), _dump(rec), create=True)
        except Conflict:
            raise Exists(
                f"scope map {name!r} already exists in registry {reg!r}: pick another name, "
                "or change it with `meridian scope-map update`",
                {"registry": reg, "scope_map": name},
            ) from None
        return self._smap_view(reg, name, rec)

    def list_scope_maps(self, reg: str) -> list[dict]:
        check_registry(reg)
        out = [
            self._smap_view(reg, name, {"actions": actions}, builtin=True)
            for name, actions in BUILTIN_SCOPE_MAPS.items()
        ]
        prefix = scope_map_key(reg, "")
        for key, raw in sorted(self.ns.records(prefix).items()):
            out.append(self._smap_view(reg, key[len(prefix) :], _json(raw)))
        return out

    async def get_scope_map(self, reg: str, name: object) -> dict:
        check_registry(reg)
        if isinstance(name, str) and name in BUILTIN_SCOPE_MAPS:
            return self._smap_view(reg, name, {"actions": BUILTIN_SCOPE_MAPS[name]}, True)
        name = check_name("scope map", name)
        raw = await self.ns.fresh_record(scope_map_key(reg, name))
        if raw is None:
            raise self._smap_missing(reg, name)
        return self._smap_view(reg, name, _json(raw))

    async def update_scope_map(
        self,
        reg: str,
        name: object,
        *,
        actions: object = None,
        add: object = None,
        remove: object = None,
        description: object = None,
    ) -> dict:
        """Replace the actions, or add and remove some (a pattern left
        without actions goes); change the description."""
        check_registry(reg)
        name = self._check_smap_name(name)
        new_actions = check_actions(actions) if actions is not None else None
        to_add = check_actions(add, what="add") if add is not None else {}
        to_remove = check_actions(remove, what="remove") if remove is not None else {}
        desc = _description(description) if description is not None else None
        if new_actions is None and not to_add and not to_remove and desc is None:
            raise Invalid("nothing to change: give actions, add, remove or description")

        def change(rec: dict) -> dict:
            current = {p: set(a) for p, a in rec.get("actions", {}).items()}
            if new_actions is not None:
                current = {p: set(a) for p, a in new_actions.items()}
            for p, acts in to_add.items():
                current.setdefault(p, set()).update(acts)
            for p, acts in to_remove.items():
                if p not in current:
                    raise NotFound(
                        f"scope map {name!r} has no repository pattern {p!r}",
                        {"repository": p},
                    )
                current[p] -= set(acts)
            result = {p: sorted(a) for p, a in current.items() if a}
            if not result:
                raise Invalid(
                    "a scope map needs at least one repository pattern: delete it instead"
                )
            if len(result) > MAX_PATTERNS:
                raise Invalid(f"at most {MAX_PATTERNS} repository patterns in one scope map")
            out = {**rec, "actions": result}
            if desc is not None:
                out["description"] = desc
            return out

        rec = await self._modify(
            scope_map_key(reg, name), change, lambda: self._smap_missing(reg, name)
        )
        return self._smap_view(reg, name, rec)

    async def delete_scope_map(self, reg: str, name: object) -> None:
        check_registry(reg)
        name = self._check_smap_name(name)
        users = [t["name"] for t in self.list_tokens(reg) if t["scope_map"] == name]
        if users:
            raise InUse(
                f"scope map {name!r} is used by token(s) {', '.join(users)}: delete them or "
                "give them another scope map first",
                {"tokens": users},
            )
        if not await self.ns.delete_record(scope_map_key(reg, name)):
            raise self._smap_missing(reg, name)

    # -- tokens -----------------------------------------------------------------

    @staticmethod
    def _token_view(reg: str, name: str, rec: dict) -> dict:
        return {
            "name": name,
            "registry": reg,
            "scope_map": rec.get("scope_map", ""),
            "status": rec.get("status", "enabled"),
            "expiry": iso(rec.get("expiry")),
            "created": iso(rec.get("created")),
        }

    def _token_missing(self, reg: str, name: str) -> NotFound:
        return NotFound(
            f"no token {name!r} in registry {reg!r}: see `meridian token list`",
            {"registry": reg, "token": name},
        )

    async def create_token(
        self,
        reg: str,
        name: object,
        scope_map: object,
        status: object = "enabled",
        expiry: object = None,
    ) -> dict:
        check_registry(reg)
        name = check_name("token", name)
        if name.lower() == OWNER or name == reg:
            whose = "the cluster owner" if name.lower() == OWNER else "the registry's admin user"
            raise Invalid(f"{name!r} is the user name of {whose}: pick another token name")
        smap = await self._smap_exists(reg, scope_map)
        st = check_status(status)
        when = check_expiry(expiry)
        if await self.ns.fresh_record(SP_PREFIX + name) is not None:
            raise Exists(
                f"a service principal has the id {name!r}, which would share its user name: "
                "pick another token name",
                {"token": name},
            )
        p1, p2 = generate(), generate()
        rec = {
            "scope_map": smap,
            "status": st,
            "expiry": when,
            "passwords": [await _hash(p1), await _hash(p2)],
            "created": time.time(),
        }
        try:
            await self.ns.put_record(token_key(reg, name), _dump(rec), create=True)
        except Conflict:
            raise Exists(
                f"token {name!r} already exists in registry {reg!r}: pick another name, or "
                "change it with `meridian token update`",
                {"registry": reg, "token": name},
            ) from None
        return {**self._token_view(reg, name, rec), "passwords": _passwords(PASSWORDS, (p1, p2))}

    def list_tokens(self, reg: str) -> list[dict]:
        check_registry(reg)
        prefix = token_key(reg, "")
        return [
            self._token_view(reg, key[len(prefix) :], _json(raw))
            for key, raw in sorted(self.ns.records(prefix).items())
        ]

    async def get_token(self, reg: str, name: object) -> dict:
        check_registry(reg)
        name = check_name("token", name)
        raw = await self.ns.fresh_record(token_key(reg, name))
        if raw is None:
            raise self._token_missing(reg, name)
        return self._token_view(reg, name, _json(raw))

    async def update_token(self, reg: str, name: object, changes: dict[str, Any]) -> dict:
        """``changes``: any of ``scope_map``, ``status``, ``expiry`` (null: none)."""
        check_registry(reg)
        name = check_name("token", name)
        if not changes:
            raise Invalid("nothing to change: give scope_map, status or expiry")
        new: dict[str, Any] = {}
        if "scope_map" in changes:
            new["scope_map"] = await self._smap_exists(reg, changes["scope_map"])
        if "status" in changes:
            new["status"] = check_status(changes["status"])
        if "expiry" in changes:
            new["expiry"] = check_expiry(changes["expiry"])
        rec = await self._modify(
            token_key(reg, name), lambda r: {**r, **new}, lambda: self._token_missing(reg, name)
        )
        return self._token_view(reg, name, rec)

    async def renew_token(self, reg: str, name: object, which: object) -> dict:
        """A new value for ``password1`` or ``password2``; the other still works."""
        check_registry(reg)
        name = check_name("token", name)
        i = check_password_name(which)
        value = generate()
        hashed = await _hash(value)
        rec = await self._modify(
            token_key(reg, name),
            lambda r: {**r, "passwords": _replaced(r.get("passwords", []), i, hashed)},
            lambda: self._token_missing(reg, name),
        )
        return {
            **self._token_view(reg, name, rec),
            "passwords": _passwords((PASSWORDS[i],), (value,)),
        }

    async def delete_token(self, reg: str, name: object) -> None:
        check_registry(reg)
        name = check_name("token", name)
        if not await self.ns.delete_record(token_key(reg, name)):
            raise self._token_missing(reg, name)

    # -- the admin user -----------------------------------------------------------

    @staticmethod
    def _admin_view(reg: str, rec: dict | None) -> dict:
        return {"registry": reg, "username": reg, "enabled": (rec or {}).get("enabled") is True}

    async def admin_user(self, reg: str) -> dict:
        check_registry(reg)
        raw = await self.ns.fresh_record(admin_key(reg))
        return self._admin_view(reg, _json(raw) if raw is not None else None)

    async def set_admin_enabled(self, reg: str, enabled: object) -> dict:
        """Enable or disable the admin user. The first enable generates its
        two passwords and returns them (shown only then; renew to get new ones)."""
        check_registry(reg)
        on = check_bool("enabled", enabled)
        key = admin_key(reg)
        if on and await self.ns.fresh_record(key) is None:
            p1, p2 = generate(), generate()
            rec = {"enabled": True, "passwords": [await _hash(p1), await _hash(p2)]}
            try:
                await self.ns.put_record(key, _dump(rec), create=True)
                return {**self._admin_view(reg, rec), "passwords": _passwords(PASSWORDS, (p1, p2))}
            except Conflict:
                pass  # created an instant ago elsewhere: enable that one
        if not on and await self.ns.fresh_record(key) is None:
            return self._admin_view(reg, None)  # never enabled: already off
        rec = await self._modify(
            key, lambda r: {**r, "enabled": on}, lambda: Busy("changed concurrently: retry")
        )
        return self._admin_view(reg, rec)

    async def renew_admin(self, reg: str, which: object) -> dict:
        check_registry(reg)
        i = check_password_name(which)
        value = generate()
        hashed = await _hash(value)
        rec = await self._modify(
            admin_key(reg),
            lambda r: {**r, "passwords": _replaced(r.get("passwords", []), i, hashed)},
            lambda: NotFound(
                f"registry {reg!r} has no admin user yet: enable it with "
                "`meridian credential enable`",
                {"registry": reg},
            ),
        )
        return {**self._admin_view(reg, rec), "passwords": _passwords((PASSWORDS[i],), (value,))}

    # -- settings: anonymous pull, network rules ------------------------------------

    @staticmethod
    def _settings_view(reg: str, config: dict) -> dict:
        net = config.get("network") if isinstance(config.get("network"), dict) else {}
        return {
            "registry": reg,
            "anonymous_pull": config.get("anonymous_pull") is True,
            "public_access": net.get("public_access", True) is not False,
            "allowed_cidrs": list(net.get("allowed_cidrs", [])),
        }

    async def settings(self, reg: str) -> dict:
        check_registry(reg)
        entry = await self.ns.kv.get(config_key(reg))
        return self._settings_view(reg, _json(entry.value if entry is not None else None))

    async def _update_config(self, reg: str, change: Callable[[dict, dict], None]) -> dict:
        """``change(config, network)`` edits both in place; other keys are kept."""

        def apply(config: dict) -> dict:
            net = dict(config.get("network") or {})
            change(config, net)
            config["network"] = net
            return config

        try:
            config = await self.ns.update_registry_config(reg, apply)
        except Conflict:
            raise Busy(
                "the registry's settings changed concurrently several times: retry"
            ) from None
        return self._settings_view(reg, config)

    async def update_settings(
        self,
        reg: str,
        *,
        anonymous_pull: object = None,
        public_access: object = None,
        allowed_cidrs: object = None,
    ) -> dict:
        check_registry(reg)
        anon = check_bool("anonymous_pull", anonymous_pull) if anonymous_pull is not None else None
        public = check_bool("public_access", public_access) if public_access is not None else None
        cidrs = None
        if allowed_cidrs is not None:
            if not isinstance(allowed_cidrs, list):
                raise Invalid("allowed_cidrs must be a list of networks such as 10.0.0.0/8")
            cidrs = sorted({check_cidr(c) for c in allowed_cidrs})
            if len(cidrs) > MAX_RULES:
                raise Invalid(f"at most {MAX_RULES} allowed networks in one registry")
        if anon is None and public is None and cidrs is None:
            raise Invalid("nothing to change: give anonymous_pull, public_access or allowed_cidrs")

        def change(config: dict, net: dict) -> None:
            if public is False or cidrs:
                _network_rules_allowed(reg, config)
            if anon is not None:
                config["anonymous_pull"] = anon
            if public is not None:
                net["public_access"] = public
            if cidrs is not None:
                net["allowed_cidrs"] = cidrs

        return await self._update_config(reg, change)

    async def add_network_rule(self, reg: str, cidr: object) -> dict:
        check_registry(reg)
        net_text = check_cidr(cidr)

        def change(config: dict, net: dict) -> None:
            _network_rules_allowed(reg, config)
            have = list(net.get("allowed_cidrs", []))
            if net_text in have:
                raise Exists(
                    f"{net_text} is already allowed in registry {reg!r}", {"cidr": net_text}
                )
            if len(have) >= MAX_RULES:
                raise Invalid(f"at most {MAX_RULES} allowed networks in one registry")
            net["allowed_cidrs"] = sorted([*have, net_text])

        return await self._update_config(reg, change)

    async def remove_network_rule(self, reg: str, cidr: object) -> dict:
        check_registry(reg)
        net_text = check_cidr(cidr)

        def change(_: dict, net: dict) -> None:
            have = list(net.get("allowed_cidrs", []))
            if net_text not in have:
                raise NotFound(
                    f"{net_text} is not an allowed network of registry {reg!r}: see "
                    "`meridian network-rule list`",
                    {"cidr": net_text},
                )
            have.remove(net_text)
            net["allowed_cidrs"] = have

        return await self._update_config(reg, change)


def _network_rules_allowed(reg: str, config: dict) -> None:
    """Network rules are a Premium feature (``cluster.skus``; the default
    registry, with no tier, has every feature)."""
    sku = skus.of_config(config)
    if not sku.network_rules:
        raise Invalid(
            f"network rules need the Premium tier and registry {reg!r} is {sku.name}: raise it "
            f"with `meridian registry update {reg} --sku Premium`",
            {"sku": sku.name},
        )


def _replaced(hashes: list, i: int, new: str) -> list:
    out = list(hashes) + [""] * (len(PASSWORDS) - len(hashes))
    out[i] = new
    return out


def _description(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
        raise Invalid(f"description must be text of at most {MAX_DESCRIPTION} characters")
    return value
