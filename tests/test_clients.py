"""Real clients against a real node: skopeo, containerd's ctr, podman.

Each logs in as the cluster owner (skopeo ``--creds``/``--src-creds``/
``--dest-creds``, ctr ``--user``, podman ``--creds``). Every image is built
locally (tests/images.py) and every round trip is checked byte for byte:
the manifest digest, config and layer digests that come back out are those
that went in.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import images as im
from tests.containerd import Containerd
from tests.procs import OWNER_CREDS, NodeProcess, redact, require_tool, with_creds

pytestmark = pytest.mark.timeout(240)


def run_skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = require_tool("skopeo")
    r = subprocess.run(
        [exe, "--insecure-policy", *with_creds(args)], capture_output=True, text=True, timeout=300
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"skopeo {' '.join(args)} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\n"
            f"stderr:\n{r.stderr[-3000:]}"
        )
    return r


def push(layout: Path, ref: str, dest: str, *extra: str) -> None:
    run_skopeo("copy", "-q", "--dest-tls-verify=false", *extra, f"oci:{layout}:{ref}", dest)


def pull(src: str, dest: str, *extra: str) -> None:
    run_skopeo("copy", "-q", "--src-tls-verify=false", *extra, src, dest)


def inspect(ref: str, *extra: str) -> dict:
    return json.loads(run_skopeo("inspect", "--tls-verify=false", *extra, ref).stdout)


def inspect_raw(ref: str, *extra: str) -> bytes:
    exe = require_tool("skopeo")
    r = subprocess.run(
        [
            exe,
            "--insecure-policy",
            *with_creds(["inspect", "--raw", "--tls-verify=false"]),
            *extra,
            ref,
        ],  # fmt: skip
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_registry_has(reg: im.Registry, repo: str, item: im.Image | im.Index) -> None:
    """Every manifest of ``item`` is served byte-identical, every blob hashes."""
    for digest, body, media_type in item.manifests():
        got, ctype, dcd = reg.get_manifest(repo, digest)
        assert got == body, f"manifest {digest} changed in the registry"
        assert ctype == media_type
        assert dcd == digest
    for b in item.all_blobs():
        assert sha(reg.get_blob(repo, b.digest)) == b.digest


def check_dir_copy(d: Path, top_digest: str) -> dict:
    """A ``dir:`` copy: manifest.json hashes to ``top_digest`` and every
    other file named by a digest hashes to it. Returns the manifest."""
    body = (d / "manifest.json").read_bytes()
    assert sha(body) == top_digest
    for p in d.iterdir():
        if p.name in ("manifest.json", "version"):
            continue
        name = p.name.removesuffix(".manifest.json")
        assert re.fullmatch(r"[0-9a-f]{64}", name), p.name
        assert hashlib.sha256(p.read_bytes()).hexdigest() == name, f"{p} is corrupt"
    return json.loads(body)


@pytest.fixture
def logged_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node that writes an access log (to see which requests clients made)."""
    n = NodeProcess(tmp_path / "data", extra=["--access-log"]).start()
    try:
        yield n
    finally:
        n.stop()


def access_log(node: NodeProcess) -> list[dict]:
    out = []
    for line in node.logs().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "request":
            out.append(rec)
    return out


# -- skopeo ------------------------------------------------------------------


def test_skopeo_single_arch_round_trip(node: NodeProcess, tmp_path: Path) -> None:
    img = im.build_image([300_000, 1_200_000, 65_536], seed="single")
    img2 = im.build_image([70_000], seed="single-2")
    src = im.write_layout(tmp_path / "src", {"v1": img, "v2": img2})
    repo = "clients/single"
    base = f"docker://{node.hostport}/{repo}"

    push(src, "v1", f"{base}:v1")
    push(src, "v1", f"{base}:also")
    push(src, "v2", f"{base}:v2")
    reg = im.Registry(node.url)
    check_registry_has(reg, repo, img)
    check_registry_has(reg, repo, img2)
    body, ctype, dcd = reg.get_manifest(repo, "v1")
    assert (body, ctype, dcd) == (img.manifest, im.OCI_MANIFEST, img.digest)

    out = tmp_path / "out"
    pull(f"{base}:v1", f"oci:{out}:v1")
    lay = im.read_layout(out)
    ref = lay.ref("v1")
    assert ref.digest == img.digest
    assert ref.body == img.manifest
    assert set(lay.walk(ref)) == {img.digest, *(b.digest for b in img.blobs())}
    assert lay.blob(img.config.digest) == img.config.data
    for layer in img.layers:
        assert lay.blob(layer.digest) == layer.data
    im.verify_layout(out)

    info = inspect(f"{base}:v1")
    assert info["Digest"] == img.digest
    assert sorted(info["RepoTags"]) == ["also", "v1", "v2"]
    assert info["Architecture"] == "amd64"
    assert info["Os"] == "linux"
    assert info["Layers"] == [layer.digest for layer in img.layers]
    assert inspect_raw(f"{base}:v1") == img.manifest
    assert inspect_raw(f"{base}:v1", "--config") == img.config.data
    assert inspect(f"{base}@{img2.digest}")["Digest"] == img2.digest

    tags = json.loads(run_skopeo("list-tags", "--tls-verify=false", base).stdout)
    assert sorted(tags["Tags"]) == ["also", "v1", "v2"]

    # delete removes the manifest (by digest), so every tag on it goes too.
    run_skopeo("delete", "--tls-verify=false", f"{base}:v1")
    for tag in ("v1", "also"):
        r = run_skopeo("inspect", "--tls-verify=false", f"{base}:{tag}", check=False)
        assert r.returncode != 0, f"{tag} still resolves after skopeo delete"
        assert "manifest unknown" in r.stderr.lower(), r.stderr
    status, _, _ = reg.request("GET", f"/v2/{repo}/manifests/{img.digest}")
    assert status == 404
    tags = json.loads(run_skopeo("list-tags", "--tls-verify=false", base).stdout)
    assert tags["Tags"] == ["v2"]
    assert inspect(f"{base}:v2")["Digest"] == img2.digest


def test_skopeo_multi_arch_index(node: NodeProcess, tmp_path: Path) -> None:
    idx = im.build_index([200_000, 40_000], seed="multi")
    amd64, arm64 = idx.image_for("amd64"), idx.image_for("arm64")
    src = im.write_layout(tmp_path / "src", {"multi": idx})
    repo = "clients/multi"
    base = f"docker://{node.hostport}/{repo}"

    push(src, "multi", f"{base}:1.0", "--all")
    reg = im.Registry(node.url)
    check_registry_has(reg, repo, idx)
    body, ctype, dcd = reg.get_manifest(repo, "1.0")
    assert (body, ctype, dcd) == (idx.manifest, im.OCI_INDEX, idx.digest)

    out = tmp_path / "out"
    pull(f"{base}:1.0", f"oci:{out}:1.0", "--all")
    lay = im.read_layout(out)
    top = lay.ref("1.0")
    assert top.digest == idx.digest and top.body == idx.manifest
    children = {c.doc["config"]["digest"]: c for c in lay.children(top)}
    assert [c["platform"] for c in top.doc["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    for img in (amd64, arm64):
        child = children[img.config.digest]
        assert child.digest == img.digest and child.body == img.manifest
    reachable = set(lay.walk(top))
    assert reachable == {
        idx.digest,
        *(d for d, _, _ in idx.manifests()),
        *(b.digest for b in idx.all_blobs()),
    }
    im.verify_layout(out)

    info = inspect(f"{base}:1.0", "--override-arch", "arm64")
    assert info["Digest"] == idx.digest
    assert info["Architecture"] == "arm64"
    assert info["Layers"] == [layer.digest for layer in arm64.layers]
    info = inspect(f"{base}:1.0", "--override-arch", "amd64")
    assert info["Architecture"] == "amd64"
    assert info["Layers"] == [layer.digest for layer in amd64.layers]
    assert inspect_raw(f"{base}:1.0") == idx.manifest

    # Without --all, a copy picks one platform: the arm64 manifest, unchanged.
    one = tmp_path / "arm64"
    pull(f"{base}:1.0", f"oci:{one}:arm", "--override-arch", "arm64")
    ref = im.read_layout(one).ref("arm")
    assert ref.digest == arm64.digest and ref.body == arm64.manifest


def test_skopeo_docker_schema2(node: NodeProcess, tmp_path: Path) -> None:
    img = im.build_image([250_000, 30_000], seed="v2s2")
    src = im.write_layout(tmp_path / "src", {"v1": img})
    repo = "clients/docker"
    base = f"docker://{node.hostport}/{repo}"
    push(src, "v1", f"{base}:v1", "--format", "v2s2")

    reg = im.Registry(node.url)
    body, ctype, dcd = reg.get_manifest(repo, "v1")
    assert ctype == im.DOCKER_MANIFEST
    assert dcd == sha(body)
    doc = json.loads(body)
    assert doc["mediaType"] == im.DOCKER_MANIFEST
    assert doc["config"]["mediaType"] == im.DOCKER_CONFIG
    assert doc["config"]["digest"] == img.config.digest  # same config bytes
    assert [layer["digest"] for layer in doc["layers"]] == [la.digest for la in img.layers]
    assert {layer["mediaType"] for layer in doc["layers"]} == {im.DOCKER_LAYER_GZIP}
    status, hdrs, _ = reg.request(
        "HEAD", f"/v2/{repo}/manifests/v1", headers={"Accept": im.DOCKER_MANIFEST}
    )
    assert status == 200 and hdrs["Docker-Content-Digest"] == dcd

    # Out: dir: keeps the manifest as served, so the digest is preserved.
    out = tmp_path / "dir"
    pull(f"{base}:v1", f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == body
    check_dir_copy(out, dcd)
    for la in img.layers:
        assert (out / la.digest.split(":")[1]).read_bytes() == la.data
    assert inspect_raw(f"{base}:v1") == body
    info = inspect(f"{base}:v1")
    assert info["Digest"] == dcd and info["Architecture"] == "amd64"

    # Docker to Docker, digests preserved, into another repository.
    pull(
        f"{base}:v1",
        f"docker://{node.hostport}/clients/docker-copy:v1",
        "--dest-tls-verify=false",
        "--preserve-digests",
    )
    assert reg.get_manifest("clients/docker-copy", "v1")[2] == dcd


def test_skopeo_docker_manifest_list(node: NodeProcess, tmp_path: Path) -> None:
    # 1. skopeo converts an OCI index to a Docker manifest list on the way in.
    idx = im.build_index([120_000, 20_000], seed="dlist")
    src = im.write_layout(tmp_path / "src", {"multi": idx})
    repo = "clients/dlist"
    base = f"docker://{node.hostport}/{repo}"
    push(src, "multi", f"{base}:l1", "--all", "--format", "v2s2")
    reg = im.Registry(node.url)
    body, ctype, dcd = reg.get_manifest(repo, "l1")
    assert ctype == im.DOCKER_LIST and dcd == sha(body)
    doc = json.loads(body)
    assert [m["mediaType"] for m in doc["manifests"]] == [im.DOCKER_MANIFEST] * 2
    assert [m["platform"]["architecture"] for m in doc["manifests"]] == ["amd64", "arm64"]
    for m, img in zip(doc["manifests"], idx.images, strict=True):
        child, cty, cd = reg.get_manifest(repo, m["digest"])
        assert cty == im.DOCKER_MANIFEST and cd == m["digest"] == sha(child)
        assert [la["digest"] for la in json.loads(child)["layers"]] == [
            la.digest for la in img.layers
        ]
    out = tmp_path / "dir-l1"
    pull(f"{base}:l1", f"dir:{out}", "--all")
    check_dir_copy(out, dcd)
    for m in doc["manifests"]:
        assert (out / (m["digest"].split(":")[1] + ".manifest.json")).is_file()
    info = inspect(f"{base}:l1", "--override-arch", "arm64")
    assert info["Digest"] == dcd and info["Architecture"] == "arm64"

    # 2. A Docker manifest list pushed over HTTP, copied out by skopeo as is.
    dl = im.build_index([50_000], seed="dlist-http", docker=True)
    assert reg.push("clients/dlist-http", "l2", dl) == dl.digest
    check_registry_has(reg, "clients/dlist-http", dl)
    out2 = tmp_path / "dir-l2"
    pull(f"docker://{node.hostport}/clients/dlist-http:l2", f"dir:{out2}", "--all")
    assert (out2 / "manifest.json").read_bytes() == dl.manifest
    check_dir_copy(out2, dl.digest)
    for img in dl.images:
        assert (out2 / (img.digest.split(":")[1] + ".manifest.json")).read_bytes() == img.manifest
        for b in img.blobs():
            assert (out2 / b.digest.split(":")[1]).read_bytes() == b.data
    # ... and registry to registry, digests preserved.
    pull(
        f"docker://{node.hostport}/clients/dlist-http:l2",
        f"docker://{node.hostport}/clients/dlist-copy:l2",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
    )
    check_registry_has(reg, "clients/dlist-copy", dl)
    assert reg.get_manifest("clients/dlist-copy", "l2")[2] == dl.digest


def test_skopeo_sync_and_copy_mount_across_repos(logged_node: NodeProcess, tmp_path: Path) -> None:
    node = logged_node
    img1 = im.build_image([400_000, 90_000], seed="sync-1")
    img2 = im.build_image([80_000], seed="sync-2")
    idx = im.build_index([60_000], seed="sync-3")
    src = im.write_layout(tmp_path / "src", {"v1": img1, "v2": img2, "multi": idx})
    host = node.hostport
    push(src, "v1", f"docker://{host}/team/app:v1")
    push(src, "v2", f"docker://{host}/team/app:v2")
    push(src, "multi", f"docker://{host}/team/app:multi", "--all")
    pushed = {rec["path"] for rec in access_log(node)}

    # sync: every tag of team/app into mirror/app (same registry).
    r = run_skopeo(
        "sync",
        "--all",
        "--src",
        "docker",
        "--dest",
        "docker",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"{host}/team/app",
        f"{host}/mirror",
    )
    assert "Synced" in r.stderr + r.stdout
    # copy: one tag into a third repository.
    pull(
        f"docker://{host}/team/app:v1", f"docker://{host}/copied/app:v1", "--dest-tls-verify=false"
    )

    reg = im.Registry(node.url)
    assert sorted(reg.tags("mirror/app")) == ["multi", "v1", "v2"]
    for tag, item in (("v1", img1), ("v2", img2), ("multi", idx)):
        body, _, dcd = reg.get_manifest("mirror/app", tag)
        assert body == item.manifest and dcd == item.digest
        check_registry_has(reg, "mirror/app", item)
    check_registry_has(reg, "copied/app", img1)

    # The layers reached the new repositories by cross-repository mount
    # (POST ?mount=&from= answered 201), not by uploading them again.
    log = [rec for rec in access_log(node) if rec["path"] not in pushed]
    layers = {
        "mirror/app": [la.digest for it in (img1, img2) for la in it.layers]
        + [la.digest for img in idx.images for la in img.layers],
        "copied/app": [la.digest for la in img1.layers],
    }
    for repo, digests in layers.items():
        mounted = {
            m.group(1).replace("%3A", ":")
            for rec in log
            if rec["method"] == "POST"
            and rec["status"] == 201
            and rec["path"].startswith(f"/v2/{repo}/blobs/uploads/")
            and (m := re.search(r"mount=([^&]+)", rec["path"]))
        }
        uploaded = {
            m.group(1).replace("%3A", ":")
            for rec in log
            if rec["method"] in ("PUT", "POST")
            and rec["path"].startswith(f"/v2/{repo}/blobs/uploads/")
            and (m := re.search(r"[?&]digest=([^&]+)", rec["path"]))
        }
        assert set(digests) <= mounted, f"{repo}: not mounted: {set(digests) - mounted}"
        assert not set(digests) & uploaded, f"{repo}: layers uploaded again"


def test_skopeo_copies_an_artifact(node: NodeProcess, tmp_path: Path) -> None:
    """An OCI artifact (empty config, artifactType, subject) pushed over HTTP
    is listed by the referrers API and copied by skopeo byte for byte."""
    img = im.build_image([20_000], seed="art-subject")
    art = im.build_artifact(
        "application/vnd.example.sbom+json", {"sbom.json": b'{"packages": []}'}, subject=img
    )
    reg = im.Registry(node.url)
    reg.push("art/app", "v1", img)
    for b in art.blobs():
        reg.push_blob("art/app", b)
    assert reg.put_manifest("art/app", art.digest, art.manifest, im.OCI_MANIFEST) == art.digest
    status, _, body = reg.request("GET", f"/v2/art/app/referrers/{img.digest}")
    assert status == 200
    assert [(d["digest"], d.get("artifactType")) for d in json.loads(body)["manifests"]] == [
        (art.digest, "application/vnd.example.sbom+json")
    ]
    src = f"docker://{node.hostport}/art/app@{art.digest}"
    out = tmp_path / "out"
    pull(src, f"oci:{out}:sbom", "--preserve-digests")
    lay = im.read_layout(out)
    ref = lay.ref("sbom")
    assert ref.digest == art.digest and ref.body == art.manifest
    assert set(lay.walk(ref)) == {art.digest, *(b.digest for b in art.blobs())}
    pull(
        src,
        f"docker://{node.hostport}/art/copy@{art.digest}",
        "--preserve-digests",
        "--dest-tls-verify=false",
    )
    check_registry_has(reg, "art/copy", art)
    status, _, body = reg.request("GET", f"/v2/art/copy/referrers/{img.digest}")
    assert [d["digest"] for d in json.loads(body)["manifests"]] == [art.digest]


# -- containerd ----------------------------------------------------------------


def test_containerd_pull(node: NodeProcess, tmp_path: Path) -> None:
    img = im.build_image([500_000, 64_000], seed="ctr-single")
    idx = im.build_index([100_000], seed="ctr-multi")
    dimg = im.build_image([90_000], seed="ctr-docker", docker=True)
    reg = im.Registry(node.url)
    assert reg.push("ctr/single", "v1", img) == img.digest
    assert reg.push("ctr/multi", "v1", idx) == idx.digest
    assert reg.push("ctr/docker", "v1", dimg) == dimg.digest

    with Containerd(tmp_path / "containerd") as ctrd:
        host = node.hostport
        ctrd.pull(f"{host}/ctr/single:v1", "--user", OWNER_CREDS)
        ctrd.pull(f"{host}/ctr/multi:v1", "--all-platforms", "--user", OWNER_CREDS)
        ctrd.pull(f"{host}/ctr/docker:v1", "--user", OWNER_CREDS)
        listed = ctrd.images()
        assert listed[f"{host}/ctr/single:v1"] == (im.OCI_MANIFEST, img.digest)
        assert listed[f"{host}/ctr/multi:v1"] == (im.OCI_INDEX, idx.digest)
        assert listed[f"{host}/ctr/docker:v1"] == (im.DOCKER_MANIFEST, dimg.digest)

        content = ctrd.content()
        for item in (img, idx, dimg):
            for digest, body, _ in item.manifests():
                assert digest in content
                assert ctrd.content_bytes(digest) == body
            for b in item.all_blobs():
                assert b.digest in content, f"{b.digest} not fetched"
        for layer in img.layers:
            assert ctrd.content_bytes(layer.digest) == layer.data
        check = ctrd.ctr("images", "check").stdout
        for ref in listed:
            line = next(line for line in check.splitlines() if line.startswith(ref + " "))
            assert "complete" in line, line
        # The pulled image was unpacked into snapshots (one per layer).
        snaps = ctrd.ctr("snapshots", "--snapshotter", ctrd.snapshotter, "ls").stdout
        assert len(snaps.splitlines()) - 1 >= len(img.layers)


# -- podman --------------------------------------------------------------------


def test_podman_pull(node: NodeProcess, tmp_path: Path) -> None:
    exe = shutil.which("podman")
    if exe is None:
        raise RuntimeError("podman not found: apt-get install -y podman")
    img = im.build_image([300_000, 20_000], seed="podman")
    idx = im.build_index([50_000], seed="podman-multi")
    reg = im.Registry(node.url)
    reg.push("pod/single", "v1", img)
    reg.push("pod/multi", "v1", idx)
    runroot = tempfile.mkdtemp(prefix="mpod-", dir="/tmp")  # podman wants <= 50 chars
    base = [
        exe,
        "--root",
        str(tmp_path / "proot"),
        "--runroot",
        runroot,
        "--storage-driver",
        "vfs",
        "--events-backend",
        "none",
        "--cgroup-manager",
        "cgroupfs",
    ]

    def podman(*args: str) -> str:
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, redact(f"podman {' '.join(args)}: {r.stderr[-3000:]}")
        return r.stdout

    try:
        host = node.hostport
        podman("pull", "-q", "--tls-verify=false", "--creds", OWNER_CREDS, f"{host}/pod/single:v1")
        info = json.loads(podman("image", "inspect", f"{host}/pod/single:v1"))[0]
        assert info["Digest"] == img.digest
        assert info["Id"] == img.config.digest.split(":")[1]
        assert info["Architecture"] == "amd64"
        assert f"{host}/pod/single@{img.digest}" in info["RepoDigests"]

        podman("pull", "-q", "--tls-verify=false", "--creds", OWNER_CREDS, "--arch", "arm64",
               f"{host}/pod/multi:v1")  # fmt: skip
        info = json.loads(podman("image", "inspect", f"{host}/pod/multi:v1"))[0]
        arm64 = idx.image_for("arm64")
        assert info["Architecture"] == "arm64"
        assert info["Id"] == arm64.config.digest.split(":")[1]
        assert f"{host}/pod/multi@{idx.digest}" in info["RepoDigests"]
        assert f"{host}/pod/multi@{arm64.digest}" in info["RepoDigests"]
    finally:
        subprocess.run([*base, "rmi", "-a", "-f"], capture_output=True, timeout=120)
        shutil.rmtree(runroot, ignore_errors=True)
