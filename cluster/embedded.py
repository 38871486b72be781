"""``EmbeddedKV``: the key-value contract (cluster/kv.py) on a sqlite3 file.

For a standalone node with no etcd. One file in the node's data dir, in WAL
mode with ``synchronous=FULL``: a txn is acknowledged only after its commit
is on disk, so it survives SIGKILL and power loss.

Every sqlite call runs on ONE dedicated thread, so the event loop never
blocks on disk and sqlite never sees two threads. The thread also serializes
writers, which is what makes the global revision simple: each txn that
changes something bumps it by one, and every key it writes gets that
revision as its mod revision.

Watches are in-process: a bounded in-memory log of recent events (the last
``event_log_size`` events) lets a watch start from a slightly older revision;
anything older (including anything before this process opened the file)
raises ``WatchCompacted`` carrying the oldest revision a watch may start at.

Leases live in memory only. They are liveness keys, so at start every key
still attached to a lease from a previous process is deleted (as one write,
with its own revision). A lease is kept alive automatically (every ttl/3)
until ``revoke_lease`` or ``close``; ``grant_lease(ttl, keep_alive=False)``
grants one that simply expires after ``ttl`` seconds unless revoked first.

A ``start`` that fails (that first write meeting a full disk, an I/O error)
raises ``KVUnavailable`` and leaves the file as it was and nothing open.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cluster.kv import (
    Compare,
    Delete,
    Entry,
    Event,
    KVUnavailable,
    Op,
    Put,
    TxnResult,
    WatchCompacted,
)

__all__ = ["MAX_TXN_OPS", "EmbeddedKV", "check_txn", "prefix_end"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""

# A subscriber whose queue grows beyond this many batches is detached and
# re-attached from the event log (or gets WatchCompacted if it fell too far).
_MAX_PENDING_BATCHES = 4096


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix``
    (etcd's rule); None when there is none (empty or all-0xff prefix)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return None


# etcd's default --max-txn-ops; the embedded store enforces it too so code
# that works standalone does not break on etcd.
MAX_TXN_OPS = 128


def check_txn(compares: list[Compare], ops: list[Op], max_ops: int = MAX_TXN_OPS) -> None:
    """Reject what etcd rejects, identically for both stores: empty keys, a
    key touched twice in one txn, more than ``max_ops`` ops or compares."""
    if len(ops) > max_ops or len(compares) > max_ops:
        raise ValueError(f"too many operations in txn (max {max_ops})")
    for c in compares:
        if not isinstance(c, Compare):
            raise TypeError(f"not a Compare: {c!r}")
        if not c.key:
            raise ValueError("empty key")
    seen: set[str] = set()
    for op in ops:
        if not isinstance(op, Put | Delete):
            raise TypeError(f"not a Put or Delete: {op!r}")
        if not op.key:
            raise ValueError("empty key")
        if op.key in seen:
            raise ValueError(f"duplicate key in txn: {op.key!r}")
        seen.add(op.key)


@dataclass(eq=False)
class _Lease:
    ttl: int
    keep_alive: bool
    deadline: float
    refreshed: float


@dataclass(eq=False)
class _Subscriber:
    prefix: str
    batches: collections.deque[list[Event]] = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    closed: bool = False

    def push(self, events: list[Event], *, replay: bool = False) -> None:
        """Queue the events under our prefix. Live pushes beyond the limit
        mark the subscriber overflowed (it re-attaches from the log); a replay
        from the (already bounded) log is never limited."""
        if self.overflowed or self.closed:
            return
        batch = [e for e in events if e.key.startswith(self.prefix)]
        if not batch:
            return
        if not replay and len(self.batches) >= _MAX_PENDING_BATCHES:
            self.overflowed = True
            self.batches.clear()
        else:
            self.batches.append(batch)
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class EmbeddedKV:
    """sqlite3-backed ``KVStore``.

    ``path``: the database file (created if absent; its directory must exist).
    ``event_log_size``: how many recent events a watch can replay.
    """

    def __init__(self, path: str, *, event_log_size: int = 10_000) -> None:
        self._path = path
        self._log_size = event_log_size
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # only touched on the thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._revision = 0
        # (revision, events) per write txn, oldest first; whole txns are trimmed.
        self._log: collections.deque[tuple[int, list[Event]]] = collections.deque()
        self._log_events = 0
        self._floor = 1  # the oldest revision a watch may start from
        self._subs: set[_Subscriber] = set()
        self._leases: dict[int, _Lease] = {}
        self._lease_wakeup = asyncio.Event()
        self._lease_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-kv")
        try:
            self._revision = await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._floor = self._revision + 1
        self._lease_task = asyncio.create_task(self._lease_loop(), name="embedded-kv-leases")
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lease_task is not None:
            self._lease_task.cancel()
            try:
                await self._lease_task
            except asyncio.CancelledError:
                pass
        self._leases.clear()
        for sub in list(self._subs):
            sub.close()
        self._subs.clear()
        if self._executor is not None:
            executor = self._executor
            try:
                await asyncio.get_running_loop().run_in_executor(executor, self._close_conn)
            finally:
                executor.shutdown(wait=False)

    # -- reads -------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        if not key:
            raise ValueError("empty key")
        return await self._run(self._get, key)

    async def range(self, prefix: str) -> tuple[list[Entry], int]:
        return await self._run(self._range, prefix)

    # -- writes ------------------------------------------------------------

    async def txn(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        check_txn(compares, ops)
        for op in ops:
            if isinstance(op, Put) and op.lease is not None and op.lease not in self._leases:
                raise ValueError(f"lease not found: {op.lease}")
        return await self._run(self._txn, list(compares), list(ops))

    # -- watch -------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        self._check_open()
        next_rev = max(start_revision, 1)
        while True:
            sub = self._subscribe(prefix, next_rev)
            try:
                while True:
                    if sub.batches:
                        batch = sub.batches.popleft()
                        next_rev = batch[-1].mod_revision + 1
                        yield batch
                        continue
                    if sub.closed:
                        return
                    if sub.overflowed:
                        break  # re-attach from the log at next_rev
                    sub.wakeup.clear()
                    await sub.wakeup.wait()
            finally:
                self._subs.discard(sub)

    def _subscribe(self, prefix: str, start_revision: int) -> _Subscriber:
        # Runs without awaiting: the log copy and the registration see the
        # same instant, so no event is both replayed and delivered, or lost.
        self._check_open()
        if start_revision < self._floor:
            raise WatchCompacted(self._floor)
        sub = _Subscriber(prefix)
        for rev, events in self._log:
            if rev >= start_revision:
                sub.push(events, replay=True)
        self._subs.add(sub)
        return sub

    def _publish(self, revision: int, events: list[Event]) -> None:
        """On the loop, in commit order (called via call_soon_threadsafe from
        the single sqlite thread)."""
        self._revision = max(self._revision, revision)
        if not events:
            return
        self._log.append((revision, events))
        self._log_events += len(events)
        while self._log_events > self._log_size and len(self._log) > 1:
            old_rev, old = self._log.popleft()
            self._log_events -= len(old)
            self._floor = old_rev + 1
        for sub in list(self._subs):
            sub.push(events)

    async def compact(self, revision: int) -> None:
        """Forget the watch history before ``revision`` (like etcd's compact):
        a watch starting earlier raises ``WatchCompacted(revision)``."""
        self._check_open()
        if revision > self._revision:
            raise ValueError(f"cannot compact a future revision {revision} > {self._revision}")
        while self._log and self._log[0][0] < revision:
            _, old = self._log.popleft()
            self._log_events -= len(old)
        self._floor = max(self._floor, revision)

    # -- leases ------------------------------------------------------------

    async def grant_lease(self, ttl: int, *, keep_alive: bool = True) -> int:
        self._check_open()
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        lease_id = secrets.randbits(62) + 1
        while lease_id in self._leases:
            lease_id = secrets.randbits(62) + 1
        now = time.monotonic()
        self._leases[lease_id] = _Lease(ttl, keep_alive, now + ttl, now)
        self._lease_wakeup.set()
        return lease_id

    async def revoke_lease(self, lease: int) -> None:
        self._check_open()
        if self._leases.pop(lease, None) is None:
            return
        await self._run(self._delete_lease_keys, lease)

    async def _lease_loop(self) -> None:
        while True:
            now = time.monotonic()
            expired: list[int] = []
            next_due = now + 1.0
            for lease_id, lease in self._leases.items():
                if lease.keep_alive and now - lease.refreshed >= lease.ttl / 3:
                    lease.refreshed = now
                    lease.deadline = now + lease.ttl
                if now >= lease.deadline:
                    expired.append(lease_id)
                    continue
                if lease.keep_alive:
                    next_due = min(next_due, lease.refreshed + lease.ttl / 3)
                next_due = min(next_due, lease.deadline)
            for lease_id in expired:
                del self._leases[lease_id]
                try:
                    await self._run(self._delete_lease_keys, lease_id)
                except KVUnavailable:
                    pass  # store closing or disk failing; start() cleans up
            self._lease_wakeup.clear()
            try:
                await asyncio.wait_for(
                    self._lease_wakeup.wait(), max(0.01, next_due - time.monotonic())
                )
            except TimeoutError:
                pass

    # -- plumbing ----------------------------------------------------------

    def _check_open(self) -> None:
        if not self._started:
            raise RuntimeError("EmbeddedKV.start() was not called")
        if self._closed:
            raise KVUnavailable("store closed")

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._closed or self._executor is None:
            if self._executor is None and not self._closed:
                raise RuntimeError("EmbeddedKV.start() was not called")
            raise KVUnavailable("store closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # executor shut down under us
            if self._closed:
                raise KVUnavailable("store closed") from exc
            raise
        except sqlite3.OperationalError as exc:  # disk full, I/O error, locked
            raise KVUnavailable(f"sqlite: {exc}") from exc

    # Everything below runs on the sqlite thread only.

    def _open(self) -> int:
        """Open the file and make its first write; on any failure (the first
        write meeting a full disk too) close the connection again, so a
        failed ``start`` leaves no descriptor open on the database."""
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            self._conn = conn
            # Leases died with the previous process: drop their keys.
            return self._write(self._drop_all_leased)
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise KVUnavailable("store closed")
        return self._conn

    def _current_revision(self) -> int:
        (rev,) = self._db().execute("SELECT value FROM meta WHERE name='revision'").fetchone()
        return int(rev)

    def _get(self, key: str) -> Entry | None:
        row = (
            self._db()
            .execute("SELECT value, mod_revision FROM kv WHERE key=?", (key.encode(),))
            .fetchone()
        )
        return None if row is None else Entry(key, bytes(row[0]), int(row[1]))

    def _range(self, prefix: str) -> tuple[list[Entry], int]:
        db = self._db()
        db.execute("BEGIN")
        try:
            lo = prefix.encode()
            hi = prefix_end(lo)
            if hi is None:
                rows = db.execute(
                    "SELECT key, value, mod_revision FROM kv WHERE key>=? ORDER BY key", (lo,)
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT key, value, mod_revision FROM kv WHERE key>=? AND key<? ORDER BY key",
                    (lo, hi),
                ).fetchall()
            rev = self._current_revision()
        finally:
            db.execute("COMMIT")
        return [Entry(bytes(k).decode(), bytes(v), int(r)) for k, v, r in rows], rev

    def _write(self, body: Any) -> Any:
        """Run ``body(db, new_revision) -> (result, events)`` in one sqlite
        transaction; bump the revision iff it produced events; publish them
        to the loop in commit order."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            rev = self._current_revision()
            result, events = body(db, rev + 1)
            if events:
                rev += 1
                db.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # sqlite already rolled back after a full disk
                db.execute("ROLLBACK")
            raise
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, rev, events)
        return rev if result is None else result

    def _drop_all_leased(self, db: sqlite3.Connection, rev: int) -> tuple[None, list[Event]]:
        keys = db.execute("SELECT key FROM kv WHERE lease IS NOT NULL ORDER BY key").fetchall()
        db.execute("DELETE FROM kv WHERE lease IS NOT NULL")
        return None, [Event(bytes(k).decode(), None, rev) for (k,) in keys]

    def _delete_lease_keys(self, lease: int) -> None:
        def body(db: sqlite3.Connection, rev: int) -> tuple[None, list[Event]]:
            keys = db.execute("SELECT key FROM kv WHERE lease=? ORDER BY key", (lease,)).fetchall()
            db.execute("DELETE FROM kv WHERE lease=?", (lease,))
            return None, [Event(bytes(k).decode(), None, rev) for (k,) in keys]

        self._write(body)

    def _txn(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        def body(db: sqlite3.Connection, rev: int) -> tuple[TxnResult, list[Event]]:
            for c in compares:
                row = db.execute(
                    "SELECT mod_revision FROM kv WHERE key=?", (c.key.encode(),)
                ).fetchone()
                if (0 if row is None else int(row[0])) != c.mod_revision:
                    return TxnResult(False, rev - 1), []
            events: list[Event] = []
            for op in ops:
                k = op.key.encode()
                if isinstance(op, Put):
                    db.execute(
                        "INSERT INTO kv (key, value, mod_revision, lease) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT(key) DO UPDATE SET value=excluded.value,"
                        " mod_revision=excluded.mod_revision, lease=excluded.lease",
                        (k, bytes(op.value), rev, op.lease),
                    )
                    events.append(Event(op.key, bytes(op.value), rev))
                else:
                    if db.execute("DELETE FROM kv WHERE key=?", (k,)).rowcount:
                        events.append(Event(op.key, None, rev))
            return TxnResult(True, rev if events else rev - 1), events

        return self._write(body)
