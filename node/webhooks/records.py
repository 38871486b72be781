"""Webhook records: validation, their keys in the namespace, scope matching.

A webhook belongs to one registry and one region (its ``location``): the
region whose nodes deliver its events. Its record is JSON at
``/meridian/reg/<registry>/hooks/<name>``:
``{name, location, uri, actions, scope, headers, status, secret, created}``.
The secret signs every delivery (``node.webhooks.signing``), so it is kept
as it is (the namespace also holds the token signing keys): it is shown by
the call that created or rotated it and by an explicit ``show --secret``,
never in a list, a log or a delivery record; custom header values (often
a receiver's credential) are shown the same way only.

Every create also rewrites ``/meridian/reg/<registry>/hookguard`` and
commits only if that key is unchanged since it counted the webhooks, so
concurrent creates cannot pass the tier's webhook count.

Events waiting for delivery are ``/meridian/reg/<registry>/events/<region>/
<name>/<id>`` (one key per event, written in the transaction that records
the push or delete, so an acknowledged change always has its event);
finished deliveries are kept, a bounded number per webhook, at
``/meridian/reg/<registry>/deliveries/<region>/<name>/<id>``.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cluster.auth.admin import Invalid
from cluster.namespace import REG

ACTIONS = ("push", "delete", "quarantine", "chart_push", "chart_delete", "replicated")
STATUSES = ("enabled", "disabled")
NAME_RE = re.compile(r"^[A-Za-z0-9]{5,50}$")
NAME_RULE = "5-50 letters or digits (as ACR's webhook names)"
_REPO_PATTERN = re.compile(r"^[a-z0-9*][a-z0-9._/*-]{0,255}$")
_TAG_PATTERN = re.compile(r"^[A-Za-z0-9_*][A-Za-z0-9_.*-]{0,127}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
RESERVED_HEADERS = ("content-type", "content-length", "host", "user-agent", "transfer-encoding")
MAX_HEADERS = 20
MAX_HEADER_VALUE = 1024
MAX_URI = 2048
SECRET_BYTES = 32


def hooks_prefix(reg: str) -> str:
    return f"{REG}{reg}/hooks/"


def hook_key(reg: str, name: str) -> str:
    return f"{REG}{reg}/hooks/{name}"


def hooks_guard_key(reg: str) -> str:
    """Rewritten by every webhook create, which compares its revision: the
    creates of one registry commit one at a time, each having counted the
    webhooks after the previous one committed (the tier's limit holds).
    It starts with ``hooks_and_guard(reg)``, as the webhooks' keys do."""
    return f"{REG}{reg}/hookguard"


def hooks_and_guard(reg: str) -> str:
    """The prefix of a registry's webhooks and their guard: one range read
    of it counts the webhooks at the guard's revision."""
    return f"{REG}{reg}/hook"


def events_prefix(reg: str, region: str, name: str = "") -> str:
    return f"{REG}{reg}/events/{region}/" + (f"{name}/" if name else "")


def deliveries_prefix(reg: str, region: str, name: str) -> str:
    return f"{REG}{reg}/deliveries/{region}/{name}/"


def parse_hook_key(key: str) -> tuple[str, str] | None:
    """(registry, name) of a webhook record's key, else None."""
    if not key.startswith(REG):
        return None
    reg, sep, rest = key[len(REG) :].partition("/hooks/")
    if not sep or not reg or "/" in reg or not rest or "/" in rest:
        return None
    return reg, rest


def parse_event_key(key: str) -> tuple[str, str, str, str] | None:
    """(registry, region, name, id) of a pending event's key, else None."""
    if not key.startswith(REG):
        return None
    reg, sep, rest = key[len(REG) :].partition("/events/")
    parts = rest.split("/")
    if not sep or "/" in reg or len(parts) != 3 or not all(parts):
        return None
    return reg, parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Webhook:
    name: str
    location: str
    uri: str
    actions: tuple[str, ...]
    scope: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    status: str = "enabled"
    secret: str = ""
    created: float = 0.0

    def to_json(self) -> bytes:
        d = asdict(self)
        d["actions"] = list(self.actions)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Webhook:
        d = json.loads(raw)
        d["actions"] = tuple(d.get("actions", ()))
        return cls(**d)

    @property
    def enabled(self) -> bool:
        return self.status == "enabled"

    def fires(self, action: str, repository: str, tag: str) -> bool:
        """Whether an ``action`` on ``repository`` (``tag``, "" for none)
        is for this webhook: enabled, the action chosen, in scope."""
        return (
            self.enabled and action in self.actions and scope_matches(self.scope, repository, tag)
        )

    def public(self, *, secret: bool = False) -> dict[str, Any]:
        """The record as the API shows it: header values and the secret
        only when asked for explicitly."""
        d: dict[str, Any] = {
            "name": self.name,
            "location": self.location,
            "uri": self.uri,
            "actions": list(self.actions),
            "scope": self.scope,
            "status": self.status,
            "created": self.created,
        }
        if secret:
            d["headers"] = dict(self.headers)
            d["secret"] = self.secret
        else:
            d["headers"] = {k: "***" for k in self.headers}
        return d


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


# -- validation -------------------------------------------------------------------


def check_hook_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Invalid(f"invalid webhook name {str(name)[:60]!r}: {NAME_RULE}")
    return name


def check_uri(uri: object) -> str:
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI:
        raise Invalid("give the receiver's URI (http:// or https://, at most 2048 characters)")
    u = urlsplit(uri)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise Invalid(f"invalid URI {uri[:80]!r}: an http:// or https:// URL with a host")
    if any(c.isspace() for c in uri):
        raise Invalid("the URI may not contain spaces")
    return uri


def check_actions(actions: object) -> tuple[str, ...]:
    if isinstance(actions, str):
        actions = [a for a in actions.split(",") if a.strip()]
    if not isinstance(actions, list) or not actions:
        raise Invalid(f"give at least one action of {', '.join(ACTIONS)}")
    out = []
    for a in actions:
        a = str(a).strip()
        if a not in ACTIONS:
            raise Invalid(f"unknown action {a[:40]!r}: the actions are {', '.join(ACTIONS)}")
        if a not in out:
            out.append(a)
    return tuple(out)


def check_scope(scope: object) -> str:
    """ACR's scope: empty (every event), ``repo`` (its tag latest),
    ``repo:tag``; ``*`` matches any run of characters in either part."""
    if scope is None or scope == "":
        return ""
    if not isinstance(scope, str):
        raise Invalid("the scope is a string such as 'repo:*' or 'repo:v1*'")
    repo, sep, tag = scope.partition(":")
    if not _REPO_PATTERN.match(repo) or (sep and not _TAG_PATTERN.match(tag)):
        raise Invalid(
            f"invalid scope {scope[:80]!r}: REPOSITORY[:TAG], '*' as a wildcard "
            "(e.g. 'app:*', 'team/*:v1*')"
        )
    return scope


def check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if isinstance(headers, list):  # ["k=v", ...] as the CLI takes them
        pairs: dict[str, object] = {}
        for item in headers:
            k, sep, v = str(item).partition("=")
            if not sep:
                raise Invalid(f"a header is NAME=VALUE, got {str(item)[:40]!r}")
            pairs[k.strip()] = v
        headers = pairs
    if not isinstance(headers, dict):
        raise Invalid("headers are an object of NAME: VALUE")
    if len(headers) > MAX_HEADERS:
        raise Invalid(f"at most {MAX_HEADERS} custom headers")
    out: dict[str, str] = {}
    for k, v in headers.items():
        if not isinstance(k, str) or not _HEADER_NAME.match(k):
            raise Invalid(f"invalid header name {str(k)[:40]!r}")
        low = k.lower()
        if low in RESERVED_HEADERS or low.startswith("x-meridian-"):
            raise Invalid(f"header {k!r} is set by Meridian itself")
        if not isinstance(v, str) or len(v) > MAX_HEADER_VALUE or any(c in v for c in "\r\n\0"):
            raise Invalid(f"invalid value for header {k!r}: text of at most 1024 characters")
        out[k] = v
    return out


def check_status(status: object) -> str:
    if status not in STATUSES:
        raise Invalid(f"status is one of {', '.join(STATUSES)}")
    return str(status)


# -- scope --------------------------------------------------------------------------


_compiled: dict[str, re.Pattern[str]] = {}


def _pattern(glob: str) -> re.Pattern[str]:
    p = _compiled.get(glob)
    if p is None:
        p = re.compile("^" + ".*".join(re.escape(part) for part in glob.split("*")) + "$")
        if len(_compiled) < 4096:
            _compiled[glob] = p
    return p


def scope_matches(scope: str, repository: str, tag: str) -> bool:
    """Whether ``repository:tag`` is in ``scope`` (ACR's rules: empty is
    everything; ``repo`` alone means ``repo:latest``). An event without a
    tag (a push or delete by digest) matches a tag pattern of ``*`` only."""
    if not scope:
        return True
    repo_glob, sep, tag_glob = scope.partition(":")
    if not sep:
        tag_glob = "latest"
    return bool(_pattern(repo_glob).match(repository) and _pattern(tag_glob).match(tag))


def now() -> float:
    return round(time.time(), 3)
