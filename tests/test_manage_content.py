"""Content management end to end (node/manage_content.py, cluster/content_cli.py):
repositories, tags and manifests listed, shown and deleted, ACR's locks on a
repository, a tag or a manifest (enforced on the v2 API and the management
API alike), and the retention of untagged manifests applied by the online
garbage collection. Real nodes on a real etcd, authentication on; pushes
with the v2 test client, the ``meridian`` CLI as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from cluster.etcd import EtcdKV
from cluster.namespace import Lock, Locked, Namespace, config_key, tag_key
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.images import build_image, write_layout
from tests.oci import Client, artifact, digest, image, index, manifest_path, repo_name
from tests.procs import NodeProcess, skopeo
from tests.test_manage_identities import api, basic, error_code, owner_cli
from tests.test_namespace import D1, D2, L1, make_kv, namespaces  # noqa: F401 (fixtures)
from tests.test_namespace import rec as ns_rec

pytestmark = pytest.mark.timeout(300)

etcd = etcd_fixture(scope="module")
REG = "default"
UNLOCKED = {f"{a}_enabled": True for a in ("write", "delete", "read", "list")}


@pytest.fixture(scope="module")
def reg_node(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("content") / "data"
    n = NodeProcess(data, etcd=etcd.client_url).start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
async def client(reg_node: NodeProcess) -> AsyncIterator[Client]:
    async with Client.connect(reg_node.url) as c:
        yield c


def q(what: str, **query: str) -> str:
    return f"/registries/{REG}/{what}?{urlencode(query)}" if query else f"/registries/{REG}/{what}"


def ok(node: NodeProcess, method: str, path: str, body: Any = None) -> Any:
    status, doc = api(node, method, path, body)  # type: ignore[arg-type]
    assert status in (200, 201, 204), (method, path, status, doc)
    return doc


def refused(node: NodeProcess, method: str, path: str, status: int, code: str, body: Any = None):
    got, doc = api(node, method, path, body)  # type: ignore[arg-type]
    assert (got, error_code(doc)) == (status, code), (method, path, got, doc)
    return doc["errors"][0]["message"]


async def tags_of(client: Client, repo: str) -> list[str]:
    r = await client.get(f"/v2/{repo}/tags/list")
    return r.json()["tags"] if r.status == 200 else []


# -- listing and showing ---------------------------------------------------------------


async def test_repositories_tags_and_manifests_are_listed(
    reg_node: NodeProcess, client: Client
) -> None:
    repo = f"team/{repo_name('list')}/web"
    first, second, third = image(), image(2), image()
    await client.push(repo, first, "v1")
    await asyncio.sleep(1.1)  # tag times are shown to the second
    await client.push(repo, second, "v2")
    await asyncio.sleep(1.1)
    await client.push(repo, third, "v1")  # v1 moves; ``first`` is untagged now

    listed = ok(reg_node, "GET", q("repositories"))["repositories"]
    row = next(r for r in listed if r["name"] == repo)
    assert (row["tag_count"], row["manifest_count"]) == (2, 3)
    assert row["last_update"]

    shown = ok(reg_node, "GET", q("repository", repository=repo))
    assert shown["name"] == repo and shown["manifest_count"] == 3
    assert (shown["write_enabled"], shown["delete_enabled"]) == (True, True)
    assert shown["created"] <= shown["last_update"]

    by_name = ok(reg_node, "GET", q("tags", repository=repo))["tags"]
    assert [t["name"] for t in by_name] == ["v1", "v2"]
    v1 = by_name[0]
    assert v1["digest"] == third.digest and v1["size"] == len(third.body)
    assert v1["media_type"] == third.media_type
    # v1 was created with the first push and last updated with the third.
    assert v1["created"] < v1["last_update"], v1
    assert by_name[1]["created"] == by_name[1]["last_update"]
    newest = ok(reg_node, "GET", q("tags", repository=repo, orderby="time_desc"))["tags"]
    assert [t["name"] for t in newest] == ["v1", "v2"]
    oldest = ok(reg_node, "GET", q("tags", repository=repo, orderby="time_asc", top="1"))
    assert [t["name"] for t in oldest["tags"]] == ["v2"]

    manifests = ok(reg_node, "GET", q("manifests", repository=repo))["manifests"]
    tags = {m["digest"]: m["tags"] for m in manifests}
    assert tags == {first.digest: [], second.digest: ["v2"], third.digest: ["v1"]}
    untagged = next(m for m in manifests if m["digest"] == first.digest)
    assert untagged["size"] == len(first.body) and untagged["media_type"] == first.media_type

    one = ok(reg_node, "GET", q("manifest", repository=repo, reference="v2"))
    assert one["digest"] == second.digest and one["tags"] == ["v2"]
    assert one["manifest"] == json.loads(second.body)  # the manifest as stored
    assert one["tag"] == {"name": "v2", **UNLOCKED}
    by_digest = ok(reg_node, "GET", q("manifest", repository=repo, reference=first.digest))
    assert by_digest["tags"] == [] and by_digest["manifest"] == json.loads(first.body)


async def test_untag_and_manifest_delete(reg_node: NodeProcess, client: Client) -> None:
    repo = repo_name("untag")
    img, other = image(), image()
    await client.push(repo, img, "v1")
    await client.push(repo, img, "stable")
    await client.push(repo, other, "v2")

    assert ok(reg_node, "DELETE", q("tag", repository=repo, tag="stable")) is None
    assert await tags_of(client, repo) == ["v1", "v2"]
    assert (await client.get(manifest_path(repo, img.digest))).status == 200  # stays
    refused(reg_node, "DELETE", q("tag", repository=repo, tag="stable"), 404, "NOT_FOUND")

    gone = ok(reg_node, "DELETE", q("manifest", repository=repo, reference="v1"))
    assert gone == {"registry": REG, "repository": repo, "digest": img.digest, "tags": ["v1"]}
    assert await tags_of(client, repo) == ["v2"]
    assert (await client.get(manifest_path(repo, img.digest))).status == 404
    assert (await client.get(manifest_path(repo, "v1"))).status == 404
    assert (await client.get(manifest_path(repo, "v2"))).status == 200


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_repository_delete_removes_everything(
    reg_node: NodeProcess, client: Client, etcd: EtcdServer, tmp_path: Path
) -> None:
    parent = f"org/{repo_name('del')}"
    repo = f"{parent}/app"
    kept = image()
    await client.push(parent, kept, "v1")  # a repository whose name prefixes the other
    child_a, child_b = image(), image()
    idx = index([child_a, child_b])
    await client.push(repo, idx, "multi")
    await client.push(repo, image(), "v1")
    await client.push(repo, image())  # untagged

    # Another region of the cluster sees the repository, then its deletion.
    west = NodeProcess(tmp_path / "west", region="westeurope", etcd=etcd.client_url).start()
    try:
        async with Client.connect(west.url) as wc:

            async def west_has() -> bool:
                return await tags_of(wc, repo) == ["multi", "v1"]

            await eventually(west_has, "the other region never saw the repository")
            doc = ok(reg_node, "DELETE", q("repository", repository=repo))
            assert doc["deleted"] == {"tags": 2, "manifests": 5}

            async def west_lost() -> bool:
                r = await wc.get(f"/v2/{repo}/tags/list")
                catalog = (await wc.get("/v2/_catalog")).json()["repositories"]
                return r.status == 404 and repo not in catalog and parent in catalog

            await eventually(west_lost, "the other region still lists the repository")
            refused(west, "GET", q("repository", repository=repo), 404, "NOT_FOUND")
    finally:
        west.stop()
    catalog = (await client.get("/v2/_catalog")).json()["repositories"]
    assert repo not in catalog and parent in catalog
    assert (await client.get(f"/v2/{repo}/tags/list")).status == 404
    for ref in ("multi", "v1", idx.digest, child_a.digest):
        assert (await client.get(manifest_path(repo, ref))).status == 404
    assert (await client.get(f"/v2/{repo}/blobs/{digest(child_a.blobs[0])}")).status == 404
    refused(reg_node, "GET", q("repository", repository=repo), 404, "NOT_FOUND")
    refused(reg_node, "DELETE", q("repository", repository=repo), 404, "NOT_FOUND")
    assert (await client.get(manifest_path(parent, "v1"))).status == 200

    await client.push(repo, image(), "again")  # the name can be pushed to anew
    assert await tags_of(client, repo) == ["again"]


# -- locks ----------------------------------------------------------------------------------


async def test_a_write_locked_tag_refuses_to_move_and_to_go(
    reg_node: NodeProcess, client: Client
) -> None:
    repo = repo_name("lock")
    img, other = image(), image()
    await client.push(repo, img, "v1")
    locked = ok(
        reg_node, "PATCH", q("manifest", repository=repo, reference="v1"), {"write_enabled": False}
    )
    assert locked == {
        "registry": REG,
        "repository": repo,
        "tag": "v1",
        **UNLOCKED,
        "write_enabled": False,
    }
    for b in other.blobs:
        await client.push_blob(repo, b)
    r = await client.put_manifest(repo, "v1", other.body, other.media_type)
    assert r.status == 403 and r.codes() == ["DENIED"], r
    message = r.json()["errors"][0]["message"]
    assert "tag v1 is locked (write-enabled false)" in message
    assert "meridian repository update" in message and f"--image {repo}:v1" in message
    assert (await client.get(manifest_path(repo, "v1"))).headers[
        "Docker-Content-Digest"
    ] == img.digest
    # Re-pushing what it already points at moves nothing: accepted.
    assert (await client.put_manifest(repo, "v1", img.body, img.media_type)).status == 201
    # Deletes: v2 API (tag and digest), management untag and manifest delete.
    r = await client.delete(manifest_path(repo, "v1"))
    assert r.status == 403 and r.codes() == ["DENIED"], r
    r = await client.delete(manifest_path(repo, img.digest))
    assert r.status == 403 and r.codes() == ["DENIED"], r
    refused(reg_node, "DELETE", q("tag", repository=repo, tag="v1"), 409, "LOCKED")
    refused(reg_node, "DELETE", q("manifest", repository=repo, reference="v1"), 409, "LOCKED")
    refused(reg_node, "DELETE", q("repository", repository=repo), 409, "LOCKED")
    assert await tags_of(client, repo) == ["v1"]
    tag = ok(reg_node, "GET", q("tag", repository=repo, tag="v1"))
    assert (tag["digest"], tag["write_enabled"]) == (img.digest, False)

    ok(reg_node, "PATCH", q("manifest", repository=repo, reference="v1"), {"write_enabled": True})
    assert (await client.put_manifest(repo, "v1", other.body, other.media_type)).status == 201
    assert (await client.delete(manifest_path(repo, "v1"))).status == 202
    assert await tags_of(client, repo) == []


async def test_delete_locks_on_manifest_and_repository(
    reg_node: NodeProcess, client: Client
) -> None:
    repo = repo_name("dlock")
    img = image()
    await client.push(repo, img, "v1")
    path = q("manifest", repository=repo, reference=img.digest)
    doc = ok(reg_node, "PATCH", path, {"delete_enabled": False})
    assert (doc["manifest"], doc["delete_enabled"], doc["write_enabled"]) == (
        img.digest,
        False,
        True,
    )
    assert ok(reg_node, "GET", path)["delete_enabled"] is False
    r = await client.delete(manifest_path(repo, img.digest))
    assert r.status == 403 and "delete-enabled false" in r.json()["errors"][0]["message"], r
    refused(reg_node, "DELETE", path, 409, "LOCKED")
    refused(reg_node, "DELETE", q("repository", repository=repo), 409, "LOCKED")
    # Still writable: a new tag on it is accepted.
    assert (await client.put_manifest(repo, "v2", img.body, img.media_type)).status == 201
    ok(reg_node, "PATCH", path, {"delete_enabled": True})

    # The repository itself: write-locked refuses pushes and deletes.
    repo_path = q("repository", repository=repo)
    shown = ok(reg_node, "PATCH", repo_path, {"write_enabled": False})
    assert (shown["write_enabled"], shown["delete_enabled"]) == (False, True)
    fresh = image()
    for b in fresh.blobs:
        await client.push_blob(repo, b)
    r = await client.put_manifest(repo, "v3", fresh.body, fresh.media_type)
    assert r.status == 403 and f"repository {repo} is locked" in r.json()["errors"][0]["message"]
    r = await client.delete(manifest_path(repo, "v2"))
    assert r.status == 403, r
    refused(reg_node, "DELETE", repo_path, 409, "LOCKED")
    assert await tags_of(client, repo) == ["v1", "v2"]
    ok(reg_node, "PATCH", repo_path, {"write_enabled": True, "delete_enabled": False})
    assert (await client.put_manifest(repo, "v3", fresh.body, fresh.media_type)).status == 201
    refused(reg_node, "DELETE", repo_path, 409, "LOCKED")
    ok(reg_node, "PATCH", repo_path, {"delete_enabled": True})
    ok(reg_node, "DELETE", repo_path)
    assert (await client.get(f"/v2/{repo}/tags/list")).status == 404


async def test_a_lock_holds_against_a_node_whose_cache_is_behind(namespaces) -> None:  # noqa: F811
    """The lock check is part of the write's transaction: a node that has
    not seen a lock set elsewhere (its watch stalled) is refused all the
    same, and one that has not seen the unlock is not refused."""
    b = await namespaces("westeurope")
    await b.link_blob(REG, "team/app", L1, 10)
    await b.put_manifest(REG, "team/app", ns_rec(D1), ["v1"], [L1])
    await b.put_manifest(REG, "team/app", ns_rec(D2), [], [L1])
    a = await namespaces("eastus", watch=False)  # knows v1 -> D1, no lock
    assert await b.set_lock(REG, "team/app", "v1", write=False) == Lock(write=False)
    assert a.lock(REG, "team/app", "v1") == Lock()  # a's cache is behind
    with pytest.raises(Locked, match="tag v1 is locked"):
        await a.put_manifest(REG, "team/app", ns_rec(D2), ["v1"], [L1])
    with pytest.raises(Locked):
        await a.delete_tag(REG, "team/app", "v1")
    with pytest.raises(Locked):
        await a.delete_manifest(REG, "team/app", D1)
    with pytest.raises(Locked):
        await a.delete_repository(REG, "team/app")
    assert (await a.kv.get(tag_key(REG, "team/app", "v1"))).value == D1.encode()

    assert await b.set_lock(REG, "team/app", "v1", write=True) == Lock()
    assert a.lock(REG, "team/app", "v1") == Lock(write=False)  # behind again
    await a.put_manifest(REG, "team/app", ns_rec(D2), ["v1"], [L1])
    assert (await a.kv.get(tag_key(REG, "team/app", "v1"))).value == D2.encode()
    assert await a.delete_repository(REG, "team/app")
    assert (await a.kv.range(f"/meridian/reg/{REG}/repo/team/app/"))[0] == []


async def test_read_and_list_locks(reg_node: NodeProcess, client: Client) -> None:
    repo = repo_name("rlock")
    img, other = image(), image()
    await client.push(repo, img, "v1")
    await client.push(repo, other, "v2")
    ok(reg_node, "PATCH", q("manifest", repository=repo, reference="v1"), {"read_enabled": False})
    r = await client.get(manifest_path(repo, "v1"))
    assert r.status == 403 and "tag v1 is locked (read-enabled false)" in r.json()["errors"][0][
        "message"]  # fmt: skip
    assert (await client.get(manifest_path(repo, "v2"))).status == 200
    ok(reg_node, "PATCH", q("manifest", repository=repo, reference="v1"), {"read_enabled": True})
    assert (await client.get(manifest_path(repo, "v1"))).status == 200

    ok(reg_node, "PATCH", q("manifest", repository=repo, reference="v2"), {"list_enabled": False})
    assert await tags_of(client, repo) == ["v1"]
    listed = ok(reg_node, "GET", q("tags", repository=repo))["tags"]
    assert [t["name"] for t in listed] == ["v1"]
    assert (await client.get(manifest_path(repo, "v2"))).status == 200  # still pulls
    ok(reg_node, "PATCH", q("repository", repository=repo), {"list_enabled": False})
    catalog = (await client.get("/v2/_catalog")).json()["repositories"]
    assert repo not in catalog
    assert repo not in [r["name"] for r in ok(reg_node, "GET", q("repositories"))["repositories"]]
    shown = ok(reg_node, "GET", q("repository", repository=repo))
    assert (shown["list_enabled"], shown["write_enabled"]) == (False, True)
    # Neither read nor list locks keep anything from being deleted.
    ok(reg_node, "DELETE", q("repository", repository=repo))
    assert (await client.get(f"/v2/{repo}/tags/list")).status == 404


def test_skopeo_cannot_overwrite_or_delete_a_locked_tag(
    reg_node: NodeProcess, tmp_path: Path
) -> None:
    first, second = build_image([4096], seed="lock-1"), build_image([4096], seed="lock-2")
    layout = write_layout(tmp_path / "src", {"a": first, "b": second})
    repo = repo_name("skopeo")
    ref = f"docker://{reg_node.hostport}/{repo}:v1"
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:a", ref)
    ok(reg_node, "PATCH", q("manifest", repository=repo, reference="v1"), {"write_enabled": False})

    r = skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:b", ref, check=False)
    assert r.returncode != 0 and "tag v1 is locked (write-enabled false)" in r.stderr, r.stderr
    r = skopeo("delete", "--tls-verify=false", ref, check=False)
    assert r.returncode != 0 and "locked" in r.stderr, r.stderr
    raw = skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
    assert json.loads(raw) == json.loads(first.manifest)  # unchanged

    ok(reg_node, "PATCH", q("manifest", repository=repo, reference="v1"), {"write_enabled": True})
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:b", ref)
    raw = skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
    assert json.loads(raw) == json.loads(second.manifest)


# -- bad input --------------------------------------------------------------------------


async def test_bad_input_is_refused_and_changes_nothing(
    reg_node: NodeProcess, client: Client
) -> None:
    repo = repo_name("bad")
    img = image()
    await client.push(repo, img, "v1")

    def state() -> Any:
        return (
            ok(reg_node, "GET", q("manifests", repository=repo)),
            ok(reg_node, "GET", q("repository", repository=repo)),
            ok(reg_node, "GET", q("retention")),
        )

    before = state()
    unknown = q("manifest", repository=repo, reference="sha256:" + "0" * 64)
    cases = [
        ("GET", q("repository", repository="no/such/repo"), None, 404, "NOT_FOUND"),
        ("DELETE", q("repository", repository="no/such/repo"), None, 404, "NOT_FOUND"),
        ("GET", q("repository"), None, 400, "INVALID"),
        ("GET", q("repository", repository="Bad_Name"), None, 400, "NAME_INVALID"),
        ("GET", q("tag", repository=repo, tag="nope"), None, 404, "NOT_FOUND"),
        ("DELETE", q("tag", repository=repo, tag="nope"), None, 404, "NOT_FOUND"),
        ("GET", q("tag", repository=repo, tag="-bad"), None, 400, "TAG_INVALID"),
        ("GET", unknown, None, 404, "NOT_FOUND"),
        ("DELETE", unknown, None, 404, "NOT_FOUND"),
        ("GET", q("manifest", repository=repo, reference="sha256:zz"), None, 400, "DIGEST_INVALID"),
        ("GET", q("tags", repository=repo, orderby="size"), None, 400, "INVALID"),
        ("GET", q("tags", repository=repo, top="0"), None, 400, "INVALID"),
        ("GET", q("tags", repository=repo, top="x"), None, 400, "INVALID"),
        ("PATCH", q("repository", repository=repo), {}, 400, "INVALID"),
        ("PATCH", q("repository", repository=repo), {"write_enabled": "no"}, 400, "INVALID"),
        ("PATCH", q("repository", repository=repo), {"hidden": False}, 400, "INVALID"),
        ("PATCH", q("manifest", repository=repo, reference="no"), {"write_enabled": False}, 404,
         "NOT_FOUND"),
        ("PATCH", q("retention"), {"days": -1}, 400, "INVALID"),
        ("PATCH", q("retention"), {"days": 366}, 400, "INVALID"),
        ("PATCH", q("retention"), {"days": "7"}, 400, "INVALID"),
        ("PATCH", q("retention"), {"days": True}, 400, "INVALID"),
        ("PATCH", q("retention"), {"enabled": "yes"}, 400, "INVALID"),
        ("PATCH", q("retention"), {"keep": 1}, 400, "INVALID"),
    ]  # fmt: skip
    for method, path, body, status, code in cases:
        refused(reg_node, method, path, status, code, body)
    assert state() == before

    # Who may pull a repository may read it here; changes take a manager.
    sp = ok(reg_node, "POST", "/serviceprincipals", {"roles": {REG: ["AcrPush"]}})
    pusher = basic(sp["id"], sp["secret"])
    elsewhere = {"name": "elsewhere-only", "actions": {"elsewhere/*": ["content/read"]}}
    ok(reg_node, "POST", q("scopemaps"), elsewhere)
    tok = ok(reg_node, "POST", q("tokens"), {"name": "outsider", "scope_map": "elsewhere-only"})
    outsider = basic(tok["name"], tok["passwords"][0]["value"])
    status, doc = api(reg_node, "GET", q("repositories"), auth=pusher)  # type: ignore[arg-type]
    assert status == 200 and repo in [r["name"] for r in doc["repositories"]]
    status, doc = api(reg_node, "GET", q("tags", repository=repo), auth=pusher)  # type: ignore[arg-type]
    assert status == 200 and [t["name"] for t in doc["tags"]] == ["v1"]
    status, doc = api(reg_node, "GET", q("repositories"), auth=outsider)  # type: ignore[arg-type]
    assert status == 200 and repo not in [r["name"] for r in doc["repositories"]]
    for method, path, body, who in (
        ("GET", q("tags", repository=repo), None, outsider),
        ("GET", q("manifest", repository=repo, reference="v1"), None, outsider),
        ("DELETE", q("repository", repository=repo), None, pusher),
        ("DELETE", q("tag", repository=repo, tag="v1"), None, pusher),
        ("PATCH", q("manifest", repository=repo, reference="v1"), {"write_enabled": False}, pusher),
        ("GET", q("retention"), None, pusher),
        ("PATCH", q("retention"), {"enabled": True}, pusher),
    ):
        status, doc = api(reg_node, method, path, body, auth=who)  # type: ignore[arg-type]
        assert (status, error_code(doc)) == (403, "DENIED"), (method, path, doc)
    status, doc = api(reg_node, "GET", q("repositories"), auth={})  # type: ignore[arg-type]
    assert status == 401
    assert state() == before
    assert await tags_of(client, repo) == ["v1"]


async def test_retention_is_premium_only(reg_node: NodeProcess, etcd: EtcdServer) -> None:
    ns = Namespace(EtcdKV(etcd.endpoints), "tests")
    await ns.start()
    try:
        for reg, sku in (("basicreg1", "Basic"), ("premiumreg1", "Premium")):
            await ns.set_registry_config(reg, {"sku": sku, "created": time.time()})
        path = "/registries/basicreg1/retention"
        message = refused(reg_node, "PATCH", path, 400, "INVALID", {"enabled": True})
        assert "Premium" in message
        assert "retention" not in json.loads((await ns.kv.get(config_key("basicreg1"))).value)
        assert ok(reg_node, "GET", path)["enabled"] is False
        doc = ok(reg_node, "PATCH", "/registries/premiumreg1/retention", {"enabled": True})
        assert (doc["enabled"], doc["days"], doc["sku"]) == (True, 7, "Premium")
        stored = json.loads((await ns.kv.get(config_key("premiumreg1"))).value)
        assert stored["retention"] == {"enabled": True, "days": 7} and stored["sku"] == "Premium"
    finally:
        await ns.close()


# -- the CLI ----------------------------------------------------------------------------------


async def test_cli_verbs_end_to_end(reg_node: NodeProcess, client: Client, tmp_path: Path) -> None:
    repo = f"cli/{repo_name('web')}"
    img, newer = image(), image()
    await client.push(repo, img, "v1")
    await asyncio.sleep(1.1)
    await client.push(repo, newer, "v2")
    await client.push(repo, image())  # untagged
    cli = owner_cli(tmp_path, reg_node)  # type: ignore[arg-type]

    assert repo in [r["name"] for r in cli.ok("repository", "list")["repositories"]]
    table = cli("repository", "list")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == [
        "Name",
        "Tags",
        "Manifests",
    ]
    assert any(line.split()[:3] == [repo, "2", "3"] for line in table.stdout.splitlines())
    assert cli.ok("repository", "show", "--repository", repo)["manifest_count"] == 3
    assert cli.ok("repository", "show-tags", "--repository", repo) == ["v1", "v2"]
    top = cli.ok(
        "repository", "show-tags", "--repository", repo, "--orderby", "time_desc", "--top", "1"
    )
    assert top == ["v2"]
    detail = cli("repository", "show-tags", "--repository", repo, "--detail", "-o", "tsv")
    rows = [line.split("\t") for line in detail.stdout.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("v1", img.digest), ("v2", newer.digest)]
    manifests = cli.ok("repository", "show-manifests", "--repository", repo)["manifests"]
    assert sorted(len(m["tags"]) for m in manifests) == [0, 1, 1]
    assert cli.ok("manifest", "list", "--repository", repo)["manifests"] == manifests
    shown = cli.ok("manifest", "show", f"{repo}:v1")
    assert shown["digest"] == img.digest and shown["manifest"] == json.loads(img.body)
    assert cli.ok("manifest", "show", f"{repo}@{img.digest}")["tags"] == ["v1"]

    # Lock the tag: an overwrite fails with the unlock command; unlock, it works.
    cli.ok("repository", "update", "--image", f"{repo}:v1", "--write-enabled", "false")
    other = image()
    for b in other.blobs:
        await client.push_blob(repo, b)
    r = await client.put_manifest(repo, "v1", other.body, other.media_type)
    assert r.status == 403, r
    line = cli.fails(7, "manifest", "delete", f"{repo}:v1", "--yes")
    assert "locked" in line and "meridian repository update" in line
    cli.ok("manifest", "update", f"{repo}:v1", "--write-enabled", "true")
    assert (await client.put_manifest(repo, "v1", other.body, other.media_type)).status == 201

    # Destructive verbs want --yes.
    assert "--yes" in cli.fails(2, "repository", "delete", "--repository", repo)
    assert "--yes" in cli.fails(2, "manifest", "delete", f"{repo}:v2")
    assert await tags_of(client, repo) == ["v1", "v2"]
    cli.ok("repository", "untag", "--image", f"{repo}:v2")
    assert await tags_of(client, repo) == ["v1"]
    assert cli.ok("manifest", "delete", f"{repo}:v1", "--yes")["tags"] == ["v1"]
    assert await tags_of(client, repo) == []
    gone = cli.ok("repository", "delete", "--repository", repo, "--yes")
    assert gone["deleted"]["manifests"] == 3
    assert (await client.get(f"/v2/{repo}/tags/list")).status == 404

    # Mistakes: one line each, the documented exit codes.
    assert "not found" in cli.fails(6, "repository", "show", "--repository", repo)
    assert "REPO:TAG" in cli.fails(2, "manifest", "show", "justarepo")
    assert "orderby" in cli.fails(2, "repository", "show-tags", "--repository", repo,
                                  "--orderby", "size")  # fmt: skip
    assert "0..365" in cli.fails(2, "config", "retention", "update", "--days", "400")
    assert "nothing to change" in cli.fails(2, "config", "retention", "update")

    shown = cli.ok("config", "retention", "show")
    assert (shown["enabled"], shown["days"]) == (False, 7)
    table = cli("config", "retention", "show")
    assert table.returncode == 0 and "disabled" in table.stdout
    cli.ok("config", "retention", "update", "--days", "30")
    assert cli.ok("config", "retention", "show")["days"] == 30
    cli.ok("config", "retention", "update", "--days", "7")


# -- retention ------------------------------------------------------------------------------


etcd_gc = etcd_fixture()
GRACE = 5  # the node's --reclaim-grace: no untagged manifest goes younger than this


@pytest.fixture
def gc_node(etcd_gc: EtcdServer, tmp_path: Path) -> Iterator[NodeProcess]:
    """A node of its own namespace running the online GC every second."""
    flags = ["--reclaim-interval", "1", "--reclaim-grace", str(GRACE)]
    n = NodeProcess(tmp_path / "data", etcd=etcd_gc.client_url, extra=flags).start()
    try:
        yield n
    finally:
        n.stop()


async def test_retention_deletes_old_untagged_manifests_only(gc_node: NodeProcess) -> None:
    repo = repo_name("keep")
    async with Client.connect(gc_node.url) as client:
        tagged = image()
        await client.push(repo, tagged, "v1")
        untagged = image()
        await client.push(repo, untagged)
        locked = image()
        await client.push(repo, locked)
        ok(
            gc_node,
            "PATCH",
            q("manifest", repository=repo, reference=locked.digest),
            {"delete_enabled": False},
        )
        children = [image(), image()]
        await client.push(repo, index(children), "multi")  # its children are untagged
        signature = artifact(tagged)  # an untagged referrer of a tagged image
        await client.push(repo, signature)
        orphan_sig = artifact(untagged)  # a referrer of what goes: goes too
        await client.push(repo, orphan_sig)

        assert ok(gc_node, "GET", q("retention")) == {
            "registry": REG,
            "enabled": False,
            "days": 7,
            "sku": "Unlimited",
        }
        doc = ok(gc_node, "PATCH", q("retention"), {"days": 0, "enabled": True})
        assert (doc["enabled"], doc["days"]) == (True, 0)
        assert ok(gc_node, "GET", q("retention"))["enabled"] is True

        deadline = time.monotonic() + 120
        while True:
            listed = ok(gc_node, "GET", q("manifests", repository=repo))["manifests"]
            left = {m["digest"] for m in listed}
            if untagged.digest not in left and orphan_sig.digest not in left:
                break
            assert time.monotonic() < deadline, f"retention did not delete: {listed}"
            await asyncio.sleep(0.5)
        assert left == {
            tagged.digest,
            locked.digest,
            index(children).digest,
            *(c.digest for c in children),
            signature.digest,
        }
        assert (await client.get(manifest_path(repo, untagged.digest))).status == 404
        assert (await client.get(manifest_path(repo, children[0].digest))).status == 200
        # Its blobs go by the link collection, in the same or the next pass.
        only = untagged.blobs[-1]
        deadline = time.monotonic() + 60
        while (await client.get(f"/v2/{repo}/blobs/{digest(only)}")).status != 404:
            assert time.monotonic() < deadline, "the untagged manifest's layer stayed linked"
            await asyncio.sleep(0.5)
        assert (await client.get(f"/v2/{repo}/blobs/{digest(tagged.blobs[-1])}")).status == 200

        # Disabled, nothing more goes.
        ok(gc_node, "PATCH", q("retention"), {"enabled": False})
        later = image()
        await client.push(repo, later)
        await asyncio.sleep(GRACE + 3)
        assert (await client.get(manifest_path(repo, later.digest))).status == 200
