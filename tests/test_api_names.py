"""Repository names: nested namespaces work on every endpoint; names outside
the spec's grammar are 400 NAME_INVALID everywhere and never touch the disk."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from tests import oci
from tests.oci import Client, assert_error

reg_node = oci.module_node_fixture("names")
api = oci.client_fixture()

INVALID_NAMES = [
    "../x",
    "../../../../../../tmp/meridian-escape",
    "a/../b",
    "./a",
    "a/.",
    "A/B",
    "Repo",
    "a//b",
    "a/",  # trailing slash
    "/a",
    "a" * 256,
    "/".join(["abcdefghijklmnopqrstuvwxyz0123456789"] * 8),  # 295 characters
    "-a",
    "a-",
    "a_",
    "_a",
    "a..b",
    "a___b",
    "a%20b",
    "caf%C3%A9",
    "_catalog/x",
]


def _endpoints(name: str, m: oci.Manifest) -> list[tuple[str, str, dict]]:
    d = oci.digest(m.blobs[0])
    put = {"data": m.body, "headers": {"Content-Type": m.media_type}}
    return [
        ("GET", f"/v2/{name}/tags/list", {}),
        ("GET", f"/v2/{name}/manifests/latest", {}),
        ("HEAD", f"/v2/{name}/manifests/latest", {}),
        ("PUT", f"/v2/{name}/manifests/latest", put),
        ("PUT", f"/v2/{name}/manifests/{m.digest}", put),
        ("DELETE", f"/v2/{name}/manifests/latest", {}),
        ("GET", f"/v2/{name}/blobs/{d}", {}),
        ("HEAD", f"/v2/{name}/blobs/{d}", {}),
        ("DELETE", f"/v2/{name}/blobs/{d}", {}),
        ("POST", f"/v2/{name}/blobs/uploads/", {}),
        ("POST", f"/v2/{name}/blobs/uploads/", {"params": {"digest": d}, "data": m.blobs[0]}),
        ("POST", f"/v2/{name}/blobs/uploads/", {"params": {"mount": d, "from": "ok/src"}}),
        ("GET", f"/v2/{name}/blobs/uploads/{uuid.uuid4()}", {}),
        ("GET", f"/v2/{name}/referrers/{m.digest}", {}),
    ]


def _snapshot(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


def _outside(data: Path, before: set[str], after: set[str]) -> list[str]:
    """Paths that appeared next to (not inside) the data dir, or escaped it."""
    root = data.parent.parent
    data_rel = os.path.relpath(data, root)
    created = sorted(p for p in after - before if not p.startswith(data_rel + os.sep))
    for stray in (Path("/tmp/meridian-escape"), data.parent / "x", data / "x"):
        if stray.exists():
            created.append(str(stray))
    return created


@pytest.mark.parametrize("name", INVALID_NAMES)
async def test_invalid_name(api: Client, reg_node, name: str) -> None:
    m = oci.image(1)
    await api.push("ok/src", m)
    before = _snapshot(reg_node.data.parent.parent)
    for method, path, kw in _endpoints(name, m):
        r = await api.req(method, path, **kw)
        assert_error(r, 400, "NAME_INVALID")
    after = _snapshot(reg_node.data.parent.parent)
    assert not _outside(reg_node.data, before, after)


async def test_disk_layout_stays_inside_data_dir(api: Client, reg_node) -> None:
    """After every invalid-name test, the data dir holds only what the node
    itself lays out (blobs by digest, upload sessions by uuid, namespace)."""
    data = reg_node.data
    top = set(os.listdir(data))
    assert top <= {
        "blobs",
        "tmp",
        "uploads",
        "reserve",
        "namespace.sqlite",
        "namespace.sqlite-wal",
        "namespace.sqlite-shm",
        "namespace.sqlite-journal",
    }, top
    blob_re = re.compile(r"^(sha256/[0-9a-f]{2}/[0-9a-f]{64}|sha512/[0-9a-f]{2}/[0-9a-f]{128})$")
    for p in _snapshot(data / "blobs"):
        parts = p.split(os.sep)
        if len(parts) == 3:
            assert blob_re.match("/".join(parts)), p
        else:
            assert len(parts) < 3 and all(
                re.match(r"^(sha256|sha512|[0-9a-f]{2})$", x) for x in parts
            ), p
    uuid_re = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    for entry in os.listdir(data / "uploads"):
        assert uuid_re.match(entry), entry


@pytest.mark.parametrize(
    "name",
    [
        "team/app/api",
        "a",
        "a/b/c/d/e/f/g/h",
        "my.org/my_app/my__svc/my-api/my---x",
        "0/1/2",
        "n/manifests/latest",  # the verbs' words are valid path components
        "n/blobs/uploads",
        "n/blobs",
        "n/tags/list",
        "n/referrers/x",
        "a" * 255,
        "/".join(["b" * 50] * 4 + ["c" * 51]),  # 255 characters, nested
    ],
)
async def test_valid_nested_name_on_every_endpoint(api: Client, name: str) -> None:
    subject = oci.image(2)
    await api.push(name, subject, "v1")
    r = await api.get(f"/v2/{name}/manifests/v1")
    assert r.status == 200 and r.body == subject.body, r
    assert (await api.head(f"/v2/{name}/manifests/{subject.digest}")).status == 200

    # chunked upload
    data = oci.blob_bytes(3000)
    start = await api.start_upload(name)
    assert f"/v2/{name}/blobs/uploads/" in start.location, start
    r = await api.patch(
        start.location,
        data=data,
        headers={"Content-Type": "application/octet-stream", "Content-Range": "0-2999"},
    )
    assert r.status == 202, r
    assert (await api.get(r.location)).headers["Range"] == "0-2999"
    d = oci.digest(data)
    r = await api.put(r.location, params={"digest": d})
    assert r.status == 201, r
    g = await api.get(f"/v2/{name}/blobs/{d}")
    assert g.status == 200 and g.body == data, g

    # mount into a sibling, referrers, tags, catalog, delete
    sibling = f"{name[:200]}/sib{uuid.uuid4().hex[:6]}"
    r = await api.post(f"/v2/{sibling}/blobs/uploads/", params={"mount": d, "from": name})
    assert r.status == 201, r
    sbom = oci.artifact(subject, annotations={"n": name[:50]})
    await api.push(name, sbom)
    r = await api.get(f"/v2/{name}/referrers/{subject.digest}")
    assert r.status == 200, r
    assert [x["digest"] for x in r.json()["manifests"]] == [sbom.digest]
    r = await api.get(f"/v2/{name}/tags/list")
    assert r.status == 200 and r.json() == {"name": name, "tags": ["v1"]}, r
    r = await api.get("/v2/_catalog")
    assert name in r.json()["repositories"], r
    assert (await api.delete(f"/v2/{name}/manifests/v1")).status == 202
    assert (await api.delete(f"/v2/{name}/blobs/{d}")).status == 202
    assert_error(await api.get(f"/v2/{name}/blobs/{d}"), 404, "BLOB_UNKNOWN")


async def test_nested_names_are_distinct_repositories(api: Client) -> None:
    base = oci.repo_name("nest")
    parent, child = base, f"{base}/child"
    a, b = oci.image(1), oci.image(1)
    await api.push(parent, a, "v1")
    await api.push(child, b, "v1")
    assert (await api.get(f"/v2/{parent}/manifests/v1")).body == a.body
    assert (await api.get(f"/v2/{child}/manifests/v1")).body == b.body
    assert_error(await api.get(f"/v2/{parent}/manifests/{b.digest}"), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.get(f"/v2/{child}/manifests/{a.digest}"), 404, "MANIFEST_UNKNOWN")
    catalog = (await api.get("/v2/_catalog")).json()["repositories"]
    assert parent in catalog and child in catalog
