"""Referrers API: GET /v2/<name>/referrers/<digest>, artifactType filtering,
artifacts, byte-identical storage of manifests with extra fields."""

from __future__ import annotations

import pytest

from tests import oci
from tests.oci import OCI_INDEX, OCI_MANIFEST, Client, Manifest, assert_error

reg_node = oci.module_node_fixture("referrers")
api = oci.client_fixture()

SBOM = "application/vnd.example.sbom.v1"
SIG = "application/vnd.example.signature.v1"
SIG_CONFIG = "application/vnd.example.signature.config.v1+json"


def _path(repo: str, d: str) -> str:
    return f"/v2/{repo}/referrers/{d}"


async def _referrers(api: Client, repo: str, d: str, **params: str) -> oci.Resp:
    r = await api.get(_path(repo, d), params=params or None)
    assert r.status == 200, r
    assert r.headers["Content-Type"] == OCI_INDEX, r
    body = r.json()
    assert body["schemaVersion"] == 2, r
    assert body["mediaType"] == OCI_INDEX, r
    assert isinstance(body["manifests"], list), r
    return r


def _by_digest(r: oci.Resp) -> dict[str, dict]:
    return {d["digest"]: d for d in r.json()["manifests"]}


async def test_referrers_descriptors(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject, "v1")

    sbom = oci.artifact(subject, SBOM, annotations={"org.example.kind": "spdx", "x": "1"})
    sig = oci.artifact(  # no artifactType: the config's mediaType stands in
        subject,
        None,
        config=b'{"sig": true}',
        config_type=SIG_CONFIG,
        layers=[oci.blob_bytes(64)],
    )
    idx_children = [oci.image(1), oci.image(1)]
    idx = oci.index(idx_children, subject=subject, artifact_type=SIG, annotations={"k": "v"})
    unrelated = oci.image(1)
    for m in (sbom, sig, idx, unrelated):
        await api.push(repo, m)

    r = await _referrers(api, repo, subject.digest)
    got = _by_digest(r)
    assert set(got) == {sbom.digest, sig.digest, idx.digest}, r
    assert got[sbom.digest] == {
        "mediaType": OCI_MANIFEST,
        "digest": sbom.digest,
        "size": len(sbom.body),
        "artifactType": SBOM,
        "annotations": {"org.example.kind": "spdx", "x": "1"},
    }
    assert got[sig.digest]["artifactType"] == SIG_CONFIG
    assert got[sig.digest]["size"] == len(sig.body)
    assert got[sig.digest]["mediaType"] == OCI_MANIFEST
    assert "annotations" not in got[sig.digest] or got[sig.digest]["annotations"] == {}
    assert got[idx.digest]["mediaType"] == OCI_INDEX
    assert got[idx.digest]["artifactType"] == SIG
    assert got[idx.digest]["annotations"] == {"k": "v"}
    assert got[idx.digest]["size"] == len(idx.body)
    # The children of the index and the unrelated image do not refer to it.
    r = await _referrers(api, repo, unrelated.digest)
    assert r.json()["manifests"] == []


async def test_referrers_filter_by_artifact_type(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    sboms = [oci.artifact(subject, SBOM, annotations={"n": str(i)}) for i in range(2)]
    sig = oci.artifact(subject, SIG)
    for m in (*sboms, sig):
        await api.push(repo, m)

    r = await _referrers(api, repo, subject.digest, artifactType=SBOM)
    assert set(_by_digest(r)) == {m.digest for m in sboms}, r
    assert "artifactType" in r.headers.get("OCI-Filters-Applied", ""), r
    assert all(d["artifactType"] == SBOM for d in r.json()["manifests"])

    r = await _referrers(api, repo, subject.digest, artifactType="application/vnd.none")
    assert r.json()["manifests"] == [], r
    assert "artifactType" in r.headers.get("OCI-Filters-Applied", ""), r

    r = await _referrers(api, repo, subject.digest)
    assert len(r.json()["manifests"]) == 3
    assert "OCI-Filters-Applied" not in r.headers


async def test_artifact_without_layers(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    m = oci.artifact(subject, SBOM, layers=[])
    assert m.doc["layers"] == []
    r = await api.push(repo, m)
    assert r.headers["OCI-Subject"] == subject.digest
    got = await api.get(oci.manifest_path(repo, m.digest))
    assert got.status == 200 and got.body == m.body, got
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {m.digest}


async def test_data_field_and_unknown_fields_are_kept_byte_identical(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    payload = b'{"hello": "world"}'
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM,
        "config": oci.descriptor(oci.EMPTY_JSON, oci.OCI_EMPTY, data=oci.b64(oci.EMPTY_JSON)),
        "layers": [
            oci.descriptor(
                payload,
                "application/json",
                data=oci.b64(payload),
                annotations={"org.opencontainers.image.title": "hello.json"},
                **{"x-custom-descriptor-field": [1, 2, {"deep": None}]},
            )
        ],
        "subject": subject.descriptor(**{"x-subject-extra": True}),
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        "x-unknown-top-level": {"numbers": [1.5, -0.0, 1e300], "unicode": "\u00e9\u4e2d"},
    }
    body = b"{\n\t" + oci.encode(doc, indent=1)[1:]  # unusual but valid whitespace
    m = Manifest(body, OCI_MANIFEST, [oci.EMPTY_JSON, payload])
    await api.push(repo, m, "odd")
    for ref in ("odd", m.digest):
        r = await api.get(oci.manifest_path(repo, ref))
        assert r.status == 200 and r.body == body, r
        assert r.headers["Docker-Content-Digest"] == m.digest
    got = _by_digest(await _referrers(api, repo, subject.digest))
    assert got[m.digest]["annotations"] == doc["annotations"]
    assert got[m.digest]["artifactType"] == SBOM


async def test_index_with_unknown_fields_kept_byte_identical(api: Client) -> None:
    repo = oci.repo_name()
    child = oci.image(1)
    m = oci.index([child], extra={"x-vendor": {"a": [True, False, None]}}, indent=7)
    await api.push(repo, m, "idx")
    r = await api.get(oci.manifest_path(repo, "idx"))
    assert r.status == 200 and r.body == m.body, r


async def test_no_referrers(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    r = await _referrers(api, repo, subject.digest)
    assert r.json()["manifests"] == []
    r = await _referrers(api, repo, oci.unknown_digest())  # nothing at that digest
    assert r.json()["manifests"] == []
    r = await _referrers(api, repo, oci.unknown_digest("sha512"))
    assert r.json()["manifests"] == []


async def test_no_referrers_in_unknown_repository(api: Client) -> None:
    r = await _referrers(api, oci.repo_name(), oci.unknown_digest())
    assert r.json()["manifests"] == []


async def test_referrer_pushed_before_subject(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    m = oci.artifact(subject, SBOM)
    await api.push(repo, m)
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {m.digest}
    await api.push(repo, subject, "v1")
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {m.digest}


async def test_deleting_referrer_removes_it(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    a, b = oci.artifact(subject, SBOM), oci.artifact(subject, SIG)
    await api.push(repo, a, "a-tag")
    await api.push(repo, b)
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {a.digest, b.digest}
    # Deleting a tag is not deleting the referrer.
    assert (await api.delete(oci.manifest_path(repo, "a-tag"))).status == 202
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {a.digest, b.digest}
    assert (await api.delete(oci.manifest_path(repo, a.digest))).status == 202
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {b.digest}
    assert (await api.delete(oci.manifest_path(repo, b.digest))).status == 202
    assert (await _referrers(api, repo, subject.digest)).json()["manifests"] == []


async def test_referrers_are_per_repository(api: Client) -> None:
    repo, other = oci.repo_name(), oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    await api.push(other, subject)
    m = oci.artifact(subject, SBOM)
    await api.push(repo, m)
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {m.digest}
    assert (await _referrers(api, other, subject.digest)).json()["manifests"] == []


async def test_referrer_of_a_referrer(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    sbom = oci.artifact(subject, SBOM)
    await api.push(repo, sbom)
    sig = oci.artifact(sbom, SIG)
    await api.push(repo, sig)
    assert set(_by_digest(await _referrers(api, repo, subject.digest))) == {sbom.digest}
    assert set(_by_digest(await _referrers(api, repo, sbom.digest))) == {sig.digest}


@pytest.mark.parametrize("bad", ["sha256:abc", "latest", "sha256:" + "G" * 64, "md5:00"])
async def test_referrers_malformed_digest(api: Client, bad: str) -> None:
    repo = oci.repo_name()
    await api.push(repo, oci.image(1))
    assert_error(await api.get(_path(repo, bad)), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
async def test_referrers_unsupported_methods(api: Client, method: str) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    assert_error(await api.req(method, _path(repo, subject.digest)), 405, "UNSUPPORTED")


async def test_index_referrer_without_artifact_type_omits_it(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    idx = oci.index([oci.image(1)], subject=subject, annotations={"k": "v"})
    r = await api.push(repo, idx)
    assert r.headers["OCI-Subject"] == subject.digest, r
    (d,) = (await _referrers(api, repo, subject.digest)).json()["manifests"]
    assert d["digest"] == idx.digest and d["mediaType"] == OCI_INDEX
    assert "artifactType" not in d, d
    assert d["annotations"] == {"k": "v"}


async def test_empty_artifact_type_falls_back_to_config_media_type(api: Client) -> None:
    """The spec: if artifactType is empty or missing in an image manifest, the
    referrer descriptor's artifactType is the config descriptor's mediaType.
    (A registry may instead refuse an empty artifactType as MANIFEST_INVALID.)"""
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    m = oci.artifact(subject, None, config=b'{"a":1}', config_type=SIG_CONFIG, extra={})
    doc = m.doc
    doc["artifactType"] = ""
    body = oci.encode(doc)
    for b in m.blobs:
        await api.push_blob(repo, b)
    r = await api.put_manifest(repo, oci.digest(body), body, OCI_MANIFEST)
    if r.status == 400:
        assert_error(r, 400, "MANIFEST_INVALID")
        return
    assert r.status == 201, r
    got = _by_digest(await _referrers(api, repo, subject.digest))
    assert got[oci.digest(body)].get("artifactType") == SIG_CONFIG, got
    r = await _referrers(api, repo, subject.digest, artifactType=SIG_CONFIG)
    assert set(_by_digest(r)) == {oci.digest(body)}, r


async def test_filter_matches_artifact_type_taken_from_config(api: Client) -> None:
    repo = oci.repo_name()
    subject = oci.image(1)
    await api.push(repo, subject)
    sig = oci.artifact(subject, None, config=b'{"s":1}', config_type=SIG_CONFIG)
    await api.push(repo, sig)
    await api.push(repo, oci.artifact(subject, SBOM))
    r = await _referrers(api, repo, subject.digest, artifactType=SIG_CONFIG)
    assert set(_by_digest(r)) == {sig.digest}, r
