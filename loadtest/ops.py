"""The client operations a worker process runs (see :mod:`loadtest.workers`).

Each operation is ``async def op(w: Worker)``: it reads its parameters from
``w.p``, sends requests while ``w.take()`` allows (the step's request count
and deadline), and records every request in ``w.rec`` with the name of what
it did (``pull``, ``push``, ``manifest``, ``head``, ``head-missing``,
``catalog``, ``tags``, ``manifest-put``, ``config``, ``layer``,
``image-pull``, ``image-push``). A request that fails is recorded as failed
(with its reason), never raised: a run always ends with its samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from loadtest.ocipush import (
    MANIFEST_ACCEPT,
    OCI_MANIFEST,
    OciClient,
    OciError,
    TokenAuth,
    image_manifest,
    random_bytes,
    random_image,
    write_oci_layout,
)
from loadtest.workers import NotLoopback, Worker

OPS: dict[str, Callable[[Worker], Awaitable[None]]] = {}
REDIRECTS = (301, 302, 303, 307, 308)
CLIENT_ERRORS = (aiohttp.ClientError, TimeoutError, OciError, NotLoopback, ValueError, OSError)


def op(name: str) -> Callable[[Callable[[Worker], Awaitable[None]]], Callable]:
    def register(fn: Callable[[Worker], Awaitable[None]]) -> Callable:
        OPS[name] = fn
        return fn

    return register


class Failed(Exception):
    pass


async def fetch(
    s: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    keep: bool = False,
) -> tuple[int, int, str, bytes]:
    """One request, following redirects itself: (status, body bytes read,
    region that served it (``X-Meridian-Region``, else ""), body if ``keep``)."""
    region = ""
    for _ in range(5):
        async with s.request(method, url, headers=headers, allow_redirects=False) as r:
            region = r.headers.get("X-Meridian-Region", region)
            if r.status in REDIRECTS and "Location" in r.headers:
                url = urljoin(url, r.headers["Location"])
                await r.release()
                continue
            if keep:
                body = await r.read()
                return r.status, len(body), region, body
            n = 0
            async for chunk in r.content.iter_any():
                n += len(chunk)
            return r.status, n, region, b""
    raise Failed(f"{method} {url}: too many redirects")


async def timed(w: Worker, name: str, coro: Awaitable[int], reraise: bool = False) -> int | None:
    """Run ``coro`` (returns bytes moved, or raises), record it; bytes, or
    None when it failed (or Failed raised, with ``reraise``)."""
    t0 = time.monotonic()
    try:
        n = await coro
    except CLIENT_ERRORS + (Failed,) as e:
        w.rec.add(name, t0, time.monotonic() - t0, 0, ok=False)
        w.rec.error(name, f"{type(e).__name__}: {e}")
        if reraise:
            raise Failed(f"{name}: {e}") from e
        return None
    w.rec.add(name, t0, time.monotonic() - t0, n, ok=True)
    return n


async def _wait_start(w: Worker) -> None:
    delay = w.job.start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _warm(s: aiohttp.ClientSession, url: str, n: int) -> None:
    """Open ``n`` connections before the clock starts (not recorded)."""

    async def one() -> None:
        with contextlib.suppress(*CLIENT_ERRORS):
            async with s.get(url) as r:
                await r.read()

    await asyncio.gather(*(one() for _ in range(n)))


def _v2(w: Worker, path: str) -> str:
    return f"{w.base_url.rstrip('/')}/v2/{path}"


# -- blobs ----------------------------------------------------------------------------


@op("blob_get")
async def blob_get(w: Worker) -> None:
    """GET one blob over and over: ``mode`` ``whole`` (one request) or
    ``ranged`` (consecutive ``Range`` requests of ``chunk`` bytes)."""
    repo, digest, size = w.p["repo"], w.p["digest"], int(w.p["size"])
    mode, chunk = w.p.get("mode", "whole"), int(w.p.get("chunk") or size)
    url = _v2(w, f"{repo}/blobs/{digest}")
    async with w.session() as s:
        await _warm(s, w.base_url + "/v2/", w.job.concurrency)
        await _wait_start(w)

        async def whole() -> int:
            status, n, _, _ = await fetch(s, url)
            if status != 200 or n != size:
                raise Failed(f"GET blob: HTTP {status}, {n} of {size} bytes")
            return n

        async def ranged() -> int:
            got = 0
            for off in range(0, size, chunk):
                end = min(size, off + chunk) - 1
                h = {"Range": f"bytes={off}-{end}"}
                status, n, _, _ = await fetch(s, url, headers=h)
                if status not in (200, 206) or n != end - off + 1:
                    raise Failed(f"GET blob range {off}-{end}: HTTP {status}, {n} bytes")
                got += n
            return got

        async def body(_: int) -> None:
            await timed(w, "pull", whole() if mode == "whole" else ranged())

        await w.loops(body)


class BlobSource:
    """Fresh blobs of one size, cheaply: one random buffer plus a unique
    16-byte tail per blob; the digest continues a copy of the buffer's hash
    state, so making blob *i* costs one copy of the buffer and no hashing of
    it. With ``pool`` > 0 the same ``pool`` blobs come round again (a bounded
    amount of content, for a soak)."""

    def __init__(self, size: int, seed: str, pool: int = 0) -> None:
        self.size = max(size, 17)
        self.base = random_bytes(self.size - 16, seed)
        self.hash = hashlib.sha256(self.base)
        self.seed = seed
        self.pool = pool
        self.i = 0

    def next(self) -> tuple[bytes, str]:
        i = self.i % self.pool if self.pool else self.i
        self.i += 1
        tail = hashlib.md5(f"{self.seed}/{i}".encode()).digest()
        h = self.hash.copy()
        h.update(tail)
        return self.base + tail, "sha256:" + h.hexdigest()


async def _upload(client: OciClient, repo: str, data: bytes, digest: str, w: Worker) -> int:
    mode = w.p.get("mode", "monolithic")
    if mode == "chunked":
        await client.upload_blob_chunked(repo, data, int(w.p.get("chunk") or 5 << 20), digest)
    elif mode == "post":
        await client.upload_blob_monolithic(repo, data, digest)
    else:
        await client.upload_blob(repo, data, digest)
    return len(data)


@op("blob_push")
async def blob_push(w: Worker) -> None:
    """Upload fresh blobs of ``size`` bytes: ``mode`` ``monolithic`` (POST,
    then one PUT with the body), ``post`` (a single POST ``?digest=``) or
    ``chunked`` (POST, PATCH ``chunk`` bytes at a time, PUT)."""
    repo, size = w.p["repo"], int(w.p["size"])
    src = BlobSource(size, f"{w.p.get('seed', 'push')}-w{w.job.worker}", int(w.p.get("pool", 0)))
    async with w.session() as s:
        client = OciClient(w.base_url, s)
        await _warm(s, w.base_url + "/v2/", w.job.concurrency)
        await _wait_start(w)

        async def body(_: int) -> None:
            data, digest = src.next()
            await timed(w, "push", _upload(client, repo, data, digest, w))

        await w.loops(body)


@op("blob_head")
async def blob_head(w: Worker) -> None:
    """HEAD blobs: existing ones (expects 200 and the size) and, a
    ``missing_ratio`` share of the time, digests the registry has never seen
    (expects 404)."""
    repo = w.p["repo"]
    existing = [(d, int(n)) for d, n in w.p["existing"]]
    missing = list(w.p.get("missing", []))
    ratio = float(w.p.get("missing_ratio", 0.0)) if missing else 0.0
    rnd = random.Random(f"head-{w.job.worker}")
    async with w.session() as s:
        await _warm(s, w.base_url + "/v2/", w.job.concurrency)
        await _wait_start(w)

        async def one(digest: str, want: int | None) -> int:
            async with s.head(_v2(w, f"{repo}/blobs/{digest}"), allow_redirects=False) as r:
                await r.release()
                if want is None:
                    if r.status != 404:
                        raise Failed(f"HEAD missing blob: HTTP {r.status}, expected 404")
                elif r.status != 200 or int(r.headers.get("Content-Length", -1)) != want:
                    raise Failed(f"HEAD blob: HTTP {r.status}")
            return 0

        async def body(k: int) -> None:
            if rnd.random() < ratio:
                await timed(w, "head-missing", one(rnd.choice(missing), None))
            else:
                d, n = existing[rnd.randrange(len(existing))]
                await timed(w, "head", one(d, n))

        await w.loops(body)


# -- manifests ----------------------------------------------------------------------


async def _get_manifest(s: aiohttp.ClientSession, url: str, accept: str) -> int:
    status, n, _, _ = await fetch(s, url, headers={"Accept": accept})
    if status != 200 or n == 0:
        raise Failed(f"GET manifest: HTTP {status}")
    return n


@op("manifest_get")
async def manifest_get(w: Worker) -> None:
    """GET manifests by tag (or digest), round robin over ``refs``."""
    repo, refs = w.p["repo"], list(w.p["refs"])
    accept = w.p.get("accept", OCI_MANIFEST)
    urls = [_v2(w, f"{repo}/manifests/{ref}") for ref in refs]
    async with w.session() as s:
        await _warm(s, w.base_url + "/v2/", w.job.concurrency)
        await _wait_start(w)
        i = w.job.worker

        async def body(_: int) -> None:
            nonlocal i
            i += 1
            await timed(w, "manifest", _get_manifest(s, urls[i % len(urls)], accept))

        await w.loops(body)


# -- mixed workload -----------------------------------------------------------------


@op("mixed")
async def mixed(w: Worker) -> None:
    """A registry's everyday mix: ``pull`` (manifest by tag, then one of its
    layers), ``push`` (a blob, then a manifest referencing it, tagged), and
    ``list`` (catalog or a repository's tags), drawn at random in proportion
    to ``mix``. ``tag_slots`` > 0 pushes into that many tags per loop, round
    robin (bounded namespace, for a soak); ``pool`` > 0 re-uploads that many blobs
    round robin (bounded storage)."""
    pulls = w.p["pulls"]  # [{repo, tag, layers: [[digest, size]]}]
    mix = w.p.get("mix", {"pull": 70, "push": 25, "list": 5})
    kinds = [k for k in ("pull", "push", "list") if mix.get(k, 0) > 0]
    weights = [float(mix[k]) for k in kinds]
    push_repo = w.p["push_repo"]
    cfg = w.p["config"]  # {digest, size}: a config blob already in push_repo
    slots = int(w.p.get("tag_slots", 0))
    src = BlobSource(
        int(w.p.get("push_size", 1 << 20)),
        f"{w.p.get('seed', 'mixed')}-w{w.job.worker}",
        int(w.p.get("pool", 0)),
    )
    list_repos = w.p.get("list_repos") or [p["repo"] for p in pulls]
    rnd = random.Random(f"mixed-{w.job.worker}-{w.p.get('seed', '')}")
    counter = 0
    async with w.session() as s:
        client = OciClient(w.base_url, s)
        await _warm(s, w.base_url + "/v2/", w.job.concurrency)
        await _wait_start(w)

        async def pull() -> None:
            img = rnd.choice(pulls)
            url = _v2(w, f"{img['repo']}/manifests/{img['tag']}")
            if await timed(w, "manifest", _get_manifest(s, url, MANIFEST_ACCEPT)) is None:
                return
            digest, size = rnd.choice(img["layers"])

            async def layer() -> int:
                status, n, _, _ = await fetch(s, _v2(w, f"{img['repo']}/blobs/{digest}"))
                if status != 200 or n != int(size):
                    raise Failed(f"GET blob: HTTP {status}, {n} of {size} bytes")
                return n

            await timed(w, "pull", layer())

        async def push(k: int) -> None:
            # Each loop pushes into tags of its own, one push at a time: two
            # pushes racing for one tag is a conflict (409) on a registry that
            # moves tags by compare-and-swap, not load.
            nonlocal counter
            counter += 1
            n = counter
            tag = f"w{w.job.worker}c{k}-{n % slots if slots else n}"
            data, digest = src.next()
            if await timed(w, "push", _upload(client, push_repo, data, digest, w)) is None:
                return
            manifest = image_manifest((cfg["digest"], int(cfg["size"])), [(digest, len(data))])

            async def put() -> int:
                await client.put_manifest(push_repo, tag, manifest)
                return len(manifest)

            await timed(w, "manifest-put", put())

        async def listing() -> None:
            if rnd.random() < 0.5:
                name, url = "catalog", f"{w.base_url}/v2/_catalog?n=100"
            else:
                name, url = "tags", _v2(w, f"{rnd.choice(list_repos)}/tags/list")

            async def get() -> int:
                status, n, _, _ = await fetch(s, url)
                if status != 200:
                    raise Failed(f"GET {name}: HTTP {status}")
                return n

            await timed(w, name, get())

        async def body(k: int) -> None:
            kind = rnd.choices(kinds, weights)[0]
            await (push(k) if kind == "push" else pull() if kind == "pull" else listing())

        await w.loops(body)


# -- whole images (rollout, sites) ------------------------------------------------------


async def pull_image(
    w: Worker,
    s: aiohttp.ClientSession,
    repo: str,
    ref: str,
    parallel: int,
    regions: dict[str, int],
) -> int:
    """Pull an image as a container runtime does: the manifest, then the
    config and layers, ``parallel`` at a time, following the registry's
    redirects. Every request is recorded; bytes per serving region are added
    to ``regions``. Raises Failed when any part failed."""
    found: dict[str, Any] = {}

    async def manifest() -> int:
        url = _v2(w, f"{repo}/manifests/{ref}")
        status, n, region, body = await fetch(
            s, url, headers={"Accept": MANIFEST_ACCEPT}, keep=True
        )
        if status != 200:
            raise Failed(f"GET manifest {repo}:{ref}: HTTP {status}")
        found.update(doc=json.loads(body), region=region)
        return n

    total = await timed(w, "manifest", manifest(), reraise=True) or 0
    doc, region = found["doc"], found["region"] or "-"
    regions[region] = regions.get(region, 0) + total
    blobs = [("config", doc["config"]["digest"], int(doc["config"]["size"]))]
    blobs += [("layer", d["digest"], int(d["size"])) for d in doc.get("layers", [])]
    sem = asyncio.Semaphore(max(parallel, 1))

    async def one(kind: str, digest: str, size: int) -> None:
        nonlocal total

        async def get() -> int:
            st, got, where, _ = await fetch(s, _v2(w, f"{repo}/blobs/{digest}"))
            if st != 200 or got != size:
                raise Failed(f"GET {kind} {digest[:19]}: HTTP {st}, {got} of {size} bytes")
            regions[where or "-"] = regions.get(where or "-", 0) + got
            return got

        async with sem:
            total += await timed(w, kind, get(), reraise=True) or 0

    results = await asyncio.gather(*(one(*b) for b in blobs), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise Failed(str(failed[0]))
    return total


@op("rollout")
async def rollout(w: Worker) -> None:
    """Emulated Kubernetes nodes (``nodes``: their ids), each with its own
    connection pool (``parallel`` connections, containerd's default of 3
    concurrent downloads), all pulling ``repo:tag`` at the same instant."""
    repo, tag, parallel = w.p["repo"], w.p["tag"], int(w.p.get("parallel", 3))
    nodes: list[dict[str, Any]] = []

    async def node(node_id: int) -> None:
        regions: dict[str, int] = {}
        info: dict[str, Any] = {"node": node_id, "ok": False, "regions": regions}
        nodes.append(info)
        async with w.session(limit=parallel) as s:
            await _wait_start(w)
            if not w.take():
                info["error"] = "not started: out of time"
                return
            t0 = time.monotonic()
            try:
                info["bytes"] = await pull_image(w, s, repo, tag, parallel, regions)
                info["ok"] = True
            except (Failed, *CLIENT_ERRORS) as e:
                info["error"] = str(e)[:300]
            info["start"] = t0 - w.job.start_at
            info["seconds"] = time.monotonic() - t0
        w.emit({"node_done": node_id, "ok": info["ok"]})

    await asyncio.gather(*(node(int(n)) for n in w.p["nodes"]))
    w.extra["nodes"] = nodes


@op("site_pull")
async def site_pull(w: Worker) -> None:
    """Clients at one site pulling ``repo:tag`` through their router, again
    and again (``think_s`` apart), ``concurrency`` at once."""
    repo, tag = w.p["repo"], w.p.get("tag", "latest")
    think, parallel = float(w.p.get("think_s", 0.0)), int(w.p.get("parallel", 3))
    regions: dict[str, int] = {}
    async with w.session(limit=parallel * max(w.job.concurrency, 1)) as s:
        await _wait_start(w)

        async def body(_: int) -> None:
            await timed(w, "image-pull", pull_image(w, s, repo, tag, parallel, regions))
            if think > 0:
                await asyncio.sleep(min(think, max(w.time_left(), 0)))

        await w.loops(body)
    w.extra["regions"] = regions


@op("site_push")
async def site_push(w: Worker) -> None:
    """Push a fresh image (``layers`` x ``layer_size``) every ``interval_s``
    through this site's router, tagged ``v<i>`` and ``latest``; tells the
    harness about each push as it is acknowledged (an ``E`` event)."""
    repo = w.p["repo"]
    layers, size = int(w.p.get("layers", 2)), int(w.p.get("layer_size", 1 << 20))
    interval = float(w.p.get("interval_s", 2.0))
    i = int(w.p.get("first", 1))
    async with w.session() as s:
        client = OciClient(w.base_url, s)
        await _wait_start(w)
        while w.take():
            img = random_image(layers, size, seed=f"{w.p.get('seed', 'site')}-{i}")
            t0 = time.monotonic()
            region = ""

            async def push(img: Any = img, tag: str = f"v{i}") -> int:
                nonlocal region
                for digest, data in img.blobs():
                    await client.upload_blob(repo, data, digest)
                for t in (tag, "latest"):
                    headers: dict[str, str] = {}
                    await client.put_manifest(repo, t, img.manifest, response_headers=headers)
                    region = headers.get("X-Meridian-Region", region)
                return img.total_bytes

            if await timed(w, "image-push", push()) is not None:
                w.emit(
                    {
                        "pushed": f"v{i}",
                        "t_ack": time.monotonic(),
                        "t_start": t0,
                        "region": region,
                        "digests": [img.manifest_digest] + [d for d, _ in img.blobs()],
                        "bytes": img.total_bytes,
                    }
                )
            i += 1
            await asyncio.sleep(min(max(0.0, interval - (time.monotonic() - t0)), w.time_left()))


# -- skopeo: as a client sees it ------------------------------------------------------


async def _skopeo(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise Failed(f"skopeo exited with {proc.returncode}: {err.decode(errors='replace')[-400:]}")


async def _skopeo_loop(
    w: Worker, name: str, prepare: Callable[[Path, int], Awaitable[tuple[list[str], int, Path]]]
) -> None:
    """Run skopeo once per unit of budget: ``prepare(workdir, i)`` gives its
    arguments (after the common ones), the bytes it moves and what to remove
    afterwards; only skopeo's own run is timed."""
    skopeo = shutil.which("skopeo") or "skopeo"
    auth = TokenAuth.owner_from_env()
    creds = ["--src-creds", auth.userpass, "--dest-creds", auth.userpass] if auth else []
    work = Path(tempfile.mkdtemp(prefix=f"skopeo-{name}-", dir=w.p.get("workdir")))
    try:
        await _wait_start(w)
        i = 0
        while w.take():
            i += 1
            args, nbytes, scratch = await prepare(work, i)
            argv = [skopeo, "--insecure-policy", "copy", "--quiet", *creds, *args]

            async def run(argv: list[str] = argv, nbytes: int = nbytes) -> int:
                await _skopeo(argv)
                return nbytes

            await timed(w, name, run())
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@op("skopeo_push")
async def skopeo_push(w: Worker) -> None:
    """``skopeo copy oci:DIR docker://…`` of a fresh image (``layers`` x
    ``layer_size``, generated before the clock starts) into a new repository
    each time (nothing to skip, no cross-repository mount possible)."""
    host = urlsplit(w.base_url).netloc
    layers, size = int(w.p.get("layers", 1)), int(w.p["layer_size"])

    async def prepare(work: Path, i: int) -> tuple[list[str], int, Path]:
        img = random_image(layers, size, seed=f"{w.p.get('seed', 'sk')}-w{w.job.worker}-{i}")
        layout = await asyncio.to_thread(write_oci_layout, work / f"l{i}", img)
        repo = f"{w.p['repo']}-w{w.job.worker}-{i}"
        args = ["--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{host}/{repo}:v1"]
        return args, img.total_bytes, layout

    await _skopeo_loop(w, "push", prepare)


@op("skopeo_pull")
async def skopeo_pull(w: Worker) -> None:
    """``skopeo copy docker://… oci:DIR`` of ``repo:tag`` (``bytes``: the
    image's size) into a fresh directory each time."""
    host = urlsplit(w.base_url).netloc
    src = f"docker://{host}/{w.p['repo']}:{w.p['tag']}"

    async def prepare(work: Path, i: int) -> tuple[list[str], int, Path]:
        dest = work / f"p{i}"
        return ["--src-tls-verify=false", src, f"oci:{dest}:latest"], int(w.p["bytes"]), dest

    await _skopeo_loop(w, "pull", prepare)
