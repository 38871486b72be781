"""The base endpoint, the shape of every error, unsupported methods and
unknown endpoints, and client mistakes that must never be answered with 500."""

from __future__ import annotations

import uuid

import pytest

from tests import oci
from tests.oci import Client, assert_error

reg_node = oci.module_node_fixture("errors")
api = oci.client_fixture()


async def test_base_endpoint(api: Client) -> None:
    r = await api.get("/v2/")
    assert r.status == 200, r
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    r = await api.head("/v2/")
    assert r.status == 200, r
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert r.body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_base_endpoint_unsupported_methods(api: Client, method: str) -> None:
    assert_error(await api.req(method, "/v2/"), 405, "UNSUPPORTED")


async def test_every_error_has_the_oci_shape(api: Client) -> None:
    """Errors of every kind: JSON ``{"errors": [{code, message, detail?}]}``,
    with the API version header."""
    repo = oci.repo_name()
    d = oci.unknown_digest()
    await api.push_blob(repo, oci.blob_bytes())
    cases = [
        (await api.get(oci.blob_path(repo, d)), 404, "BLOB_UNKNOWN"),
        (await api.get(oci.blob_path(repo, "sha256:x")), 400, "DIGEST_INVALID"),
        (await api.get(oci.manifest_path(repo, "nope")), 404, "MANIFEST_UNKNOWN"),
        (await api.get(f"/v2/{oci.repo_name()}/tags/list"), 404, "NAME_UNKNOWN"),
        (await api.get("/v2/Bad/tags/list"), 400, "NAME_INVALID"),
        (await api.get(f"/v2/{repo}/blobs/uploads/{uuid.uuid4()}"), 404, "BLOB_UPLOAD_UNKNOWN"),
        (await api.put_manifest(repo, "t", b"{"), 400, "MANIFEST_INVALID"),
        (await api.get("/v2/_catalog?n=x"), 400, "PAGINATION_NUMBER_INVALID"),
        (await api.req("PATCH", "/v2/_catalog"), 405, "UNSUPPORTED"),
    ]
    for r, status, code in cases:
        assert_error(r, status, code)
        err = r.json()["errors"][0]
        assert set(err) <= {"code", "message", "detail"}, r
        assert err["message"], r


@pytest.mark.parametrize(
    "path",
    [
        "/v2/x/y/z",
        "/v2/repo/unknown/thing",
        "/v2/repo/blobs",
        "/v2/repo/manifests/",
        "/v2/repo/tags/list/",
        "/v2/repo/blobs/uploads/a/b",
    ],
)
async def test_unknown_endpoint(api: Client, path: str) -> None:
    r = await api.get(path)
    assert r.status in (400, 404), r
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize(
    ("method", "path_template", "params", "headers", "data"),
    [
        ("GET", "/v2/{repo}/tags/list", {"n": "99999999999999999999999999"}, None, None),
        ("GET", "/v2/{repo}/tags/list", {"last": "\u00e9\u0000/../x"}, None, None),
        ("GET", "/v2/_catalog", {"n": "1", "last": "%%%"}, None, None),
        ("GET", "/v2/{repo}/blobs/sha256:%00", None, None, None),
        ("GET", "/v2/{repo}/blobs/{digest}", None, {"Range": "bytes=abc"}, None),
        ("GET", "/v2/{repo}/blobs/{digest}", None, {"Range": "bytes=5-2"}, None),
        ("GET", "/v2/{repo}/blobs/{digest}", None, {"Range": "items=0-1"}, None),
        ("GET", "/v2/{repo}/manifests/{digest}", None, {"Accept": ",,;;q=x"}, None),
        ("GET", "/v2/{repo}/referrers/{digest}", {"artifactType": ""}, None, None),
        ("POST", "/v2/{repo}/blobs/uploads/", {"mount": "sha256:zz", "from": "x"}, None, None),
        ("POST", "/v2/{repo}/blobs/uploads/", {"mount": "{digest}", "from": "A//"}, None, None),
        ("POST", "/v2/{repo}/blobs/uploads/", {"digest": "sha256:zz"}, None, b"x"),
        ("PUT", "/v2/{repo}/manifests/v1", {"tag": "%%"}, {"Content-Type": "a/b"}, b"{}"),
        ("PUT", "/v2/{repo}/manifests/v1", None, {"Content-Type": oci.OCI_MANIFEST}, b"null"),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_INDEX},
            b'{"schemaVersion":2,"manifests":[null]}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_INDEX},
            b'{"schemaVersion":2,"manifests":{}}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_INDEX},
            b'{"schemaVersion":2,"manifests":[],"blobs":[1]}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_INDEX},
            b'{"schemaVersion":2,"manifests":[],"blobs":{"a":1}}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_MANIFEST},
            b'{"schemaVersion":2,"config":{"mediaType":"a","digest":5,"size":1}}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_MANIFEST},
            b'{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:x","size":1e999}}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_MANIFEST},
            b'{"schemaVersion":2,"subject":{},"config":{}}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_MANIFEST},
            b'{"schemaVersion":2, "schemaVersion":2, "config":[]}',
        ),
        (
            "PUT",
            "/v2/{repo}/manifests/v1",
            None,
            {"Content-Type": oci.OCI_MANIFEST},
            b'{"schemaVersion":2,"annotations":[]}',
        ),
    ],
)
async def test_client_mistakes_are_never_500(
    api: Client,
    method: str,
    path_template: str,
    params: dict | None,
    headers: dict | None,
    data: bytes | None,
) -> None:
    repo = oci.repo_name()
    d = await api.push_blob(repo, oci.blob_bytes(100))
    m = oci.image(1)
    await api.push(repo, m, "v0")
    path = path_template.format(repo=repo, digest=d if "blobs" in path_template else m.digest)
    if params:
        params = {k: v.format(digest=d) for k, v in params.items()}
    r = await api.req(method, path, params=params, headers=headers, data=data)
    assert r.status < 500, r
    if r.status >= 400 and r.status != 416:
        assert_error(r, r.status)
    # The registry still serves what was there.
    assert (await api.get(oci.manifest_path(repo, "v0"))).body == m.body
