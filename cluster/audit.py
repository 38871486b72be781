"""Audit records: who did what, where, when, and how it went.

Kept by the nodes and by the router (the pulls it answers from its manifest
cache, ``cluster.router.cache``), hence in cluster core; ``node.audit`` is
the same module.

Every push, delete, login (success and failure) and management change is a
record; pulls are counted per minute per registry, repository, identity and
source address (one record with a ``count``), so the manifest GET path only
bumps a dictionary entry. Records wait in memory and are written in batches:
every ``flush_interval`` seconds each node writes one key per registry that
had activity, ``/meridian-audit/<hour>/reg/<registry>/<ms>-<node>-<n>`` (a
JSON list; ``<hour>``: hours since the epoch; cluster-level changes such as
service principals under ``.../<hour>/cluster/``), and the minute's pull
counts under ``.../<minute's ms>-<node>-pulls`` (rewritten while the minute
lasts), so etcd sees a handful of writes a minute rather than one per
request. A node stopped cleanly writes what it holds; one killed loses at
most the last interval's records (webhook events, which must not be lost,
are written with the change instead).

The records live outside ``/meridian/``, the prefix every node's namespace
cache loads and watches: no node holds them in memory or reads them on a
reload. Being bucketed by hour, reading ``since`` a time is one range read
per hour since then, and each node removes what is past ``retention``
(every few minutes) by reading only the expired hours: whole buckets, and
the one the cutoff falls in. A deleted registry's records stay until then.

A record: ``time`` (ISO 8601), ``ts``, ``registry``, ``region``, ``node``,
``action`` (push, pull, delete, login, manage), ``identity`` (``owner``,
``sp:<id>``, ``token:<name>``, ``admin:<registry>``, ``anonymous``; for a
failed login the name that was tried), ``source`` (the client's address),
``repository``, ``target`` (tag, digest), ``outcome`` (``success`` or
``failure``), ``detail``, and for pulls ``count`` and ``minute``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from cluster.kv import Delete, Put
from cluster.namespace import Namespace

log = logging.getLogger("meridian.audit")

AUDIT_ROOT = "/meridian-audit/"  # beside the namespace's watched /meridian/, not in it
HOUR_MS = 3_600_000
PRUNE_LOOKBACK_HOURS = 31 * 24  # a node's first pass looks this far past the cutoff
BATCH_RECORDS = 1000  # per key (etcd takes values up to 1.5 MiB)
MAX_HELD = 100_000  # records held while the namespace is away; older ones dropped
ACTIONS = ("push", "pull", "delete", "login", "manage")
DEFAULT_LIMIT = 1000  # records one listing returns (the newest)


def hour_prefix(hour: int) -> str:
    return f"{AUDIT_ROOT}{hour:07d}/"


def scope_prefix(hour: int, registry: str | None) -> str:
    return hour_prefix(hour) + (f"reg/{registry}/" if registry else "cluster/")


def audit_key(registry: str | None, ms: int, suffix: str) -> str:
    return f"{scope_prefix(ms // HOUR_MS, registry)}{ms:013d}-{suffix}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def identity_of(access: Any) -> str:
    """The audit name of a v2 request's ``node.auth.Access`` (None: the
    open mode)."""
    if access is None:
        return "anonymous (--no-auth)"
    if access.kind == "owner":
        return "owner"
    if access.kind == "anonymous":
        return "anonymous"
    return f"{access.kind}:{access.name}"


class AuditLog:
    def __init__(
        self,
        ns: Namespace,
        node: str,
        *,
        flush_interval: float = 60.0,
        retention: float = 7 * 86400.0,
        region: str | None = None,
        prunes: bool = True,
    ) -> None:
        self.ns = ns
        self.node = node
        # The region records name: the node's; for the router, the region a
        # pull it answered is accounted to.
        self.region = ns.region if region is None else region
        self.prunes = prunes  # the router leaves removing old records to the nodes
        self.flush_interval = max(flush_interval, 0.05)
        self.retention = retention
        self._held: dict[str | None, list[dict[str, Any]]] = {}
        self._pulls: dict[tuple[str, str, str, str, int], int] = {}
        self._dirty: set[tuple[str, int]] = set()  # (registry, minute) counted since a flush
        self._seq = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._dropped = 0
        self._pruned_below: int | None = None  # hours before this one are pruned

    # -- recording (no I/O) ------------------------------------------------------------

    def record(
        self,
        registry: str | None,
        action: str,
        identity: str,
        *,
        source: str = "",
        repository: str = "",
        target: dict[str, str] | None = None,
        outcome: str = "success",
        detail: str = "",
    ) -> None:
        now = time.time()
        rec: dict[str, Any] = {
            "time": iso(now),
            "ts": round(now, 3),
            "registry": registry or "",
            "region": self.region,
            "node": self.node,
            "action": action,
            "identity": identity,
            "source": source,
            "outcome": outcome,
        }
        if repository:
            rec["repository"] = repository
        if target:
            rec["target"] = target
        if detail:
            rec["detail"] = detail
        self._hold(registry, rec)

    def pull(self, registry: str, repository: str, identity: str, source: str) -> None:
        """One manifest GET: counted into its minute (the hot path)."""
        minute = int(time.time() // 60)
        key = (registry, repository, identity, source, minute)
        self._pulls[key] = self._pulls.get(key, 0) + 1
        self._dirty.add((registry, minute))

    def _hold(self, registry: str | None, rec: dict[str, Any]) -> None:
        held = self._held.setdefault(registry, [])
        held.append(rec)
        total = sum(len(v) for v in self._held.values())
        if total > MAX_HELD:
            held.pop(0)
            self._dropped += 1

    def _pull_batches(self) -> list[tuple[str, int, list[dict[str, Any]]]]:
        """(registry, minute, records) of every minute counted into since the
        last flush: all of that minute's counts, rewritten under one key per
        node, registry and minute until the minute is over."""
        dirty, self._dirty = self._dirty, set()
        out = []
        for reg, minute in sorted(dirty):
            ts = minute * 60.0
            recs = [
                {
                    "time": iso(ts),
                    "ts": ts,
                    "registry": reg,
                    "region": self.region,
                    "node": self.node,
                    "action": "pull",
                    "identity": identity,
                    "source": source,
                    "outcome": "success",
                    "repository": repo,
                    "count": count,
                    "minute": iso(ts),
                }
                for (r, repo, identity, source, m), count in self._pulls.items()
                if r == reg and m == minute
            ]
            out.append((reg, minute, recs))
        return out

    # -- writing ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="audit-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 3.0)

    async def _loop(self) -> None:
        prune_every = min(max(self.retention / 4, 1.0), 600.0)
        next_prune = time.monotonic() + min(prune_every, 30.0)
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("writing audit records failed (kept, retried): %s", e)
            if self.prunes and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + prune_every
                try:
                    await self.prune()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("removing old audit records failed: %s", e)

    async def flush(self) -> None:
        async with self._lock:
            batches = self._pull_batches()
            try:
                for reg, minute, recs in batches:
                    key = audit_key(reg, minute * 60_000, f"{self.node}-pulls")
                    await self.ns.kv.txn([], [Put(key, json.dumps(recs).encode())])
            except Exception:
                self._dirty.update((reg, minute) for reg, minute, _ in batches)
                raise
            now = int(time.time() // 60)
            for k in [k for k in self._pulls if k[4] < now and (k[0], k[4]) not in self._dirty]:
                del self._pulls[k]  # a minute over and written
            if self._dropped:
                log.warning("dropped %d audit records: the namespace was away", self._dropped)
                self._dropped = 0
            for registry in list(self._held):
                recs = self._held.get(registry) or []
                while recs:
                    batch = recs[:BATCH_RECORDS]
                    suffix = f"{self.node}-{next(self._seq)}"
                    key = audit_key(registry, int(time.time() * 1000), suffix)
                    await self.ns.kv.txn([], [Put(key, json.dumps(batch).encode())])
                    del recs[: len(batch)]
                self._held.pop(registry, None)

    async def prune(self) -> None:
        """Remove what is past the retention: every bucket of an hour wholly
        before the cutoff (from where the last pass stopped), and the older
        keys of the hour the cutoff falls in."""
        cutoff = int((time.time() - self.retention) * 1000)
        cutoff_hour = cutoff // HOUR_MS
        start = self._pruned_below
        if start is None:
            start = cutoff_hour - PRUNE_LOOKBACK_HOURS
        for hour in range(start, cutoff_hour + 1):
            entries = await self.ns.refresh(hour_prefix(hour))
            old = [e.key for e in entries if hour < cutoff_hour or _key_ms(e.key) < cutoff]
            for i in range(0, len(old), 100):
                await self.ns.kv.txn([], [Delete(k) for k in old[i : i + 100]])
        self._pruned_below = cutoff_hour


def _key_ms(key: str) -> int:
    try:
        return int(key.rpartition("/")[2].split("-", 1)[0])
    except ValueError:
        return 0


async def read(
    ns: Namespace,
    registry: str | None,
    *,
    since: float = 0.0,
    retention: float = 7 * 86400.0,
    identity: str = "",
    action: str = "",
    limit: int = 10_000,
) -> list[dict[str, Any]]:
    """Records of ``registry`` (None: the cluster's own), oldest first,
    filtered: one range read per hour from ``since`` (else from the
    retention's start) to now. A batch's key is never older than its
    records, so the hour of ``since`` is where they can start."""
    now = time.time()
    first = int(max(since, now - retention - 3600) * 1000) // HOUR_MS
    last = int((now + 300) * 1000) // HOUR_MS  # a node's clock a little ahead
    out: list[dict[str, Any]] = []
    for hour in range(first, last + 1):
        for e in await ns.refresh(scope_prefix(hour, registry)):
            try:
                batch = json.loads(e.value)
            except ValueError:
                continue
            out.extend(
                r for r in batch if isinstance(r, dict) and _matches(r, since, identity, action)
            )
    out.sort(key=lambda r: r.get("ts", 0))
    return out[-limit:] if limit else out


def _matches(r: dict[str, Any], since: float, identity: str, action: str) -> bool:
    return (
        (not since or float(r.get("ts", 0)) >= since)
        and (not identity or r.get("identity") == identity)
        and (not action or r.get("action") == action)
    )


def records(items: Iterable[dict[str, Any]]) -> str:
    """JSON lines, for log shippers."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in items)
