"""The scenarios of ``meridian loadtest``: what each one seeds, runs and reports.

Every parameter is a flag of the scenario's command (``meridian loadtest
<scenario> --help`` lists them with their defaults); ``--toy`` sets them all
to sizes that take seconds (what the tests run).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from loadtest import loadgen
from loadtest.common import percentile
from loadtest.common import scrape as common_scrape
from loadtest.harness import (
    HarnessError,
    Job,
    Outcome,
    Param,
    Run,
    Scenario,
    Step,
    Target,
    client,
    int_list,
    median,
    size_label,
    size_list,
    str_list,
)
from loadtest.ocipush import (
    OCI_MANIFEST,
    Image,
    build_image,
    make_layer,
    random_bytes,
    random_image,
    sha256_digest,
)
from loadtest.procstats import flatness
from loadtest.samples import MIB, Rows, stats
from loadtest.sites import site_name
from localcluster import topology as topo
from localcluster.supervisor import get_json

SCENARIOS: dict[str, type[Scenario]] = {}


def scenario(cls: type[Scenario]) -> type[Scenario]:
    SCENARIOS[cls.name] = cls
    return cls


def _choices(values: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise HarnessError(f"{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return values


def _count(volume: int, size: int, cap: int) -> int:
    return max(3, min(cap, math.ceil(volume / max(size, 1))))


async def _verify_blob(url: str, repo: str, digest: str, size: int, name: str) -> None:
    """What a step reads must be served right, or its numbers mean nothing."""
    async with client(url) as c:
        h = hashlib.sha256()
        n = 0
        async with c.session.get(c.url(f"{repo}/blobs/{digest}")) as r:
            if r.status != 200:
                raise HarnessError(f"{name}: GET blob {digest[:19]}: HTTP {r.status}")
            async for chunk in r.content.iter_chunked(1 << 20):
                h.update(chunk)
                n += len(chunk)
        if n != size or "sha256:" + h.hexdigest() != digest:
            raise HarnessError(f"{name}: GET blob {digest[:19]} returned other bytes")


def _images(run: Run, key: str, make: Any) -> Any:
    """Content generated once per run and seeded into every target alike."""
    cache = run.state.setdefault("_content", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _uniq(run: Run) -> int:
    run.state["_uniq"] = run.state.get("_uniq", 0) + 1
    return int(run.state["_uniq"])


# -- blob pull and push -----------------------------------------------------------------

COMMON_SIZE_PARAMS = [
    Param(
        "sizes",
        "1M,10M,100M",
        "blob sizes (K/M/G: KiB/MiB/GiB), comma-separated",
        "64K,512K",
        size_list,
    ),
    Param("concurrency", "1,4", "requests in flight at once, one step per value", "1,2", int_list),
    Param(
        "volume",
        "1G",
        "bytes to move per step (the request count is volume/size, at "
        "least 3, at most --max-requests)",
        "2M",
        size_list,
    ),
    Param("max-requests", 300, "most requests in one step", 40, int),
    Param("seconds", 30.0, "time limit of one step", 8.0, float),
    Param("procs", 1, "client worker processes per step", 1, int),
]


def _size_steps(
    run: Run, verb: str, modes: tuple[str, ...], op: str, skopeo_op: str, image_note: str
) -> list[Step]:
    """A step per size x mode x concurrency (pull and push)."""
    p = run.p
    chosen = ["image"] if p.client == "skopeo" else _choices(p.modes, modes, "--modes")
    out = []
    for size in p.sizes:
        for mode in chosen:
            for c in p.concurrency:
                what = f"{size_label(size)} {mode}"
                if p.client == "skopeo":
                    what = f"{size_label(size)} image{image_note}"
                out.append(
                    Step(
                        f"{verb}-{size_label(size)}-{mode}-c{c}",
                        ("skopeo " if p.client == "skopeo" else "") + f"{verb} {what}, {c} at once",
                        skopeo_op if p.client == "skopeo" else op,
                        _count(p.volume[0], size, p.max_requests),
                        p.seconds,
                        c,
                        p.procs,
                        {"size": size, "mode": mode, "chunk": p.chunk[0]},
                        primary="mib_s",
                        ops=(verb,),
                        group=f"{verb} {mode} c{c}",
                        bytes_heavy=True,
                    )
                )
    return out


@scenario
class Pull(Scenario):
    name = "pull"
    title = "Blob pull"
    description = (
        "GET of blobs of several sizes at several concurrencies, each blob the layer "
        "of an image seeded into every target alike: whole (one GET) or ranged "
        "(consecutive Range GETs of --chunk bytes), by aiohttp workers; or whole "
        "images by skopeo (--client skopeo), as a client sees them."
    )
    params = [
        *COMMON_SIZE_PARAMS,
        Param("modes", "whole", "whole and/or ranged", "whole,ranged", str_list),
        Param("chunk", "8M", "Range size for the ranged mode", "128K", size_list),
        Param(
            "client",
            "aiohttp",
            "aiohttp (blob GETs) or skopeo (image copies)",
            "aiohttp",
            choices=("aiohttp", "skopeo"),
        ),
    ]
    default_start = ("distribution", "meridian")

    def steps(self, run: Run) -> list[Step]:
        return _size_steps(run, "pull", ("whole", "ranged"), "blob_get", "skopeo_pull", "")

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        out = {}
        for size in run.p.sizes:
            img: Image = _images(
                run,
                f"pull-{size}",
                lambda size=size: build_image([make_layer(size, f"{run.run_id}-pull-{size}")]),
            )
            repo, tag = "loadtest/pull", f"s{size_label(size)}".lower()
            async with client(target.url) as c:
                await c.push_image(repo, tag, img)
            layer = img.layers[0]
            await _verify_blob(target.url, repo, layer.digest, len(layer.data), target.name)
            out[size] = {
                "repo": repo,
                "tag": tag,
                "digest": layer.digest,
                "bytes": len(layer.data),
                "image_bytes": img.total_bytes,
            }
        return out

    def step_params(self, run: Run, target: Target, step: Step, seed: dict) -> dict:
        s = seed[step.params["size"]]
        return {
            "repo": s["repo"],
            "digest": s["digest"],
            "size": s["bytes"],
            "tag": s["tag"],
            "bytes": s["image_bytes"],
            "mode": step.params["mode"],
            "chunk": step.params["chunk"],
            "workdir": str(run.workdir),
        }


@scenario
class Push(Scenario):
    name = "push"
    title = "Blob push"
    description = (
        "Uploads of fresh random blobs of several sizes at several concurrencies: "
        "monolithic (POST, then one PUT with the body), post (a single POST "
        "?digest=) or chunked (POST, PATCH --chunk bytes at a time, PUT), by "
        "aiohttp workers; or whole images by skopeo (--client skopeo: --layers "
        "layers of size/layers each, into a new repository every time)."
    )
    params = [
        *COMMON_SIZE_PARAMS,
        Param(
            "modes",
            "monolithic,chunked",
            "monolithic, post and/or chunked",
            "monolithic,chunked",
            str_list,
        ),
        Param("chunk", "5M", "PATCH size for the chunked mode", "128K", size_list),
        Param(
            "client",
            "aiohttp",
            "aiohttp (blob uploads) or skopeo (image pushes)",
            "aiohttp",
            choices=("aiohttp", "skopeo"),
        ),
        Param("layers", 5, "layers of a skopeo-pushed image", 2, int),
    ]
    default_start = ("distribution", "meridian")

    def steps(self, run: Run) -> list[Step]:
        layers = f" ({run.p.layers} layers)"
        modes = ("monolithic", "post", "chunked")
        return _size_steps(run, "push", modes, "blob_push", "skopeo_push", layers)

    def step_params(self, run: Run, target: Target, step: Step, seed: dict) -> dict:
        n = _uniq(run)
        size = step.params["size"]
        return {
            "repo": f"loadtest/push-{run.run_id}"
            if run.p.client == "aiohttp"
            else f"loadtest/skopeo-{run.run_id}-{n}",
            "size": size,
            "mode": step.params["mode"],
            "chunk": step.params["chunk"],
            "seed": f"{run.run_id}-{step.id}-{n}",
            "layers": run.p.layers,
            "layer_size": max(1, size // max(run.p.layers, 1)),
            "workdir": str(run.workdir),
        }


# -- one node against Distribution ---------------------------------------------------

NODE_METRICS = ("manifest_get", "blob_head", "blob_get", "blob_get_x4", "push")


@scenario
class Node(Scenario):
    name = "node"
    title = "Single node vs Distribution"
    description = (
        "The single-node benchmark: manifest GET by tag and blob HEAD (wrk for GET "
        "and ab for HEAD, or --loadgen ab|aiohttp), GET of one --blob-size blob "
        "--downloads times one after another and --parallel-downloads times "
        "--parallel at once (curl; aiohttp workers with --loadgen aiohttp), and a "
        "skopeo push of a fresh image (--push-layers x --push-layer-size) into a new "
        "repository every round. Every target gets the same content, is checked to "
        "serve it right and warmed up; each step records the CPU the servers, the "
        "clients and everything else on the machine used."
    )
    params = [
        Param("requests", 20000, "requests of a manifest GET or blob HEAD step", 300, int),
        Param("concurrency", 64, "connections of those steps", 8, int),
        Param("blob-size", "100M", "size of the blob the GET steps fetch", "2M", size_list),
        Param("downloads", 5, "GETs of it one after another", 2, int),
        Param("parallel", 4, "GETs of it at once in the parallel step", 4, int),
        Param("parallel-downloads", 8, "GETs in the parallel step", 4, int),
        Param("push-layers", 5, "layers of the image skopeo pushes", 2, int),
        Param("push-layer-size", "20M", "size of each pushed layer", "256K", size_list),
        Param("warmup", 2000, "requests per rate step before measuring (not recorded)", 50, int),
        Param(
            "loadgen",
            "auto",
            "auto/wrk: wrk for GET, ab for HEAD (wrk cannot HEAD); ab: ab for both; "
            "aiohttp: worker processes for all (costs more client CPU)",
            "auto",
            choices=("auto", "wrk", "ab", "aiohttp"),
        ),
        Param("procs", 2, "worker processes with --loadgen aiohttp", 1, int),
        Param(
            "metrics",
            ",".join(NODE_METRICS),
            "which measurements",
            ",".join(NODE_METRICS),
            str_list,
        ),
        Param("seconds", 300.0, "time limit of one step", 60.0, float),
    ]
    default_start = ("distribution", "meridian")

    def _tool(self, run: Run, method: str) -> str:
        lg = run.p.loadgen
        if lg == "aiohttp":
            return "manifest_get" if method == "GET" else "blob_head"
        if lg == "ab" or method == "HEAD":  # wrk cannot HEAD (wg/wrk#198)
            return "ab"
        return "wrk"

    def steps(self, run: Run) -> list[Step]:
        p = run.p
        metrics = _choices(p.metrics, NODE_METRICS, "--metrics")
        get, head = self._tool(run, "GET"), self._tool(run, "HEAD")
        download = "blob_get" if p.loadgen == "aiohttp" else "curl"
        size = size_label(p.blob_size[0])
        by = {
            "manifest_get": Step(
                "manifest_get",
                f"manifest GET by tag, {p.concurrency} at once [{get}]",
                get,
                p.requests,
                p.seconds,
                p.concurrency,
                p.procs,
                primary="rps",
                ops=("manifest",),
            ),
            "blob_head": Step(
                "blob_head",
                f"blob HEAD, {p.concurrency} at once [{head}]",
                head,
                p.requests,
                p.seconds,
                p.concurrency,
                p.procs,
                primary="rps",
                ops=("head",),
            ),
            "blob_get": Step(
                "blob_get",
                f"blob GET of {size}, one at a time [{download}]",
                download,
                p.downloads,
                p.seconds,
                1,
                primary="mib_s",
                ops=("pull",),
                bytes_heavy=True,
            ),
            "blob_get_x4": Step(
                "blob_get_x4",
                f"blob GET of {size}, {p.parallel} at once [{download}]",
                download,
                p.parallel_downloads,
                p.seconds,
                p.parallel,
                min(p.procs, p.parallel),
                primary="mib_s",
                ops=("pull",),
                bytes_heavy=True,
            ),
            "push": Step(
                "push",
                f"skopeo push of {p.push_layers} x {size_label(p.push_layer_size[0])}",
                "skopeo_push",
                1,
                p.seconds,
                1,
                primary="push_s",
                ops=("push",),
                bytes_heavy=True,
            ),
        }
        if get != head and "blob_head" in metrics:
            run.note(
                "manifest GET uses wrk (HTTP/1.1); blob HEAD uses ab (HTTP/1.0 keep-alive), "
                "because wrk cannot send HEAD."
            )
        if "push" in metrics:
            run.note(
                "push: fresh random layers every round into a new repository; skopeo "
                "uploads every blob (no existing blob, no cross-repository mount possible)."
            )
        run.note(
            f"{os.cpu_count() or 1} CPU(s) shared by servers, load generators and other "
            "processes: a server that needs less CPU per request also leaves more for the "
            "client, so rates are contention-bound, not a server's capacity on an idle "
            "machine (each step's cpu_share in the result file says who used what)."
        )
        return [by[m] for m in metrics]

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        p = run.p
        small: Image = _images(
            run, "node-small", lambda: random_image(5, 2048, seed=f"{run.run_id}-small")
        )
        big: Image = _images(
            run,
            "node-big",
            lambda: build_image([make_layer(p.blob_size[0], f"{run.run_id}-big")]),
        )
        repo, tag = "bench/seed", "v1"
        head, blob = small.layers[0], big.layers[0]
        async with client(target.url) as c:
            digest = await c.push_image(repo, tag, small)
            await c.push_image(repo, "big", big)
            body, ctype, header = await c.get_manifest(repo, tag, OCI_MANIFEST)
            if body != small.manifest:
                raise HarnessError(f"{target.name}: GET manifest by tag returned other bytes")
            if ctype.split(";")[0].strip() != OCI_MANIFEST:
                raise HarnessError(f"{target.name}: manifest Content-Type {ctype!r}")
            if header and header != digest:
                raise HarnessError(f"{target.name}: Docker-Content-Digest {header} != {digest}")
            if await c.blob_size(repo, head.digest) != len(head.data):
                raise HarnessError(f"{target.name}: HEAD blob gave the wrong size")
        await _verify_blob(target.url, repo, blob.digest, len(blob.data), target.name)
        seed = {
            "repo": repo,
            "tag": tag,
            "head": [head.digest, len(head.data)],
            "big": [blob.digest, len(blob.data)],
        }
        await asyncio.to_thread(self._warm_up, run, target, seed)
        if "distribution" in target.kind:
            run.note(
                "Distribution 2.8.2 rebuilds its URL router (compiling every route regexp) "
                "on each request (distribution/distribution#3683, fixed in 3.x), hence ~0.9 "
                "ms of CPU per small request: small-request ratios are against 2.8.2 as "
                "packaged, not 3.x."
            )
        return seed

    def _warm_up(self, run: Run, target: Target, seed: dict[str, Any]) -> None:
        """Caches, connection paths, the page cache: not recorded."""
        p = run.p
        if p.loadgen == "aiohttp" or not p.warmup:
            return  # the workers open their connections before the clock starts
        metrics = set(p.metrics)
        repo = seed["repo"]
        if "manifest_get" in metrics:
            url = f"{target.url}/v2/{repo}/manifests/{seed['tag']}"
            accept = {"Accept": OCI_MANIFEST}
            if self._tool(run, "GET") == "wrk":
                loadgen.run_wrk(url, p.warmup, p.concurrency, accept, workdir=run.workdir)
            else:
                loadgen.run_ab(url, p.warmup, p.concurrency, "GET", accept, workdir=run.workdir)
        if "blob_head" in metrics:
            url = f"{target.url}/v2/{repo}/blobs/{seed['head'][0]}"
            loadgen.run_ab(url, p.warmup, p.concurrency, "HEAD", {}, workdir=run.workdir)
        if {"blob_get", "blob_get_x4"} & metrics:
            digest, size = seed["big"]
            loadgen.run_curl_downloads(f"{target.url}/v2/{repo}/blobs/{digest}", size, 1, 1)

    def step_params(self, run: Run, target: Target, step: Step, seed: dict) -> dict:
        repo = seed["repo"]
        if step.op == "wrk" or (step.op == "ab" and step.id == "manifest_get"):
            return {
                "path": f"/v2/{repo}/manifests/{seed['tag']}",
                "headers": {"Accept": OCI_MANIFEST},
                "method": "GET",
            }
        if step.op == "ab":
            return {"path": f"/v2/{repo}/blobs/{seed['head'][0]}", "method": "HEAD"}
        if step.op == "manifest_get":
            return {"repo": repo, "refs": [seed["tag"]], "accept": OCI_MANIFEST}
        if step.op == "blob_head":
            return {"repo": repo, "existing": [seed["head"]], "missing": [], "missing_ratio": 0}
        digest, size = seed["big"]
        if step.op == "curl":
            return {"path": f"/v2/{repo}/blobs/{digest}", "size": size}
        if step.op == "blob_get":
            return {"repo": repo, "digest": digest, "size": size, "mode": "whole"}
        # skopeo_push: the n-th push of every target pushes the same fresh bytes
        pushes = run.state.setdefault("_node_pushes", {})
        n = pushes[target.name] = pushes.get(target.name, 0) + 1
        return {
            "repo": f"bench/push-{run.run_id}-r{n}",
            "layers": run.p.push_layers,
            "layer_size": run.p.push_layer_size[0],
            "seed": f"{run.run_id}-push-{n}",
            "workdir": str(run.workdir),
        }

    async def after_step(self, o: Outcome) -> None:
        st = o.result["stats"]
        if o.step.id == "push" and st.get("mean_ms") is not None:
            o.result["extra"]["push_s"] = st["mean_ms"] / 1000
        if st["errors"] > 0.01 * max(st["requests"], 1):
            # fast failures would pass for speed: refuse to report them
            raise HarnessError(
                f"{o.target.name} {o.step.id}: {st['errors']} errors in {st['requests']} "
                f"requests ({o.result['messages'][:3]}); see the server's log"
            )


# -- request storms ----------------------------------------------------------------------

STORM_PARAMS = [
    Param("requests", 20000, "requests in one step", 300, int),
    Param("concurrency", 32, "requests in flight at once", 4, int),
    Param("seconds", 30.0, "time limit of one step", 8.0, float),
    Param("procs", 1, "client worker processes (aiohttp)", 1, int),
]


@scenario
class ManifestStorm(Scenario):
    name = "manifest-storm"
    title = "Manifest GET storm"
    description = (
        "GET of image manifests by tag (or digest), round robin over --tags small "
        "images, as fast as the client can ask: aiohttp workers, or wrk (--loadgen "
        "wrk: a C client that costs far less CPU per request, one URL)."
    )
    params = [
        *STORM_PARAMS,
        Param("tags", 8, "distinct images (tags) asked for", 2, int),
        Param("by", "tag", "ask by tag or by digest", "tag", choices=("tag", "digest")),
        Param(
            "loadgen", "aiohttp", "aiohttp workers or wrk", "aiohttp", choices=("aiohttp", "wrk")
        ),
    ]
    default_start = ("distribution", "meridian")

    def steps(self, run: Run) -> list[Step]:
        p = run.p
        tool = "wrk" if p.loadgen == "wrk" else "manifest_get"
        return [
            Step(
                f"manifest-get-{p.by}" + ("-wrk" if tool == "wrk" else ""),
                f"manifest GET by {p.by}, {p.concurrency} at once"
                + (" [wrk]" if tool == "wrk" else ""),
                tool,
                p.requests,
                p.seconds,
                p.concurrency,
                p.procs,
                primary="rps",
                ops=("manifest",),
            )
        ]

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        imgs = _images(
            run,
            "manifests",
            lambda: [random_image(3, 4096, seed=f"{run.run_id}-m{i}") for i in range(run.p.tags)],
        )
        refs = []
        async with client(target.url) as c:
            for i, img in enumerate(imgs):
                d = await c.push_image("loadtest/manifests", f"t{i}", img)
                refs.append(f"t{i}" if run.p.by == "tag" else d)
            body, _, _ = await c.get_manifest("loadtest/manifests", refs[0], OCI_MANIFEST)
            if body != imgs[0].manifest:
                raise HarnessError(f"{target.name}: GET manifest returned other bytes")
        return {"repo": "loadtest/manifests", "refs": refs}

    def step_params(self, run: Run, target: Target, step: Step, seed: dict) -> dict:
        if step.op == "wrk":
            return {
                "path": f"/v2/{seed['repo']}/manifests/{seed['refs'][0]}",
                "headers": {"Accept": OCI_MANIFEST},
            }
        return {"repo": seed["repo"], "refs": seed["refs"], "accept": OCI_MANIFEST}


@scenario
class HeadStorm(Scenario):
    name = "head-storm"
    title = "Blob HEAD storm"
    description = (
        "HEAD of blobs, existing ones (expects 200 and the size) and, a --missing "
        "share of the time, digests the registry never saw (expects 404), by aiohttp "
        "workers; or ab (--loadgen ab: existing blobs only, one URL)."
    )
    params = [
        *STORM_PARAMS,
        Param("blobs", 16, "distinct existing blobs", 4, int),
        Param("missing", 0.5, "share of HEADs for missing blobs", 0.5, float),
        Param("loadgen", "aiohttp", "aiohttp workers or ab", "aiohttp", choices=("aiohttp", "ab")),
    ]
    default_start = ("distribution", "meridian")

    def steps(self, run: Run) -> list[Step]:
        p = run.p
        if p.loadgen == "ab":
            return [
                Step(
                    "head-existing-ab",
                    f"blob HEAD (existing), {p.concurrency} at once [ab]",
                    "ab",
                    p.requests,
                    p.seconds,
                    p.concurrency,
                    primary="rps",
                    ops=("head",),
                )
            ]
        return [
            Step(
                "head",
                f"blob HEAD ({p.missing:.0%} missing), {p.concurrency} at once",
                "blob_head",
                p.requests,
                p.seconds,
                p.concurrency,
                p.procs,
                primary="rps",
                ops=("head", "head-missing"),
            )
        ]

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        blobs = _images(
            run,
            "heads",
            lambda: [random_bytes(4096, f"{run.run_id}-h{i}") for i in range(run.p.blobs)],
        )
        existing = []
        async with client(target.url) as c:
            for data in blobs:
                existing.append([await c.upload_blob("loadtest/heads", data), len(data)])
            if await c.blob_size("loadtest/heads", existing[0][0]) != len(blobs[0]):
                raise HarnessError(f"{target.name}: HEAD blob gave the wrong size")
        missing = [sha256_digest(f"{run.run_id}-missing-{i}".encode()) for i in range(16)]
        return {"repo": "loadtest/heads", "existing": existing, "missing": missing}

    def step_params(self, run: Run, target: Target, step: Step, seed: dict) -> dict:
        if step.op == "ab":
            return {"path": f"/v2/{seed['repo']}/blobs/{seed['existing'][0][0]}", "method": "HEAD"}
        return {
            "repo": seed["repo"],
            "existing": seed["existing"],
            "missing": seed["missing"],
            "missing_ratio": run.p.missing,
        }


# -- mixed and soak ------------------------------------------------------------------------


def mixed_params(
    seconds: float,
    toy_seconds: float,
    requests: int,
    toy_requests: int,
    concurrency: int,
    size: str,
) -> list[Param]:
    """The parameters of a mixed run (``mixed``, ``soak``), with their defaults."""
    return [
        Param("seconds", seconds, "duration of the run (upper bound)", toy_seconds, float),
        Param("requests", requests, "operations in the run (upper bound)", toy_requests, int),
        Param("concurrency", concurrency, "operations in flight at once", 4, int),
        Param("images", 4, "images pulled from (2 layers each)", 2, int),
        Param("pull-size", size, "layer size of pulled images", "64K", size_list),
        Param("push-size", size, "size of each pushed blob", "64K", size_list),
        Param("mix", "70,25,5", "percent pull, push, catalog+tags", "70,25,5", int_list),
        Param("procs", 1, "client worker processes", 1, int),
    ]


class _Mixed(Scenario):
    pool = 0
    tag_slots = 0

    def steps(self, run: Run) -> list[Step]:
        p = run.p
        if len(p.mix) != 3:
            raise HarnessError("--mix wants three numbers: pull, push, list percentages")
        return [
            Step(
                self.name,
                f"{self.name}: {p.mix[0]}% pull / {p.mix[1]}% push / {p.mix[2]}% list, "
                f"{p.concurrency} at once",
                "mixed",
                p.requests,
                p.seconds,
                p.concurrency,
                p.procs,
                primary="rps",
            )
        ]

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        size = run.p.pull_size[0]
        imgs = _images(
            run,
            f"mixed-{size}",
            lambda: [
                random_image(2, size, seed=f"{run.run_id}-mx{i}") for i in range(run.p.images)
            ],
        )
        pulls = []
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        async with client(target.url) as c:
            for i, img in enumerate(imgs):
                await c.push_image(f"loadtest/mixed-{i}", "v1", img)
                pulls.append(
                    {
                        "repo": f"loadtest/mixed-{i}",
                        "tag": "v1",
                        "layers": [[lay.digest, len(lay.data)] for lay in img.layers],
                    }
                )
            cfg = await c.upload_blob("loadtest/mixed-push", config)
        return {"pulls": pulls, "config": {"digest": cfg, "size": len(config)}}

    def step_params(self, run: Run, target: Target, step: Step, seed: dict) -> dict:
        p = run.p
        return {
            "pulls": seed["pulls"],
            "config": seed["config"],
            "push_repo": "loadtest/mixed-push",
            "push_size": p.push_size[0],
            "mix": dict(zip(("pull", "push", "list"), p.mix, strict=True)),
            "pool": self.pool,
            "tag_slots": self.tag_slots,
            "seed": f"{run.run_id}-{step.id}-{_uniq(run) if not self.pool else 0}",
        }


@scenario
class Mixed(_Mixed):
    name = "mixed"
    title = "Mixed workload"
    description = (
        "A registry's everyday mix, drawn at random per operation: pull (manifest by "
        "tag, then one of its layers), push (a fresh blob, then a manifest referencing "
        "it under a new tag) and list (catalog or a repository's tags), in proportion "
        "to --mix (default 70/25/5)."
    )
    params = mixed_params(60.0, 6.0, 50000, 300, 16, "1M")
    default_start = ("distribution", "meridian")


@scenario
class Soak(_Mixed):
    name = "soak"
    title = "Soak"
    description = (
        "A bounded mixed run (minutes) over bounded content (a pool of --pool blobs "
        "pushed again and again into --tag-slots tags per worker), sampling every "
        "server process's VmRSS and open file descriptors; passes when both stay flat "
        "(the median of the last third of the run within --rss-tolerance plus "
        "--rss-slack, and --fd-slack, of the first third's) and nothing failed."
    )
    params = [
        *mixed_params(300.0, 10.0, 1_000_000, 3000, 8, "256K"),
        Param("pool", 32, "distinct blobs a worker pushes, round robin", 8, int),
        Param("tag-slots", 8, "tags a worker pushes into, round robin", 4, int),
        Param("rss-tolerance", 0.10, "allowed VmRSS growth, as a fraction", 0.10, float),
        Param("rss-slack", "32M", "allowed VmRSS growth on top of that", "32M", size_list),
        Param("fd-slack", 16, "allowed growth in open file descriptors", 16, int),
    ]
    default_start = ("meridian",)

    def steps(self, run: Run) -> list[Step]:
        self.pool, self.tag_slots = run.p.pool, run.p.tag_slots
        return super().steps(run)

    def checks(self, run: Run) -> dict[str, Any]:
        p = run.p
        out: dict[str, Any] = {"passed": True, "targets": {}}
        for t in run.targets:
            per: dict[str, Any] = {"processes": {}}
            for res in run.results.get(t.name, {}).get(self.name, []):
                per["errors"] = res["stats"]["errors"]
                per["worker_failures"] = len(res["worker_failures"])
                per["requests"] = res["stats"]["requests"]
                for proc, s in res["process"]["series"].items():
                    per["processes"][proc] = {
                        "rss_mib": flatness(
                            s["rss_mb"], tolerance=p.rss_tolerance, slack=p.rss_slack[0] / MIB
                        ),
                        "fds": flatness(s["fds"], tolerance=0.0, slack=float(p.fd_slack)),
                    }
            ok = per.get("errors", 1) == 0 and per.get("worker_failures", 1) == 0
            ok = ok and per.get("requests", 0) > 0
            for v in per["processes"].values():
                ok = ok and v["rss_mib"]["flat"] is not False and v["fds"]["flat"] is not False
            per["passed"] = ok
            out["targets"][t.name] = per
            out["passed"] = out["passed"] and ok
        return out


# -- clusters: rollout and multi-region ------------------------------------------------------

CLUSTER_PARAMS = [
    Param(
        "regions",
        3,
        "regions of the cluster the harness starts (the first N of "
        "meridian up's topology, or of --topology)",
        2,
        int,
    ),
    Param("topology", "", "a topology file (TOML/JSON, as for meridian up)", ""),
    Param(
        "emulate",
        True,
        "emulate the WAN between the site and the regions (else nodes are reached directly)",
        True,
    ),
]


def cluster_topology(run: Run) -> topo.Topology:
    p = run.p
    try:
        t = topo.load(p.topology) if p.topology else topo.default(max(p.regions, 1))
        return t.first(min(p.regions, len(t.regions))) if p.topology else t
    except topo.TopologyError as e:
        raise HarnessError(str(e)) from None


async def wait_replicated(target: Target, seconds: float) -> float | None:
    """Wait until no region lacks anything (a node's replication status);
    seconds waited, or None if it did not happen in time (or no cluster)."""
    nodes = [r.get("node") for r in target.regions.values() if r.get("node")]
    if not nodes:
        return None
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        with contextlib.suppress(OSError, ValueError, KeyError, urllib.error.URLError):
            rows = await asyncio.to_thread(get_json, nodes[0] + "/meridian/v1/replication", 5)
            if all(r["pending_items"] == 0 for r in rows["regions"]):
                return time.monotonic() - t0
        await asyncio.sleep(0.2)
    return None


def scrape(url: str) -> dict[str, float]:
    """A node's /metrics ({} if it does not answer): see :func:`loadtest.common.scrape`."""
    return common_scrape(url, missing_ok=True)


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def hist_quantile(before: dict, after: dict, name: str, q: float) -> float | None:
    """A quantile of a Prometheus histogram's growth between two scrapes."""
    buckets = []
    for key, v in after.items():
        if key.startswith(f"{name}_bucket{{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            bound = math.inf if le == "+Inf" else float(le)
            buckets.append((bound, v - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    want = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= want:
            return bound
    return None


@scenario
class Rollout(Scenario):
    name = "rollout"
    title = "Kubernetes rollout"
    description = (
        "A DaemonSet rollout: --nodes emulated Kubernetes nodes, each with its own "
        "connection pool (--parallel connections, containerd's default of 3 "
        "concurrent downloads), pull the same multi-layer image at the same instant, "
        "through the router (following its redirects to the regions). Reports the "
        "time until every node is done, per-node p50/p99, and bytes served per "
        "region. Without a target the harness starts a cluster (etcd, --regions "
        "nodes, the WAN emulator, the router), as meridian up does."
    )
    params = [
        Param("nodes", 50, "emulated Kubernetes nodes", 4, int),
        Param("layers", 5, "layers of the image", 2, int),
        Param("layer-size", "10M", "size of each layer", "256K", size_list),
        Param("parallel", 3, "concurrent downloads per node", 3, int),
        Param("seconds", 300.0, "time limit of one rollout", 30.0, float),
        Param("procs", 1, "client worker processes (nodes are split among them)", 1, int),
        Param(
            "replicated",
            True,
            "wait until the image is in every region before the "
            "rollout (else it starts right after the push)",
            True,
        ),
        *CLUSTER_PARAMS,
    ]
    default_start = ("cluster",)

    def steps(self, run: Run) -> list[Step]:
        p = run.p
        return [
            Step(
                "rollout",
                f"rollout: {p.nodes} nodes pull {p.layers} x {size_label(p.layer_size[0])}",
                "rollout",
                p.nodes,
                p.seconds,
                p.nodes,
                p.procs,
                primary="all_done_s",
                bytes_heavy=True,
            )
        ]

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        img: Image = _images(
            run,
            "rollout",
            lambda: random_image(run.p.layers, run.p.layer_size[0], seed=f"{run.run_id}-rollout"),
        )
        async with client(target.url) as c:
            await c.push_image("loadtest/rollout", "v1", img)
        if target.regions and run.p.replicated:
            waited = await wait_replicated(target, 300)
            if waited is None:
                run.note(f"{target.name}: the image was not in every region after 300s")
        return {"repo": "loadtest/rollout", "tag": "v1", "bytes": img.total_bytes}

    def jobs(self, run: Run, target: Target, step: Step, seed: dict) -> list[Job]:
        procs = max(1, min(step.procs, run.p.nodes))
        ids = list(range(run.p.nodes))
        return [
            Job(
                "rollout",
                target.url,
                {
                    "repo": seed["repo"],
                    "tag": seed["tag"],
                    "parallel": run.p.parallel,
                    "nodes": ids[i::procs],
                },
                len(ids[i::procs]),
                step.seconds,
                len(ids[i::procs]),
                worker=i,
                workers=procs,
            )
            for i in range(procs)
        ]

    async def before_step(self, run: Run, target: Target, step: Step) -> Any:
        return await asyncio.to_thread(_cluster_counters, target)

    async def after_step(self, o: Outcome) -> None:
        target, state, result, workers = o.target, o.state, o.result, o.workers
        nodes = [n for w in workers for n in w.extra.get("nodes", [])]
        done = [n for n in nodes if n.get("ok")]
        secs = sorted(n["seconds"] for n in done)
        regions: dict[str, int] = {}
        for n in nodes:
            for k, v in n.get("regions", {}).items():
                key = "direct" if k == "-" else k
                regions[key] = regions.get(key, 0) + v
        after = await asyncio.to_thread(_cluster_counters, target)
        all_done = max((n["start"] + n["seconds"] for n in done), default=None)
        ex = result["extra"]
        ex.update(
            all_done_s=all_done if len(done) == len(nodes) and nodes else None,
            nodes=len(nodes),
            nodes_ok=len(done),
            nodes_failed=len(nodes) - len(done),
            node_p50_s=median(secs),
            node_p99_s=_q(secs, 0.99),
            node_max_s=secs[-1] if secs else None,
            node_seconds=[round(x, 4) for x in secs],
            bytes_by_region=regions,
            requests_by_region=_counter_delta(state, after),
            # blob redirects that took an identical verifying HEAD's answer
            router_shared_heads=after["shared_heads"] - state["shared_heads"],
            failed_nodes=[
                {"node": n["node"], "error": n.get("error")} for n in nodes if not n.get("ok")
            ][:10],
        )

    def figures(self, run: Run) -> list[dict[str, Any]]:
        rows = []
        for key, label, unit in (
            ("node_p50_s", "per-node pull p50", "s"),
            ("node_p99_s", "per-node pull p99", "s"),
            ("nodes_failed", "nodes that failed", ""),
        ):
            rows.append(
                {
                    "label": f"  {label}",
                    "unit": unit,
                    "higher_is_better": False,
                    "step": "rollout",
                    "values": {
                        t.name: median(
                            [
                                r["extra"].get(key)
                                for r in run.results.get(t.name, {}).get("rollout", [])
                            ]
                        )
                        for t in run.targets
                    },
                }
            )
        return rows


def _q(sorted_values: list[float], q: float) -> float | None:
    return percentile(sorted_values, q * 100) if sorted_values else None


def _cluster_counters(target: Target) -> dict[str, Any]:
    """Requests per region so far: the router's table and each node's /metrics."""
    out: dict[str, Any] = {"router": {}, "nodes": {}, "shared_heads": 0}
    if not target.is_cluster:
        return out
    with contextlib.suppress(OSError, ValueError, KeyError, urllib.error.URLError):
        status = get_json(target.url + "/meridian/v1/router", timeout=5)
        out["shared_heads"] = status.get("shared_heads", 0)
        for r in status["regions"]:
            out["router"][r["region"]] = {
                "routed": r.get("routed", 0),
                "redirected": r.get("redirected", 0),
            }
    for name, reg in target.regions.items():
        m = scrape(reg["node"]) if reg.get("node") else {}
        out["nodes"][name] = m.get("meridian_http_requests_total", 0.0)
    return out


def _counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for region, v in after.get("router", {}).items():
        b = before.get("router", {}).get(region, {})
        out.setdefault(region, {})["router_routed"] = v["routed"] - b.get("routed", 0)
        out[region]["router_redirected"] = v["redirected"] - b.get("redirected", 0)
    for region, v in after.get("nodes", {}).items():
        out.setdefault(region, {})["node_requests"] = v - before.get("nodes", {}).get(region, 0)
    return out


@scenario
class MultiRegion(Scenario):
    name = "multiregion"
    title = "Multi-region"
    description = (
        "Clients at several emulated sites (one next to each region, --site-rtt from "
        "it, the inter-region round trip from the others), each site pulling through "
        "its own router, while one site (--push-site, default the first region) "
        "pushes a fresh image every --push-interval seconds. Reports pull latency per "
        "site and replication lag per region: from the push's acknowledgement until "
        "the image's manifest and blobs are all in that region's store (polled on "
        "disk), and the nodes' own meridian_replication_lag_seconds. Always runs on "
        "a cluster the harness starts."
    )
    params = [
        Param("pushes", 10, "images pushed during the run", 2, int),
        Param("push-interval", 3.0, "seconds between pushes", 1.5, float),
        Param("layers", 2, "layers per pushed image", 2, int),
        Param("layer-size", "4M", "size of each layer", "128K", size_list),
        Param("pullers", 2, "concurrent pullers per site", 1, int),
        Param("think", 0.5, "seconds a puller waits between pulls", 0.3, float),
        Param("seconds", 60.0, "duration of the run (upper bound)", 10.0, float),
        Param("push-site", "", "the region whose site pushes (default: the first)", ""),
        Param("site-rtt", 2.0, "round trip (ms) between a site and its own region", 2.0, float),
        Param("lag-timeout", 120.0, "how long to wait for replication after the run", 30.0, float),
        *CLUSTER_PARAMS,
    ]
    default_start = ("cluster",)
    needs_cluster = True

    def steps(self, run: Run) -> list[Step]:
        p = run.p
        return [
            Step(
                "multiregion",
                f"multi-region: image pulls/s, {p.pullers} puller(s) at each other site while "
                f"one site pushes every {p.push_interval:g}s",
                "site_pull",
                p.pushes,
                p.seconds,
                p.pullers,
                primary="rps",
                ops=("image-pull",),
                bytes_heavy=True,
            )
        ]

    def _sites(self, target: Target) -> list[str]:
        return list(target.site_routers)

    def _push_site(self, run: Run, target: Target) -> str:
        sites = self._sites(target)
        want = run.p.push_site or sites[0]
        if want not in sites:
            raise HarnessError(f"--push-site {want}: no such region ({', '.join(sites)})")
        return want

    async def seed(self, run: Run, target: Target) -> dict[str, Any]:
        if not target.site_routers:
            raise HarnessError("multiregion needs a cluster with client sites (--start cluster)")
        img = random_image(run.p.layers, run.p.layer_size[0], seed=f"{run.run_id}-mr0")
        site = self._push_site(run, target)
        async with client(target.site_routers[site]) as c:
            await c.push_image("loadtest/multiregion", "v0", img)
            await c.put_manifest("loadtest/multiregion", "latest", img.manifest)
        waited = await wait_replicated(target, 120)
        if waited is None:
            run.note("the first image was not in every region after 120s")
        return {"repo": "loadtest/multiregion"}

    def jobs(self, run: Run, target: Target, step: Step, seed: dict) -> list[Job]:
        p = run.p
        push_site = self._push_site(run, target)
        jobs = [
            Job(
                "site_push",
                target.site_routers[push_site],
                {
                    "repo": seed["repo"],
                    "layers": p.layers,
                    "layer_size": p.layer_size[0],
                    "interval_s": p.push_interval,
                    "seed": f"{run.run_id}-mr-{_uniq(run)}",
                    "first": run.state.get("_pushed", 0) + 1,
                },
                p.pushes,
                step.seconds,
                1,
                worker=0,
                site=site_name(push_site),
            )
        ]
        run.state["_pushed"] = run.state.get("_pushed", 0) + p.pushes
        for i, s in enumerate(self._sites(target)):
            if s == push_site:
                continue
            jobs.append(
                Job(
                    "site_pull",
                    target.site_routers[s],
                    {
                        "repo": seed["repo"],
                        "tag": "latest",
                        "think_s": p.think,
                        "parallel": 3,
                    },
                    1_000_000,
                    step.seconds,
                    p.pullers,
                    worker=i + 1,
                    site=site_name(s),
                )
            )
        return jobs

    async def before_step(self, run: Run, target: Target, step: Step) -> Any:
        st: dict[str, Any] = {
            "pending": [],
            "lags": [],
            "stop": False,
            "metrics": {
                n: await asyncio.to_thread(scrape, r["node"]) for n, r in target.regions.items()
            },
        }
        st["task"] = asyncio.create_task(self._poll(target, st))
        run.state["_current"] = st
        return st

    def on_event(self, run: Run, target: Target, job: Job, event: dict[str, Any]) -> None:
        st = run.state.get("_current")
        if st is None or "pushed" not in event:
            return
        for region in target.regions:
            if region != event.get("region"):
                st["pending"].append({**event, "to": region})

    async def _poll(self, target: Target, st: dict[str, Any]) -> None:
        """Replication lag, seen from outside: when every blob of a pushed
        image is in a region's store (``<data>/blobs/<alg>/<2 hex>/<hex>``)."""
        while True:
            now = time.monotonic()
            keep = []
            for item in st["pending"]:
                root = Path(target.regions[item["to"]]["data"]) / "blobs"
                here = all(
                    (root / d.split(":")[0] / d.split(":")[1][:2] / d.split(":")[1]).exists()
                    for d in item["digests"]
                )
                if here:
                    st["lags"].append(
                        {
                            "push": item["pushed"],
                            "from": item["region"],
                            "to": item["to"],
                            "lag_s": round(now - item["t_ack"], 4),
                        }
                    )
                else:
                    keep.append(item)
            st["pending"] = keep
            if st["stop"] and not keep:
                return
            await asyncio.sleep(0.02)

    async def after_step(self, o: Outcome) -> None:
        run, target, state, result, workers = o.run, o.target, o.state, o.result, o.workers
        state["stop"] = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(state["task"]), run.p.lag_timeout)
        state["task"].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state["task"]
        run.state.pop("_current", None)
        sites: dict[str, Any] = {}
        for w in workers:
            site = w.job.site.removeprefix("site-")
            if w.samples is None:
                continue
            rows = Rows()
            rows.extend(w.samples)
            role = "push" if w.job.op == "site_push" else "pull"
            s = stats(rows.select(["image-pull" if role == "pull" else "image-push"]))
            sites[site] = {
                "role": role,
                **{k: s[k] for k in ("requests", "errors", "p50_ms", "p99_ms", "max_ms")},
            }
            if role == "pull":
                sites[site]["bytes_by_region"] = w.extra.get("regions", {})
                sites[site]["rtt_ms"] = {
                    r: target.cluster.rtt_ms(site, r) if target.cluster else None
                    for r in target.regions
                }
        lags: dict[str, list[float]] = {}
        for lag in state["lags"]:
            lags.setdefault(lag["to"], []).append(lag["lag_s"])
        per_region = {}
        for name, reg in target.regions.items():
            after = await asyncio.to_thread(scrape, reg["node"])
            before = state["metrics"].get(name, {})
            n = _delta(before, after, "meridian_replication_lag_seconds_count")
            total = _delta(before, after, "meridian_replication_lag_seconds_sum")
            vals = sorted(lags.get(name, []))
            per_region[name] = {
                "observed": len(vals),
                "not_replicated": len([p for p in state["pending"] if p["to"] == name]),
                "lag_p50_s": median(vals),
                "lag_p99_s": _q(vals, 0.99),
                "lag_max_s": vals[-1] if vals else None,
                "node_lag_count": int(n),
                "node_lag_mean_s": total / n if n else None,
                "node_lag_p50_le_s": hist_quantile(
                    before, after, "meridian_replication_lag_seconds", 0.5
                ),
                "node_lag_p99_le_s": hist_quantile(
                    before, after, "meridian_replication_lag_seconds", 0.99
                ),
            }
        result["extra"].update(sites=sites, replication=per_region, lags=state["lags"])

    def figures(self, run: Run) -> list[dict[str, Any]]:
        rows = []
        for t in run.targets:
            for res in run.results.get(t.name, {}).get("multiregion", [])[-1:]:
                for site, s in sorted(res["extra"].get("sites", {}).items()):
                    verb = "pull" if s["role"] == "pull" else "push"
                    for q in ("p50", "p99"):
                        rows.append(
                            {
                                "label": f"  site {site}: image {verb} {q}",
                                "unit": "ms",
                                "higher_is_better": False,
                                "step": "multiregion",
                                "values": {t.name: s[f"{q}_ms"]},
                            }
                        )
                for region, r in sorted(res["extra"].get("replication", {}).items()):
                    if not r["observed"] and not r["not_replicated"]:
                        continue  # the region pushed into
                    for q in ("p50", "p99"):
                        rows.append(
                            {
                                "label": f"  replication lag to {region} {q}",
                                "unit": "s",
                                "higher_is_better": False,
                                "step": "multiregion",
                                "values": {t.name: r[f"lag_{q}_s"]},
                            }
                        )
        return rows


def scenario_names() -> list[str]:
    return list(SCENARIOS)


def create(name: str) -> Scenario:
    return SCENARIOS[name]()
