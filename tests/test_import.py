"""``meridian import`` and ``POST /meridian/v1/registries/{r}/import``: a
server-side copy from another registry, with authentication on.

Sources are real CNCF Distribution processes on loopback
(``loadtest.reference.start_distribution``: v3 when built, else Debian's
``docker-registry``), one open and one behind htpasswd Basic auth, plus the
Meridian node itself (its Docker token flow). Images are built locally
(``tests.images``) and pushed there; what Meridian holds afterwards is
checked byte for byte and pulled with skopeo.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.auth.admin import Invalid
from cluster.auth.identities import OWNER
from loadtest.reference import Server, start_distribution
from node.importer import MAX_MANIFESTS, parse_source
from ocidist.mediatypes import OCI_INDEX
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.hostnames import with_hosts
from tests.images import ACCEPT, Image, Index, Registry, build_image, build_index, canonical
from tests.oci import Client, client_fixture, create_registry, module_node_fixture, unknown_digest
from tests.procs import (
    OWNER_PASSWORD,
    NodeProcess,
    creds_args,
    free_port,
    redact,
    require_tool,
    skopeo,
)
from tests.test_manage_identities import OWNER_BASIC, Cli, api, basic, http
from tests.test_replication import content_digests, start_regions, wait_peers, wait_until
from tests.test_webhooks import FAST, Receiver, create_hook

pytestmark = pytest.mark.timeout(300)

SRC_USER, SRC_PASSWORD = "importer", "src-Pa55word-not-the-owner"
WRONG_PASSWORD = "wrong-Pa55word-never-logged"
MAX_BLOB = 1 << 20

DOMAIN = "import.test"
reg_node = module_node_fixture(
    "import", "--max-blob-size", "1M", "--access-log", "--domain", DOMAIN, "--usage-interval",
    "0.5", *FAST,
)  # fmt: skip
client = client_fixture()
etcd = etcd_fixture()


def _htpasswd(path: Path) -> Path:
    exe = shutil.which("htpasswd")
    if exe is None:
        raise RuntimeError("htpasswd not found: apt-get install -y apache2-utils")
    out = subprocess.run(
        [exe, "-Bin", SRC_USER], input=SRC_PASSWORD, capture_output=True, text=True, check=True
    )
    path.write_text(out.stdout)
    return path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An open Distribution."""
    s = start_distribution(tmp_path_factory.mktemp("dist"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def dist_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A Distribution behind htpasswd Basic auth (its config's auth section
    given through Distribution's REGISTRY_* environment overrides)."""
    wd = tmp_path_factory.mktemp("dist-auth")
    env = {
        "REGISTRY_AUTH": "htpasswd",
        "REGISTRY_AUTH_HTPASSWD_REALM": "import-test",
        "REGISTRY_AUTH_HTPASSWD_PATH": str(_htpasswd(wd / "htpasswd")),
    }
    s = start_distribution(wd, extra_env=env)
    try:
        yield s
    finally:
        s.stop()


class BasicRegistry(Registry):
    """``tests.images.Registry`` sending Basic credentials on every request."""

    def __init__(self, base_url: str, user: str, password: str) -> None:
        super().__init__(base_url, auth=None)
        self.basic = basic(user, password)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        return super().request(method, path, body, {**(headers or {}), **self.basic})


def source(server: Server | NodeProcess, repo_tag: str) -> str:
    return f"http://127.0.0.1:{server.port}/{repo_tag}"


def import_(
    node: NodeProcess,
    body: dict[str, Any],
    auth: dict[str, str] | None = None,
    reg: str = "default",
) -> tuple[int, Any]:
    status, _, raw = http(
        "POST",
        f"{node.url}/meridian/v1/registries/{reg}/import",
        body=body,
        headers=OWNER_BASIC if auth is None else auth,
    )
    return status, (json.loads(raw) if raw else None)


def error(doc: Any) -> tuple[str, str]:
    err = doc["errors"][0]
    return err["code"], err["message"]


def meridian(node: NodeProcess) -> Registry:
    return Registry(node.url)  # logs in as the owner


def assert_has(node: NodeProcess, repo: str, ref: str, item: Image | Index) -> None:
    """``repo:ref`` on the node is ``item``: every manifest's bytes under its
    digest, every blob's bytes."""
    m = meridian(node)
    body, ctype, digest = m.get_manifest(repo, ref)
    assert (body, ctype, digest) == (item.manifest, item.media_type, item.digest)
    for d, child, media_type in item.manifests():
        assert m.get_manifest(repo, d) == (child, media_type, d)
    for b in item.all_blobs():
        assert m.get_blob(repo, b.digest) == b.data


def assert_nothing(node: NodeProcess, repo: str, *digests: str) -> None:
    """No tag, no manifest record, no blob link in ``repo``."""
    m = meridian(node)
    status, _, _ = m.request("GET", f"/v2/{repo}/tags/list")
    assert status == 404, f"{repo} exists"
    for d in digests:
        for kind in ("manifests", "blobs"):
            status, _, _ = m.request("HEAD", f"/v2/{repo}/{kind}/{d}")
            assert status == 404, (repo, kind, d)


def assert_not_logged(node: NodeProcess, *secrets: str) -> None:
    log = node.logs()
    assert "/meridian/v1/registries/default/import" in log  # the log saw the calls
    for s in (OWNER_PASSWORD, *secrets):
        assert s not in log, "a secret is in the node's log"


def skopeo_pull(node: NodeProcess, ref: str, dest: Path, *more: str) -> Path:
    """``skopeo copy`` from the node into a ``dir:`` (manifests kept byte for
    byte; skopeo verifies every digest on the way)."""
    r = skopeo(
        "copy", "--src-tls-verify=false", *more, f"docker://{node.hostport}/{ref}", f"dir:{dest}",
        check=False,
    )  # fmt: skip
    assert r.returncode == 0, redact(r.stderr)
    return dest


def assert_pulled(dest: Path, item: Image | Index) -> None:
    """What ``skopeo_pull`` wrote is ``item``: its manifest (and with
    ``--all`` its children's), every blob."""
    assert (dest / "manifest.json").read_bytes() == item.manifest
    if isinstance(item, Index):
        for d, body, _ in item.manifests()[:-1]:
            assert (dest / f"{d[7:]}.manifest.json").read_bytes() == body
    for b in item.all_blobs():
        assert (dest / b.digest[7:]).read_bytes() == b.data


# -- references ------------------------------------------------------------------------


def test_source_references() -> None:
    s = parse_source("docker.io/library/alpine:3.19")
    assert (s.scheme, s.host, s.api_host, s.repo, s.tag, s.digest) == (
        "https", "docker.io", "registry-1.docker.io", "library/alpine", "3.19", None
    )  # fmt: skip
    assert parse_source("docker.io/alpine").repo == "library/alpine"
    assert parse_source("docker.io/alpine").ref == "latest"
    d = "sha256:" + "a" * 64
    s = parse_source(f"registry.example.com:5000/team/app:1@{d}")
    assert (s.host, s.repo, s.tag, s.digest, s.ref) == ("registry.example.com:5000", "team/app",
                                                      "1", d, d)  # fmt: skip
    s = parse_source("http://localhost:5001/x")
    assert (s.scheme, s.base_url, str(s)) == ("http", "http://localhost:5001",
                                              "http://localhost:5001/x:latest")  # fmt: skip
    assert parse_source("[::1]:5000/a/b:c").host == "[::1]:5000"
    for bad in ("alpine", "alpine:3", "library/alpine:3", "ftp://h.io/x", "u:p@h.io/x", "h.io/",
                "h.io/X", "h.io/x:", "h.io/x@sha256:12", "https://h.io"):  # fmt: skip
        with pytest.raises(Invalid):
            parse_source(bad)


# -- copies --------------------------------------------------------------------------


def test_an_image_by_tag_and_by_digest(reg_node: NodeProcess, dist: Server, tmp_path: Path) -> None:
    img = build_image((3000, 5000), seed="single")
    Registry(dist.base_url, auth=None).push("lib/app", "1", img)

    status, doc = import_(reg_node, {"source": source(dist, "lib/app:1"), "image": "imp/app:1"})
    assert status == 201, doc
    assert doc["digest"] == img.digest and doc["media_type"] == img.media_type
    assert doc["image"] == "imp/app:1" and doc["source"] == source(dist, "lib/app:1")
    assert (doc["manifests"], doc["blobs"], doc["blobs_copied"]) == (1, 3, 3)
    assert doc["bytes_copied"] == img.total_bytes
    assert_has(reg_node, "imp/app", "1", img)
    assert meridian(reg_node).tags("imp/app") == ["1"]

    # skopeo pulls it from Meridian and verifies every digest; same digest both ends.
    assert_pulled(skopeo_pull(reg_node, "imp/app:1", tmp_path / "pulled"), img)
    r = skopeo("inspect", "--tls-verify=false", f"docker://{reg_node.hostport}/imp/app:1")
    assert json.loads(r.stdout)["Digest"] == img.digest

    # By digest, into a repository alone: no tag; bytes held here are not fetched again.
    status, doc = import_(
        reg_node, {"source": source(dist, f"lib/app@{img.digest}"), "image": "imp/pinned"}
    )
    assert status == 201, doc
    assert doc["digest"] == img.digest and doc["tag"] is None and doc["image"] == "imp/pinned"
    assert doc["blobs_copied"] == 0 and doc["bytes_copied"] == img.size
    assert_has(reg_node, "imp/pinned", img.digest, img)
    assert meridian(reg_node).tags("imp/pinned") == []

    # No image at all: the source's repository and tag.
    status, doc = import_(reg_node, {"source": source(dist, "lib/app:1")})
    assert status == 201 and doc["image"] == "lib/app:1", doc
    assert_has(reg_node, "lib/app", "1", img)


def test_a_large_manifest_arrives_whole(reg_node: NodeProcess, dist: Server) -> None:
    """A manifest of many network reads (large annotations) is read whole,
    its digest kept."""
    img = build_image((600,), seed="large", annotations={"notes": "n" * 600_000})
    assert img.size > 600_000
    Registry(dist.base_url, auth=None).push("lib/large", "1", img)
    status, doc = import_(reg_node, {"source": source(dist, "lib/large:1"), "image": "large:1"})
    assert status == 201 and doc["digest"] == img.digest, doc
    assert_has(reg_node, "large", "1", img)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_a_multi_arch_index_with_every_platform(
    reg_node: NodeProcess, dist: Server, tmp_path: Path, docker: bool
) -> None:
    platforms = (("linux", "amd64", None), ("linux", "arm64", "v8"), ("linux", "s390x", None))
    idx = build_index((2000, 1000), platforms=platforms, seed=f"multi-{docker}", docker=docker)
    kind = "docker" if docker else "oci"
    repo, mirror = f"multi/{kind}", f"mirror-{kind}"
    Registry(dist.base_url, auth=None).push(repo, "v1", idx)

    status, doc = import_(reg_node, {"source": source(dist, f"{repo}:v1"), "image": mirror})
    assert status == 201, doc
    assert doc["digest"] == idx.digest and doc["media_type"] == idx.media_type
    assert doc["image"] == f"{mirror}:v1"  # REPO alone keeps the source's tag
    assert doc["manifests"] == 4 and doc["blobs"] == len(idx.all_blobs()) == 9
    assert doc["platforms"] == ["linux/amd64", "linux/arm64/v8", "linux/s390x"]
    assert doc["bytes_copied"] == idx.total_bytes
    assert_has(reg_node, mirror, "v1", idx)

    # Each platform is pullable by digest; skopeo copies all of them and verifies.
    for img in idx.images:
        assert_pulled(skopeo_pull(reg_node, f"{mirror}@{img.digest}", tmp_path / img.digest), img)
    assert_pulled(skopeo_pull(reg_node, f"{mirror}:v1", tmp_path / "all", "--all"), idx)


def test_the_token_flow_of_a_source_meridian(reg_node: NodeProcess) -> None:
    """The node itself as the source: a 401 Bearer challenge, a token from its
    realm with the given credentials."""
    img = build_image((1500,), seed="token-flow")
    meridian(reg_node).push("tf/src", "1", img)
    src = source(reg_node, "tf/src:1")

    status, doc = import_(reg_node, {"source": src, "image": "tf/anon:1"})
    assert status == 403 and error(doc)[0] == "SOURCE_DENIED", doc
    assert "requires credentials" in error(doc)[1]
    status, doc = import_(
        reg_node,
        {"source": src, "image": "tf/wrong:1", "username": OWNER, "password": WRONG_PASSWORD},
    )
    assert status == 403 and error(doc)[0] == "SOURCE_DENIED", doc
    assert "refused the credentials" in error(doc)[1] and WRONG_PASSWORD not in json.dumps(doc)
    assert_nothing(reg_node, "tf/anon", img.digest)
    assert_nothing(reg_node, "tf/wrong", img.digest)

    status, doc = import_(
        reg_node,
        {"source": src, "image": "tf/copy:1", "username": OWNER, "password": OWNER_PASSWORD},
    )
    assert status == 201 and doc["digest"] == img.digest, doc
    assert OWNER_PASSWORD not in json.dumps(doc)
    assert_has(reg_node, "tf/copy", "1", img)
    assert_not_logged(reg_node, WRONG_PASSWORD)


def test_a_source_behind_basic_auth(reg_node: NodeProcess, dist_auth: Server) -> None:
    img = build_image((2500,), seed="basic", docker=True)
    BasicRegistry(dist_auth.base_url, SRC_USER, SRC_PASSWORD).push("private/app", "2", img)
    src = source(dist_auth, "private/app:2")

    status, doc = import_(reg_node, {"source": src, "image": "priv/none:2"})
    assert status == 403 and error(doc)[0] == "SOURCE_DENIED", doc
    assert "requires credentials" in error(doc)[1] and "username and password" in error(doc)[1]
    wrong = {"username": SRC_USER, "password": WRONG_PASSWORD}
    status, doc = import_(reg_node, {"source": src, "image": "priv/wrong:2", **wrong})
    assert status == 403 and error(doc)[0] == "SOURCE_DENIED", doc
    assert WRONG_PASSWORD not in json.dumps(doc)
    assert_nothing(reg_node, "priv/none", img.digest, *(b.digest for b in img.blobs()))
    assert_nothing(reg_node, "priv/wrong", img.digest, *(b.digest for b in img.blobs()))

    right = {"username": SRC_USER, "password": SRC_PASSWORD}
    status, doc = import_(reg_node, {"source": src, "image": "priv/app:2", **right})
    assert status == 201 and doc["digest"] == img.digest, doc
    assert_has(reg_node, "priv/app", "2", img)
    assert_not_logged(reg_node, SRC_PASSWORD, WRONG_PASSWORD)


def test_an_import_makes_a_push_s_events(reg_node: NodeProcess, dist: Server) -> None:
    """Webhooks get an import's push event, as for a push; the audit log
    records the management call, by its caller."""
    r = Receiver().up()
    try:
        create_hook(reg_node, name="imports1", uri=r.url, actions=["push"], scope="hooked/app:*")
        img = build_image((700,), seed="hooked")
        Registry(dist.base_url, auth=None).push("lib/hooked", "1", img)
        body = {"source": source(dist, "lib/hooked:1"), "image": "hooked/app:v1"}
        status, doc = import_(reg_node, body)
        assert status == 201, doc
        r.wait(1, "the import's push event", "push")
        (d,) = r.deliveries("push")
    finally:
        r.close()
    target = d.doc["target"]
    assert (target["repository"], target["tag"]) == ("hooked/app", "v1")
    assert target["digest"] == img.digest and target["mediaType"] == img.media_type

    def imported() -> list[dict[str, Any]]:
        status, doc = api(reg_node, "GET", "/registries/default/audit?action=manage")
        assert status == 200, doc
        return [x for x in doc["records"] if "hooked/app:v1" in x.get("detail", "")]

    wait_until(lambda: bool(imported()), "the import's audit record", 60, 0.1)
    (rec,) = imported()
    assert rec["identity"] == "owner" and img.digest in rec["detail"]
    assert source(dist, "lib/hooked:1") in rec["detail"]


async def test_into_a_registry_of_its_own(
    client: Client, reg_node: NodeProcess, dist: Server
) -> None:
    name = f"imp{unknown_digest()[7:15]}"
    create_registry(reg_node.url, name)
    img = build_image((800,), seed="own")
    Registry(dist.base_url, auth=None).push("lib/own", "1", img)
    body = {"source": source(dist, "lib/own:1"), "image": "own/app:1"}
    status, doc = import_(reg_node, body, reg=name)
    assert status == 201 and doc["registry"] == name, doc

    host = {"Host": f"{name}.{DOMAIN}", "Accept": ACCEPT}
    r = await client.get("/v2/own/app/manifests/1", headers=host)
    assert r.status == 200 and r.body == img.manifest, r
    r = await client.get(f"/v2/own/app/blobs/{img.layers[0].digest}", headers=host)
    assert r.status == 200 and r.body == img.layers[0].data, r
    r = await client.get("/v2/own/app/manifests/1", headers={"Accept": ACCEPT})
    assert r.status == 404, r  # not in the default registry

    status, doc = import_(reg_node, body, reg="nosuchregistry")
    assert status == 404 and error(doc)[0] == "NOT_FOUND", doc


def test_usage_counts_an_import_as_a_push_of_the_image(reg_node: NodeProcess, dist: Server) -> None:
    """``meridian usage`` counts an index's import as skopeo's push of the
    same image counts: one push per manifest (each platform's, then the
    index); the two registries are otherwise alike and pulled from nowhere."""
    idx = build_index((900,), seed="usage")
    n = len(idx.manifests())
    assert n == 3  # two platforms and the index
    Registry(dist.base_url, auth=None).push("lib/usage", "1", idx)
    suffix = unknown_digest()[7:15]
    imported, pushed = f"impu{suffix}", f"pshu{suffix}"
    for name in (imported, pushed):
        create_registry(reg_node.url, name)
    body = {"source": source(dist, "lib/usage:1"), "image": "use/app:1"}
    status, doc = import_(reg_node, body, reg=imported)
    assert status == 201 and doc["manifests"] == n, doc
    res = with_hosts(
        {f"{pushed}.{DOMAIN}": "127.0.0.1"},
        [
            require_tool("skopeo"), "copy", "--all", *creds_args("copy"),
            "--src-tls-verify=false", "--dest-tls-verify=false",
            f"docker://127.0.0.1:{dist.port}/lib/usage:1",
            f"docker://{pushed}.{DOMAIN}:{reg_node.port}/use/app:1",
        ],
    )  # fmt: skip
    assert res.returncode == 0, redact(res.stderr)

    def pushes(reg: str) -> int:
        status, doc = api(reg_node, "GET", f"/registries/{reg}/usage")
        assert status == 200, doc
        return doc["total"]["pushes"]

    wait_until(lambda: pushes(pushed) == n, f"{pushed}'s {n} pushes in its usage", 60, 0.2)
    wait_until(lambda: pushes(imported) == n, f"{imported}'s import counted as {n} pushes", 30, 0.2)


def test_imported_content_replicates_as_pushed_content(
    etcd: EtcdServer, dist: Server, tmp_path: Path
) -> None:
    """Imported in eastus, every platform's manifests and blobs reach westus
    by replication, and westus serves them."""
    nodes = start_regions(tmp_path / "regions", etcd, ["eastus", "westus"])
    try:
        wait_peers(nodes)
        east, west = nodes
        idx = build_index((1500,), seed="geo")
        Registry(dist.base_url, auth=None).push("lib/geo", "1", idx)
        status, doc = import_(east, {"source": source(dist, "lib/geo:1"), "image": "geo/app:1"})
        assert status == 201 and doc["digest"] == idx.digest, doc
        wait_until(lambda: west.has_all(content_digests(idx)), "westus holds the whole import")
        assert_has(west, "geo/app", "1", idx)
    finally:
        for n in nodes:
            n.stop()


# -- failures leave nothing -------------------------------------------------------------


def test_unreachable_unknown_and_not_plain_http(reg_node: NodeProcess, dist: Server) -> None:
    dead = f"http://127.0.0.1:{free_port()}/lib/app:1"
    status, doc = import_(reg_node, {"source": dead, "image": "gone/a:1"})
    assert status == 502 and error(doc)[0] == "SOURCE_UNREACHABLE", doc
    assert "does not answer" in error(doc)[1]

    status, doc = import_(reg_node, {"source": source(dist, "lib/app:nosuch"), "image": "gone/b"})
    assert status == 404 and error(doc)[0] == "SOURCE_NOT_FOUND", doc
    assert "lib/app:nosuch" in error(doc)[1]
    status, doc = import_(reg_node, {"source": source(dist, "no/such/repo:1"), "image": "gone/c"})
    assert status == 404 and error(doc)[0] == "SOURCE_NOT_FOUND", doc

    # https is the default: a plain-HTTP registry must be named http://.
    status, doc = import_(reg_node, {"source": f"{dist.host}/lib/app:1", "image": "gone/d:1"})
    assert status == 502 and error(doc)[0] == "SOURCE_UNREACHABLE", doc
    assert "http://" in error(doc)[1]
    for repo in ("gone/a", "gone/b", "gone/c", "gone/d"):
        assert_nothing(reg_node, repo)


def test_a_corrupt_source_blob_is_refused(reg_node: NodeProcess, dist: Server) -> None:
    """Distribution serves what its disk holds: a layer changed there (same
    size) hashes to another digest, and nothing of the image is imported."""
    img = build_image((4000, 4000), seed="corrupt")
    Registry(dist.base_url, auth=None).push("lib/corrupt", "1", img)
    bad = img.layers[1]
    alg, hexd = bad.digest.split(":")
    data = dist.workdir / "data" / "docker/registry/v2/blobs" / alg / hexd[:2] / hexd / "data"
    data.write_bytes(bytes(b ^ 0xFF for b in bad.data))

    status, doc = import_(reg_node, {"source": source(dist, "lib/corrupt:1"), "image": "bad/x:1"})
    assert status == 502 and error(doc)[0] == "SOURCE_FAILED", doc
    assert bad.digest in error(doc)[1] and "nothing was imported" in error(doc)[1]
    assert_nothing(reg_node, "bad/x", img.digest, *(b.digest for b in img.blobs()))


def test_a_blob_over_the_node_s_limit(reg_node: NodeProcess, dist: Server) -> None:
    img = build_image((1000, MAX_BLOB + 4096), seed="big")
    Registry(dist.base_url, auth=None).push("lib/big", "1", img)
    status, doc = import_(reg_node, {"source": source(dist, "lib/big:1"), "image": "big/x:1"})
    assert status == 413 and error(doc)[0] == "SIZE_INVALID", doc
    assert_nothing(reg_node, "big/x", img.digest, *(b.digest for b in img.blobs()))


def test_an_index_of_too_many_manifests(reg_node: NodeProcess, dist: Server) -> None:
    """More manifests than one import copies: refused, nothing written (the
    children differ only by an annotation and share their blobs)."""
    images = [
        build_image((500,), seed="wide", annotations={"n": str(i)}) for i in range(MAX_MANIFESTS)
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [i.descriptor() for i in images],
    }
    wide = Index(canonical(doc), OCI_INDEX, images)
    Registry(dist.base_url, auth=None).push("lib/wide", "1", wide)
    status, doc = import_(reg_node, {"source": source(dist, "lib/wide:1"), "image": "wide:1"})
    assert status == 400 and f"more than {MAX_MANIFESTS} manifests" in error(doc)[1], doc
    assert_nothing(reg_node, "wide", wide.digest, images[0].digest, images[0].layers[0].digest)


def test_an_existing_tag_needs_force(reg_node: NodeProcess, dist: Server) -> None:
    one, two = build_image((1200,), seed="tag-1"), build_image((1300,), seed="tag-2")
    pusher = Registry(dist.base_url, auth=None)
    pusher.push("lib/tagged", "1", one)
    pusher.push("lib/tagged", "2", two)
    status, doc = import_(reg_node, {"source": source(dist, "lib/tagged:1"), "image": "t/app:v"})
    assert status == 201, doc

    status, doc = import_(reg_node, {"source": source(dist, "lib/tagged:2"), "image": "t/app:v"})
    assert status == 409 and error(doc)[0] == "ALREADY_EXISTS", doc
    assert "force" in error(doc)[1]
    assert meridian(reg_node).get_manifest("t/app", "v")[2] == one.digest
    status, _, _ = meridian(reg_node).request("HEAD", f"/v2/t/app/manifests/{two.digest}")
    assert status == 404  # nothing of the refused import

    body = {"source": source(dist, "lib/tagged:2"), "image": "t/app:v", "force": True}
    status, doc = import_(reg_node, body)
    assert status == 201 and doc["digest"] == two.digest, doc
    assert_has(reg_node, "t/app", "v", two)


def test_who_may_import_and_bad_input(reg_node: NodeProcess, dist: Server) -> None:
    img = build_image((900,), seed="who")
    Registry(dist.base_url, auth=None).push("lib/who", "1", img)
    body = {"source": source(dist, "lib/who:1"), "image": "who/app:1"}

    status, doc = import_(reg_node, body, auth={})
    assert status == 401, doc
    status, _, sp = http(
        "POST",
        reg_node.url + "/meridian/v1/serviceprincipals",
        body={"roles": {"default": ["AcrPush"]}},
        headers=OWNER_BASIC,
    )
    assert status == 201, sp
    sp_doc = json.loads(sp)
    status, doc = import_(reg_node, body, auth=basic(sp_doc["id"], sp_doc["secret"]))
    assert status == 403 and error(doc)[0] == "DENIED", doc
    assert_nothing(reg_node, "who/app", img.digest)

    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "give the source image"),
        ({"source": "lib/who:1"}, "names no registry host"),
        ({"source": "ftp://example.com/lib/who:1"}, "https://"),
        ({"source": f"http://{dist.host}"}, "names no repository"),
        ({"source": f"http://u:{WRONG_PASSWORD}@{dist.host}/lib/who:1"}, "username and password"),
        ({"source": f"http://{dist.host}/Lib/Who:1"}, "not a valid repository name"),
        ({"source": f"http://{dist.host}/lib/who@sha256:1234"}, "not a valid digest"),
        ({**body, "image": "who/app@sha256:" + "0" * 64}, "REPO:TAG or REPO"),
        ({**body, "image": "who/app:bad tag"}, "not a valid tag"),
        ({**body, "username": "u"}, "both username and password"),
        ({**body, "force": "yes"}, "force must be true or false"),
        ({**body, "tag": "x"}, "unknown field"),
    ]
    for b, says in bad:
        status, doc = import_(reg_node, b)
        assert status == 400 and says in error(doc)[1], (b, doc)
        assert WRONG_PASSWORD not in json.dumps(doc)
    assert_nothing(reg_node, "who/app", img.digest)
    status, doc = import_(reg_node, {"source": "docker.io/alpine:3"}, reg="Bad_Name")
    assert status == 400, doc


# -- the CLI ------------------------------------------------------------------------------


def test_the_cli_end_to_end(
    reg_node: NodeProcess,
    dist: Server,
    dist_auth: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idx = build_index((1100,), seed="cli")
    Registry(dist.base_url, auth=None).push("lib/cli", "1", idx)
    img = build_image((1700,), seed="cli-private")
    BasicRegistry(dist_auth.base_url, SRC_USER, SRC_PASSWORD).push("private/cli", "1", img)
    cli = Cli(tmp_path / "home", tmp_path / "docker")
    assert cli.login(reg_node.url).returncode == 0

    doc = cli.ok("import", "--source", source(dist, "lib/cli:1"), "--image", "cli/app:1")
    assert doc["digest"] == idx.digest and doc["manifests"] == 3
    assert_has(reg_node, "cli/app", "1", idx)
    table = cli("import", "--source", source(dist, "lib/cli:1"), "--image", "cli/app:2")
    assert table.returncode == 0, table.stderr
    head, _, row = table.stdout.splitlines()
    assert head.split()[:3] == ["Image", "Digest", "Manifests"]
    manifest_bytes = sum(len(body) for _, body, _ in idx.manifests())
    assert row.split()[:6] == ["cli/app:2", idx.digest, "3", "4", "0", str(manifest_bytes)]
    tsv = cli("import", "--source", source(dist, "lib/cli:1"), "-t", "cli/app:3", "-o", "tsv")
    assert tsv.stdout.split("\t")[:2] == ["cli/app:3", idx.digest]

    # The source's password from stdin, or from the environment; never echoed.
    src = source(dist_auth, "private/cli:1")
    doc = cli.ok(
        "import",
        "--source",
        src,
        "--image",
        "cli/private:1",
        "--username",
        SRC_USER,
        "--password-stdin",
        stdin=SRC_PASSWORD + "\n",
    )
    assert doc["digest"] == img.digest
    monkeypatch.setenv("MERIDIAN_SOURCE_PASSWORD", SRC_PASSWORD)
    doc = cli.ok("import", "--source", src, "--image", "cli/private:env", "-u", SRC_USER)
    assert doc["digest"] == img.digest and doc["blobs_copied"] == 0
    monkeypatch.delenv("MERIDIAN_SOURCE_PASSWORD")
    line = cli.fails(5, "import", "--source", src, "-t", "cli/private:2")
    assert "requires credentials" in line
    r = cli(
        "import",
        "--source",
        src,
        "-t",
        "cli/private:3",
        "-u",
        SRC_USER,
        "--password-stdin",
        stdin=WRONG_PASSWORD + "\n",
    )
    assert r.returncode == 5 and "refused the credentials" in r.stderr, r.stderr
    assert WRONG_PASSWORD not in r.stderr + r.stdout

    # Mistakes: one line, the documented exit code, nothing written.
    assert "exists already" in cli.fails(
        7, "import", "--source", source(dist, "lib/cli:1"), "--image", "cli/app:1"
    )
    assert "has no" in cli.fails(
        6, "import", "--source", source(dist, "lib/cli:404"), "--image", "cli/none:1"
    )
    dead = f"http://127.0.0.1:{free_port()}/lib/cli:1"
    assert "does not answer" in cli.fails(1, "import", "--source", dead, "--image", "cli/none:1")
    assert "names no registry host" in cli.fails(2, "import", "--source", "alpine:3")
    assert "--username" in cli.fails(2, "import", "--source", src, "-u", SRC_USER)
    assert_nothing(reg_node, "cli/none")
    assert_not_logged(reg_node, SRC_PASSWORD, WRONG_PASSWORD)
