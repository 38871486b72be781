"""One contract suite for both ``KVStore`` implementations (cluster/kv.py).

Every test in the first part runs twice: on ``EmbeddedKV`` (sqlite in
tmp_path) and on ``EtcdKV`` against a real etcd process started for the test
(tests/etcd_server.py). The last parts hold what only one of them can show:
etcd outages (kill, restart, lost leases) and the embedded store's crash
durability, bounded event log and a start on a full disk.

No test asserts a wall-clock threshold: waits are for events, bounded only by
generous safety timeouts that fail the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cluster import embedded as embedded_mod
from cluster import etcd as etcd_mod
from cluster.embedded import MAX_TXN_OPS, EmbeddedKV
from cluster.etcd import EtcdKV
from cluster.kv import (
    Compare,
    Delete,
    Event,
    KVStore,
    KVUnavailable,
    Put,
    TxnResult,
    WatchCompacted,
)
from tests.etcd_server import EtcdServer, free_port

REPO = Path(__file__).resolve().parent.parent
WAIT = 20.0  # safety net for waits on events; never an assertion about speed

pytestmark = pytest.mark.timeout(60)


# -- harnesses -------------------------------------------------------------


class Harness:
    kind: str

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.stores: list[Any] = []

    async def setup(self) -> None:
        pass

    async def _make(self, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def open(self, **kwargs: Any) -> Any:
        kv = await self._make(**kwargs)
        await kv.start()
        self.stores.append(kv)
        return kv

    async def reopen(self, kv: Any) -> Any:
        """Simulate a restart of the store; return a fresh client."""
        raise NotImplementedError

    async def teardown(self) -> None:
        for kv in self.stores:
            await kv.close()


class EmbeddedHarness(Harness):
    kind = "embedded"

    @property
    def path(self) -> str:
        return str(self.tmp_path / "kv.sqlite")

    async def _make(self, **kwargs: Any) -> EmbeddedKV:
        return EmbeddedKV(self.path, **kwargs)

    async def reopen(self, kv: Any) -> Any:
        await kv.close()
        return await self.open()


class EtcdHarness(Harness):
    kind = "etcd"

    async def setup(self) -> None:
        self.server = EtcdServer(str(self.tmp_path / "etcd"))
        await self.server.astart()

    async def _make(self, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 5.0)
        return EtcdKV(self.server.endpoints, **kwargs)

    async def reopen(self, kv: Any) -> Any:
        await kv.close()
        await self.server.arestart()  # SIGKILL, then start on the same data dir
        return await self.open()

    async def teardown(self) -> None:
        try:
            await super().teardown()
        finally:
            await asyncio.to_thread(self.server.cleanup)


@pytest.fixture(params=["embedded", "etcd"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    h: Harness = EmbeddedHarness(tmp_path) if request.param == "embedded" else EtcdHarness(tmp_path)
    await h.setup()
    try:
        yield h
    finally:
        await h.teardown()


@pytest.fixture
async def kv(harness: Harness) -> KVStore:
    return await harness.open()


@pytest.fixture
async def etcd_harness(tmp_path: Path) -> AsyncIterator[EtcdHarness]:
    h = EtcdHarness(tmp_path)
    await h.setup()
    try:
        yield h
    finally:
        await h.teardown()


# -- helpers ---------------------------------------------------------------


class Collector:
    """Consumes a watch in a task; tests wait for a number of events."""

    def __init__(self, it: AsyncIterator[list[Event]]) -> None:
        self.batches: list[list[Event]] = []
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.finished = False
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(it))

    async def _run(self, it: AsyncIterator[list[Event]]) -> None:
        try:
            async for batch in it:
                self.batches.append(batch)
                self.events.extend(batch)
                self._changed.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.finished = True
            self._changed.set()

    async def wait_events(self, n: int) -> list[Event]:
        async def _wait() -> None:
            while len(self.events) < n:
                if self.error is not None:
                    raise self.error
                if self.finished:
                    raise AssertionError(f"watch ended after {self.events}")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), WAIT)
        return self.events[:n]

    async def wait_finished(self) -> None:
        async def _wait() -> None:
            while not self.finished:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), WAIT)

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def put(kv: KVStore, key: str, value: bytes, lease: int | None = None) -> int:
    res = await kv.txn([], [Put(key, value, lease)])
    assert res.succeeded
    return res.revision


async def wait_until_gone(kv: KVStore, key: str, start_revision: int) -> Event:
    """The delete event of ``key`` seen by a watch from ``start_revision``."""
    it = kv.watch(key, start_revision)
    try:

        async def _first_delete() -> Event:
            async for batch in it:
                for ev in batch:
                    if ev.key == key and ev.value is None:
                        return ev
            raise AssertionError("watch ended")

        return await asyncio.wait_for(_first_delete(), WAIT)
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def eventually(fn: Any, *args: Any) -> Any:
    """Call ``fn`` until it stops raising KVUnavailable (after an outage)."""

    async def _loop() -> Any:
        while True:
            try:
                return await fn(*args)
            except KVUnavailable:
                await asyncio.sleep(0.05)

    return await asyncio.wait_for(_loop(), WAIT)


# == the contract, on both stores ==========================================


async def test_get_put_roundtrip(kv: KVStore) -> None:
    assert await kv.get("a/missing") is None
    rev = await put(kv, "a/bin", b"\x00\xff\x10")
    await put(kv, "a/empty", b"")
    e = await kv.get("a/bin")
    assert e is not None and e.key == "a/bin" and e.value == b"\x00\xff\x10"
    assert e.mod_revision == rev
    e2 = await kv.get("a/empty")
    assert e2 is not None and e2.value == b""


async def test_range_sorted_and_prefix_isolated(kv: KVStore) -> None:
    keys = ["r/b", "r/a/2", "r/a", "r/a/1", "r/\u00e9", "r/Z", "r0", "r", "q/x", "r/a/\u00ff"]
    last = 0
    for k in keys:
        last = await put(kv, k, k.encode())
    entries, rev = await kv.range("r/")
    got = [e.key for e in entries]
    expected = sorted(
        (k for k in keys if k.startswith("r/")), key=lambda s: s.encode()
    )  # etcd order: raw UTF-8 bytes
    assert got == expected
    assert all(e.value == e.key.encode() for e in entries)
    assert rev >= last >= max(e.mod_revision for e in entries)
    sub, _ = await kv.range("r/a/")
    assert [e.key for e in sub] == ["r/a/1", "r/a/2", "r/a/\u00ff"]
    none, rev2 = await kv.range("nothing/")
    assert none == [] and rev2 == rev
    everything, _ = await kv.range("")
    assert [e.key for e in everything] == sorted(keys, key=lambda s: s.encode())


async def test_range_many_keys_is_one_snapshot(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    if harness.kind == "etcd":
        monkeypatch.setattr(etcd_mod, "_PAGE_SIZE", 7)  # many pages
    kv = await harness.open()
    keys = [f"many/{i:04}" for i in range(300)]
    for i in range(0, len(keys), 100):
        await kv.txn([], [Put(k, k.encode()) for k in keys[i : i + 100]])
    await put(kv, "many0", b"sibling")
    entries, rev = await kv.range("many/")
    assert [e.key for e in entries] == keys
    _, now = await kv.range("")
    assert rev == now


async def test_revisions_increase(kv: KVStore) -> None:
    _, start = await kv.range("")
    revs = []
    for i in range(5):
        revs.append(await put(kv, f"rev/{i % 2}", str(i).encode()))
    assert revs == sorted(revs) and len(set(revs)) == 5 and revs[0] > start
    # each key carries the revision of the txn that last wrote it
    e0, e1 = await kv.get("rev/0"), await kv.get("rev/1")
    assert e0 is not None and e1 is not None
    assert (e0.mod_revision, e1.mod_revision) == (revs[4], revs[3])
    _, now = await kv.range("rev/")
    assert now == revs[-1]
    # a failed txn and a no-op txn write nothing and do not bump the revision
    failed = await kv.txn([Compare("rev/0", revs[0])], [Put("rev/0", b"x")])
    assert failed == TxnResult(False, now)
    noop = await kv.txn([], [Delete("rev/absent")])
    assert noop == TxnResult(True, now)
    # a txn writing several keys bumps once; all share its revision
    multi = await kv.txn([], [Put("rev/m1", b"1"), Put("rev/m2", b"2"), Delete("rev/0")])
    assert multi.succeeded and multi.revision == now + 1
    entries, _ = await kv.range("rev/m")
    assert {e.mod_revision for e in entries} == {multi.revision}


async def test_txn_compare_absent_key(kv: KVStore) -> None:
    create = [Compare("cas/k", 0)], [Put("cas/k", b"v1")]
    first = await kv.txn(*create)
    assert first.succeeded
    second = await kv.txn(*create)
    assert not second.succeeded
    e = await kv.get("cas/k")
    assert e is not None and e.value == b"v1" and e.mod_revision == first.revision


async def test_txn_stale_mod_revision_applies_nothing(kv: KVStore) -> None:
    r1 = await put(kv, "cas/tag", b"sha256:1")
    r2 = await put(kv, "cas/tag", b"sha256:2")
    res = await kv.txn(
        [Compare("cas/tag", r1)],
        [Put("cas/tag", b"sha256:3"), Put("cas/other", b"x"), Delete("cas/tag2")],
    )
    assert res == TxnResult(False, r2)
    e = await kv.get("cas/tag")
    assert e is not None and (e.value, e.mod_revision) == (b"sha256:2", r2)
    assert await kv.get("cas/other") is None
    ok = await kv.txn([Compare("cas/tag", r2)], [Put("cas/tag", b"sha256:3")])
    assert ok.succeeded and ok.revision == r2 + 1


async def test_multi_op_atomicity(kv: KVStore) -> None:
    ra = await put(kv, "m/a", b"a")
    rb = await put(kv, "m/b", b"b")
    ops = [Put("m/a", b"a2"), Delete("m/b"), Put("m/c", b"c")]
    # one compare of three fails: nothing at all happens
    bad = await kv.txn([Compare("m/a", ra), Compare("m/b", ra), Compare("m/c", 0)], ops)
    assert not bad.succeeded
    entries, rev = await kv.range("m/")
    assert [(e.key, e.value) for e in entries] == [("m/a", b"a"), ("m/b", b"b")]
    assert rev == rb
    good = await kv.txn([Compare("m/a", ra), Compare("m/b", rb), Compare("m/c", 0)], ops)
    assert good.succeeded
    entries, rev = await kv.range("m/")
    assert [(e.key, e.value, e.mod_revision) for e in entries] == [
        ("m/a", b"a2", good.revision),
        ("m/c", b"c", good.revision),
    ]
    assert rev == good.revision


async def test_concurrent_cas_has_one_winner(kv: KVStore) -> None:
    base = await put(kv, "race/tag", b"start")
    results = await asyncio.gather(
        *(
            kv.txn([Compare("race/tag", base)], [Put("race/tag", f"w{i}".encode())])
            for i in range(20)
        )
    )
    winners = [i for i, r in enumerate(results) if r.succeeded]
    assert len(winners) == 1
    e = await kv.get("race/tag")
    assert e is not None and e.value == f"w{winners[0]}".encode()
    assert e.mod_revision == results[winners[0]].revision


async def test_delete(kv: KVStore) -> None:
    await put(kv, "d/a", b"1")
    await put(kv, "d/b", b"2")
    res = await kv.txn([], [Delete("d/a")])
    assert res.succeeded
    assert await kv.get("d/a") is None
    entries, rev = await kv.range("d/")
    assert [e.key for e in entries] == ["d/b"] and rev == res.revision
    # a deleted key compares as absent again, and can be re-created
    again = await kv.txn([Compare("d/a", 0)], [Put("d/a", b"3")])
    assert again.succeeded


async def test_txn_rejects_invalid_input(kv: KVStore) -> None:
    _, rev = await kv.range("")
    with pytest.raises(ValueError):
        await kv.txn([], [Put("inv/a", b"1"), Put("inv/a", b"2")])
    with pytest.raises(ValueError):
        await kv.txn([], [Put("inv/a", b"1"), Delete("inv/a")])
    with pytest.raises(ValueError):
        await kv.txn([], [Put("", b"1")])
    with pytest.raises(ValueError):
        await kv.txn([], [Put(f"inv/{i}", b"") for i in range(MAX_TXN_OPS + 1)])
    with pytest.raises(ValueError):
        await kv.txn([], [Put("inv/b", b"1"), Put("inv/c", b"1", lease=12345)])
    assert await kv.range("inv/") == ([], rev)
    # the largest allowed txn goes through
    assert (await kv.txn([], [Put(f"inv/{i:03}", b"") for i in range(MAX_TXN_OPS)])).succeeded


async def test_watch_puts_and_deletes_in_order(kv: KVStore) -> None:
    _, rev = await kv.range("")
    c = Collector(kv.watch("w/", rev + 1))
    try:
        r1 = await put(kv, "w/a", b"1")
        await put(kv, "other/x", b"ignored")
        await put(kv, "wx", b"ignored: not under w/")
        r2 = (await kv.txn([], [Put("w/b", b"2"), Put("w/c", b"3"), Put("other/y", b"-")])).revision
        r3 = (await kv.txn([], [Delete("w/a")])).revision
        r4 = await put(kv, "w/b", b"22")
        events = await c.wait_events(5)
        assert events == [
            Event("w/a", b"1", r1),
            Event("w/b", b"2", r2),
            Event("w/c", b"3", r2),
            Event("w/a", None, r3),
            Event("w/b", b"22", r4),
        ]
        assert all(len({e.mod_revision for e in b}) == 1 for b in c.batches)
        revs = [b[0].mod_revision for b in c.batches]
        assert revs == sorted(revs)
    finally:
        await c.close()


async def test_watch_from_start_revision(kv: KVStore) -> None:
    r1 = await put(kv, "h/a", b"1")
    r2 = await put(kv, "h/b", b"2")
    r3 = (await kv.txn([], [Delete("h/a")])).revision
    c = Collector(kv.watch("h/", r2))  # history from r2 on, then live
    try:
        r4 = await put(kv, "h/c", b"3")
        assert await c.wait_events(3) == [
            Event("h/b", b"2", r2),
            Event("h/a", None, r3),
            Event("h/c", b"3", r4),
        ]
    finally:
        await c.close()
    # and from the very first write
    c2 = Collector(kv.watch("h/", r1))
    try:
        assert [e.mod_revision for e in await c2.wait_events(4)] == [r1, r2, r3, r4]
    finally:
        await c2.close()


async def test_watch_ends_when_store_closes(harness: Harness) -> None:
    kv = await harness.open()
    _, rev = await kv.range("")
    c = Collector(kv.watch("end/", rev + 1))
    await put(kv, "end/a", b"1")
    await c.wait_events(1)
    await kv.close()
    await c.wait_finished()
    assert c.error is None or isinstance(c.error, KVUnavailable)


async def test_lease_revoke_deletes_keys(kv: KVStore) -> None:
    lease = await kv.grant_lease(30)
    other = await kv.grant_lease(30)
    r1 = (
        await kv.txn(
            [], [Put("l/a", b"1", lease), Put("l/b", b"2", lease), Put("l/c", b"3", other)]
        )
    ).revision
    await put(kv, "l/plain", b"p")
    c = Collector(kv.watch("l/", r1 + 1))
    try:
        await kv.revoke_lease(lease)
        events = await c.wait_events(3)  # the put of l/plain, then two deletes
        assert [(e.key, e.value) for e in events[1:]] == [("l/a", None), ("l/b", None)]
        assert events[1].mod_revision == events[2].mod_revision
        entries, _ = await kv.range("l/")
        assert [e.key for e in entries] == ["l/c", "l/plain"]
        await kv.revoke_lease(lease)  # revoking twice is harmless
        # a plain put over a leased key detaches it from the lease
        await put(kv, "l/c", b"mine now")
        await kv.revoke_lease(other)
        e = await kv.get("l/c")
        assert e is not None and e.value == b"mine now"
    finally:
        await c.close()


async def test_lease_expiry_without_keepalive_and_keepalive(kv: KVStore) -> None:
    kept = await kv.grant_lease(1)
    lapsing = await kv.grant_lease(1, keep_alive=False)  # type: ignore[call-arg]
    rev = (
        await kv.txn([], [Put("ttl/kept", b"k", kept), Put("ttl/lapse", b"l", lapsing)])
    ).revision
    gone = await wait_until_gone(kv, "ttl/lapse", rev + 1)
    assert gone.mod_revision > rev
    # The kept lease has now outlived its TTL; give it a few more TTLs.
    await asyncio.sleep(2)
    e = await kv.get("ttl/kept")
    assert e is not None and e.value == b"k"
    await kv.revoke_lease(kept)
    assert await kv.get("ttl/kept") is None


async def test_durable_across_restart(harness: Harness) -> None:
    kv = await harness.open()
    r1 = await put(kv, "dur/a", b"1")
    r2 = (await kv.txn([], [Put("dur/b", b"2"), Put("dur/c", b"3")])).revision
    r3 = (await kv.txn([], [Delete("dur/c")])).revision
    kv2 = await harness.reopen(kv)
    entries, rev = await eventually(kv2.range, "dur/")
    assert [(e.key, e.value, e.mod_revision) for e in entries] == [
        ("dur/a", b"1", r1),
        ("dur/b", b"2", r2),
    ]
    assert rev == r3
    # revisions keep increasing after the restart
    assert await put(kv2, "dur/d", b"4") > r3
    stale = await kv2.txn([Compare("dur/a", r1 - 1)], [Put("dur/a", b"x")])
    assert not stale.succeeded


async def test_watch_compacted(kv: Any) -> None:
    revs = [await put(kv, f"cmp/{i}", b"v") for i in range(5)]
    await kv.compact(revs[3])
    with pytest.raises(WatchCompacted) as info:
        async for _ in kv.watch("cmp/", revs[1]):
            pytest.fail("no events expected before WatchCompacted")
    assert info.value.compact_revision == revs[3]
    # the documented recovery: reload, then watch from the reload's revision
    entries, rev = await kv.range("cmp/")
    assert len(entries) == 5
    c = Collector(kv.watch("cmp/", rev + 1))
    try:
        r = await put(kv, "cmp/new", b"n")
        assert await c.wait_events(1) == [Event("cmp/new", b"n", r)]
    finally:
        await c.close()


# == etcd only: outages ====================================================


async def test_etcd_watch_resumes_after_kill_and_restart(etcd_harness: EtcdHarness) -> None:
    kv = await etcd_harness.open()
    _, rev = await kv.range("")
    c = Collector(kv.watch("res/", rev + 1))
    try:
        r1 = await put(kv, "res/1", b"1")
        r2 = await put(kv, "res/2", b"2")
        await c.wait_events(2)
        await etcd_harness.server.akill()
        with pytest.raises(KVUnavailable):
            await kv.txn([], [Put("res/down", b"x")])
        await etcd_harness.server.astart()
        # written while the watch may still be reconnecting: none may be lost
        writer = await etcd_harness.open()
        later = []
        for i in range(3, 6):
            res = await eventually(kv.txn, [Compare(f"res/{i}", 0)], [Put(f"res/{i}", b"x")])
            assert res.succeeded
            later.append(res.revision)
        later.append(await put(writer, "res/6", b"6"))
        events = await c.wait_events(6)
        assert [e.key for e in events] == [f"res/{i}" for i in range(1, 7)]
        assert [e.mod_revision for e in events] == [r1, r2, *later]
        await asyncio.sleep(0.2)
        assert len(c.events) == 6, "no duplicates after resuming"
        assert c.error is None
    finally:
        await c.close()


async def test_etcd_unavailable_when_down_then_recovers(etcd_harness: EtcdHarness) -> None:
    kv = await etcd_harness.open(timeout=0.5)
    lease = await kv.grant_lease(5)
    await put(kv, "down/a", b"1")
    await etcd_harness.server.akill()
    with pytest.raises(KVUnavailable):
        await kv.get("down/a")
    with pytest.raises(KVUnavailable):
        await kv.range("down/")
    with pytest.raises(KVUnavailable):
        await kv.txn([Compare("down/b", 0)], [Put("down/b", b"1")])
    with pytest.raises(KVUnavailable):
        await kv.grant_lease(5)
    with pytest.raises(KVUnavailable):
        await kv.revoke_lease(lease)
    await etcd_harness.server.astart()
    e = await eventually(kv.get, "down/a")
    assert e is not None and e.value == b"1"
    assert await kv.get("down/b") is None  # the failed txn was never replayed
    assert (await kv.txn([Compare("down/b", 0)], [Put("down/b", b"1")])).succeeded


async def test_etcd_unavailable_when_never_reachable(tmp_path: Path) -> None:
    kv = EtcdKV([f"http://127.0.0.1:{free_port()}"], timeout=0.3)
    await kv.start()
    try:
        with pytest.raises(KVUnavailable):
            await kv.range("")
        with pytest.raises(KVUnavailable):
            await kv.txn([], [Put("x", b"1")])
    finally:
        await kv.close()


async def test_etcd_fails_over_to_a_live_endpoint(etcd_harness: EtcdHarness) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    kv = EtcdKV([dead, *etcd_harness.server.endpoints], timeout=5.0)
    await kv.start()
    try:
        assert await kv.get("fo/a") is None  # retried on the next member
        assert (await kv.txn([Compare("fo/a", 0)], [Put("fo/a", b"1")])).succeeded
        _, rev = await kv.range("fo/")
        c = Collector(kv.watch("fo/", rev))
        assert (await c.wait_events(1))[0].key == "fo/a"
        await c.close()
    finally:
        await kv.close()


async def test_etcd_lost_lease_is_regranted(etcd_harness: EtcdHarness) -> None:
    regranted: asyncio.Queue[int] = asyncio.Queue()
    kv = await etcd_harness.open(on_lease_regranted=regranted.put)
    other = await etcd_harness.open()
    lease = await kv.grant_lease(2)
    rev = await put(kv, "live/node", b"up", lease)
    # Another client revokes it: for the owner this is a lease that expired
    # (e.g. while it could not reach etcd); its keys are gone.
    await other.revoke_lease(lease)
    await wait_until_gone(other, "live/node", rev + 1)
    assert await asyncio.wait_for(regranted.get(), WAIT) == lease
    # the same lease id is alive again: the owner re-puts its liveness keys
    await put(kv, "live/node", b"up again", lease)
    e = await other.get("live/node")
    assert e is not None and e.value == b"up again"
    await kv.revoke_lease(lease)
    assert await other.get("live/node") is None


# == embedded only: crash durability, restart semantics, bounded log =======


async def test_embedded_acknowledged_txn_survives_sigkill(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite")
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, sys
        from cluster.embedded import EmbeddedKV
        from cluster.kv import Put

        async def main():
            kv = EmbeddedKV({path!r})
            await kv.start()
            lease = await kv.grant_lease(60)
            for i in range(20):
                ops = [Put(f"crash/{{i:02}}", b"v" * i), Put("crash/last", str(i).encode())]
                res = await kv.txn([], ops)
                print(res.revision, flush=True)
            await kv.txn([], [Put("crash/leased", b"alive", lease)])
            print("acked", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == -9, err.decode()
    lines = out.decode().split()
    assert lines[-1] == "acked"
    acked = [int(x) for x in lines[:-1]]
    kv = EmbeddedKV(path)
    await kv.start()
    try:
        entries, rev = await kv.range("crash/")
        assert len(entries) == 21
        last = await kv.get("crash/last")
        assert last is not None and last.value == b"19" and last.mod_revision == acked[-1]
        # the leased key died with its process: dropped at start, as a write
        assert await kv.get("crash/leased") is None
        assert rev > acked[-1]
    finally:
        await kv.close()


async def test_embedded_restart_compacts_watch_history(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite")
    kv = EmbeddedKV(path)
    await kv.start()
    r1 = await put(kv, "hist/a", b"1")
    await kv.close()
    kv = EmbeddedKV(path)
    await kv.start()
    try:
        with pytest.raises(WatchCompacted) as info:
            async for _ in kv.watch("hist/", r1):
                pass
        _, rev = await kv.range("hist/")
        assert info.value.compact_revision == rev + 1
        c = Collector(kv.watch("hist/", info.value.compact_revision))
        r2 = await put(kv, "hist/b", b"2")
        assert await c.wait_events(1) == [Event("hist/b", b"2", r2)]
        await c.close()
    finally:
        await kv.close()


async def test_embedded_event_log_is_bounded(tmp_path: Path) -> None:
    kv = EmbeddedKV(str(tmp_path / "kv.sqlite"), event_log_size=5)
    await kv.start()
    try:
        revs = [await put(kv, f"log/{i}", b"") for i in range(10)]
        with pytest.raises(WatchCompacted) as info:
            async for _ in kv.watch("log/", revs[0]):
                pass
        assert info.value.compact_revision == revs[5]
        c = Collector(kv.watch("log/", revs[5]))
        assert [e.mod_revision for e in await c.wait_events(5)] == revs[5:]
        await c.close()
    finally:
        await kv.close()


async def test_embedded_slow_watcher_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_mod, "_MAX_PENDING_BATCHES", 3)
    kv = EmbeddedKV(str(tmp_path / "kv.sqlite"))
    await kv.start()
    try:
        r0 = await put(kv, "slow/0", b"")
        it = kv.watch("slow/", r0)
        first = await anext(it)
        assert first == [Event("slow/0", b"", r0)]
        revs = [await put(kv, f"slow/{i}", b"") for i in range(1, 20)]  # overflows the queue
        seen = []
        while len(seen) < len(revs):
            seen.extend(e.mod_revision for e in await asyncio.wait_for(anext(it), WAIT))
        assert seen == revs
        await it.aclose()  # type: ignore[attr-defined]
    finally:
        await kv.close()


def open_fds(path: Path) -> list[str]:
    """This process's descriptors open on the database ``path`` or its
    ``-wal`` and ``-shm`` files."""
    names = {str(path), f"{path}-wal", f"{path}-shm"}
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if target in names:
            found.append(target)
    return found


async def test_embedded_start_on_a_full_disk_leaves_nothing_open(small_fs: Path) -> None:
    """The first write of a start (dropping the keys of the previous
    process's leases) meets a full disk: ``start`` raises KVUnavailable
    saying so, keeps no descriptor to the database open and changes
    nothing; with room again a start drops those keys and keeps the rest."""
    path = small_fs / "kv.sqlite"
    kv = EmbeddedKV(str(path))
    await kv.start()
    lease = await kv.grant_lease(60)
    for first in range(0, 600, 100):  # ~600 KiB of leased keys: a big first write
        ops = [Put(f"leased/{i:04}", b"x" * 1000, lease) for i in range(first, first + 100)]
        assert (await kv.txn([], ops)).succeeded
    kept_rev = await put(kv, "kept/a", b"kept")
    await kv.close()  # leases live in memory: the leased keys stay on disk
    assert open_fds(path) == []

    # Fill the file system, then give back 128 KiB: room for sqlite to open
    # the database (its 32 KiB -shm), none for the write dropping the keys.
    filler = small_fs / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    os.truncate(filler, filler.stat().st_size - (128 << 10))
    db_before = path.read_bytes()

    failed = EmbeddedKV(str(path))
    with pytest.raises(KVUnavailable, match="full"):
        await failed.start()
    assert open_fds(path) == []
    assert path.read_bytes() == db_before
    await failed.close()  # closing a store that never started is harmless

    filler.unlink()
    kv = EmbeddedKV(str(path))
    await kv.start()
    try:
        entries, rev = await kv.range("")
        assert [(e.key, e.value, e.mod_revision) for e in entries] == [
            ("kept/a", b"kept", kept_rev)
        ]
        assert rev == kept_rev + 1  # the drop, once, as one write
    finally:
        await kv.close()
    assert open_fds(path) == []
