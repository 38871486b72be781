"""Smoke tests for the single-node benchmark harness (loadtest/), at toy size,
against CNCF Distribution (and the load generators against a Meridian node
with authentication on). They check that the pieces work and that the report
is well-formed JSON; they assert nothing about speed."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp
import pytest

from cluster.auth.identities import OWNER_PASSWORD_ENV
from cluster.auth.tokens import TOKEN_TTL
from loadtest import loadgen
from loadtest.ocipush import (
    OCI_MANIFEST,
    OciClient,
    TokenAuth,
    make_layer,
    random_bytes,
    random_image,
    sha256_digest,
    write_oci_layout,
)
from loadtest.reference import REPO_ROOT, distribution_config, require_tool, running
from tests.benchrun import strict_json

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    # Fail, never skip, naming the install step.
    require_tool("docker-registry", "apt-get install -y docker-registry")
    require_tool("skopeo", "apt-get install -y skopeo")
    loadgen.require("wrk")
    loadgen.require("ab")
    loadgen.require("curl")


def test_distribution_starts_and_stops_by_pid() -> None:
    with running("distribution") as server:
        pid, workdir = server.pid, server.workdir
        config = (workdir / "config.yml").read_text()
        assert f"addr: 127.0.0.1:{server.port}" in config
        assert "enabled: true" in config  # deletes
        assert os.path.exists(f"/proc/{pid}")
    assert server.proc.poll() is not None
    assert not workdir.exists()
    # the generated config is self-contained
    assert "rootdirectory: /x" in distribution_config(1, Path("/x"))


def test_layers_are_real_gzip_tars() -> None:
    layer = make_layer(10_000, seed=1)
    raw = gzip.decompress(layer.data)
    assert sha256_digest(raw) == layer.diff_id
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        (member,) = tar.getmembers()
        assert member.size == 10_000
    assert make_layer(10_000, seed=1) == layer  # seeded: reproducible


def test_oci_layout(tmp_path: Path) -> None:
    image = random_image(2, 1000, seed=3)
    write_oci_layout(tmp_path, image)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for digest, data in image.blobs():
        assert (tmp_path / "blobs" / "sha256" / digest[7:]).read_bytes() == data
    config = json.loads(image.config)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]


async def test_ocipush_against_distribution() -> None:
    with running("distribution") as server:
        async with aiohttp.ClientSession() as session:
            client = OciClient(server.base_url, session)
            assert await client.ping() == 200
            for i, upload in enumerate(
                (
                    client.upload_blob,
                    client.upload_blob_monolithic,
                    lambda repo, data: client.upload_blob_chunked(repo, data, 700),
                )
            ):
                data = random_bytes(2000 + i, seed=i)
                digest = await upload("smoke/blobs", data)
                assert digest == sha256_digest(data)
                assert await client.blob_size("smoke/blobs", digest) == len(data)
                assert await client.get_blob("smoke/blobs", digest) == data
            image = random_image(3, 1500, seed=7)
            digest = await client.push_image("smoke/img", "v1", image)
            assert digest == image.manifest_digest
            body, ctype, header = await client.get_manifest("smoke/img", "v1", OCI_MANIFEST)
            assert body == image.manifest and ctype.startswith(OCI_MANIFEST)
            assert header == digest
            assert await client.manifest_digest("smoke/img", "v1") == digest
            assert await client.blob_size("smoke/img", sha256_digest(b"nope")) is None


def test_load_generators_against_distribution() -> None:
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    try:
        with running("distribution") as server:

            async def seed() -> str:
                async with aiohttp.ClientSession() as session:
                    client = OciClient(server.base_url, session)
                    return await client.upload_blob("smoke/load", b"x" * 1000)

            digest = asyncio.run(seed())
            url = f"{server.base_url}/v2/smoke/load/blobs/{digest}"
            results = [
                loadgen.run_wrk(url, 100, 4),
                loadgen.run_ab(url, 100, 4, "HEAD"),
                loadgen.run_ab(url, 100, 4, "GET"),
                loadgen.run_aiohttp(pool, 2, url, 100, 4, "HEAD"),
            ]
            dl = pool.submit(loadgen.download_worker, url, 1000, 3, 2).result()
            curl_seq = loadgen.run_curl_downloads(url, 1000, 3, 1)
            curl_par = loadgen.run_curl_downloads(url, 1000, 4, 2)
    finally:
        pool.shutdown(wait=True)
    for r in results:
        assert r.requests == 100, r
        assert r.errors == 0, r
        assert r.rps > 0 and r.seconds > 0
        assert r.p50_ms >= 0 and r.p99_ms >= r.p50_ms and math.isfinite(r.p99_ms)
    assert dl["bytes"] == 3000 and len(dl["each"]) == 3
    assert curl_seq["bytes"] == 3000 and len(curl_seq["each"]) == 3
    assert curl_par["bytes"] == 4000 and curl_par["seconds"] > 0


def test_load_generators_log_in_to_meridian(monkeypatch: pytest.MonkeyPatch) -> None:
    """wrk, ab and curl against a node with authentication on: each run gets
    a bearer token of its own (the owner's, from the environment) and every
    request is answered; without credentials every one is refused. A run
    with a token is cut before the token expires."""
    assert loadgen.BEARER_RUN_MAX_S < TOKEN_TTL
    with running("meridian") as server:

        async def seed() -> str:
            async with aiohttp.ClientSession(middlewares=(TokenAuth.owner_from_env(),)) as s:
                return await OciClient(server.base_url, s).upload_blob("smoke/load", b"y" * 1000)

        digest = asyncio.run(seed())
        url = f"{server.base_url}/v2/smoke/load/blobs/{digest}"
        results = [
            loadgen.run_wrk(url, 50, 4, max_seconds=1000),
            loadgen.run_ab(url, 50, 4, "HEAD", max_seconds=1000),
            loadgen.run_ab(url, 50, 4, "GET", max_seconds=1000),
        ]
        curl = loadgen.run_curl_downloads(url, 1000, 3, 2, max_seconds=1000)
        # A run with a token ends when the token's time is up (here 1 s), not
        # at the caller's limit: it stops short of its request count.
        monkeypatch.setattr(loadgen, "BEARER_RUN_MAX_S", 1)
        cut = loadgen.run_wrk(url, 10**9, 2, max_seconds=1000)
        with pytest.raises(loadgen.LoadgenError, match="did not finish 100000000 requests in 1s"):
            loadgen.run_ab(url, 10**8, 2, "HEAD", max_seconds=1000)
        monkeypatch.delenv(OWNER_PASSWORD_ENV)
        refused = loadgen.run_wrk(url, 50, 4)
        with pytest.raises(loadgen.LoadgenError, match="HTTP 401"):
            loadgen.run_curl_downloads(url, 1000, 1, 1)
    for r in results:
        assert r.requests == 50 and r.errors == 0, r
    assert curl["bytes"] == 3000 and len(curl["each"]) == 3
    assert cut.notes and "within 1s" in cut.notes[0] and cut.requests < 10**9, cut
    assert cut.errors == 0, cut
    assert refused.requests == 50 and refused.errors == 50, refused


def test_bench_node_toy_json(tmp_path: Path) -> None:
    """``python -m loadtest.bench_node``: the harness's ``node`` scenario
    (every measurement of the single-node benchmark), at toy size."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.bench_node",
            "--toy",
            "--targets",
            "distribution",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "distribution" in proc.stdout and "manifest GET by tag" in proc.stdout
    assert f"wrote {out}" in proc.stdout
    result = strict_json(out.read_text())
    assert isinstance(result, dict)
    assert result["schema"] == "meridian.loadtest/1"
    assert result["host"]["cpus"] >= 1
    (sc,) = result["scenarios"]
    assert sc["scenario"] == "node"
    assert [t["name"] for t in sc["targets"]] == ["distribution"]
    assert sc["targets"][0]["version"]
    steps = {s["id"]: s for s in sc["steps"]}
    assert set(steps) == {"manifest_get", "blob_head", "blob_get", "blob_get_x4", "push"}
    assert [steps[k]["op"] for k in ("manifest_get", "blob_head", "blob_get", "push")] == [
        "wrk",
        "ab",
        "curl",
        "skopeo_push",
    ]
    assert steps["blob_get_x4"]["concurrency"] == 4
    # one figure row per measurement with its unit; no baseline, so no ratio
    assert sc["baseline"] is None
    primaries = [r for r in sc["figures"] if not r["label"].startswith(" ")]
    assert {r["step"] for r in primaries} == set(steps)
    for row in sc["figures"]:
        assert set(row) >= {"label", "unit", "higher_is_better", "values", "ratios"}
        assert row["ratios"] == {}
        v = row["values"]["distribution"]
        assert v is None or (isinstance(v, int | float) and v >= 0)
    for r in primaries:
        assert isinstance(r["values"]["distribution"], int | float), r
    res = sc["results"]["distribution"]
    assert res["manifest_get"][0]["stats"]["errors"] == 0
    assert res["manifest_get"][0]["stats"]["requests"] == 300
    get = res["blob_get"][0]["stats"]
    assert get["requests"] == 2 and get["bytes"] >= 2 * (2 << 20) and get["mib_s"] > 0
    assert res["push"][0]["extra"]["push_s"] > 0
    for step in steps:
        (r,) = res[step]
        assert set(r["cpu_share"]) == {"server", "client", "other"}
    # every process the run started is gone, and so is its work dir
    assert not any((tmp_path / "work").iterdir())
