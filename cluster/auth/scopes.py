"""Docker token scopes and the actions of ACR's roles and scope maps.

A client asks for scopes like ``repository:team/app:pull,push`` or
``registry:catalog:*``; an access token lists what was granted, as the
Docker token specification's ``access`` claim.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

PULL, PUSH, DELETE = "pull", "push", "delete"
REPOSITORY_ACTIONS = (PULL, PUSH, DELETE)
CATALOG = ("registry", "catalog")
MANAGE = ("registry", "manage")  # the management API (node/manage.py)

# ACR's scope-map actions and the Docker actions they allow.
SCOPE_MAP_ACTIONS = {
    "content/read": (PULL,),
    "content/write": (PUSH,),
    "content/delete": (DELETE,),
    "metadata/read": ("metadata_read",),
    "metadata/write": ("metadata_write",),
}

# ACR's built-in roles for service principals.
ROLES = {
    "AcrPull": frozenset({PULL}),
    "AcrPush": frozenset({PULL, PUSH}),
    "AcrDelete": frozenset({DELETE}),
    "Owner": frozenset({PULL, PUSH, DELETE, "metadata_read", "metadata_write", "manage"}),
}


@dataclass(frozen=True, slots=True)
class Scope:
    type: str  # "repository" or "registry"
    name: str  # repository name, or "catalog"
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    def as_claim(self) -> dict:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scope(text: str) -> Scope | None:
    """``type:name:actions``; the name may itself hold a colon (a
    registry host with a port in front of a repository). None if malformed."""
    typ, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not typ or not name:
        return None
    acts = tuple(a for a in dict.fromkeys(actions.split(",")) if a)
    return Scope(typ, name, acts) if acts else None


def parse_scopes(values: list[str]) -> list[Scope]:
    """Every ``scope`` parameter; a parameter may hold several, space-separated."""
    out = []
    for v in values:
        for part in v.split():
            s = parse_scope(part)
            if s is not None:
                out.append(s)
    return out


def pattern_matches(pattern: str, repository: str) -> bool:
    """ACR's scope-map repository patterns: an exact name or a trailing
    ``/*`` (``team-a/*`` covers ``team-a/app`` and ``team-a/x/y``)."""
    if pattern.endswith("/*"):
        return repository.startswith(pattern[:-1])
    if "*" in pattern:
        return fnmatch.fnmatchcase(repository, pattern)
    return repository == pattern
