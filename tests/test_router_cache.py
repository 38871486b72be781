"""The router answers manifest GET/HEAD from its cache (cluster/router/cache.py)
exactly as a node would, and only when a node would answer 200.

One module-wide setup: a real etcd, a real node (auth on, trusting the
router's X-Forwarded-For) and a real ``meridian router`` process. Clients
log in as the cluster owner (tokens from the node's token endpoint, good in
the router too). Eventual things (the router's watch seeing a change, a
usage flush) are bounded polls; nothing is about elapsed time.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.etcd_server import EtcdServer, etcd_fixture
from tests.oci import digest, image, repo_name
from tests.procs import NodeProcess
from tests.test_manage_identities import api
from tests.test_router import RouterProcess, bearer, push_to

etcd = etcd_fixture(scope="module")

HEADERS = (
    "Content-Type",
    "Docker-Content-Digest",
    "ETag",
    "Content-Length",
    "Docker-Distribution-API-Version",
)


@dataclass
class Setup:
    node: NodeProcess
    router: RouterProcess


@pytest.fixture(scope="module")
def setup(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("router-cache")
    node = NodeProcess(
        base / "solo",
        region="solo",
        etcd=etcd.client_url,
        extra=(
            "--auth",
            "--trusted-proxies",
            "127.0.0.1/32",
            "--usage-interval",
            "0.3",
            "--audit-flush-interval",
            "0.3",
        ),
    ).start()
    router = RouterProcess(
        etcd.client_url, base, ("--usage-interval", "0.3", "--audit-flush-interval", "0.3")
    )
    try:
        router.start()
        router.wait_for(lambda st: any(r["up"] for r in st["regions"]), "the node in rotation")
        yield Setup(node, router)
    finally:
        router.stop()
        node.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def ask(url: str, auth: dict[str, str], method: str = "GET", **headers: str) -> Answer:
    async with (
        aiohttp.ClientSession(skip_auto_headers=("Accept",)) as s,
        s.request(method, url, headers={**auth, **headers}) as r,
    ):
        return Answer(r.status, {k: r.headers[k] for k in r.headers}, await r.read())


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {within:.0f}s")


def pushed(setup: Setup, ref: str = "v1", layers: int = 1) -> tuple[str, object, dict[str, str]]:
    repo, m = repo_name("cache"), image(layers)
    asyncio.run(push_to(setup.node.url, repo, m, ref))
    return repo, m, bearer(setup.node.url, f"repository:{repo}:pull")


async def cached(router: str, path: str, auth: dict[str, str], **headers: str) -> Answer:
    """GET through the router until it answers from its cache."""
    got: list[Answer] = []

    async def hit() -> bool:
        got.append(await ask(router + path, auth, **headers))
        return got[-1].headers.get("X-Meridian-Cache") == "hit"

    await until(hit, f"{path} answered from the router's cache")
    return got[-1]


def test_cached_answer_is_the_nodes_byte_for_byte(setup: Setup) -> None:
    repo, m, auth = pushed(setup)

    async def go() -> None:
        for ref in ("v1", m.digest):
            path = f"/v2/{repo}/manifests/{ref}"
            direct = await ask(setup.node.url + path, auth)
            hit = await cached(setup.router.url, path, auth)
            assert direct.status == hit.status == 200
            assert hit.body == direct.body == m.body
            for h in HEADERS:
                assert hit.headers.get(h) == direct.headers.get(h), (ref, h)
            # HEAD: the same headers, no body.
            dh = await ask(setup.node.url + path, auth, "HEAD")
            rh = await ask(setup.router.url + path, auth, "HEAD")
            assert rh.headers.get("X-Meridian-Cache") == "hit"
            assert (rh.status, rh.body) == (dh.status, dh.body) == (200, b"")
            for h in HEADERS:
                assert rh.headers.get(h) == dh.headers.get(h), (ref, "HEAD", h)
            # An Accept that takes the type: answered; one that does not: the node's 404.
            ok = await ask(setup.router.url + path, auth, Accept=m.media_type)
            assert ok.headers.get("X-Meridian-Cache") == "hit" and ok.body == m.body
            no = await ask(setup.router.url + path, auth, Accept="text/plain")
            nd = await ask(setup.node.url + path, auth, Accept="text/plain")
            assert no.status == nd.status == 404 and "X-Meridian-Cache" not in no.headers
            assert no.body == nd.body

    asyncio.run(go())


def test_blob_head_is_the_nodes(setup: Setup) -> None:
    """A blob HEAD from the router's namespace: the node's headers; with no
    token, a Range or for a blob not in the repository: the node's answer."""
    repo, m, auth = pushed(setup, layers=2)
    names = HEADERS + ("Accept-Ranges", "Cache-Control")

    async def go() -> None:
        for b in m.blobs:
            path = f"/v2/{repo}/blobs/{digest(b)}"
            direct = await ask(setup.node.url + path, auth, "HEAD")
            hit = await ask(setup.router.url + path, auth, "HEAD")
            assert hit.headers.get("X-Meridian-Cache") == "hit"
            assert (hit.status, hit.body) == (direct.status, direct.body) == (200, b"")
            assert hit.headers["Content-Length"] == str(len(b))
            for h in names:
                assert hit.headers.get(h) == direct.headers.get(h), h
            ranged = await ask(setup.router.url + path, auth, "HEAD", Range="bytes=0-0")
            assert ranged.status == 206 and "X-Meridian-Cache" not in ranged.headers
            none = await ask(setup.router.url + path, {}, "HEAD")
            assert none.status == 401 and "X-Meridian-Cache" not in none.headers
        other = repo_name("other")
        blob_path = f"/v2/{other}/blobs/{digest(m.blobs[0])}"
        elsewhere = await ask(
            setup.router.url + blob_path, bearer(setup.node.url, f"repository:{other}:pull"), "HEAD"
        )
        assert elsewhere.status == 404 and "X-Meridian-Cache" not in elsewhere.headers

    asyncio.run(go())


def test_refusals_are_the_nodes(setup: Setup) -> None:
    """Without a token, with a token for another repository, with a read
    lock or outside the registry's networks: the node's answer, never the
    cached manifest."""
    repo, m, auth = pushed(setup)
    path = f"/v2/{repo}/manifests/v1"
    router, node = setup.router.url, setup.node.url

    async def go() -> None:
        await cached(router, path, auth)
        none = await ask(router + path, {})
        assert none.status == 401 and "X-Meridian-Cache" not in none.headers
        assert f'realm="{router}/oauth2/token"' in none.headers["WWW-Authenticate"]
        assert f'scope="repository:{repo}:pull"' in none.headers["WWW-Authenticate"]
        other = bearer(node, f"repository:{repo_name('other')}:pull")
        wrong = await ask(router + path, other)
        assert wrong.status == 401 and "insufficient_scope" in wrong.headers["WWW-Authenticate"]
        forged = {"Authorization": auth["Authorization"][:-4] + "AAAA"}
        bad = await ask(router + path, forged)
        assert bad.status == 401 and m.body not in bad.body

        # A read lock on the tag: 403 DENIED, from the router as from the node.
        q = f"/registries/default/manifest?repository={repo}&reference=v1"
        assert api(setup.node, "PATCH", q, {"read_enabled": False})[0] == 200
        try:

            async def locked() -> bool:
                return (await ask(router + path, auth)).status == 403

            await until(locked, "the read lock seen by the router")
            for _ in range(3):
                r = await ask(router + path, auth)
                assert r.status == 403 and b"DENIED" in r.body and r.body != m.body
        finally:
            assert api(setup.node, "PATCH", q, {"read_enabled": True})[0] == 200
        await cached(router, path, auth)

        # Network rules: only 10.9.9.0/24 may pull; this client is 127.0.0.1.
        s = "/registries/default/settings"
        rules = {"public_access": False, "allowed_cidrs": ["10.9.9.0/24"]}
        status, doc = api(setup.node, "PATCH", s, rules)
        assert status == 200, doc
        try:

            async def walled() -> bool:
                return (await ask(router + path, auth)).status == 403

            await until(walled, "the network rule seen by the router")
            r = await ask(router + path, auth)
            assert r.status == 403 and "X-Meridian-Cache" not in r.headers
        finally:
            assert api(setup.node, "PATCH", s, {"public_access": True})[0] == 200
        await cached(router, path, auth)

    asyncio.run(go())


def test_moved_tag_and_deleted_manifest_are_seen(setup: Setup) -> None:
    repo, m, auth = pushed(setup)
    path = f"/v2/{repo}/manifests/v1"
    router = setup.router.url
    m2 = image(2)

    async def go() -> None:
        first = await cached(router, path, auth)
        assert first.headers["Docker-Content-Digest"] == m.digest
        await push_to(setup.node.url, repo, m2, "v1")  # the tag moves

        async def moved() -> bool:
            r = await ask(router + path, auth)
            return r.status == 200 and r.headers["Docker-Content-Digest"] == m2.digest

        await until(moved, "the moved tag seen by the router")
        hit = await cached(router, path, auth)
        assert hit.body == m2.body

        by_digest = f"/v2/{repo}/manifests/{m.digest}"
        await cached(router, by_digest, auth)
        delete = bearer(setup.node.url, f"repository:{repo}:delete")
        gone = await ask(setup.node.url + by_digest, delete, "DELETE")
        assert gone.status == 202, gone

        async def deleted() -> bool:
            return (await ask(router + by_digest, auth)).status == 404

        await until(deleted, "the delete seen by the router")
        for method in ("GET", "HEAD", "GET"):
            r = await ask(router + by_digest, auth, method)
            assert r.status == 404 and m.body not in r.body, method

    asyncio.run(go())


def test_pulls_answered_by_the_router_are_counted(setup: Setup) -> None:
    """In the usage records of the region answered for, and as pull audit
    records (identity, source, repository, count)."""
    repo, m, auth = pushed(setup)
    path = f"/v2/{repo}/manifests/v1"

    def audited() -> tuple[int, list[dict]]:
        status, doc = api(setup.node, "GET", "/registries/default/audit?action=pull")
        assert status == 200, doc
        recs = [r for r in doc["records"] if r.get("repository") == repo]
        return sum(r["count"] for r in recs), recs

    def pulls() -> int:
        status, doc = api(setup.node, "GET", "/registries/default/usage")
        assert status == 200, doc
        return sum(r["pulls"] for r in doc["regions"] if r["region"] == "solo")

    async def go() -> None:
        await cached(setup.router.url, path, auth)
        await asyncio.sleep(1.0)  # earlier pulls flushed (node and router every 0.3 s)

        async def settled() -> bool:
            a = pulls()
            await asyncio.sleep(0.8)
            return pulls() == a

        await until(settled, "usage settled")
        before = pulls()
        for _ in range(7):
            r = await ask(setup.router.url + path, auth)
            assert r.headers.get("X-Meridian-Cache") == "hit" and r.body == m.body
            assert r.headers["X-Meridian-Region"] == "solo"

        async def counted() -> bool:
            return pulls() == before + 7

        await until(counted, "7 cached pulls in the usage records")

        async def in_audit() -> bool:
            n, recs = audited()
            return n >= 7 and any(r["node"].startswith("router-") for r in recs)

        await until(in_audit, "the cached pulls in the audit records")
        n, recs = audited()
        mine = [r for r in recs if r["node"].startswith("router-")]
        assert sum(r["count"] for r in mine) >= 7, recs
        for r in mine:
            assert (r["identity"], r["source"], r["region"]) == ("owner", "127.0.0.1", "solo")

    asyncio.run(go())


def _misses(router: str) -> float:
    """The router's manifest cache misses so far (its /metrics)."""
    with urllib.request.urlopen(router + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('meridian_router_manifest_cache_total{result="miss"}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_concurrent_misses_share_one_fetch(setup: Setup) -> None:
    """GETs of a manifest the router knows of but has no bytes for yet (an
    image pushed an instant ago, as a rollout right after a push asks for
    it), all at once: one is proxied, the others wait for its bytes and are
    answered from the cache -- each the node's bytes."""
    repo, m, auth = pushed(setup)
    path = f"/v2/{repo}/manifests/v1"

    async def go() -> None:
        async def known() -> bool:  # the router's namespace has the record (HEAD needs no bytes)
            r = await ask(setup.router.url + path, auth, "HEAD")
            return r.headers.get("X-Meridian-Cache") == "hit"

        await until(known, "the manifest record in the router's namespace")
        before = await asyncio.to_thread(_misses, setup.router.url)
        answers = await asyncio.gather(*(ask(setup.router.url + path, auth) for _ in range(12)))
        assert all(a.status == 200 and a.body == m.body for a in answers), answers
        hits = [a for a in answers if a.headers.get("X-Meridian-Cache") == "hit"]
        assert len(hits) == 11, [a.headers.get("X-Meridian-Cache") for a in answers]
        assert await asyncio.to_thread(_misses, setup.router.url) == before + 1

    asyncio.run(go())


def test_cache_off_proxies_every_manifest(setup: Setup, etcd: EtcdServer, tmp_path: Path) -> None:
    repo, m, auth = pushed(setup)
    off = RouterProcess(etcd.client_url, tmp_path, ("--manifest-cache", "0")).start()
    try:
        off.wait_for(lambda st: any(r["up"] for r in st["regions"]), "the node in rotation")

        async def go() -> None:
            for _ in range(3):
                r = await ask(off.url + f"/v2/{repo}/manifests/v1", auth)
                assert r.status == 200 and r.body == m.body
                assert "X-Meridian-Cache" not in r.headers

        asyncio.run(go())
    finally:
        off.stop()


def test_byte_cache_is_bounded_and_verified() -> None:
    """Only bytes that hash to their digest and fit get in; least recently
    used out first past the budget."""
    from cluster.namespace import ManifestRecord
    from cluster.router.cache import ITEM_MAX, ManifestBytes

    def rec(body: bytes) -> ManifestRecord:
        return ManifestRecord(digest(body), "application/vnd.oci.image.manifest.v1+json", len(body))

    bodies = [bytes([i]) * 400 for i in range(4)]
    c = ManifestBytes(1000)
    assert c.put(rec(bodies[0]), bodies[0]) and c.put(rec(bodies[1]), bodies[1])
    assert c.get(digest(bodies[0])) is not None  # 0 is now the most recent
    assert c.put(rec(bodies[2]), bodies[2])  # over 1000 bytes: 1 goes
    assert c.get(digest(bodies[1])) is None and c.used == 800
    assert [c.get(digest(b)).body for b in bodies[:3:2]] == [bodies[0], bodies[2]]
    assert not c.put(rec(bodies[3]), bodies[0])  # not the bytes of that digest
    assert c.get(digest(bodies[3])) is None
    big = b"x" * (ITEM_MAX + 1)
    assert not ManifestBytes(10 * ITEM_MAX).put(rec(big), big)
    assert not ManifestBytes(0).put(rec(bodies[0]), bodies[0])
