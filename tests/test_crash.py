"""Nothing acknowledged is lost, nothing partial is visible: SIGKILL a node
while uploads and pushes are in flight, restart it on the same data dir.

- ``test_sigkill_mid_uploads``: monolithic 20-28 MB uploads streamed slowly
  (POST then PUT ``?digest=``, and single ``POST ?digest=``), chunked uploads
  (some idle after acknowledged PATCHes, one PATCHing when the kill lands)
  and concurrent image/index pushes; the kill lands at a different point of
  the monolithic streams in each of 5 iterations, all on one data dir. After
  each restart: every blob is absent or whole and hashes to its digest, every
  acknowledged blob, manifest and tag (of every iteration so far) is there
  byte for byte, upload sessions resume from the offset the node reports,
  and the blob store holds no temporary leftovers.
- ``test_sigkill_mid_skopeo_copy``: skopeo pushes a multi-layer image through
  a throttling TCP proxy; the node dies after a given share of the bytes;
  after a restart the same ``skopeo copy`` succeeds and the image verifies.
- ``test_upload_dirs_left_by_a_crash_are_purged``: the upload-session dirs a
  kill can leave behind (bytes already renamed into the blob store, or the
  session half-created) are removed by the TTL purge like any abandoned one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urljoin

import aiohttp
import pytest

from tests import images as im
from tests.oci import owner_auth
from tests.procs import NodeProcess, require_tool, with_creds

pytestmark = pytest.mark.timeout(240)

MB = 1 << 20
MONO_RATE = 14 * MB  # bytes/s per slow monolithic stream
CHUNK = 1 * MB
PIECE = 64 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class KilledError(Exception):
    """A request failed because the node was killed under it."""


# -- bookkeeping -----------------------------------------------------------------


@dataclass
class Ledger:
    """What was attempted and what the node acknowledged (a 2xx received)."""

    attempted: dict[tuple[str, str], int] = field(default_factory=dict)
    blobs: dict[tuple[str, str], int] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)

    def attempt(self, repo: str, digest: str, size: int) -> None:
        self.attempted[(repo, digest)] = size

    def ack_blob(self, repo: str, digest: str, size: int) -> None:
        self.attempted[(repo, digest)] = size
        self.blobs[(repo, digest)] = size


@dataclass
class Session:
    """One upload session the client knows the URL of."""

    name: str
    repo: str
    data: bytes
    location: str = ""
    acked: int = 0  # bytes the node acknowledged (202 to a PATCH)
    sent: int = 0  # bytes handed to the connection (acked or in flight)
    in_flight: bool = False  # a request carrying bytes was open at the kill
    finishing: bool = False  # the final PUT was open at the kill
    done: bool = False  # 201 received

    @property
    def digest(self) -> str:
        return sha(self.data)


# -- a small async client ----------------------------------------------------------


class Client:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base.rstrip("/")
        self.s = session

    def abs(self, location: str) -> str:
        return urljoin(self.base + "/", location)

    @staticmethod
    def with_query(url: str, **q: str) -> str:
        return url + ("&" if "?" in url else "?") + urlencode(q)

    async def start(self, repo: str) -> str:
        async with self.s.post(f"{self.base}/v2/{repo}/blobs/uploads/") as r:
            assert r.status == 202, await r.text()
            return self.abs(r.headers["Location"])

    async def patch(self, location: str, offset: int, body, length: int) -> tuple[int, dict]:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + length - 1}",
            "Content-Length": str(length),
        }
        async with self.s.patch(location, data=body, headers=headers) as r:
            await r.read()
            return r.status, dict(r.headers)

    async def put(self, location: str, digest: str, body=None, length: int = 0) -> tuple[int, str]:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        async with self.s.put(
            self.with_query(location, digest=digest), data=body or b"", headers=headers
        ) as r:
            return r.status, await r.text()

    async def post_monolithic(self, repo: str, digest: str, body, length: int) -> tuple[int, str]:
        url = self.with_query(f"{self.base}/v2/{repo}/blobs/uploads/", digest=digest)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        async with self.s.post(url, data=body, headers=headers) as r:
            return r.status, await r.text()

    async def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> int:
        async with self.s.put(
            f"{self.base}/v2/{repo}/manifests/{ref}",
            data=body,
            headers={"Content-Type": media_type},
        ) as r:
            text = await r.text()
            assert r.status == 201, f"PUT manifest {repo}:{ref}: {r.status} {text}"
            assert r.headers["Docker-Content-Digest"] == sha(body)
            return r.status

    async def status(self, location: str) -> tuple[int, dict]:
        async with self.s.get(location) as r:
            await r.read()
            return r.status, dict(r.headers)

    async def head_blob(self, repo: str, digest: str) -> tuple[int, dict]:
        async with self.s.head(f"{self.base}/v2/{repo}/blobs/{digest}") as r:
            return r.status, dict(r.headers)

    async def get_blob(self, repo: str, digest: str) -> bytes:
        async with self.s.get(f"{self.base}/v2/{repo}/blobs/{digest}") as r:
            body = await r.read()
            assert r.status == 200, f"GET blob {repo}@{digest}: {r.status}"
            return body

    async def get_manifest(self, repo: str, ref: str) -> tuple[int, bytes, dict]:
        async with self.s.get(
            f"{self.base}/v2/{repo}/manifests/{ref}", headers={"Accept": im.ACCEPT}
        ) as r:
            return r.status, await r.read(), dict(r.headers)

    async def tags(self, repo: str) -> list[str]:
        async with self.s.get(f"{self.base}/v2/{repo}/tags/list") as r:
            assert r.status == 200, await r.text()
            return list((await r.json())["tags"])


async def slow_body(
    data: bytes, rate: float, progress: Session, start: int = 0, end: int | None = None
):
    """Yield ``data[start:end]`` in pieces at about ``rate`` bytes/s, counting
    in ``progress.sent`` the offset handed over so far."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    off = start
    end = len(data) if end is None else end
    while off < end:
        piece = data[off : min(off + PIECE, end)]
        yield piece
        off += len(piece)
        progress.sent = off
        delay = t0 + (off - start) / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


def parse_range(headers: dict) -> int:
    """Bytes held by an upload session, from its ``Range: 0-<last>``."""
    m = re.fullmatch(r"(?:bytes=)?0-(\d+)", headers.get("Range", ""))
    assert m, f"bad Range header {headers.get('Range')!r}"
    return int(m.group(1)) + 1


# -- the workloads -------------------------------------------------------------------


async def mono_post_put(c: Client, sess: Session, ledger: Ledger) -> None:
    """POST, then one PUT ?digest= carrying the whole body, slowly."""
    ledger.attempt(sess.repo, sess.digest, len(sess.data))
    sess.location = await c.start(sess.repo)
    sess.in_flight = sess.finishing = True
    status, text = await c.put(
        sess.location, sess.digest, slow_body(sess.data, MONO_RATE, sess), len(sess.data)
    )
    assert status == 201, f"{sess.name}: {status} {text}"
    sess.in_flight = sess.finishing = False
    sess.done = True
    sess.acked = len(sess.data)
    ledger.ack_blob(sess.repo, sess.digest, len(sess.data))


async def mono_single_post(c: Client, sess: Session, ledger: Ledger) -> None:
    """One POST ?digest= carrying the whole body, slowly."""
    ledger.attempt(sess.repo, sess.digest, len(sess.data))
    sess.in_flight = True
    status, text = await c.post_monolithic(
        sess.repo, sess.digest, slow_body(sess.data, MONO_RATE, sess), len(sess.data)
    )
    assert status == 201, f"{sess.name}: {status} {text}"
    sess.in_flight = False
    sess.done = True
    sess.acked = len(sess.data)
    ledger.ack_blob(sess.repo, sess.digest, len(sess.data))


async def chunked(
    c: Client,
    sess: Session,
    ledger: Ledger,
    *,
    stop_after: int | None,
    rate: float | None = None,
) -> None:
    """POST, then PATCH 1 MiB chunks. ``stop_after``: go idle after that many
    acknowledged chunks (the session then waits to be resumed); None: PATCH
    everything (at ``rate`` if given) and PUT ?digest=."""
    ledger.attempt(sess.repo, sess.digest, len(sess.data))
    sess.location = await c.start(sess.repo)
    n = 0
    while sess.acked < len(sess.data):
        if stop_after is not None and n >= stop_after:
            return
        chunk = sess.data[sess.acked : sess.acked + CHUNK]
        end = sess.acked + len(chunk)
        sess.sent = end
        body = chunk if rate is None else slow_body(sess.data, rate, sess, sess.acked, end)
        sess.in_flight = True
        status, headers = await c.patch(sess.location, sess.acked, body, len(chunk))
        assert status == 202, f"{sess.name}: PATCH at {sess.acked}: {status}"
        sess.in_flight = False
        assert parse_range(headers) == sess.acked + len(chunk)
        sess.acked += len(chunk)
        sess.location = c.abs(headers["Location"])
        n += 1
    sess.finishing = True
    status, text = await c.put(sess.location, sess.digest)
    assert status == 201, f"{sess.name}: PUT: {status} {text}"
    sess.finishing = False
    sess.done = True
    ledger.ack_blob(sess.repo, sess.digest, len(sess.data))


async def pusher(c: Client, repo: str, worker: int, ledger: Ledger, seed: str) -> None:
    """Push small images (and now and then an index over the last two) under
    fresh tags, one after another, until the node dies."""
    rng = random.Random(seed)
    recent: list[im.Image] = []
    n = 0
    while True:
        img = im.build_image([rng.randint(1_000, 48_000)], seed=rng.getrandbits(64))
        for b in img.blobs():
            ledger.attempt(repo, b.digest, b.size)
            status, text = await c.post_monolithic(repo, b.digest, b.data, b.size)
            assert status == 201, f"blob {b.digest}: {status} {text}"
            ledger.ack_blob(repo, b.digest, b.size)
        tag = f"w{worker}-{n}"
        await c.put_manifest(repo, tag, img.manifest, img.media_type)
        ledger.manifests[(repo, img.digest)] = (img.manifest, img.media_type)
        ledger.tags[(repo, tag)] = img.digest
        recent = [*recent[-1:], img]
        if n % 3 == 2 and len(recent) == 2:
            body = im.canonical(
                {
                    "schemaVersion": 2,
                    "mediaType": im.OCI_INDEX,
                    "manifests": [i.descriptor() for i in recent],
                }
            )
            itag = f"w{worker}-{n}-index"
            await c.put_manifest(repo, itag, body, im.OCI_INDEX)
            ledger.manifests[(repo, sha(body))] = (body, im.OCI_INDEX)
            ledger.tags[(repo, itag)] = sha(body)
        n += 1
        await asyncio.sleep(0.01)


# -- checks after a restart ------------------------------------------------------------


def check_store(data: Path, seen: set[Path]) -> None:
    """No temporary leftovers; every file in the blob store is a whole blob
    (it hashes to its name) at its canonical path."""
    tmp = data / "tmp"  # the nodes' own subdirectories (tmp/<node-id>/) may stay
    leftovers = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir())
    assert leftovers == [], f"blob store tmp/ holds leftovers after restart: {leftovers}"
    for p in (data / "blobs").rglob("*"):
        if p.is_dir() or p in seen:
            continue
        rel = p.relative_to(data / "blobs").parts
        assert (
            len(rel) == 3
            and rel[0] == "sha256"
            and re.fullmatch(r"[0-9a-f]{64}", rel[2])
            and rel[1] == rel[2][:2]
        ), f"unexpected file in the blob store: {p}"
        assert im.file_sha256(p) == rel[2], f"partial or corrupt blob visible: {p}"
        seen.add(p)


async def check_nothing_lost(c: Client, ledger: Ledger, verified: set[tuple[str, str]]) -> None:
    for (repo, digest), size in ledger.attempted.items():
        status, headers = await c.head_blob(repo, digest)
        acked = (repo, digest) in ledger.blobs
        assert status in (200, 404), f"HEAD {repo}@{digest}: {status}"
        if acked:
            assert status == 200, f"acknowledged blob {repo}@{digest} lost after SIGKILL"
        if status == 200:
            assert int(headers["Content-Length"]) == size, f"{digest}: partial size visible"
            if (repo, digest) not in verified:
                data = await c.get_blob(repo, digest)
                assert len(data) == size and sha(data) == digest, f"{digest}: bad bytes"
                verified.add((repo, digest))
    for (repo, digest), (body, media_type) in ledger.manifests.items():
        status, got, headers = await c.get_manifest(repo, digest)
        assert status == 200, f"acknowledged manifest {repo}@{digest} lost: {status}"
        assert got == body and headers["Content-Type"] == media_type
        assert headers["Docker-Content-Digest"] == digest
    by_repo: dict[str, set[str]] = {}
    for (repo, tag), digest in ledger.tags.items():
        status, got, headers = await c.get_manifest(repo, tag)
        assert status == 200, f"acknowledged tag {repo}:{tag} lost: {status}"
        assert headers["Docker-Content-Digest"] == digest and sha(got) == digest
        by_repo.setdefault(repo, set()).add(tag)
    for repo, tags in by_repo.items():
        missing = tags - set(await c.tags(repo))
        assert not missing, f"tags/list of {repo} lacks acknowledged tags {sorted(missing)}"


async def resume(c: Client, sess: Session, ledger: Ledger) -> None:
    """Resume an upload session after the restart as a client would: GET its
    status, PATCH from the offset the node reports, PUT ?digest=."""
    status, headers = await c.status(sess.location)
    if status == 404:
        # Only possible if the final PUT was under way: the node may have
        # moved the bytes into place (then the blob is whole) or not.
        assert sess.finishing and sess.sent >= len(sess.data), (
            f"{sess.name}: upload session lost after restart although its final PUT "
            f"was not under way with every byte sent ({sess.sent}/{len(sess.data)})"
        )
        return
    assert status == 204, f"{sess.name}: GET upload status: {status}"
    held = parse_range(headers)
    print(f"resume {sess.name}: node holds {held}, acked {sess.acked}, sent {sess.sent}")
    if held == 1 and headers["Range"].endswith("-0"):
        held = 0 if sess.acked == 0 else held  # "0-0" means 0 or 1 byte
    if sess.in_flight:
        # A request was cut: the node may hold more than it acknowledged.
        assert sess.acked <= held <= max(sess.sent, sess.acked), (
            f"{sess.name}: node holds {held}, acked {sess.acked}, sent {sess.sent}"
        )
    else:
        assert held == sess.acked, (
            f"{sess.name}: after restart the session holds {held} bytes, "
            f"{sess.acked} were acknowledged"
        )
    location = c.abs(headers["Location"])
    offset = held
    while offset < len(sess.data):
        chunk = sess.data[offset : offset + 4 * MB]
        status, headers = await c.patch(location, offset, chunk, len(chunk))
        if status == 416 and offset == 0:  # it held 1 byte after all
            offset = parse_range(headers)
            continue
        assert status == 202, f"{sess.name}: resume PATCH at {offset}: {status}"
        offset += len(chunk)
        assert parse_range(headers) == offset
        location = c.abs(headers["Location"])
    status, text = await c.put(location, sess.digest)
    assert status == 201, f"{sess.name}: resumed PUT: {status} {text}"
    ledger.ack_blob(sess.repo, sess.digest, len(sess.data))
    assert sha(await c.get_blob(sess.repo, sess.digest)) == sess.digest
    sess.done = True


# -- the tests ---------------------------------------------------------------------


KILL_POINTS = (0.12, 0.3, 0.5, 0.7, 0.9)  # share of the monolithic bytes sent


TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


async def crash_once(
    node: NodeProcess,
    it: int,
    point: float,
    ledger: Ledger,
    verified: set[tuple[str, str]],
    seen: set[Path],
) -> None:
    """One round: start the workload, SIGKILL the node once the slow
    monolithic streams have sent ``point`` of their bytes, restart, check."""
    repo = f"crash/it{it}"
    rng = random.Random(f"crash-{it}")
    mono_a = Session("mono-post-put", repo, rng.randbytes(rng.randint(20, 28) * MB))
    mono_b = Session("mono-single-post", repo, rng.randbytes(rng.randint(20, 28) * MB))
    idle3 = Session("chunked-idle-3", repo, rng.randbytes(6 * MB + 12345))
    idle1 = Session("chunked-idle-1", repo, rng.randbytes(3 * MB + 1))
    active = Session("chunked-active", repo, rng.randbytes(8 * MB + 777))
    mono_total = len(mono_a.data) + len(mono_b.data)

    def ready() -> bool:
        # Pushes acknowledged in this round too, so the kill tests them.
        return (
            (mono_a.sent + mono_b.sent) >= point * mono_total
            and idle3.acked == 3 * CHUNK
            and idle1.acked == CHUNK
            and len(ledger.manifests) >= 2 * (it + 1)
        )

    async with aiohttp.ClientSession(timeout=TIMEOUT, middlewares=(owner_auth(),)) as http:
        c = Client(node.url, http)
        tasks = {
            asyncio.create_task(mono_post_put(c, mono_a, ledger)): "mono_a",
            asyncio.create_task(mono_single_post(c, mono_b, ledger)): "mono_b",
            asyncio.create_task(chunked(c, idle3, ledger, stop_after=3)): "idle3",
            asyncio.create_task(chunked(c, idle1, ledger, stop_after=1)): "idle1",
            asyncio.create_task(chunked(c, active, ledger, stop_after=None, rate=3 * MB)): "active",
            asyncio.create_task(pusher(c, repo, 0, ledger, f"p0-{it}")): "pusher0",
            asyncio.create_task(pusher(c, repo, 1, ledger, f"p1-{it}")): "pusher1",
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not ready():
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:  # a genuine error before the kill
                raise failed[0].exception()  # type: ignore[misc]
            assert loop.time() < deadline, "workload never reached the kill point"
            await asyncio.sleep(0.002)
        node.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for name, res in zip(tasks.values(), results, strict=True):
            if name.startswith("pusher"):
                assert isinstance(res, Exception), f"{name} outlived the node"
            if isinstance(res, AssertionError):
                raise res  # a wrong answer before the kill, not a dead node
        for sess in (mono_a, mono_b, idle3, idle1, active):
            print(
                f"it{it} kill@{point}: {sess.name}: size={len(sess.data)} sent={sess.sent} "
                f"acked={sess.acked} in_flight={sess.in_flight} finishing={sess.finishing} "
                f"done={sess.done}"
            )
        print(f"it{it}: {len(ledger.manifests)} manifests, {len(ledger.blobs)} blobs acked")
        # The kill landed mid-stream: neither monolithic upload finished.
        assert not mono_a.done and not mono_b.done
        assert mono_a.sent < len(mono_a.data) or mono_b.sent < len(mono_b.data)

    node.start()
    check_store(node.data, seen)
    async with aiohttp.ClientSession(timeout=TIMEOUT, middlewares=(owner_auth(),)) as http:
        c = Client(node.url, http)
        await check_nothing_lost(c, ledger, verified)
        # Half-sent monolithic blobs cannot be visible: not all bytes left.
        for s in (mono_a, mono_b):
            if s.sent < len(s.data):
                status, _ = await c.head_blob(repo, s.digest)
                assert status == 404, f"{s.name}: a partial blob is visible"
        for s in (idle3, idle1, active, mono_a):
            if not s.done:
                await resume(c, s, ledger)
        # The single-POST upload has no session URL: upload it anew.
        if not mono_b.done:
            status, text = await c.post_monolithic(
                repo, mono_b.digest, mono_b.data, len(mono_b.data)
            )
            assert status == 201, text
            ledger.ack_blob(repo, mono_b.digest, len(mono_b.data))
        await check_nothing_lost(c, ledger, verified)
    check_store(node.data, seen)


async def test_sigkill_mid_uploads(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data").start()
    ledger = Ledger()
    verified: set[tuple[str, str]] = set()
    seen: set[Path] = set()
    try:
        for it, point in enumerate(KILL_POINTS):
            await crash_once(node, it, point, ledger, verified, seen)
    finally:
        node.stop()


class ThrottleProxy:
    """A TCP proxy on loopback that limits client-to-server bytes (all
    connections together) to ``rate`` bytes/s and counts them."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.sent = 0
        self.t0 = 0.0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ThrottleProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def reset(self) -> None:
        self.sent = 0
        self.t0 = asyncio.get_running_loop().time()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        loop = asyncio.get_running_loop()

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await r.read(PIECE):
                    if up:
                        self.sent += len(data)
                        delay = self.t0 + self.sent / self.rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, uwriter, True), pipe(ureader, writer, False))


async def run_skopeo(*args: str) -> tuple[int, str]:
    exe = require_tool("skopeo")
    p = await asyncio.create_subprocess_exec(
        exe,
        "--insecure-policy",
        *with_creds(args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(p.communicate(), 180)
    return p.returncode or 0, out.decode(errors="replace")


async def test_sigkill_mid_skopeo_copy(tmp_path: Path) -> None:
    require_tool("skopeo")
    node = NodeProcess(tmp_path / "data").start()
    proxy = await ThrottleProxy(node.port, rate=16 * MB).start()
    seen: set[Path] = set()
    try:
        for it, point in enumerate((0.05, 0.45, 0.9)):
            img = im.build_image([6 * MB, 5 * MB, 4 * MB, 3 * MB, 100_000], seed=f"skopeo-{it}")
            src = im.write_layout(tmp_path / f"src{it}", {"v1": img})
            repo = f"crash/skopeo{it}"
            proxy.reset()
            copy = asyncio.create_task(
                run_skopeo(
                    "copy",
                    "--dest-tls-verify=false",
                    f"oci:{src}:v1",
                    f"docker://127.0.0.1:{proxy.port}/{repo}:v1",
                )
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while proxy.sent < point * img.total_bytes:
                assert not copy.done(), f"skopeo ended before the kill: {copy.result()}"
                assert loop.time() < deadline, "skopeo made no progress"
                await asyncio.sleep(0.002)
            node.kill()
            rc, out = await copy
            assert rc != 0, f"skopeo copy succeeded although the node died mid-way:\n{out}"
            print(f"skopeo killed at {proxy.sent}/{img.total_bytes} bytes:\n{out[-600:]}")

            node.start()
            check_store(node.data, seen)
            reg = im.Registry(node.url)
            status, _, _ = reg.request("GET", f"/v2/{repo}/manifests/v1")
            assert status == 404, "the manifest exists although its push was cut"
            for b in img.blobs():  # whatever is visible is whole
                status, hdrs, _ = reg.request("HEAD", f"/v2/{repo}/blobs/{b.digest}")
                assert status == 404 or int(hdrs["Content-Length"]) == b.size

            rc, out = await run_skopeo(
                "copy",
                "--dest-tls-verify=false",
                f"oci:{src}:v1",
                f"docker://{node.hostport}/{repo}:v1",
            )
            assert rc == 0, f"skopeo copy after restart failed:\n{out}"
            body, ctype, dcd = reg.get_manifest(repo, "v1")
            assert body == img.manifest and dcd == img.digest and ctype == im.OCI_MANIFEST
            for b in img.blobs():
                assert sha(reg.get_blob(repo, b.digest)) == b.digest
            out_dir = tmp_path / f"out{it}"
            rc, out = await run_skopeo(
                "copy",
                "--src-tls-verify=false",
                f"docker://{node.hostport}/{repo}:v1",
                f"oci:{out_dir}:v1",
            )
            assert rc == 0, out
            lay = im.read_layout(out_dir)
            ref = lay.ref("v1")
            assert ref.digest == img.digest and ref.body == img.manifest
            assert set(lay.walk(ref)) == {img.digest, *(b.digest for b in img.blobs())}
            check_store(node.data, seen)
    finally:
        await proxy.close()
        node.stop()


def test_store_layout_helpers_catch_a_partial_blob(tmp_path: Path) -> None:
    """``check_store`` itself must notice a truncated blob or a leftover."""
    data = tmp_path / "data"
    blob = os.urandom(1000)
    hexd = hashlib.sha256(blob).hexdigest()
    (data / "blobs" / "sha256" / hexd[:2]).mkdir(parents=True)
    (data / "tmp").mkdir()
    (data / "blobs" / "sha256" / hexd[:2] / hexd).write_bytes(blob[:500])
    with pytest.raises(AssertionError, match="partial or corrupt"):
        check_store(data, set())
    (data / "blobs" / "sha256" / hexd[:2] / hexd).write_bytes(blob)
    check_store(data, set())
    (data / "tmp" / "abc").write_bytes(b"x")
    with pytest.raises(AssertionError, match="leftovers"):
        check_store(data, set())


def test_upload_dirs_left_by_a_crash_are_purged(tmp_path: Path) -> None:
    """What a SIGKILL can leave in ``uploads/`` is removed once it is older
    than the upload TTL: a session whose bytes were already renamed into the
    blob store (killed between the rename and the clean-up), one killed while
    being created (no ``data`` yet), and a plain abandoned session."""
    data = tmp_path / "data"
    old = 3600.0
    made = {}
    for kind, files in {
        "renamed-away": {"info.json": b'{"registry": "default", "repo": "r", "started": 1}'},
        "half-created": {},
        "abandoned": {
            "info.json": b'{"registry": "default", "repo": "r", "started": 1}',
            "data": b"x" * 100,
        },
    }.items():
        d = data / "uploads" / str(uuid.uuid4())
        d.mkdir(parents=True)
        for name, body in files.items():
            (d / name).write_bytes(body)
        for p in [*d.iterdir(), d]:
            t = os.stat(p).st_mtime - old
            os.utime(p, (t, t))
        made[kind] = d
    node = NodeProcess(data, extra=["--upload-ttl", "60"]).start()
    try:
        deadline = time.monotonic() + 15
        while made["abandoned"].exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not made["abandoned"].exists(), "the purge never ran"
        time.sleep(0.5)
        left = sorted(kind for kind, d in made.items() if d.exists())
        assert left == [], f"upload dirs older than the TTL never purged: {left}"
    finally:
        node.stop()
