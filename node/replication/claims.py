"""Work a region's nodes share, done by one node at a time.

Nodes of one region share its blob store (an Azure container, or a shared
data dir), so an item copied into the region by one of them is there for
all: the others must not copy it again. Each node holds one lease of its
own (``Claims``, kept alive by the KV store every ttl/3) and claims work
with a put-if-absent under it:

- ``/meridian/claims/<region>/<registry>/<digest>``: the node copying
  ``<digest>`` into ``<region>`` for ``<registry>``; released (deleted, if
  still the one it put) once the copy and its placement are recorded, or
  when the copy failed. A node that dies holding claims loses them with
  its lease (within the TTL), and the key's deletion (seen by every node's
  namespace watch) lets another node take the item over;
- ``/meridian/leaders/<region>/<role>``: the node doing ``<role>`` (e.g.
  ``reclaim``) for the region; kept for as long as the holder lives, taken
  over by another node once its lease lapses.

A claim's value is JSON ``{"node", "lease", "t"}``. A node restarted with
the same ``--node-id`` takes over what its previous process left under a
lease of its own (the old lease dies within the TTL anyway; no need to
wait).

Only the replicator claims: a read-through copy (a client is waiting for
the bytes) goes ahead whoever holds the item. A claim is an optimisation,
not a lock that correctness depends on: if a
lease is lost while its holder still works (the store unreachable for
longer than the TTL), two nodes may copy one item; both copies are verified
and commit the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from cluster.kv import Compare, Delete, KVStore, KVUnavailable, Put
from cluster.namespace import ROOT

log = logging.getLogger("meridian.replication")

CLAIMS = ROOT + "claims/"
LEADERS = ROOT + "leaders/"
CLAIM_TTL = 10  # seconds a dead node's claims outlive it at most
RELEASE_TIMEOUT = 2.0


def claim_key(region: str, reg: str, digest: str) -> str:
    return f"{CLAIMS}{region}/{reg}/{digest}"


def leader_key(region: str, role: str) -> str:
    return f"{LEADERS}{region}/{role}"


def claimed_item(key: str, region: str) -> tuple[str, str] | None:
    """(registry, digest) of a claim key of ``region``, else None."""
    prefix = f"{CLAIMS}{region}/"
    if not key.startswith(prefix):
        return None
    reg, _, digest = key[len(prefix) :].partition("/")
    return (reg, digest) if reg and digest else None


class Claims:
    """One node's claims, all under one lease of its own."""

    def __init__(self, kv: KVStore, node: str, ttl: int = CLAIM_TTL) -> None:
        self.kv = kv
        self.node = node
        self.ttl = ttl
        self._lease: int | None = None
        self._lock = asyncio.Lock()
        self._held: dict[str, int] = {}  # key -> mod revision of our put

    async def _lease_id(self) -> int:
        async with self._lock:
            if self._lease is None:
                self._lease = await self.kv.grant_lease(self.ttl)
            return self._lease

    def _value(self, lease: int) -> bytes:
        doc = {"node": self.node, "lease": lease, "t": round(time.time(), 3)}
        return json.dumps(doc, separators=(",", ":")).encode()

    async def claim(self, key: str) -> bool:
        """Whether this node holds ``key`` now (claimed now, or already)."""
        for _ in range(3):
            lease = await self._lease_id()
            try:
                r = await self.kv.txn([Compare(key, 0)], [Put(key, self._value(lease), lease)])
            except KVUnavailable:
                raise
            except ValueError as e:  # our lease is gone (it lapsed): take a new one
                log.warning("claim lease lost (%s); granting a new one", e)
                async with self._lock:
                    if self._lease == lease:
                        self._lease = None
                continue
            if r.succeeded:
                self._held[key] = r.revision
                return True
            e = await self.kv.get(key)
            if e is None:
                continue  # released meanwhile: try again
            try:
                doc = json.loads(e.value)
                holder, held_lease = doc["node"], int(doc["lease"])
            except (ValueError, KeyError, TypeError):
                return False
            if holder != self.node:
                return False
            if held_lease == lease:
                self._held[key] = e.mod_revision
                return True
            # Left by an earlier process of this node: ours again.
            r = await self.kv.txn(
                [Compare(key, e.mod_revision)], [Put(key, self._value(lease), lease)]
            )
            if r.succeeded:
                self._held[key] = r.revision
                return True
        return False

    def holds(self, key: str) -> bool:
        return key in self._held

    async def release(self, key: str) -> None:
        """Delete ``key`` if it is still the claim this node put."""
        rev = self._held.pop(key, None)
        if rev is None:
            return
        with contextlib.suppress(Exception):  # it lapses with the lease anyway
            await asyncio.wait_for(self.kv.txn([Compare(key, rev)], [Delete(key)]), RELEASE_TIMEOUT)

    async def close(self) -> None:
        """Revoke the lease: every claim of this node goes at once."""
        lease, self._lease = self._lease, None
        self._held.clear()
        if lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.kv.revoke_lease(lease), RELEASE_TIMEOUT)


class Leader:
    """``role`` for the region, on one node at a time: ``await
    leader.acquire()`` before each round of the work; False means another
    live node holds it (skip this round)."""

    def __init__(self, claims: Claims, region: str, role: str) -> None:
        self.claims = claims
        self.key = leader_key(region, role)
        self._was = False

    async def acquire(self) -> bool:
        held = await self.claims.claim(self.key)
        if held != self._was:
            log.info(
                "%s leader of region: %s",
                self.key.rsplit("/", 1)[-1],
                "this node" if held else "another node",
            )
            self._was = held
        return held
