"""Registries selected by Host (``<registry>.<domain>``): every endpoint is
scoped to its registry, and a Host that names no valid registry never reads
or writes another registry's content. Each test creates its registries
(``oci.create_registry``)."""

from __future__ import annotations

import pytest

from tests import oci
from tests.oci import Client, assert_error
from tests.procs import NodeProcess

DOMAIN = "reg.test"
reg_node = oci.module_node_fixture("registries", "--domain", DOMAIN)
api = oci.client_fixture()


def _host(registry: str) -> dict[str, str]:
    return {"Host": f"{registry}.{DOMAIN}"}


def _new(node: NodeProcess, prefix: str) -> str:
    """A registry of its own, created."""
    name = f"{prefix}{oci.unknown_digest()[7:15]}"
    oci.create_registry(node.url, name)
    return name


async def _push(api: Client, host: dict[str, str], repo: str, m: oci.Manifest, tag: str) -> None:
    for child in m.children:
        await _push(api, host, repo, child, child.digest)
    for b in m.blobs:
        r = await api.post(
            f"/v2/{repo}/blobs/uploads/", params={"digest": oci.digest(b)}, data=b, headers=host
        )
        assert r.status == 201, r
    r = await api.put(
        f"/v2/{repo}/manifests/{tag}",
        data=m.body,
        headers={**host, "Content-Type": m.media_type},
    )
    assert r.status == 201, r


async def test_registries_are_isolated(api: Client, reg_node: NodeProcess) -> None:
    a, b = _host(_new(reg_node, "a")), _host(_new(reg_node, "b"))
    repo = "team/app"
    img = oci.image(1)
    sbom = oci.artifact(img, annotations={"r": "a"})
    await _push(api, a, repo, img, "v1")
    await _push(api, a, repo, sbom, sbom.digest)
    layer = oci.digest(img.blobs[1])

    r = await api.get(f"/v2/{repo}/manifests/v1", headers=a)
    assert r.status == 200 and r.body == img.body, r
    assert_error(await api.get(f"/v2/{repo}/manifests/v1", headers=b), 404)
    assert_error(await api.get(f"/v2/{repo}/manifests/{img.digest}", headers=b), 404)
    assert_error(await api.get(f"/v2/{repo}/blobs/{layer}", headers=b), 404, "BLOB_UNKNOWN")
    assert_error(await api.get(f"/v2/{repo}/tags/list", headers=b), 404, "NAME_UNKNOWN")
    assert repo in (await api.get("/v2/_catalog", headers=a)).json()["repositories"]
    assert repo not in (await api.get("/v2/_catalog", headers=b)).json()["repositories"]
    r = await api.get(f"/v2/{repo}/referrers/{img.digest}", headers=b)
    assert r.status == 200 and r.json()["manifests"] == [], r
    # A mount (with or without ``from``) never crosses registries.
    for params in ({"mount": layer, "from": repo}, {"mount": layer}):
        r = await api.post(f"/v2/{repo}/blobs/uploads/", params=params, headers=b)
        assert r.status == 202, r
    assert_error(await api.head(f"/v2/{repo}/blobs/{layer}", headers=b), 404)
    # An upload session belongs to its registry.
    up = await api.post(f"/v2/{repo}/blobs/uploads/", headers=a)
    assert up.status == 202, up
    assert_error(await api.get(up.location, headers=b), 404, "BLOB_UPLOAD_UNKNOWN")
    assert (await api.get(up.location, headers=a)).status == 204
    # Deleting in one registry leaves the other alone.
    await _push(api, b, repo, img, "v1")
    assert (await api.delete(f"/v2/{repo}/manifests/{img.digest}", headers=b)).status == 202
    assert (await api.get(f"/v2/{repo}/manifests/v1", headers=a)).status == 200


async def test_host_is_case_insensitive(api: Client, reg_node: NodeProcess) -> None:
    name = _new(reg_node, "c")
    img = oci.image(1)
    await _push(api, _host(name), "app", img, "v1")
    r = await api.get("/v2/app/manifests/v1", headers={"Host": f"{name.upper()}.REG.TEST"})
    assert r.status == 200 and r.body == img.body, r


@pytest.mark.parametrize(
    "registry_part",
    [
        "{victim}/repo/evil",  # would write keys under /reg/<victim>/repo/evil/...
        "{victim}/repo",
        "{victim}/x",
    ],
)
async def test_host_cannot_reach_into_another_registry(
    api: Client, reg_node: NodeProcess, registry_part: str
) -> None:
    victim = _new(reg_node, "v")
    vh = _host(victim)
    await _push(api, vh, "own", oci.image(1), "v1")
    evil = {"Host": f"{registry_part.format(victim=victim)}.{DOMAIN}"}
    empty_index = oci.index([])
    blob = oci.blob_bytes(64)
    r1 = await api.post(
        "/v2/app/blobs/uploads/", params={"digest": oci.digest(blob)}, data=blob, headers=evil
    )
    r2 = await api.put(
        "/v2/app/manifests/v1",
        data=empty_index.body,
        headers={**evil, "Content-Type": oci.OCI_INDEX},
    )
    assert r1.status < 500 and r2.status < 500, (r1, r2)
    # Nothing appeared in the victim's registry.
    r = await api.get("/v2/_catalog", headers=vh)
    assert r.json()["repositories"] == ["own"], r
    for repo in ("evil/app", "evil/repo/app", "repo/app", "x/app", "app"):
        assert_error(await api.get(f"/v2/{repo}/tags/list", headers=vh), 404, "NAME_UNKNOWN")
        assert_error(await api.get(f"/v2/{repo}/manifests/v1", headers=vh), 404)
