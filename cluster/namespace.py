"""The registry-wide namespace: key layout, watch-fed cache and operations.

Written once over the ``KVStore`` contract (cluster/kv.py), so a standalone
node (embedded sqlite) and a cluster (etcd) behave the same.

Key tree (every registry key is scoped by the registry's name; repository
path components never start with ``_``, so the ``_x`` markers cannot clash
with a nested repository name):

    /meridian/auth/...                                  cluster identities and
                                                        token signing keys (JSON,
                                                        cluster.auth)
    /meridian/reg/<registry>/auth/...                   the registry's identities
    /meridian/regions/<region>                          region info (JSON; the
                                                        endpoints of the node
                                                        that registered last)
    /meridian/regions/<region>/nodes/<node-id>          one node of the region:
                                                        its endpoints (JSON
                                                        NodeInfo), leased by
                                                        that node (gone when it
                                                        stops)
    /meridian/alive/<region>                            liveness (leased by the
                                                        node that registered
                                                        last); a region is alive
                                                        while this key or any of
                                                        its node keys exists
    /meridian/reg/<registry>/config                     the registry's record and
                                                        settings (JSON: sku,
                                                        location, created,
                                                        replicas, state, ...;
                                                        cluster.registries)
    /meridian/reg/<registry>/repo/<repo>/_t/<tag>       tag -> manifest digest
    /meridian/reg/<registry>/repo/<repo>/_m/<digest>    manifest record (JSON)
    /meridian/reg/<registry>/repo/<repo>/_b/<digest>    blob link (JSON {"size",
                                                        "t": unix time linked})
    /meridian/reg/<registry>/repo/<repo>/_g/pushes      bumped by every manifest
                                                        push (guards link GC)
    /meridian/reg/<registry>/repo/<repo>/_l/<ref>       lock of a tag or (a ref
                                                        with ':') a manifest:
                                                        JSON {"write", "delete"}
                                                        (only while not both true)
    /meridian/reg/<registry>/repo/<repo>/_g/locks       the repository's own lock
                                                        (JSON as above), rewritten
                                                        with every lock change in
                                                        it; absent: no lock at all.
                                                        Pushes and deletes compare
                                                        its revision
    /meridian/reg/<registry>/place/<digest>/<region>    bytes of <digest> held in
                                                        <region> (JSON {"size"})
    /meridian/reg/<registry>/hooks/<name>               a webhook (JSON, with its
                                                        signing secret:
                                                        node.webhooks.records)
    /meridian/reg/<registry>/hookguard                  rewritten by every webhook
                                                        create, which compares it
                                                        (the tier's webhook count)
    /meridian/reg/<registry>/events/<region>/<name>/<id>
                                                        a webhook event waiting
                                                        for <region>'s deliverer
                                                        (JSON payload; written
                                                        with the push)
    /meridian/reg/<registry>/deliveries/<region>/<name>/<ns>-<id>
                                                        a finished delivery (the
                                                        last N per webhook)
    /meridian-audit/<hour>/reg/<registry>/<ms>-<node>-<n>
                                                        a batch of audit records
                                                        (JSON list; node.audit;
                                                        <hour> since the epoch):
                                                        beside /meridian/, so in
                                                        no node's cache
    /meridian-audit/<hour>/cluster/<ms>-<node>-<n>      the cluster's own audit
                                                        records (service
                                                        principals, registries)
    /meridian/leaders/<region>/webhooks                 the region's webhook
                                                        deliverer (leased)
    /meridian/reg/<registry>/usage/<region>             the registry's usage in
                                                        <region> (JSON: pushes,
                                                        pulls, bytes_served,
                                                        gib_days, stored_bytes,
                                                        integrated_at, updated;
                                                        node.usage adds to it by
                                                        compare-and-swap)
    /meridian/claims/<region>/<registry>/<digest>       the node of <region> copying
                                                        <digest> into it now (JSON
                                                        {"node", "lease", "t"},
                                                        leased by that node;
                                                        node.replication.claims)
    /meridian/leaders/<region>/<role>                   the node of <region> doing
                                                        <role> (reclaim, ...; as
                                                        a claim)

Reads are served from ``Cache``, an in-memory mirror loaded with one range
read (applied page by page where the store reads it so) and kept current by
a watch; a node's own writes are applied to it as
soon as their transaction commits (read-your-writes), and watch events older
than what the cache already holds for a key are ignored.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, field, fields, replace
from types import MappingProxyType

from cluster import skus
from cluster.kv import (
    Compare,
    Delete,
    Entry,
    Event,
    KVStore,
    KVUnavailable,
    Op,
    Put,
    WatchCompacted,
)

log = logging.getLogger("meridian.namespace")

ROOT = "/meridian/"
REGIONS = ROOT + "regions/"
ALIVE = ROOT + "alive/"
REG = ROOT + "reg/"
AUTH = ROOT + "auth/"
NODES = "/nodes/"  # /meridian/regions/<region>/nodes/<node-id>


# etcd refuses a txn of more than 128 compares or ops (its default limit);
# the embedded store enforces the same, so what works standalone works on etcd.
TXN_BATCH = 100
MAX_TAGS_PER_PUSH = TXN_BATCH
# A manifest record keeps the times of at most this many of its tags.
MAX_TAGGED = 1024
# Manifest records are etcd values (etcd's request limit is 1.5 MiB): larger
# annotations stay only in the manifest's bytes.
MAX_RECORD_ANNOTATIONS = 256 << 10
# A cache miss is checked against the store this long at most (a read).
FRESH_READ_TIMEOUT = 0.5
PUSH_ATTEMPTS = 8  # a manifest push re-reads links that changed under it this often
STORE_CHECK_TIMEOUT = 2.0  # the periodic liveness read


class Conflict(Exception):
    """A compare-and-swap lost: someone else changed the key first."""


class BlobsGone(Exception):
    """A manifest push references blob links that were removed (by online
    garbage collection or a blob DELETE) since they were checked."""

    def __init__(self, digests: list[str]) -> None:
        super().__init__(", ".join(digests))
        self.digests = digests


# What the cache holds per tag is kept small (issue 16: at most 1 KiB per
# tag): the strings many keys and records repeat (digests, repository names,
# media types, regions, the tags in a record's tag times) are interned, so
# each is held once however many keys, records and indexes name it; a
# record's empty mappings are one shared read-only mapping; tag times are a
# flat tuple.
_intern = sys.intern
NO_ANNOTATIONS: Mapping[str, str] = MappingProxyType({})
# A record keeps its tag times as a flat tuple (tag, created, updated, ...)
# up to this many tags (a dict tag -> (created, updated) beyond).
_FLAT_TAGGED = 8

# ``ManifestRecord.tagged`` as held: a flat tuple or a mapping.
Tagged = tuple | Mapping[str, Sequence[float]]


def _no_annotations() -> Mapping[str, str]:
    return NO_ANNOTATIONS


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    digest: str
    media_type: str
    size: int
    blobs: tuple[str, ...] = ()  # config + layers (and blobs of artifacts)
    manifests: tuple[str, ...] = ()  # children of an index
    subject: str | None = None
    artifact_type: str | None = None
    # read-only (empty: the shared ``NO_ANNOTATIONS``)
    annotations: Mapping[str, str] = field(default_factory=_no_annotations)
    created: float = 0.0
    # True when the annotations were too large to keep in the record: read
    # them from the manifest's bytes.
    annotations_elided: bool = False
    # ``created`` is the record's last push (every tag move rewrites it);
    # ``first_pushed`` the first (0: unknown, take ``created``), and
    # ``tagged`` each tag's [created, last update] as of its last move onto
    # this manifest (the tag key's value stays the bare digest). Written by
    # ``Namespace.put_manifest``; not part of a record's equality. Given as
    # a mapping tag -> [created, updated]; held compact (read it with
    # ``tag_times`` and ``tag_items``).
    first_pushed: float = field(default=0.0, compare=False)
    tagged: Tagged = field(default=(), compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "digest", _intern(self.digest))
        put(self, "media_type", _intern(self.media_type))
        put(self, "blobs", tuple(map(_intern, self.blobs)))
        if self.manifests:
            put(self, "manifests", tuple(map(_intern, self.manifests)))
        if self.subject:
            put(self, "subject", _intern(self.subject))
        if self.artifact_type:
            put(self, "artifact_type", _intern(self.artifact_type))
        if not self.annotations:
            put(self, "annotations", NO_ANNOTATIONS)
        created, first = self.created, self.first_pushed
        if first == created and type(first) is type(created):
            put(self, "first_pushed", created)
        elif first == 0.0 and type(first) is float:
            put(self, "first_pushed", 0.0)
        put(self, "tagged", _compact_tagged(self.tagged, created))

    def to_json(self) -> bytes:
        d = {name: getattr(self, name) for name in _RECORD_FIELDS}
        d["annotations"] = dict(self.annotations)
        d["tagged"] = {t: list(v) for t, v in self.tag_items()}
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ManifestRecord:
        d = json.loads(raw)
        d["blobs"] = tuple(d.get("blobs", ()))
        d["manifests"] = tuple(d.get("manifests", ()))
        return cls(**d)

    def tag_times(self, tag: str) -> tuple[float, float]:
        """(created, last update) of ``tag`` pointing here."""
        t = self.tagged
        if type(t) is tuple:
            try:
                i = t.index(tag)  # only tags are strings in the flat tuple
            except ValueError:
                return self.created, self.created
            return float(t[i + 1]), float(t[i + 2])
        v = t.get(tag)
        if v and len(v) == 2:
            return float(v[0]), float(v[1])
        return self.created, self.created

    def tag_items(self) -> Iterator[tuple[str, Sequence[float]]]:
        """(tag, [created, updated]) of each tag whose times are kept, oldest
        move first."""
        t = self.tagged
        if type(t) is tuple:
            for i in range(0, len(t), 3):
                yield t[i], t[i + 1 : i + 3]
        else:
            yield from t.items()


_RECORD_FIELDS = tuple(f.name for f in fields(ManifestRecord))


def _compact_tagged(tagged: Tagged, created: float) -> Tagged:
    """``tagged`` as a record holds it: a flat tuple (tag, created, updated,
    ...) for a few tags, else a dict tag -> (created, updated); times equal
    to the record's ``created`` are that same float object. A malformed
    entry (not a pair) keeps the mapping as given, so it reads back as is."""
    if type(tagged) is tuple or not tagged:
        return tagged or ()
    items = list(tagged.items())
    if not all(isinstance(v, list | tuple) and len(v) == 2 for _, v in items):
        return tagged

    def same(x: float) -> float:
        return created if x == created and type(x) is type(created) else x

    if len(items) <= _FLAT_TAGGED:
        flat: list = []
        for t, (c, u) in items:
            flat += (_intern(t), same(c), same(u))
        return tuple(flat)
    return {_intern(t): (same(c), same(u)) for t, (c, u) in items}


@dataclass(frozen=True, slots=True)
class RegionInfo:
    name: str
    http: str  # base URL of the region's v2 API
    grpc: str = ""  # host:port of its replication service
    started: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node of a region (``/meridian/regions/<region>/nodes/<node>``)."""

    region: str
    node: str
    http: str
    grpc: str = ""
    started: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def region_info(self) -> RegionInfo:
        return RegionInfo(self.region, self.http, self.grpc, self.started)


def tag_key(reg: str, repo: str, tag: str) -> str:
    return f"{REG}{reg}/repo/{repo}/_t/{tag}"


def manifest_key(reg: str, repo: str, digest: str) -> str:
    return f"{REG}{reg}/repo/{repo}/_m/{digest}"


def blob_key(reg: str, repo: str, digest: str) -> str:
    return f"{REG}{reg}/repo/{repo}/_b/{digest}"


def pushes_key(reg: str, repo: str) -> str:
    return f"{REG}{reg}/repo/{repo}/_g/pushes"


def lock_key(reg: str, repo: str, ref: str) -> str:
    """The lock record of a tag or (``ref`` with a ':') a manifest digest."""
    return f"{REG}{reg}/repo/{repo}/_l/{ref}"


def locks_key(reg: str, repo: str) -> str:
    """The repository's own lock attributes, rewritten with every lock change
    in the repository: writes and deletes compare its revision."""
    return f"{REG}{reg}/repo/{repo}/_g/locks"


def repo_prefix(reg: str, repo: str) -> str:
    return f"{REG}{reg}/repo/{repo}/_"


@dataclass(frozen=True, slots=True)
class Lock:
    """ACR's changeable attributes of a repository, tag or manifest."""

    write: bool = True  # False: no push onto it, no delete (ACR write-enabled)
    delete: bool = True  # False: no delete (ACR delete-enabled)
    read: bool = True  # False: its manifest GET is refused (ACR read-enabled)
    list: bool = True  # False: left out of tag lists and the catalog (ACR list-enabled)

    @property
    def deletable(self) -> bool:
        return self.write and self.delete

    def to_dict(self) -> dict[str, bool]:
        return {f"{k}_enabled": getattr(self, k) for k in LOCK_ATTRS}

    @classmethod
    def from_json(cls, raw: bytes) -> Lock:
        d = json.loads(raw)
        return cls(**{k: bool(d.get(k, True)) for k in LOCK_ATTRS})

    def to_json(self) -> bytes:
        return json.dumps({k: getattr(self, k) for k in LOCK_ATTRS}).encode()


UNLOCKED = Lock()
LOCK_ATTRS = ("write", "delete", "read", "list")


class Locked(Exception):
    """A read, write or delete refused by a lock (nothing was changed)."""

    def __init__(self, what: str, attr: str, unlock: str) -> None:
        super().__init__(f"{what} is locked ({attr}-enabled false): unlock with `{unlock}`")
        self.what = what


def place_key(reg: str, digest: str, region: str) -> str:
    return f"{REG}{reg}/place/{digest}/{region}"


def config_key(reg: str) -> str:
    return f"{REG}{reg}/config"


def region_key(region: str) -> str:
    return REGIONS + region


def node_key(region: str, node: str) -> str:
    return f"{REGIONS}{region}{NODES}{node}"


def alive_key(region: str) -> str:
    return ALIVE + region


def usage_key(reg: str, region: str) -> str:
    return f"{REG}{reg}/usage/{region}"


@dataclass(slots=True)
class RepoState:
    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, ManifestRecord] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)
    # subject digest -> referrer manifest digests
    referrers: dict[str, set[str]] = field(default_factory=dict)
    # lock records: tag or digest -> Lock; the repository's own (None: unlocked)
    locks: dict[str, Lock] = field(default_factory=dict)
    repo_lock: Lock | None = None
    _sorted_tags: list[str] | None = None

    def sorted_tags(self) -> list[str]:
        if self._sorted_tags is None:
            self._sorted_tags = sorted(self.tags)
        return self._sorted_tags

    def empty(self) -> bool:
        return not (self.tags or self.manifests or self.blobs or self.locks or self.repo_lock)


@dataclass(slots=True)
class RegistryState:
    repos: dict[str, RepoState] = field(default_factory=dict)
    # digest -> region -> size
    placements: dict[str, dict[str, int]] = field(default_factory=dict)
    # blob digest -> repos linking it (for mount without ``from``): read
    # with ``holders`` (a name, a tuple or a set, by how many)
    blob_repos: dict[str, Holders] = field(default_factory=dict)
    # manifest digest -> repos holding its record (``Namespace.references``),
    # held as ``blob_repos``
    manifest_repos: dict[str, Holders] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    usage: dict[str, dict] = field(default_factory=dict)  # region -> usage record
    # bytes of the distinct digests the registry references (blob links and
    # manifest records), kept as keys come and go: its storage use
    stored: int = 0
    _sorted_repos: list[str] | None = None

    def holds(self, digest: str) -> bool:
        return digest in self.blob_repos or digest in self.manifest_repos

    def sorted_repos(self) -> list[str]:
        if self._sorted_repos is None:
            self._sorted_repos = sorted(r for r, s in self.repos.items() if s.manifests)
        return self._sorted_repos


# A digest's holders (``RegistryState.blob_repos``/``manifest_repos``) are
# the repository's name while one holds it (most digests), a tuple up to
# this many, a set beyond: read them with ``holders``.
_FEW_HOLDERS = 8
Holders = str | tuple[str, ...] | set[str]


def holders(held: Holders | None) -> Iterable[str]:
    """The repositories in a ``blob_repos``/``manifest_repos`` value."""
    if held is None:
        return ()
    return (held,) if type(held) is str else held


def _hold(index: dict[str, Holders], digest: str, repo: str) -> None:
    held = index.get(digest)
    if held is None:
        index[digest] = repo
    elif type(held) is str:
        if held != repo:
            index[digest] = (held, repo)
    elif repo in held:
        return
    elif type(held) is set:
        held.add(repo)
    elif len(held) < _FEW_HOLDERS:
        index[digest] = (*held, repo)
    else:
        index[digest] = {*held, repo}


def _release(index: dict[str, Holders], digest: str, repo: str) -> None:
    held = index.get(digest)
    if held is None:
        return
    if type(held) is str:
        if held == repo:
            del index[digest]
        return
    if type(held) is set:
        held.discard(repo)
        if held:
            return
    else:
        held = tuple(r for r in held if r != repo)
        if len(held) > 1:
            index[digest] = held
            return
        if held:
            index[digest] = held[0]
            return
    del index[digest]


# ``Revisions`` files a place key (``.../place/<digest>/<region>``) under
# ``<registry prefix>/place/\0<region>`` with the digest as its leaf: one
# directory per region, not one per digest.
_PLACE_DIR = "/place/\0"


class Revisions:
    """The mod revision of every live key (what compare-and-swap compares),
    a mapping by full key that does not hold the full keys: a key is filed
    under its directory (one string and dict per directory) by its last
    component, the same object the cache's own tables (tags, manifests by
    digest) hold as their key (``Cache.apply`` passes it on; digests
    interned)."""

    __slots__ = ("_dirs", "_n")

    def __init__(self) -> None:
        self._dirs: dict[str, dict[str, int]] = {}
        self._n = 0

    @staticmethod
    def split(key: str) -> tuple[str, str]:
        """(directory, leaf) of ``key``."""
        if key.startswith(REG):
            i = key.find("/", len(REG))
            if key.startswith("/place/", i):
                digest, sep, region = key[i + 7 :].partition("/")
                if sep and "/" not in region:
                    return key[:i] + _PLACE_DIR + region, digest
        d, _, leaf = key.rpartition("/")
        return d, leaf

    @staticmethod
    def _join(d: str, leaf: str) -> str:
        head, sep, region = d.partition(_PLACE_DIR)
        return f"{head}/place/{leaf}/{region}" if sep else f"{d}/{leaf}"

    def get(self, key: str, default: int | None = None) -> int | None:
        return self.at(*self.split(key), default)

    def at(self, d: str, leaf: str, default: int | None = None) -> int | None:
        leaves = self._dirs.get(d)
        return leaves.get(leaf, default) if leaves is not None else default

    def __getitem__(self, key: str) -> int:
        rev = self.get(key)
        if rev is None:
            raise KeyError(key)
        return rev

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __setitem__(self, key: str, rev: int) -> None:
        self.put(*self.split(key), rev)

    def put(self, d: str, leaf: str, rev: int) -> None:
        leaves = self._dirs.get(d)
        if leaves is None:
            leaves = self._dirs[d] = {}
        if leaf not in leaves:
            self._n += 1
        leaves[leaf] = rev

    def pop(self, key: str, default: int | None = None) -> int | None:
        return self.drop(*self.split(key), default)

    def drop(self, d: str, leaf: str, default: int | None = None) -> int | None:
        leaves = self._dirs.get(d)
        if leaves is None or leaf not in leaves:
            return default
        self._n -= 1
        rev = leaves.pop(leaf)
        if not leaves:
            del self._dirs[d]
        return rev

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        for d, leaves in list(self._dirs.items()):
            for leaf in list(leaves):
                yield self._join(d, leaf)

    def under(self, prefix: str) -> list[str]:
        """The live keys that start with ``prefix``."""
        return [k for k in self if k.startswith(prefix)]


class Cache:
    """In-memory mirror of everything under ``/meridian/``."""

    def __init__(self) -> None:
        self.registries: dict[str, RegistryState] = {}
        self.regions: dict[str, RegionInfo] = {}
        self.nodes: dict[str, dict[str, NodeInfo]] = {}  # region -> node id -> node
        self.alive: set[str] = set()
        # identities and keys (cluster.auth), by full key: few, read by key
        self.records: dict[str, bytes] = {}
        self.revs = Revisions()  # key -> mod revision (live keys)
        self.tombstones: dict[str, int] = {}  # deleted key -> revision of the delete
        self.revision = 0  # highest revision applied from the store
        self.listeners: list[Callable[[str, bytes | None], None]] = []

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def registry(self, reg: str) -> RegistryState:
        st = self.registries.get(reg)
        if st is None:
            st = self.registries[reg] = RegistryState()
        return st

    def apply(self, key: str, value: bytes | None, rev: int) -> None:
        d, leaf = self.revs.split(key)
        if ":" in leaf:  # a digest (tags hold no ':'): one object for all that name it
            leaf = _intern(leaf)
        known = max(self.revs.at(d, leaf, 0), self.tombstones.get(key, 0))
        if rev <= known:
            return
        if value is None:
            self.revs.drop(d, leaf)
            self.tombstones[key] = rev
        else:
            self.revs.put(d, leaf, rev)
            self.tombstones.pop(key, None)
        try:
            self._apply(key, value, leaf)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed namespace key %s", key)
        for fn in self.listeners:
            fn(key, value)

    def advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            # A tombstone is only needed until the watch has passed it.
            if len(self.tombstones) > 4096:
                self.tombstones = {k: r for k, r in self.tombstones.items() if r > revision}

    def _record(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.records.pop(key, None)
        else:
            self.records[key] = value

    def _apply(self, key: str, value: bytes | None, leaf: str) -> None:
        """Apply one key; ``leaf`` is its last component (the object the
        revisions hold, to be shared with the tables below)."""
        if key.startswith(AUTH):
            self._record(key, value)
            return
        if key.startswith(ALIVE):
            name = key[len(ALIVE) :]
            if value is None:
                self.alive.discard(name)
            else:
                self.alive.add(name)
            return
        if key.startswith(REGIONS):
            name = key[len(REGIONS) :]
            if NODES in name:
                region, _, node = name.partition(NODES)
                nodes = self.nodes.setdefault(region, {})
                if value is None:
                    nodes.pop(node, None)
                    if not nodes:
                        del self.nodes[region]
                else:
                    nodes[node] = NodeInfo(**json.loads(value))
                return
            if value is None:
                self.regions.pop(name, None)
            else:
                d = json.loads(value)
                self.regions[name] = RegionInfo(**d)
            return
        if not key.startswith(REG):
            return
        reg, _, rest = key[len(REG) :].partition("/")
        if rest.startswith("auth/"):
            self._record(key, value)
            return
        st = self.registry(reg)
        if rest == "config":
            st.config = json.loads(value) if value is not None else {}
            return
        if rest.startswith("usage/"):
            region = rest[len("usage/") :]
            if value is None:
                st.usage.pop(region, None)
            else:
                st.usage[region] = json.loads(value)
            return
        if rest.startswith("place/"):
            digest, _, region = rest[len("place/") :].partition("/")
            digest, region = _intern(digest), _intern(region)
            places = st.placements.setdefault(digest, {})
            if value is None:
                places.pop(region, None)
                if not places:
                    del st.placements[digest]
            else:
                places[region] = json.loads(value)["size"]
            return
        if not rest.startswith("repo/"):
            return
        head = rest[len("repo/") : len(rest) - len(leaf) - 1]
        repo, _, kind = head.rpartition("/")
        repo = _intern(repo)
        rs = st.repos.get(repo)
        if rs is None:
            if value is None:
                return
            rs = st.repos[repo] = RepoState()
            st._sorted_repos = None
        had_manifests = bool(rs.manifests)
        held, size = st.holds(leaf), 0
        if kind == "_t":
            if value is None:
                rs.tags.pop(leaf, None)
            else:
                rs.tags[leaf] = _intern(value.decode())
            rs._sorted_tags = None
        elif kind == "_m":
            old = rs.manifests.pop(leaf, None)
            if old is not None and old.subject:
                refs = rs.referrers.get(old.subject)
                if refs is not None:
                    refs.discard(leaf)
                    if not refs:
                        del rs.referrers[old.subject]
            size = old.size if old is not None else 0
            if value is not None:
                rec = ManifestRecord.from_json(value)
                size = rec.size
                rs.manifests[leaf] = rec
                if rec.subject:
                    rs.referrers.setdefault(rec.subject, set()).add(leaf)
                _hold(st.manifest_repos, leaf, repo)
            elif old is not None:
                _release(st.manifest_repos, leaf, repo)
        elif kind == "_b":
            if value is None:
                size = rs.blobs.pop(leaf, 0)
                _release(st.blob_repos, leaf, repo)
            else:
                size = rs.blobs[leaf] = json.loads(value)["size"]
                _hold(st.blob_repos, leaf, repo)
        elif kind == "_l":
            lock = Lock.from_json(value) if value is not None else UNLOCKED
            if lock == UNLOCKED:
                rs.locks.pop(leaf, None)
            else:
                rs.locks[leaf] = lock
        elif kind == "_g" and leaf == "locks":
            lock = Lock.from_json(value) if value is not None else UNLOCKED
            rs.repo_lock = None if lock == UNLOCKED else lock
        if st.holds(leaf) != held:
            st.stored += size if not held else -size
        if bool(rs.manifests) != had_manifests:
            st._sorted_repos = None
        if rs.empty():
            del st.repos[repo]
            st._sorted_repos = None


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system after a load (glibc's
    ``malloc_trim``; elsewhere nothing): the read's buffers (gRPC pages,
    decoded values) are freed by then, but glibc keeps free pages between
    live allocations unless asked (about 200 bytes per tag at 100k tags)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _load(cache: Cache, entries: list[Entry]) -> None:
    """Apply ``entries`` (emptied: each is dropped once applied, so what the
    cache keeps reuses the memory the read took)."""
    entries.reverse()
    while entries:
        e = entries.pop()
        cache.apply(e.key, e.value, e.mod_revision)


class Namespace:
    """Registry operations over a KV store, reads from the watch-fed cache."""

    def __init__(self, kv: KVStore, region: str) -> None:
        self.kv = kv
        self.region = region
        self.cache = Cache()
        self._watch_task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        await self.kv.start()
        await self._reload()
        self._watch_task = asyncio.create_task(self._watch_loop(), name="namespace-watch")

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
        await self.kv.close()

    async def _reload(self) -> None:
        # A store that reads a range page by page (etcd) is applied page by
        # page: the load holds one page of raw entries, not all of them (the
        # node's RSS at 100k tags; loadtest/bench_namespace.py).
        pages = getattr(self.kv, "range_pages", None)
        while True:
            fresh = Cache()
            fresh.listeners = self.cache.listeners
            rev = 0
            try:
                if pages is None:
                    entries, rev = await self.kv.range(ROOT)
                    _load(fresh, entries)
                else:
                    async for entries, page_rev in pages(ROOT):
                        _load(fresh, entries)
                        rev = page_rev
            except WatchCompacted:
                continue  # compacted between two pages: read a new snapshot
            break
        fresh.advance(rev)
        self.cache = fresh
        del fresh
        _trim_heap()
        self.synced.set()

    async def _watch_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for batch in self.kv.watch(ROOT, self.cache.revision + 1):
                    self._apply_events(batch)
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except WatchCompacted:
                log.warning("namespace watch compacted; reloading")
            except Exception as e:  # KVUnavailable and transport errors
                log.warning("namespace watch interrupted: %s", e)
                self.synced.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            try:
                await self._reload()
            except Exception as e:
                log.warning("namespace reload failed: %s", e)

    def _apply_events(self, batch: list[Event]) -> None:
        for ev in batch:
            self.cache.apply(ev.key, ev.value, ev.mod_revision)
        if batch:
            self.cache.advance(batch[-1].mod_revision)

    async def alive_in_store(self, region: str) -> bool:
        """Whether ``region``'s liveness key is in the store right now (not
        just in the cache). Also what ``synced`` reports: cleared while the
        store cannot be reached, set again once it answers."""
        try:
            entry = await asyncio.wait_for(self.kv.get(alive_key(region)), STORE_CHECK_TIMEOUT)
        except (KVUnavailable, TimeoutError):
            self.synced.clear()
            raise KVUnavailable("the namespace store did not answer") from None
        self.synced.set()
        return entry is not None

    async def _commit(self, compares: list[Compare], ops: list[Op]) -> int:
        try:
            res = await self.kv.txn(compares, ops)
        except KVUnavailable:
            self.synced.clear()
            raise
        self.synced.set()  # the store answered
        if not res.succeeded:
            raise Conflict()
        for op in ops:
            if isinstance(op, Put):
                self.cache.apply(op.key, op.value, res.revision)
            else:
                self.cache.apply(op.key, None, res.revision)
        return res.revision

    async def commit(self, compares: list[Compare], ops: list[Op]) -> int:
        """A caller's own transaction (at most ``TXN_BATCH`` operations),
        applied to the cache when it commits; ``Conflict`` if a compare fails."""
        return await self._commit(compares, ops)

    def _rev(self, key: str) -> int:
        return self.cache.revs.get(key, 0)

    # -- reads (cache) -----------------------------------------------------

    def repo(self, reg: str, repo: str) -> RepoState | None:
        st = self.cache.registries.get(reg)
        return st.repos.get(repo) if st else None

    async def _fresh(self, key: str) -> bytes | None:
        """A key the cache lacks, read from the store once: a watch event a
        few milliseconds behind must not turn a just-pushed image into a
        404. With the store unreachable the cache's answer stands."""
        try:
            entry = await asyncio.wait_for(self.kv.get(key), FRESH_READ_TIMEOUT)
        except (KVUnavailable, TimeoutError):
            return None
        if entry is None:
            return None
        self.cache.apply(entry.key, entry.value, entry.mod_revision)
        return entry.value

    async def fresh_tag(self, reg: str, repo: str, tag: str) -> str | None:
        value = await self._fresh(tag_key(reg, repo, tag))
        return value.decode() if value is not None else None

    async def fresh_manifest(self, reg: str, repo: str, digest: str) -> ManifestRecord | None:
        if await self._fresh(manifest_key(reg, repo, digest)) is None:
            return None
        return self.manifest(reg, repo, digest)

    async def fresh_region(self, name: str) -> RegionInfo | None:
        """A region's record, read from the store when the cache lacks it (a
        region registered an instant ago)."""
        info = self.cache.regions.get(name)
        if info is None and await self._fresh(region_key(name)) is not None:
            info = self.cache.regions.get(name)
        return info

    def repo_exists(self, reg: str, repo: str) -> bool:
        return self.repo(reg, repo) is not None

    def tag(self, reg: str, repo: str, tag: str) -> str | None:
        rs = self.repo(reg, repo)
        return rs.tags.get(tag) if rs else None

    def manifest(self, reg: str, repo: str, digest: str) -> ManifestRecord | None:
        rs = self.repo(reg, repo)
        return rs.manifests.get(digest) if rs else None

    def blob_size(self, reg: str, repo: str, digest: str) -> int | None:
        """Size of ``digest`` if linked into ``repo`` (as a blob or manifest)."""
        rs = self.repo(reg, repo)
        if rs is None:
            return None
        size = rs.blobs.get(digest)
        if size is None and digest in rs.manifests:
            size = rs.manifests[digest].size
        return size

    def repos_with_blob(self, reg: str, digest: str) -> set[str]:
        st = self.cache.registries.get(reg)
        return set(holders(st.blob_repos.get(digest))) if st else set()

    def references(self, reg: str, digest: str) -> bool:
        """Whether ``reg`` still references ``digest``: a repository links it
        as a blob or holds it as a manifest (every blob a manifest references
        stays linked: ``put_manifest``, ``collect_links``). Deleted content
        and other registries' content are not. Two dictionary lookups."""
        st = self.cache.registries.get(reg)
        return st is not None and (digest in st.blob_repos or digest in st.manifest_repos)

    async def caught_up(self, within: float = 2 * FRESH_READ_TIMEOUT) -> bool:
        """Wait until the cache holds every write the store had committed
        when this was called (a watch event a few milliseconds behind
        another region's write): one read of the store's revision, then at
        most ``within`` seconds for the watch. False when the store did not
        answer or the watch did not get there in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        try:
            # An empty range: nothing but the store's current revision.
            _, revision = await asyncio.wait_for(
                self.kv.range(ROOT + "_revision/"), FRESH_READ_TIMEOUT
            )
        except (KVUnavailable, TimeoutError):
            return False
        while self.cache.revision < revision:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def tags(self, reg: str, repo: str) -> list[str]:
        rs = self.repo(reg, repo)
        return rs.sorted_tags() if rs else []

    def repos(self, reg: str) -> list[str]:
        st = self.cache.registries.get(reg)
        return st.sorted_repos() if st else []

    def referrers(self, reg: str, repo: str, digest: str) -> list[ManifestRecord]:
        rs = self.repo(reg, repo)
        if rs is None:
            return []
        return [rs.manifests[d] for d in sorted(rs.referrers.get(digest, ())) if d in rs.manifests]

    def placements(self, reg: str, digest: str) -> dict[str, int]:
        st = self.cache.registries.get(reg)
        return dict(st.placements.get(digest, {})) if st else {}

    def regions(self) -> dict[str, RegionInfo]:
        """Each region's endpoints: its record's, unless the region has live
        nodes and that record names none of them (the node that wrote it
        stopped) -- then its first live node's. So whoever dials a region
        (replication, the router) reaches a node that is running."""
        out = dict(self.cache.regions)
        for name, nodes in self.cache.nodes.items():
            rec = out.get(name)
            if nodes and (rec is None or all(n.http != rec.http for n in nodes.values())):
                out[name] = nodes[min(nodes)].region_info()
        return out

    def nodes(self, region: str | None = None) -> dict[str, dict[str, NodeInfo]]:
        """Live nodes by region (their keys are leased), or one region's."""
        if region is not None:
            return {region: dict(self.cache.nodes.get(region, {}))}
        return {r: dict(n) for r, n in self.cache.nodes.items()}

    def alive_regions(self) -> set[str]:
        """Regions whose liveness key or any node key exists."""
        return set(self.cache.alive) | {r for r, n in self.cache.nodes.items() if n}

    # -- writes (transactions) ---------------------------------------------

    async def link_blob(self, reg: str, repo: str, digest: str, size: int) -> None:
        ops: list[Op] = []
        rs = self.repo(reg, repo)
        if rs is None or rs.blobs.get(digest) != size:
            link = json.dumps({"size": size, "t": round(time.time(), 3)}).encode()
            ops.append(Put(blob_key(reg, repo, digest), link))
        if self.region not in self.placements(reg, digest):
            ops.append(Put(place_key(reg, digest, self.region), _size(size)))
        if ops:
            await self._commit([], ops)

    async def record_placement(
        self, reg: str, digest: str, size: int, *, extra: Iterable[Op] = ()
    ) -> None:
        """Record that this region holds ``digest``; ``extra`` puts commit in
        the same transaction (what must be durable with it, e.g. events)."""
        if self.region in self.placements(reg, digest):
            return
        ops: list[Op] = [Put(place_key(reg, digest, self.region), _size(size)), *extra]
        await self._commit([], ops)

    async def unlink_blob(self, reg: str, repo: str, digest: str) -> bool:
        key = blob_key(reg, repo, digest)
        rev = self._rev(key)
        if not rev:
            return False
        await self._commit([Compare(key, rev)], [Delete(key)])
        return True

    async def put_manifest(
        self,
        reg: str,
        repo: str,
        rec: ManifestRecord,
        tags: Iterable[str],
        blobs: Iterable[str] = (),
        children: Iterable[str] = (),
        extra: Iterable[Op] = (),
    ) -> None:
        """Record a manifest, its placement here and its tags in one
        transaction, with ``extra`` puts (the push's webhook events: an
        acknowledged push always has them, a refused one never).
        Racing pushes of one tag are all accepted: the store
        orders the transactions and the later one in that order wins, so
        every region converges on the same digest (as ACR and Distribution
        behave; a CI pipeline must not fail because another pushed too).
        Writing the record again with every tag move is what lets
        ``delete_manifest``'s compare on the record catch a racing move.

        ``blobs`` are the repository's blob links the manifest needs: the
        transaction holds only if each is still there, and it bumps the
        repository's push counter, so online garbage collection
        (``cluster.gc``), which removes a link only if that counter did not
        move since it found the link unreferenced, can never remove a link
        a committed manifest references. Raises ``BlobsGone`` when a link
        was removed meanwhile. ``children`` (an index's manifests) are
        required the same way, so retention cannot delete one under it;
        ``Locked`` when a lock refuses the push (decided atomically: the
        transaction also compares the repository's lock guard)."""
        tags = list(dict.fromkeys(tags))
        if len(tags) > MAX_TAGS_PER_PUSH:
            raise ValueError(f"at most {MAX_TAGS_PER_PUSH} tags per push")
        links = [blob_key(reg, repo, d) for d in dict.fromkeys(blobs)]
        links += [manifest_key(reg, repo, d) for d in dict.fromkeys(children)]
        checked = len(links) <= TXN_BATCH
        extra = list(extra)
        for _ in range(PUSH_ATTEMPTS):
            # Locks are decided on this node's view and the transaction
            # holds only if the repository's lock guard has not moved since.
            await self._confirmed(reg, repo, lambda: self.check_write(reg, repo, rec.digest, tags))
            ops = [*self._push_ops(reg, repo, rec, tags), *extra]
            guard = self._locks_guard(reg, repo)
            # Past etcd's compare limit the links are checked by the fresh
            # read below only (an image of over 100 blobs).
            compares = [Compare(k, self._rev(k)) for k in links] if checked else []
            if checked and all(c.mod_revision for c in compares):
                try:
                    await self._commit([guard, *compares], ops)
                    return
                except Conflict:
                    pass  # a link or a lock changed: look again
            fresh = [await self.kv.get(k) for k in links]
            gone = [k.rpartition("/")[2] for k, e in zip(links, fresh, strict=True) if e is None]
            if gone:
                raise BlobsGone(gone)
            for e in fresh:
                assert e is not None
                self.cache.apply(e.key, e.value, e.mod_revision)
            await self.fresh_locks(reg, repo)
            if not checked:
                self.check_write(reg, repo, rec.digest, tags)
                try:
                    await self._commit(
                        [self._locks_guard(reg, repo)],
                        [*self._push_ops(reg, repo, rec, tags), *extra],
                    )
                    return
                except Conflict:
                    continue
        raise Conflict()

    def _push_ops(self, reg: str, repo: str, rec: ManifestRecord, tags: list[str]) -> list[Op]:
        rec = self._stamped(reg, repo, rec, tags)
        ops: list[Op] = [
            Put(manifest_key(reg, repo, rec.digest), rec.to_json()),
            Put(pushes_key(reg, repo), rec.digest.encode()),
        ]
        if self.region not in self.placements(reg, rec.digest):
            ops.append(Put(place_key(reg, rec.digest, self.region), _size(rec.size)))
        ops += [Put(tag_key(reg, repo, t), rec.digest.encode()) for t in tags]
        return ops

    def _stamped(self, reg: str, repo: str, rec: ManifestRecord, tags: list[str]) -> ManifestRecord:
        """``rec`` with its first push time and its tags' times: a tag moved
        here keeps the creation time it had on the manifest it leaves."""
        rs = self.repo(reg, repo)
        now = rec.created
        current = rs.tags if rs is not None else {}
        old = rs.manifests.get(rec.digest) if rs is not None else None
        tagged: dict[str, list[float]] = {}
        if old is not None:
            tagged = {t: list(v) for t, v in old.tag_items() if current.get(t) == rec.digest}
        for t in tags:
            holder = current.get(t)
            hrec = rs.manifests.get(holder) if rs is not None and holder else None
            tagged.pop(t, None)
            tagged[t] = [hrec.tag_times(t)[0] if hrec is not None else now, now]
        if len(tagged) > MAX_TAGGED:  # keep the latest moves; others show the record's time
            tagged = dict(list(tagged.items())[-MAX_TAGGED:])
        first = (old.first_pushed or old.created) if old is not None else now
        return replace(rec, first_pushed=first, tagged=tagged)

    async def delete_tag(self, reg: str, repo: str, tag: str, extra: Iterable[Op] = ()) -> bool:
        """Remove one tag (the manifest stays); refused (``Locked``) when the
        tag or the repository is locked. False when there is no such tag.
        ``extra`` puts (its webhook events) commit with the removal."""
        key = tag_key(reg, repo, tag)
        extra = list(extra)
        for attempt in range(PUSH_ATTEMPTS):
            if attempt:
                await self.fresh_locks(reg, repo)
            rev = self._rev(key)
            if not rev and (attempt or await self._fresh(key) is None):
                return False
            rev = self._rev(key)
            await self._confirmed(reg, repo, lambda: self.check_delete(reg, repo, tags=(tag,)))
            try:
                await self._commit(
                    [self._locks_guard(reg, repo), Compare(key, rev)], [Delete(key), *extra]
                )
            except Conflict:
                await self._reread(key)
                continue
            return True
        raise Conflict()

    async def delete_manifest(
        self,
        reg: str,
        repo: str,
        digest: str,
        extra: Callable[[list[str]], Iterable[Op]] | None = None,
    ) -> bool:
        """Delete a manifest and every tag of this repository that points at
        it. Reads the store fresh (this node's cache may not know a tag
        another region just moved here); every tag move onto a manifest
        rewrites its record, so the compare on the record's revision catches
        a move that races this delete. Tags go first and the record last, so
        no tag is ever left pointing at a missing record. ``extra(tags)``
        (the names of the tags it removes) gives puts that commit with the
        record's removal: the delete's webhook events."""
        mkey = manifest_key(reg, repo, digest)
        await self.fresh_locks(reg, repo)
        record = await self.kv.get(mkey)
        if record is None:
            return False
        tag_entries, _ = await self.kv.range(tag_key(reg, repo, ""))
        pointing = [e for e in tag_entries if e.value == digest.encode()]
        prefix = len(tag_key(reg, repo, ""))
        self.check_delete(reg, repo, digests=(digest,), tags=[e.key[prefix:] for e in pointing])
        locks = self._locks_guard(reg, repo)
        guard = Compare(mkey, record.mod_revision)
        more = list(extra([e.key[prefix:] for e in pointing])) if extra is not None else []
        if len(pointing) + len(more) < TXN_BATCH - 1:
            await self._commit(
                [locks, guard, *(Compare(e.key, e.mod_revision) for e in pointing)],
                [Delete(mkey), *(Delete(e.key) for e in pointing), *more],
            )
            return True
        for i in range(0, len(pointing), TXN_BATCH - 1):
            batch = pointing[i : i + TXN_BATCH - 1]
            await self._commit(
                [locks, *(Compare(e.key, e.mod_revision) for e in batch)],
                [Delete(e.key) for e in batch],
            )
        await self._commit([locks, guard], [Delete(mkey), *more[: TXN_BATCH - 1]])
        for i in range(TXN_BATCH - 1, len(more), TXN_BATCH):
            await self._commit([], more[i : i + TXN_BATCH])
        return True

    async def collect_links(self, grace: float) -> int:
        """Online garbage collection of blob links: remove every link that no
        manifest of its repository references and that is older than
        ``grace`` seconds (an upload links its blob before the manifest that
        uses it is pushed). Returns how many were removed.

        Safe while pushes run: each removal is one transaction that holds
        only if the link and the repository's push counter are unchanged
        since the fresh read it was decided on, and every manifest push
        bumps that counter while requiring its links to exist
        (``put_manifest``). So in the store's order either the push comes
        first (the counter moved: the removal fails and waits for the next
        pass) or the removal does (the push finds the link gone and answers
        MANIFEST_BLOB_UNKNOWN; nothing references a missing link).

        Once a blob has no link and no manifest referencing it anywhere in
        the registry, replication stops copying it and each region's
        reclaimer removes its bytes."""
        entries, _ = await self.kv.range(REG)
        now = time.time()
        repos: dict[tuple[str, str], _RepoScan] = {}
        for e in entries:
            reg, _, rest = e.key[len(REG) :].partition("/")
            if not rest.startswith("repo/"):
                continue
            head, _, leaf = rest[len("repo/") :].rpartition("/")
            repo, _, kind = head.rpartition("/")
            scan = repos.setdefault((reg, repo), _RepoScan())
            if kind == "_b":
                try:
                    linked = float(json.loads(e.value).get("t", 0.0))
                except (ValueError, TypeError, AttributeError):
                    linked = 0.0
                scan.links[leaf] = (e.key, e.mod_revision, linked)
            elif kind == "_m":
                try:
                    scan.records[leaf] = (e.key, e.mod_revision, ManifestRecord.from_json(e.value))
                except (ValueError, TypeError, KeyError):
                    scan.unreadable = True  # keep every link of this repository
            elif kind == "_t":
                scan.tagged.add(e.value.decode(errors="replace"))
            elif kind == "_l":
                try:
                    if not Lock.from_json(e.value).deletable:
                        scan.locked.add(leaf)
                except (ValueError, TypeError, AttributeError):
                    scan.locked.add(leaf)
            elif kind == "_g" and leaf == "locks":
                scan.locks_rev = e.mod_revision
                try:
                    scan.repo_locked = not Lock.from_json(e.value).deletable
                except (ValueError, TypeError, AttributeError):
                    scan.repo_locked = True
            elif kind == "_g" and leaf == "pushes":
                scan.pushes_rev = e.mod_revision
        policies = _retention_policies(entries)
        removed = 0
        for (reg, repo), scan in repos.items():
            if scan.unreadable:
                continue
            if reg in policies and not scan.repo_locked:
                await self._apply_retention(reg, repo, scan, max(policies[reg], grace), now)
            for _, _, rec in scan.records.values():
                scan.referenced.update(rec.blobs)
            garbage = [
                (key, rev)
                for d, (key, rev, linked) in scan.links.items()
                if d not in scan.referenced and now - linked >= grace
            ]
            guard = Compare(pushes_key(reg, repo), scan.pushes_rev)
            for i in range(0, len(garbage), TXN_BATCH - 1):
                batch = garbage[i : i + TXN_BATCH - 1]
                try:
                    await self._commit(
                        [guard, *(Compare(k, r) for k, r in batch)], [Delete(k) for k, _ in batch]
                    )
                except Conflict:
                    break  # a push or an upload raced this pass: look again next time
                removed += len(batch)
        return removed

    async def _apply_retention(
        self, reg: str, repo: str, scan: _RepoScan, age: float, now: float
    ) -> None:
        """Delete the untagged manifests of a repository last pushed more
        than ``age`` seconds ago (registry config ``retention``), except
        locked ones, children of a manifest that stays and referrers whose
        subject stays. Each batch holds only if the records, the push
        counter (an index pushed meanwhile may name one as its child) and
        the lock guard are unchanged; a push that tags a manifest rewrites
        its record. Deleted records leave ``scan.records``."""
        kept = {
            d
            for d, (_, _, rec) in scan.records.items()
            if d in scan.tagged or d in scan.locked or now - rec.created < age
        }
        grew = True
        while grew:
            grew = False
            for d, (_, _, rec) in scan.records.items():
                if d in kept:
                    for child in rec.manifests:
                        if child in scan.records and child not in kept:
                            kept.add(child)
                            grew = True
                elif rec.subject and rec.subject in kept:
                    kept.add(d)
                    grew = True
        doomed = [(d, key, rev) for d, (key, rev, _) in scan.records.items() if d not in kept]
        guards = [
            Compare(pushes_key(reg, repo), scan.pushes_rev),
            Compare(locks_key(reg, repo), scan.locks_rev),
        ]
        for i in range(0, len(doomed), TXN_BATCH - len(guards)):
            batch = doomed[i : i + TXN_BATCH - len(guards)]
            try:
                await self._commit(
                    [*guards, *(Compare(k, r) for _, k, r in batch)],
                    [Delete(k) for _, k, _ in batch],
                )
            except Conflict:
                return  # a push or a lock raced this pass: look again next time
            for d, _, _ in batch:
                del scan.records[d]
            log.info("retention: deleted %d untagged manifest(s) of %s/%s", len(batch), reg, repo)

    # -- content management: locks, repository delete (node.manage_content) ----

    async def _reread(self, key: str) -> None:
        """Bring one key of the cache up to the store (also a delete)."""
        entry = await self.kv.get(key)
        if entry is not None:
            self.cache.apply(entry.key, entry.value, entry.mod_revision)
        elif key in self.cache.revs:
            self.cache.apply(key, None, self.cache.revs[key] + 1)

    async def fresh_locks(self, reg: str, repo: str) -> None:
        """Read a repository's lock guard, then its lock records, from the
        store into the cache (a lock set a moment ago in another region). A
        lock changed between the two reads moves the guard past what the
        cache holds, so a write decided on this view fails its compare."""
        for prefix in (locks_key(reg, repo), lock_key(reg, repo, "")):
            entries, rev = await self.kv.range(prefix)
            seen = {e.key for e in entries}
            for e in entries:
                self.cache.apply(e.key, e.value, e.mod_revision)
            for key in [k for k in self.cache.revs.under(prefix) if k not in seen]:
                self.cache.apply(key, None, rev)

    async def _confirmed(self, reg: str, repo: str, check: Callable[[], None]) -> None:
        """Run a lock ``check`` on the cache; a refusal is confirmed against
        the store before it stands (a cache behind an unlock elsewhere must
        not refuse), so it raises ``Locked`` only for a lock the store holds."""
        try:
            check()
        except Locked:
            await self.fresh_locks(reg, repo)
            check()

    def _locks_guard(self, reg: str, repo: str) -> Compare:
        key = locks_key(reg, repo)
        return Compare(key, self._rev(key))

    def lock(self, reg: str, repo: str, ref: str | None = None) -> Lock:
        """The attributes of a repository (``ref`` None), tag or manifest."""
        rs = self.repo(reg, repo)
        if rs is None:
            return UNLOCKED
        if ref is None:
            return rs.repo_lock or UNLOCKED
        return rs.locks.get(ref, UNLOCKED)

    @staticmethod
    def _unlock(reg: str, repo: str, ref: str | None, attr: str) -> str:
        target = f"--repository {repo}" if ref is None else f"--image {repo}{_sep(ref)}{ref}"
        return f"meridian repository update --registry {reg} {target} --{attr}-enabled true"

    def check_write(self, reg: str, repo: str, digest: str, tags: Iterable[str]) -> None:
        """Raise ``Locked`` if a push of ``digest`` under ``tags`` is refused:
        the repository is write-locked, or a tag that would move is."""
        rs = self.repo(reg, repo)
        if rs is None or not (rs.repo_lock or rs.locks):
            return
        lock = rs.repo_lock or UNLOCKED
        if not lock.write:
            raise Locked(f"repository {repo}", "write", self._unlock(reg, repo, None, "write"))
        for t in tags:
            lock = rs.locks.get(t, UNLOCKED)
            if not lock.write and rs.tags.get(t) != digest:
                raise Locked(f"tag {t}", "write", self._unlock(reg, repo, t, "write"))

    def check_delete(
        self, reg: str, repo: str, *, digests: Iterable[str] = (), tags: Iterable[str] = ()
    ) -> None:
        """Raise ``Locked`` if deleting these tags and manifests is refused:
        the repository or one of them is delete- or write-locked (ACR: a
        write-disabled image cannot be deleted either)."""
        rs = self.repo(reg, repo)
        if rs is None or not (rs.repo_lock or rs.locks):
            return
        refs: list[tuple[str, str | None]] = [(f"repository {repo}", None)]
        refs += [(f"tag {t}", t) for t in tags] + [(f"manifest {d}", d) for d in digests]
        for what, ref in refs:
            lock = self.lock(reg, repo, ref)
            if not lock.deletable:
                attr = "write" if not lock.write else "delete"
                raise Locked(what, attr, self._unlock(reg, repo, ref, attr))

    def check_read(self, reg: str, repo: str, refs: Iterable[str]) -> None:
        """Raise ``Locked`` if a manifest GET through these references (the
        tag asked for and the digest it names) is refused: the repository or
        one of them is read-locked. From the cache: a read is no transaction."""
        rs = self.repo(reg, repo)
        if rs is None or not (rs.repo_lock or rs.locks):
            return
        refs_: list[tuple[str, str | None]] = [(f"repository {repo}", None)]
        refs_ += [(f"{'manifest' if ':' in r else 'tag'} {r}", r) for r in refs]
        for what, ref in refs_:
            if not self.lock(reg, repo, ref).read:
                raise Locked(what, "read", self._unlock(reg, repo, ref, "read"))

    def listed(self, reg: str, repo: str, tag: str | None = None) -> bool:
        """Whether a repository (``tag`` None) or a tag is shown in lists."""
        return self.lock(reg, repo, tag).list

    def listed_tags(self, reg: str, repo: str) -> list[str]:
        """The repository's tags but those list-disabled, sorted."""
        rs = self.repo(reg, repo)
        if rs is None:
            return []
        tags = rs.sorted_tags()
        if rs.locks:
            tags = [t for t in tags if rs.locks.get(t, UNLOCKED).list]
        return tags

    async def set_lock(
        self,
        reg: str,
        repo: str,
        ref: str | None,
        *,
        write: bool | None = None,
        delete: bool | None = None,
        read: bool | None = None,
        list_: bool | None = None,
    ) -> Lock | None:
        """Change the attributes of a repository (``ref`` None), a tag or a
        manifest digest; unchanged where None. Returns the new attributes,
        or None when the repository, tag or manifest does not exist. One
        transaction: the lock record, the repository's guard (rewritten, so
        every write or delete decided before fails its compare) and the
        target's existence."""
        for _ in range(PUSH_ATTEMPTS):
            await self.fresh_locks(reg, repo)
            compares = [self._locks_guard(reg, repo)]
            if ref is not None:
                target = manifest_key(reg, repo, ref) if ":" in ref else tag_key(reg, repo, ref)
                await self._reread(target)
                if not self._rev(target):
                    return None
                compares.append(Compare(target, self._rev(target)))
            rs = self.repo(reg, repo)
            if rs is None or not rs.manifests:
                return None
            old = self.lock(reg, repo, ref)
            given = (write, delete, read, list_)
            new = Lock(*(o if g is None else g for o, g in zip(astuple(old), given, strict=True)))
            repo_lock = new if ref is None else (rs.repo_lock or UNLOCKED)
            others = {k for k in rs.locks if k != ref}
            ops: list[Op] = []
            if ref is not None:
                key = lock_key(reg, repo, ref)
                ops.append(Put(key, new.to_json()) if new != UNLOCKED else Delete(key))
                if new != UNLOCKED:
                    others.add(ref)
            guard = locks_key(reg, repo)
            if repo_lock != UNLOCKED or others:
                ops.append(Put(guard, repo_lock.to_json()))
            else:
                ops.append(Delete(guard))
            try:
                await self._commit(compares, ops)
            except Conflict:
                continue
            return new
        raise Conflict()

    async def delete_repository(self, reg: str, repo: str, extra: Sequence[Op] = ()) -> int | None:
        """Delete a whole repository: its tags, then its manifests (indexes
        before their children), blob links, lock records and counters, in
        transactions of at most ``TXN_BATCH`` keys, each holding only if the
        keys and the repository's lock guard are unchanged (a push racing
        it keeps what it wrote: the pass re-reads and goes on). Refused
        (``Locked``) while the repository or anything in it is delete- or
        write-locked. Returns how many keys went, None when there is no
        such repository. Bytes go by the reclaimers of every region once
        nothing in the registry references them. ``extra`` (the delete's
        webhook events) commits with the transaction that deletes the last
        keys when it fits there, else right after it; never when there was
        nothing to delete."""
        deleted = 0
        prefix = repo_prefix(reg, repo)
        more = list(extra)
        for _ in range(PUSH_ATTEMPTS):
            await self.fresh_locks(reg, repo)
            rs = self.repo(reg, repo)
            if rs is not None:
                refs = list(rs.locks)
                self.check_delete(
                    reg,
                    repo,
                    digests=[r for r in refs if ":" in r],
                    tags=[r for r in refs if ":" not in r],
                )
            entries, _ = await self.kv.range(prefix)
            if not entries:
                if not deleted:
                    return None
                break  # a racing delete took the rest
            guard = self._locks_guard(reg, repo)
            entries.sort(key=lambda e: _delete_order(e, len(prefix)))
            try:
                for i in range(0, len(entries), TXN_BATCH - 1):
                    batch = entries[i : i + TXN_BATCH - 1]
                    ops: list[Op] = [Delete(e.key) for e in batch]
                    cmps = [Compare(e.key, e.mod_revision) for e in batch]
                    last = i + TXN_BATCH - 1 >= len(entries)
                    with_extra = last and bool(more) and len(ops) + len(more) <= TXN_BATCH
                    if with_extra:
                        ops += more
                    if any(e.key == guard.key for e in batch):
                        await self._commit(cmps, ops)
                    else:
                        await self._commit([guard, *cmps], ops)
                    deleted += len(batch)
                    if with_extra:
                        more = []
            except Conflict:
                continue
            break
        else:
            raise Conflict()
        for i in range(0, len(more), TXN_BATCH):
            await self._commit([], more[i : i + TXN_BATCH])
        return deleted

    # -- records (identities, signing keys: cluster.auth) --------------------

    def record(self, key: str) -> bytes | None:
        return self.cache.records.get(key)

    def records(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.cache.records.items() if k.startswith(prefix)}

    async def fresh_record(self, key: str) -> bytes | None:
        """A record the cache lacks (written an instant ago elsewhere)."""
        return self.record(key) or await self._fresh(key)

    async def put_record(self, key: str, value: bytes, *, create: bool = False) -> None:
        """Write a record; with ``create``, only if it does not exist yet
        (raises ``Conflict`` otherwise, also when this node's cache is behind)."""
        await self._commit([Compare(key, 0)] if create else [], [Put(key, value)])

    async def replace_record(self, key: str, value: bytes, expect: bytes | None) -> None:
        """Write a record only if it still holds ``expect`` as this node saw
        it (compare on its revision); raises ``Conflict`` otherwise."""
        if self.record(key) != expect:
            raise Conflict()
        await self._commit([Compare(key, self._rev(key))], [Put(key, value)])

    async def delete_record(self, key: str) -> bool:
        if self.record(key) is None and await self._fresh(key) is None:
            return False
        await self._commit([], [Delete(key)])
        return True

    async def set_registry_config(self, reg: str, config: dict) -> None:
        await self._commit([], [Put(config_key(reg), json.dumps(config).encode())])

    async def update_registry_config(self, reg: str, change: Callable[[dict], dict]) -> dict:
        """Apply ``change`` to the registry's config as the store holds it
        now, compare-and-swap on its revision (retried when another writer
        got in between), so keys others set meanwhile are kept. Returns
        the config written."""
        return await self._update_json(config_key(reg), change)

    async def _update_json(self, key: str, change: Callable[[dict], dict]) -> dict:
        """Compare-and-swap of a JSON object on its revision, as the store
        holds it now (``{}`` when absent), retried when another writer got
        in between; raises ``Conflict`` after ``PUSH_ATTEMPTS`` losses."""
        for _ in range(PUSH_ATTEMPTS):
            entry = await self.kv.get(key)
            doc = change(json.loads(entry.value) if entry is not None else {})
            rev = entry.mod_revision if entry is not None else 0
            try:
                await self._commit([Compare(key, rev)], [Put(key, json.dumps(doc).encode())])
            except Conflict:
                continue
            return doc
        raise Conflict()

    # -- usage records (node.usage) ------------------------------------------

    async def update_usage(self, reg: str, region: str, change: Callable[[dict], dict]) -> dict:
        """Apply ``change`` to ``reg``'s usage record of ``region`` by
        compare-and-swap (the nodes of a region add to one record)."""
        return await self._update_json(usage_key(reg, region), change)

    def usage_records(self, reg: str) -> dict[str, dict]:
        """``reg``'s usage records by region (from the cache)."""
        st = self.cache.registries.get(reg)
        return {r: dict(u) for r, u in st.usage.items()} if st else {}

    # -- region removal --------------------------------------------------------

    async def remove_region(self, name: str) -> dict[str, int]:
        """Decommission ``name``: every placement of it in every registry,
        it from every registry's ``replicas``, its node keys, liveness key
        and region record (last, so a retry finds the rest), read fresh from
        the store. Returns counts of what went. The caller checks first
        that no node of it runs and that it is no registry's home."""
        record = region_key(name)
        entries, _ = await self.kv.range(record + NODES)
        region_keys = [e.key for e in entries]
        for key in (alive_key(name), record):
            if await self.kv.get(key) is not None:
                region_keys.append(key)
        regs, _ = await self.kv.range(REG)
        places: list[str] = []
        configs: list[str] = []
        for e in regs:
            reg, _, rest = e.key[len(REG) :].partition("/")
            if rest.startswith("place/") and rest.endswith("/" + name):
                places.append(e.key)
            elif rest == "config":
                try:
                    replicas = json.loads(e.value).get("replicas")
                except (ValueError, AttributeError):
                    continue
                if isinstance(replicas, list) and name in replicas:
                    configs.append(reg)

        def drop(config: dict) -> dict:
            return {**config, "replicas": [r for r in config.get("replicas") or [] if r != name]}

        for reg in configs:
            await self.update_registry_config(reg, drop)
        gone = places + region_keys
        for i in range(0, len(gone), TXN_BATCH):
            await self._commit([], [Delete(k) for k in gone[i : i + TXN_BATCH]])
        return {
            "placements": len(places),
            "registries": len(configs),
            "nodes": sum(1 for k in region_keys if NODES in k),
        }

    # -- replication settings (config key ``replicas``) ----------------------

    def registries(self) -> list[str]:
        return sorted(self.cache.registries)

    def registry_config(self, reg: str) -> dict:
        """The registry's config as this node's cache holds it ({}: none)."""
        st = self.cache.registries.get(reg)
        return st.config if st is not None else {}

    async def fresh_registry_config(self, reg: str) -> dict:
        """The registry's config, read from the store when the cache has
        none (a registry created an instant ago in another region)."""
        config = self.registry_config(reg)
        if not config and await self._fresh(config_key(reg)) is not None:
            config = self.registry_config(reg)
        return config

    def stored_bytes(self, reg: str) -> int:
        """Bytes of the distinct digests ``reg`` references (linked blobs and
        manifests), kept up to date as keys change: no scan."""
        st = self.cache.registries.get(reg)
        return st.stored if st is not None else 0

    def registry_replicas(self, reg: str) -> set[str] | None:
        """Regions that should hold ``reg``'s content: the ``replicas`` list
        of its config, or None when unset (meaning: every region)."""
        st = self.cache.registries.get(reg)
        replicas = st.config.get("replicas") if st else None
        if isinstance(replicas, list) and replicas:
            return {str(r) for r in replicas}
        return None

    async def remove_placement(self, reg: str, digest: str) -> bool:
        """Forget that this region holds ``digest`` in ``reg`` (before its
        bytes are reclaimed). Compare-and-swap on the key's revision."""
        key = place_key(reg, digest, self.region)
        rev = self._rev(key)
        if not rev:
            return False
        await self._commit([Compare(key, rev)], [Delete(key)])
        return True

    async def set_registry_replicas(self, reg: str, regions: list[str] | None) -> None:
        """Set (or with None, unset) which regions hold ``reg``; other config
        keys are kept."""
        st = self.cache.registries.get(reg)
        config = dict(st.config) if st else {}
        if regions is None:
            config.pop("replicas", None)
        else:
            config["replicas"] = sorted(set(regions))
        await self.set_registry_config(reg, config)

    async def register_region(self, info: RegionInfo, lease: int, node: str | None = None) -> None:
        """Publish this region's endpoints and mark it alive under ``lease``;
        with ``node``, also this node's own key under the same lease."""
        ops: list[Op] = [
            Put(region_key(info.name), info.to_json()),
            Put(alive_key(info.name), b"1", lease=lease),
        ]
        if node is not None:
            rec = NodeInfo(info.name, node, info.http, info.grpc, info.started)
            ops.append(Put(node_key(info.name, node), rec.to_json(), lease=lease))
        await self._commit([], ops)

    async def node_in_store(self, region: str, node: str) -> bool:
        """Whether this node's key is in the store right now (not the cache)."""
        try:
            entry = await asyncio.wait_for(self.kv.get(node_key(region, node)), STORE_CHECK_TIMEOUT)
        except TimeoutError:
            raise KVUnavailable("the namespace store did not answer") from None
        return entry is not None

    async def refresh(self, key_prefix: str) -> list[Entry]:
        """A fresh read straight from the store (bypassing the cache)."""
        entries, _ = await self.kv.range(key_prefix)
        return entries


@dataclass
class _RepoScan:
    links: dict[str, tuple[str, int, float]] = field(default_factory=dict)  # key, rev, linked
    referenced: set[str] = field(default_factory=set)
    pushes_rev: int = 0
    unreadable: bool = False
    records: dict[str, tuple[str, int, ManifestRecord]] = field(default_factory=dict)
    tagged: set[str] = field(default_factory=set)  # digests some tag points at
    locked: set[str] = field(default_factory=set)  # tags and digests with a lock record
    locks_rev: int = 0
    repo_locked: bool = False


def _retention_policies(entries: list[Entry]) -> dict[str, float]:
    """Registries whose config enables retention of untagged manifests (and
    whose tier allows it: a Premium registry moved down keeps its policy
    but it no longer runs): name -> seconds an untagged manifest is kept."""
    out: dict[str, float] = {}
    for e in entries:
        reg, _, rest = e.key[len(REG) :].partition("/")
        if rest != "config":
            continue
        try:
            config = json.loads(e.value)
            policy = config.get("retention") or {}
            if policy.get("enabled") is True and skus.of_config(config).retention:
                out[reg] = float(policy.get("days", 7)) * 86400
        except (ValueError, TypeError, AttributeError):
            continue
    return out


def _sep(ref: str) -> str:
    return "@" if ":" in ref else ":"


def _delete_order(e: Entry, skip: int) -> tuple[int, int]:
    """Tags, indexes, other manifests, then links, locks and counters."""
    kind = e.key[skip - 1 : skip + 2]  # "_t/", "_m/", ...
    if kind == "_m/":
        try:
            return (1 if ManifestRecord.from_json(e.value).manifests else 2), 0
        except (ValueError, TypeError, KeyError):
            return 2, 0
    return {"_t/": 0, "_b/": 3, "_l/": 4}.get(kind, 5), 0


def _size(size: int) -> bytes:
    return json.dumps({"size": size}).encode()


__all__ = [
    "BlobsGone",
    "Cache",
    "Conflict",
    "KVUnavailable",
    "ManifestRecord",
    "Namespace",
    "RegionInfo",
]
