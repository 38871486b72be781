"""Manifests: PUT/GET/HEAD/DELETE by tag and digest for the four manifest
types, content negotiation, reference checks, validation, tags on push."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from tests import oci
from tests.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Client,
    Manifest,
    assert_error,
    manifest_path,
)

reg_node = oci.module_node_fixture("manifests")
api = oci.client_fixture()


def _oci_image() -> Manifest:
    return oci.image(2, annotations={"org.opencontainers.image.title": "demo"}, indent=2)


def _oci_index() -> Manifest:
    return oci.index([oci.image(1), oci.image(2)], annotations={"a": "b"}, indent=4)


def _docker_image() -> Manifest:
    return oci.image(2, media_type=DOCKER_MANIFEST, indent=3)


def _docker_list() -> Manifest:
    children = [oci.image(1, media_type=DOCKER_MANIFEST) for _ in range(3)]
    return oci.index(children, media_type=DOCKER_LIST, indent=3)


KINDS: dict[str, Callable[[], Manifest]] = {
    "oci-image": _oci_image,
    "oci-index": _oci_index,
    "docker-image": _docker_image,
    "docker-list": _docker_list,
}


async def _push_refs(api: Client, repo: str, m: Manifest) -> None:
    for child in m.children:
        await api.push(repo, child)
    for b in m.blobs:
        await api.push_blob(repo, b, m.alg)


def _check_served(r: oci.Resp, m: Manifest, head: bool = False) -> None:
    assert r.status == 200, r
    assert r.headers["Docker-Content-Digest"] == m.digest, r
    assert r.headers["Content-Type"] == m.media_type, r
    assert int(r.headers["Content-Length"]) == len(m.body), r
    if head:
        assert r.body == b"", r
    else:
        assert r.body == m.body, r
        assert oci.digest(r.body) == m.digest


@pytest.mark.parametrize("kind", list(KINDS))
async def test_put_get_head_by_tag_and_digest(api: Client, kind: str) -> None:
    repo = oci.repo_name()
    m = KINDS[kind]()
    await _push_refs(api, repo, m)

    r = await api.put_manifest(repo, "v1", m.body, m.media_type)
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == m.digest
    assert r.location.endswith(manifest_path(repo, m.digest)), r
    assert "OCI-Subject" not in r.headers

    for ref in ("v1", m.digest):
        _check_served(await api.get(manifest_path(repo, ref)), m)
        _check_served(await api.head(manifest_path(repo, ref)), m, head=True)
        # Served to a client that accepts exactly this type, and to any.
        r = await api.get(manifest_path(repo, ref), headers={"Accept": m.media_type})
        _check_served(r, m)
        r = await api.get(manifest_path(repo, ref), headers={"Accept": "*/*"})
        _check_served(r, m)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_put_by_digest_then_delete(api: Client, kind: str) -> None:
    repo = oci.repo_name()
    m = KINDS[kind]()
    await _push_refs(api, repo, m)
    r = await api.put_manifest(repo, m.digest, m.body, m.media_type)
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == m.digest
    assert "OCI-Tag" not in r.headers
    _check_served(await api.get(manifest_path(repo, m.digest)), m)

    r = await api.delete(manifest_path(repo, m.digest))
    assert r.status == 202, r
    assert_error(await api.get(manifest_path(repo, m.digest)), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.head(manifest_path(repo, m.digest)), 404)
    assert_error(await api.delete(manifest_path(repo, m.digest)), 404, "MANIFEST_UNKNOWN")


async def test_put_without_content_type_uses_body_media_type(api: Client) -> None:
    repo = oci.repo_name()
    for m in (oci.image(1), oci.image(1, media_type=DOCKER_MANIFEST)):
        await _push_refs(api, repo, m)
        r = await api.put_manifest(repo, m.digest, m.body, media_type=None)
        assert r.status == 201, r
        _check_served(await api.get(manifest_path(repo, m.digest)), m)


async def test_put_same_manifest_twice_is_idempotent(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, "t")
    r = await api.put_manifest(repo, "t", m.body, m.media_type)
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == m.digest
    _check_served(await api.get(manifest_path(repo, "t")), m)


async def test_retag_moves_tag(api: Client) -> None:
    repo = oci.repo_name()
    a, b = oci.image(1), oci.image(1)
    await api.push(repo, a, "latest")
    await api.push(repo, b, "latest")
    _check_served(await api.get(manifest_path(repo, "latest")), b)
    _check_served(await api.get(manifest_path(repo, a.digest)), a)


# -- content negotiation ----------------------------------------------------

DOCKER_ONLY = f"{DOCKER_MANIFEST}, {DOCKER_LIST}"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_docker_only_client_does_not_get_oci_index(api: Client, method: str) -> None:
    repo = oci.repo_name()
    m = _oci_index()
    await api.push(repo, m, "multi")
    for ref in ("multi", m.digest):
        r = await api.req(method, manifest_path(repo, ref), headers={"Accept": DOCKER_ONLY})
        assert_error(r, 404, "MANIFEST_UNKNOWN")
    r = await api.req(method, manifest_path(repo, "multi"))  # no Accept at all
    _check_served(r, m, head=method == "HEAD")


@pytest.mark.parametrize(
    "accept",
    [
        [f"{DOCKER_MANIFEST}", f"{OCI_INDEX}"],  # several Accept headers
        [f"{DOCKER_MANIFEST};q=0.9, {OCI_INDEX};q=0.5, {OCI_MANIFEST}"],  # parameters
        [f"{DOCKER_MANIFEST},{OCI_INDEX}"],  # no space after the comma
    ],
)
async def test_accept_lists(api: Client, accept: list[str]) -> None:
    repo = oci.repo_name()
    m = _oci_index()
    await api.push(repo, m, "multi")
    async with api.session.get(
        api.url(manifest_path(repo, "multi")), headers=[("Accept", a) for a in accept]
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == OCI_INDEX
        assert await r.read() == m.body


async def test_docker_client_gets_docker_types(api: Client) -> None:
    repo = oci.repo_name()
    img, lst = _docker_image(), _docker_list()
    await api.push(repo, img, "img")
    await api.push(repo, lst, "lst")
    for ref, m in (("img", img), ("lst", lst)):
        r = await api.get(manifest_path(repo, ref), headers={"Accept": DOCKER_ONLY})
        _check_served(r, m)


# -- references ---------------------------------------------------------------


async def test_missing_layer(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(2)
    await api.push_blob(repo, m.blobs[0])  # config
    await api.push_blob(repo, m.blobs[1])  # first layer only
    r = await api.put_manifest(repo, "v1", m.body, m.media_type)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, m.digest)), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, "v1")), 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_missing_config(api: Client, media_type: str) -> None:
    repo = oci.repo_name()
    m = oci.image(1, media_type=media_type)
    await api.push_blob(repo, m.blobs[1])  # layer only
    r = await api.put_manifest(repo, "v1", m.body, m.media_type)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, "v1")), 404, "MANIFEST_UNKNOWN")


async def test_blob_in_another_repository_does_not_count(api: Client) -> None:
    repo, other = oci.repo_name(), oci.repo_name()
    m = oci.image(1)
    for b in m.blobs:
        await api.push_blob(other, b)
    r = await api.put_manifest(repo, m.digest, m.body, m.media_type)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
async def test_index_with_missing_child(api: Client, media_type: str) -> None:
    repo = oci.repo_name()
    child_type = DOCKER_MANIFEST if media_type == DOCKER_LIST else OCI_MANIFEST
    present, absent = oci.image(1, media_type=child_type), oci.image(1, media_type=child_type)
    await api.push(repo, present)
    for b in absent.blobs:  # its blobs are there, the manifest is not
        await api.push_blob(repo, b)
    m = oci.index([present, absent], media_type=media_type)
    r = await api.put_manifest(repo, "multi", m.body, m.media_type)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, "multi")), 404, "MANIFEST_UNKNOWN")


async def test_index_child_deleted_before_push(api: Client) -> None:
    repo = oci.repo_name()
    child = oci.image(1)
    await api.push(repo, child)
    assert (await api.delete(manifest_path(repo, child.digest))).status == 202
    m = oci.index([child])
    assert_error(
        await api.put_manifest(repo, m.digest, m.body, OCI_INDEX), 400, "MANIFEST_BLOB_UNKNOWN"
    )


async def test_missing_subject_is_accepted(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)  # never pushed
    m = oci.artifact(subject)
    await _push_refs(api, repo, m)
    r = await api.put_manifest(repo, m.digest, m.body, m.media_type)
    assert r.status == 201, r
    assert r.headers["OCI-Subject"] == subject.digest
    _check_served(await api.get(manifest_path(repo, m.digest)), m)


async def test_subject_present_header(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    m = oci.image(1, subject=subject)
    r = await api.push(repo, m)
    assert r.headers["OCI-Subject"] == subject.digest


@pytest.mark.parametrize(
    "layer_type",
    [
        oci.OCI_NONDIST_LAYER,
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ],
)
async def test_non_distributable_layer_with_urls(api: Client, layer_type: str) -> None:
    repo = oci.repo_name()
    foreign = oci.blob_bytes(100)
    config = oci.config_bytes()
    media_type = DOCKER_MANIFEST if "docker" in layer_type else OCI_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": oci.descriptor(
            config, oci.DOCKER_CONFIG if "docker" in layer_type else oci.OCI_CONFIG
        ),
        "layers": [
            oci.descriptor(foreign, layer_type, urls=["https://example.com/layer.tar.gz"]),
        ],
    }
    body = oci.encode(doc)
    await api.push_blob(repo, config)
    r = await api.put_manifest(repo, "foreign", body, media_type)
    assert r.status == 201, r
    r = await api.get(manifest_path(repo, "foreign"))
    assert r.status == 200 and r.body == body, r
    assert_error(await api.head(oci.blob_path(repo, oci.digest(foreign))), 404)


async def test_non_distributable_layer_without_urls_needs_blob(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1, layer_type=oci.OCI_NONDIST_LAYER)
    await api.push_blob(repo, m.blobs[0])
    r = await api.put_manifest(repo, "v1", m.body, m.media_type)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")


async def test_regular_layer_with_urls_needs_blob(api: Client) -> None:
    repo = oci.repo_name()
    layer = oci.blob_bytes()
    config = oci.config_bytes()
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": oci.descriptor(config, oci.OCI_CONFIG),
        "layers": [oci.descriptor(layer, oci.OCI_LAYER, urls=["https://example.com/l"])],
    }
    await api.push_blob(repo, config)
    r = await api.put_manifest(repo, "v1", oci.encode(doc), OCI_MANIFEST)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")


# -- size ---------------------------------------------------------------------


def _padded(m: Manifest, total: int) -> bytes:
    """``m``'s document padded with an annotation to exactly ``total`` bytes."""
    doc = m.doc
    doc["annotations"] = {"pad": ""}
    base = len(oci.encode(doc))
    doc["annotations"]["pad"] = "x" * (total - base)
    body = oci.encode(doc)
    assert len(body) == total
    return body


async def test_manifest_of_exactly_4_mib_is_accepted(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    body = _padded(m, 4 * oci.MIB)
    r = await api.put_manifest(repo, "big", body, OCI_MANIFEST)
    assert r.status == 201, r
    r = await api.get(manifest_path(repo, "big"))
    assert r.status == 200 and r.body == body, r


@pytest.mark.parametrize("streamed", [False, True])
async def test_manifest_over_4_mib_is_rejected(api: Client, streamed: bool) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    body = _padded(m, 4 * oci.MIB + 1)
    data = oci.chunks(body, 256 * 1024) if streamed else body
    r = await api.put(manifest_path(repo, "big"), data=data, headers={"Content-Type": OCI_MANIFEST})
    assert_error(r, 413, "SIZE_INVALID", "MANIFEST_INVALID")
    assert_error(await api.get(manifest_path(repo, "big")), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, oci.digest(body))), 404, "MANIFEST_UNKNOWN")


# -- invalid manifests ----------------------------------------------------------


def _valid_doc() -> tuple[dict, list[bytes]]:
    m = oci.image(1)
    return m.doc, m.blobs


def _mutate(fn: Callable[[dict], object]) -> Callable[[dict], bytes]:
    def build(doc: dict) -> bytes:
        fn(doc)
        return oci.encode(doc)

    return build


INVALID: dict[str, Callable[[dict], bytes]] = {
    "not-json": lambda d: b"{this is not json",
    "truncated-json": lambda d: oci.encode(d)[:-1],
    "empty-body": lambda d: b"",
    "json-array": lambda d: b"[]",
    "json-string": lambda d: b'"manifest"',
    "invalid-utf8": lambda d: b'{"schemaVersion": 2, "x": "\xff\xfe"}',
    "deeply-nested": lambda d: (
        b'{"schemaVersion": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    ),
    "schema-version-1": _mutate(lambda d: d.update(schemaVersion=1)),
    "schema-version-3": _mutate(lambda d: d.update(schemaVersion=3)),
    "schema-version-string": _mutate(lambda d: d.update(schemaVersion="2")),
    "schema-version-missing": _mutate(lambda d: d.pop("schemaVersion")),
    "config-missing": _mutate(lambda d: d.pop("config")),
    "config-not-object": _mutate(lambda d: d.update(config="sha256:abc")),
    "config-digest-malformed": _mutate(lambda d: d["config"].update(digest="sha256:nothex")),
    "config-digest-missing": _mutate(lambda d: d["config"].pop("digest")),
    "config-size-negative": _mutate(lambda d: d["config"].update(size=-1)),
    "config-size-string": _mutate(lambda d: d["config"].update(size="12")),
    "config-size-float": _mutate(lambda d: d["config"].update(size=1.5)),
    "config-media-type-missing": _mutate(lambda d: d["config"].pop("mediaType")),
    "layers-not-list": _mutate(lambda d: d.update(layers={"a": 1})),
    "layer-not-object": _mutate(lambda d: d.update(layers=["sha256:abc"])),
    "layer-digest-bad-algorithm": _mutate(
        lambda d: d["layers"][0].update(digest="md5:d41d8cd98f00b204e9800998ecf8427e")
    ),
    "layer-urls-not-list": _mutate(lambda d: d["layers"][0].update(urls="https://x")),
    "annotations-not-strings": _mutate(lambda d: d.update(annotations={"a": 1})),
    "image-with-manifests": _mutate(lambda d: d.update(manifests=[])),
    "subject-not-descriptor": _mutate(lambda d: d.update(subject="sha256:abc")),
    "media-type-not-string": _mutate(lambda d: d.update(mediaType=5)),
    "artifact-type-not-string": _mutate(lambda d: d.update(artifactType=["x"])),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_manifest(api: Client, case: str) -> None:
    repo = oci.repo_name()
    doc, blobs = _valid_doc()
    for b in blobs:
        await api.push_blob(repo, b)
    body = INVALID[case](doc)
    r = await api.put_manifest(repo, "bad", body, OCI_MANIFEST)
    assert_error(r, 400, "MANIFEST_INVALID")
    assert_error(await api.get(manifest_path(repo, "bad")), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, oci.digest(body))), 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize(
    ("content_type", "body_type"),
    [
        (OCI_MANIFEST, DOCKER_MANIFEST),
        (DOCKER_MANIFEST, OCI_MANIFEST),
        (OCI_INDEX, OCI_MANIFEST),
        (OCI_MANIFEST, OCI_INDEX),
        (DOCKER_LIST, OCI_INDEX),
    ],
)
async def test_media_type_mismatch(api: Client, content_type: str, body_type: str) -> None:
    repo = oci.repo_name()
    m = oci.image(1) if body_type in (OCI_MANIFEST, DOCKER_MANIFEST) else oci.index([oci.image(1)])
    await _push_refs(api, repo, m)
    doc = m.doc
    doc["mediaType"] = body_type
    body = oci.encode(doc)
    r = await api.put_manifest(repo, "bad", body, content_type)
    assert_error(r, 400, "MANIFEST_INVALID")
    assert_error(await api.get(manifest_path(repo, "bad")), 404, "MANIFEST_UNKNOWN")


async def test_index_with_layers_is_invalid(api: Client) -> None:
    repo = oci.repo_name()
    img = oci.image(1)
    await api.push(repo, img)
    m = oci.index([img], extra={"layers": img.doc["layers"]})
    assert_error(await api.put_manifest(repo, "bad", m.body, OCI_INDEX), 400, "MANIFEST_INVALID")


async def test_index_child_descriptor_invalid(api: Client) -> None:
    repo = oci.repo_name()
    img = oci.image(1)
    await api.push(repo, img)
    m = oci.index([img])
    doc = m.doc
    doc["manifests"][0]["size"] = -5
    r = await api.put_manifest(repo, "bad", oci.encode(doc), OCI_INDEX)
    assert_error(r, 400, "MANIFEST_INVALID")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
        "text/plain",
        "application/vnd.example.unknown+json",
    ],
)
async def test_unsupported_content_type(api: Client, content_type: str) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    doc = m.doc
    doc.pop("mediaType")
    r = await api.put_manifest(repo, "bad", oci.encode(doc), content_type)
    assert_error(r, 400, "MANIFEST_INVALID")


async def test_docker_schema1_body_is_rejected(api: Client) -> None:
    repo = oci.repo_name()
    body = oci.encode(
        {"schemaVersion": 1, "name": repo, "tag": "v1", "architecture": "amd64", "fsLayers": []}
    )
    r = await api.put_manifest(repo, "v1", body, media_type=None)
    assert_error(r, 400, "MANIFEST_INVALID")


# -- digests and tags on push ---------------------------------------------------------


async def test_put_by_digest_with_different_body(api: Client) -> None:
    repo = oci.repo_name()
    m, other = oci.image(1), oci.image(1)
    await _push_refs(api, repo, m)
    r = await api.put_manifest(repo, other.digest, m.body, m.media_type)
    assert_error(r, 400, "DIGEST_INVALID")
    assert_error(await api.get(manifest_path(repo, other.digest)), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, m.digest)), 404, "MANIFEST_UNKNOWN")


async def test_put_by_sha512_digest(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    d512 = oci.digest(m.body, "sha512")
    r = await api.put_manifest(repo, d512, m.body, m.media_type)
    assert r.status == 201, r
    assert r.headers["Docker-Content-Digest"] == d512
    r = await api.get(manifest_path(repo, d512))
    assert r.status == 200 and r.body == m.body, r
    assert r.headers["Docker-Content-Digest"] == d512


async def test_put_by_digest_with_tags(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    r = await api.put_manifest(
        repo, m.digest, m.body, m.media_type, params=[("tag", "a"), ("tag", "b")]
    )
    assert r.status == 201, r
    tags = {t.strip() for v in r.headers.getall("OCI-Tag", []) for t in v.split(",")}
    assert tags == {"a", "b"}, r
    for ref in ("a", "b", m.digest):
        _check_served(await api.get(manifest_path(repo, ref)), m)
    r = await api.get(f"/v2/{repo}/tags/list")
    assert r.status == 200 and sorted(r.json()["tags"]) == ["a", "b"], r


async def test_put_by_digest_with_invalid_tag(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    r = await api.put_manifest(
        repo, m.digest, m.body, m.media_type, params=[("tag", "ok"), ("tag", "-bad")]
    )
    assert_error(r, 400, "TAG_INVALID", "MANIFEST_INVALID")
    assert_error(await api.get(manifest_path(repo, m.digest)), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, "ok")), 404, "MANIFEST_UNKNOWN")


# -- delete ---------------------------------------------------------------------------


async def test_delete_by_tag_removes_only_that_tag(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, "one")
    await api.put_manifest(repo, "two", m.body, m.media_type)
    r = await api.delete(manifest_path(repo, "one"))
    assert r.status == 202, r
    assert_error(await api.get(manifest_path(repo, "one")), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.head(manifest_path(repo, "one")), 404)
    _check_served(await api.get(manifest_path(repo, m.digest)), m)
    _check_served(await api.get(manifest_path(repo, "two")), m)
    r = await api.get(f"/v2/{repo}/tags/list")
    assert r.json()["tags"] == ["two"], r
    assert_error(await api.delete(manifest_path(repo, "one")), 404, "MANIFEST_UNKNOWN")


async def test_delete_by_digest_removes_manifest_and_its_tags(api: Client) -> None:
    repo = oci.repo_name()
    m, keep = oci.image(1), oci.image(1)
    await api.push(repo, keep, "keep")
    await api.push(repo, m, "x")
    await api.put_manifest(repo, "y", m.body, m.media_type)
    r = await api.delete(manifest_path(repo, m.digest))
    assert r.status == 202, r
    for ref in ("x", "y", m.digest):
        assert_error(await api.get(manifest_path(repo, ref)), 404, "MANIFEST_UNKNOWN")
        assert_error(await api.head(manifest_path(repo, ref)), 404)
    r = await api.get(f"/v2/{repo}/tags/list")
    assert r.status == 200 and r.json()["tags"] == ["keep"], r
    _check_served(await api.get(manifest_path(repo, "keep")), keep)
    # The blobs stay (only the manifest was deleted) and it can be pushed again.
    for b in m.blobs:
        assert (await api.head(oci.blob_path(repo, oci.digest(b)))).status == 200
    assert (await api.put_manifest(repo, "x", m.body, m.media_type)).status == 201
    _check_served(await api.get(manifest_path(repo, "x")), m)


async def test_delete_unknown(api: Client) -> None:
    repo = oci.repo_name()
    await api.push(repo, oci.image(1), "v1")
    assert_error(await api.delete(manifest_path(repo, "nope")), 404, "MANIFEST_UNKNOWN")
    r = await api.delete(manifest_path(repo, oci.unknown_digest()))
    assert_error(r, 404, "MANIFEST_UNKNOWN")


# -- unknown and invalid references ----------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_unknown_manifest(api: Client, method: str) -> None:
    repo = oci.repo_name()
    await api.push(repo, oci.image(1), "v1")
    for ref in ("v2", oci.unknown_digest(), oci.unknown_digest("sha512")):
        assert_error(await api.req(method, manifest_path(repo, ref)), 404, "MANIFEST_UNKNOWN")


async def test_manifest_in_unknown_repository(api: Client) -> None:
    repo = oci.repo_name()
    for ref in ("latest", oci.unknown_digest()):
        r = await api.get(manifest_path(repo, ref))
        assert_error(r, 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN")


async def test_manifest_of_another_repository(api: Client) -> None:
    repo, other = oci.repo_name(), oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, "v1")
    await api.push(other, oci.image(1), "v1")
    assert_error(await api.get(manifest_path(other, m.digest)), 404, "MANIFEST_UNKNOWN")


INVALID_TAGS = ["-bad", ".bad", "a" * 129, "bad%20tag", "bad+tag", "%C3%A9t%C3%A9"]


@pytest.mark.parametrize("tag", INVALID_TAGS)
async def test_invalid_tag(api: Client, tag: str) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, "v1")
    r = await api.put_manifest(repo, tag, m.body, m.media_type)
    assert_error(r, 400, "TAG_INVALID", "MANIFEST_INVALID", "NAME_INVALID")
    for method in ("GET", "DELETE"):
        r = await api.req(method, manifest_path(repo, tag))
        assert_error(r, 400, "TAG_INVALID", "MANIFEST_INVALID", "NAME_INVALID")
    assert_error(await api.head(manifest_path(repo, tag)), 400)
    assert json.loads((await api.get(f"/v2/{repo}/tags/list")).body)["tags"] == ["v1"]


async def test_longest_valid_tag(api: Client) -> None:
    repo = oci.repo_name()
    tag = "_" + "a" * 127
    m = oci.image(1)
    await api.push(repo, m, tag)
    _check_served(await api.get(manifest_path(repo, tag)), m)


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_malformed_digest_reference(api: Client, method: str) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, "v1")
    for ref in ("sha256:abc", "sha256:" + "A" * 64, "md5:d41d8cd98f00b204e9800998ecf8427e"):
        data = m.body if method == "PUT" else None
        headers = {"Content-Type": OCI_MANIFEST} if method == "PUT" else None
        r = await api.req(method, manifest_path(repo, ref), data=data, headers=headers)
        assert_error(r, 400, "DIGEST_INVALID")


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_manifest_unsupported_methods(api: Client, method: str) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, "v1")
    r = await api.req(method, manifest_path(repo, "v1"), data=m.body)
    assert_error(r, 405, "UNSUPPORTED")


async def test_content_type_parameters_are_ignored(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    r = await api.put_manifest(repo, "v1", m.body, f"{OCI_MANIFEST}; charset=utf-8")
    assert r.status == 201, r
    _check_served(await api.get(manifest_path(repo, "v1")), m)


async def test_blob_digest_is_not_a_manifest(api: Client) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    await api.push(repo, m, "v1")
    layer = oci.digest(m.blobs[1])
    assert_error(await api.get(manifest_path(repo, layer)), 404, "MANIFEST_UNKNOWN")
    assert_error(await api.head(manifest_path(repo, layer)), 404)
    assert_error(await api.delete(manifest_path(repo, layer)), 404, "MANIFEST_UNKNOWN")
    # and an index cannot list a blob as a child manifest
    idx = oci.index([Manifest(m.blobs[1], OCI_MANIFEST)])
    r = await api.put_manifest(repo, "idx", idx.body, OCI_INDEX)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")


# -- concurrency ----------------------------------------------------------------


async def test_concurrent_identical_pushes_to_one_tag_all_succeed(api: Client) -> None:
    """Pushing the same manifest to the same tag from several clients at once
    (parallel CI jobs, client retries) has one outcome, so every push is
    acknowledged: none of them moved the tag away from another."""
    repo = oci.repo_name()
    m = oci.image(1)
    await _push_refs(api, repo, m)
    results = await asyncio.gather(
        *(api.put_manifest(repo, "latest", m.body, m.media_type) for _ in range(8))
    )
    assert [r.status for r in results] == [201] * 8, results
    _check_served(await api.get(manifest_path(repo, "latest")), m)


async def test_concurrent_pushes_of_different_manifests_to_one_tag(api: Client) -> None:
    """Racing pushes of different manifests to one tag: every push is
    acknowledged (201, as CNCF Distribution and ACR do) and the tag ends on
    one of them; every manifest is recorded and pullable by digest."""
    repo = oci.repo_name()
    ms = [oci.image(1) for _ in range(6)]
    for m in ms:
        await _push_refs(api, repo, m)
    results = await asyncio.gather(
        *(api.put_manifest(repo, "latest", m.body, m.media_type) for m in ms)
    )
    assert [r.status for r in results] == [201] * len(ms), results
    r = await api.get(manifest_path(repo, "latest"))
    assert r.status == 200, r
    assert r.headers["Docker-Content-Digest"] in {m.digest for m in ms}
    for m in ms:
        _check_served(await api.get(manifest_path(repo, m.digest)), m)


@pytest.mark.parametrize("size", [10**30, 2**63, -1, 1.5, "12"])
async def test_descriptor_size_out_of_range(api: Client, size: object) -> None:
    """A size no blob can have (beyond a signed 64-bit integer, negative, not
    an integer) is a malformed manifest."""
    repo = oci.repo_name()
    m = oci.image(1)
    for b in m.blobs:
        await api.push_blob(repo, b)
    doc = m.doc
    doc["layers"][0]["size"] = size
    r = await api.put_manifest(repo, "v1", oci.encode(doc))
    assert_error(r, 400, "MANIFEST_INVALID")
    assert_error(await api.get(manifest_path(repo, "v1")), 404)


@pytest.mark.parametrize("where", ["config", "layer", "child"])
async def test_descriptor_size_must_match_the_stored_content(api: Client, where: str) -> None:
    """A descriptor whose size disagrees with the blob (or child manifest)
    stored under its digest does not describe anything the registry holds."""
    repo = oci.repo_name()
    child = oci.image(1)
    await api.push(repo, child)
    if where == "child":
        doc = oci.index([child]).doc
        doc["manifests"][0]["size"] += 1
    else:
        doc = child.doc
        target = doc["config"] if where == "config" else doc["layers"][0]
        target["size"] -= 1
    body = oci.encode(doc)
    mt = OCI_INDEX if where == "child" else OCI_MANIFEST
    r = await api.put_manifest(repo, oci.digest(body), body, mt)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(await api.get(manifest_path(repo, oci.digest(body))), 404)


@pytest.mark.parametrize("content_type", [OCI_MANIFEST, None])
async def test_empty_media_type_is_rejected(api: Client, content_type: str | None) -> None:
    repo = oci.repo_name()
    m = oci.image(1)
    for b in m.blobs:
        await api.push_blob(repo, b)
    doc = m.doc
    doc["mediaType"] = ""
    r = await api.put_manifest(repo, "v1", oci.encode(doc), content_type)
    assert_error(r, 400, "MANIFEST_INVALID")
