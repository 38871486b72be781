"""The key-value contract under the namespace.

The registry namespace (cluster/namespace.py) is written once on top of this
small, etcd-shaped interface: a flat, ordered key space of byte values, a
global revision that every write bumps, multi-key transactions guarded by
compare-on-mod-revision, prefix watches that resume from a revision, and
leases for liveness keys. Two implementations share one contract test suite:

- ``cluster.embedded.EmbeddedKV`` -- sqlite3 in the data dir, for a standalone
  node with no other server;
- ``cluster.etcd.EtcdKV`` -- a real etcd cluster, shared by every region.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class KVUnavailable(Exception):
    """The store cannot be reached now; the caller may answer 503."""


class KVRefused(KVUnavailable):
    """The store answers but refuses this client: its TLS certificate is not
    trusted, or it wants a client certificate, a user name or a password
    that was not given or is wrong. Retrying does not help; the message
    names the option to fix (and never holds a secret)."""


class WatchCompacted(Exception):
    """The watch's start revision was compacted away: reload fully, then
    watch again from the revision the reload returned."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Compare:
    """Holds when ``key``'s mod revision equals ``mod_revision``
    (0 means: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch. ``value`` is None for a delete."""

    key: str
    value: bytes | None
    mod_revision: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


class KVStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: str) -> Entry | None: ...

    async def range(self, prefix: str) -> tuple[list[Entry], int]:
        """Every key under ``prefix`` (sorted) and the store revision the
        snapshot was taken at."""
        ...

    async def txn(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        """Apply every op atomically if every compare holds. Never retried
        blindly by an implementation: a lost answer raises KVUnavailable."""
        ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under ``prefix`` with mod revision >=
        ``start_revision``, in revision order; resumes by itself across
        reconnects; raises WatchCompacted if it cannot resume."""
        ...

    async def grant_lease(self, ttl: int) -> int:
        """A lease kept alive (every ttl/3) until revoke_lease or close."""
        ...

    async def revoke_lease(self, lease: int) -> None: ...
