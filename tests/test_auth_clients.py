"""Real clients log in to a node with each kind of identity (issue 11):
the cluster owner, a registry's admin user, a service principal (AcrPush),
a repository token (a scope map), and anonymous pull -- skopeo copy and
inspect (``--creds``/``--src-creds``/``--dest-creds``), podman login then
pull (an auth file of the test's own), containerd's ``ctr pull --user`` --
straight to a node over plain HTTP. Each identity also meets a refusal its
rights imply, and every round trip is checked by digest.

The node runs on etcd; identities are made with ``cluster.auth.admin`` over
a namespace on the same etcd and reach the node through its watch. Clients
name the node by address, so everything happens in the registry
``default`` (whose admin user's name is ``default``). The open mode
(``--no-auth``) is at the end: anyone pushes and pulls, and the node says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.auth.admin import Admin
from tests import images as im
from tests.containerd import Containerd
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.procs import OWNER_CREDS, OWNER_PASSWORD, NodeProcess, redact, require_tool, with_creds

pytestmark = pytest.mark.timeout(300)
etcd = etcd_fixture(scope="module")

REGISTRY = "default"  # what a Host without --domain selects


# -- the node, identities, clients -----------------------------------------------------------


@pytest.fixture(scope="module")
def reg_node(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("clients") / "data"
    n = NodeProcess(data, etcd=etcd.client_url, extra=["--access-log"]).start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def ctrd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    with Containerd(tmp_path_factory.mktemp("containerd")) as c:
        yield c


class Skopeo:
    """skopeo against the node, with ``creds`` (None: none at all)."""

    def __init__(self, node: NodeProcess, creds: str | None) -> None:
        self.exe = require_tool("skopeo")
        self.node = node
        self.creds = creds

    def ref(self, repo: str, tag: str = "v1") -> str:
        return f"docker://{self.node.hostport}/{repo}:{tag}"

    def run(self, *args: str) -> subprocess.CompletedProcess:
        argv = list(args) if self.creds is None else with_creds(args, self.creds)
        return subprocess.run(
            [self.exe, "--insecure-policy", *argv], capture_output=True, text=True, timeout=120
        )

    def push(self, layout: Path, repo: str) -> subprocess.CompletedProcess:
        return self.run("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", self.ref(repo))

    def inspect(self, repo: str) -> subprocess.CompletedProcess:
        return self.run("inspect", "--tls-verify=false", self.ref(repo))

    def pull(self, repo: str, out: Path) -> subprocess.CompletedProcess:
        return self.run("copy", "-q", "--src-tls-verify=false", self.ref(repo), f"oci:{out}:v1")


def ok(r: subprocess.CompletedProcess, *secrets: str) -> str:
    assert r.returncode == 0, redact(f"{r.args[1:]}: {r.stderr[-2000:]}", *secrets)
    return r.stdout


def refused(r: subprocess.CompletedProcess, *secrets: str) -> None:
    """The client failed, and because the registry said no."""
    text = redact(f"{r.args[1:]}: {r.stdout[-1000:]} {r.stderr[-2000:]}", *secrets)
    assert r.returncode != 0, text
    low = r.stderr.lower()
    assert "unauthorized" in low or "denied" in low or "authentication required" in low, text


class Podman:
    """podman with storage, run root and auth file of its own."""

    def __init__(self, base: Path) -> None:
        exe = shutil.which("podman")
        if exe is None:
            raise RuntimeError("podman not found: apt-get install -y podman")
        self.runroot = tempfile.mkdtemp(prefix="mpod-", dir="/tmp")  # podman wants <= 50 chars
        self.argv = [exe, "--root", str(base / "proot"), "--runroot", self.runroot]
        self.argv += ["--storage-driver", "vfs", "--events-backend", "none"]
        self.argv += ["--cgroup-manager", "cgroupfs"]
        self.auth_file = base / "auth.json"
        self.auth_file.write_text("{}")  # podman wants it to exist
        self.env = dict(os.environ, REGISTRY_AUTH_FILE=str(self.auth_file))

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.argv, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
            env=self.env,
        )

    def login(self, host: str, user: str, password: str) -> subprocess.CompletedProcess:
        return self.run(
            "login", "--tls-verify=false", "-u", user, "--password-stdin", host, stdin=password
        )

    def pull(self, ref: str) -> subprocess.CompletedProcess:
        return self.run("pull", "-q", "--tls-verify=false", ref)

    def digest(self, ref: str) -> str:
        return json.loads(ok(self.run("image", "inspect", ref)))[0]["Digest"]

    def close(self) -> None:
        self.run("rmi", "-a", "-f")
        shutil.rmtree(self.runroot, ignore_errors=True)


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    p = Podman(tmp_path)
    try:
        yield p
    finally:
        p.close()


def layout(tmp_path: Path, seed: str) -> tuple[im.Image, Path]:
    img = im.build_image([60_000, 4_000], seed=seed)
    return img, im.write_layout(tmp_path / seed, {"v1": img})


def check_pulled(out: Path, img: im.Image) -> None:
    ref = im.read_layout(out).ref("v1")
    assert ref.digest == img.digest and ref.body == img.manifest


def ctr_pull(ctrd: Containerd, ref: str, creds: str | None) -> subprocess.CompletedProcess:
    user = ["--user", creds] if creds is not None else []
    return ctrd.ctr(
        "images", "pull", "--plain-http", "--snapshotter", ctrd.snapshotter, *user, ref,
        check=False,
    )  # fmt: skip


def check_clients(
    node: NodeProcess,
    ctrd: Containerd,
    podman: Podman,
    tmp_path: Path,
    user: str,
    password: str,
    repo: str,
) -> im.Image:
    """``user`` pushes with skopeo, inspects and pulls with skopeo, podman
    (after login) and ctr; each gets exactly what was pushed."""
    creds = f"{user}:{password}"
    sk = Skopeo(node, creds)
    img, src = layout(tmp_path, f"{user}-{repo.replace('/', '-')}")
    ok(sk.push(src, repo), password)
    assert json.loads(ok(sk.inspect(repo), password))["Digest"] == img.digest
    out = tmp_path / f"out-{user}"
    ok(sk.pull(repo, out), password)
    check_pulled(out, img)
    ref = f"{node.hostport}/{repo}:v1"
    refused(podman.pull(ref))  # not logged in yet
    ok(podman.login(node.hostport, user, password), password)
    assert node.hostport in json.loads(podman.auth_file.read_text())["auths"]
    ok(podman.pull(ref), password)
    assert podman.digest(ref) == img.digest
    ok(ctr_pull(ctrd, ref, creds), password)
    assert ctrd.images()[ref] == (im.OCI_MANIFEST, img.digest)
    return img


def no_secret_logged(node: NodeProcess, *secrets: str) -> None:
    logs = node.logs()
    for s in (OWNER_PASSWORD, *secrets):
        assert s not in logs, "a secret reached the node's log"


# -- each kind of identity ----------------------------------------------------------------------


def test_owner(reg_node: NodeProcess, ctrd: Containerd, podman: Podman, tmp_path: Path) -> None:
    check_clients(reg_node, ctrd, podman, tmp_path, "owner", OWNER_PASSWORD, "own/app")
    # Without credentials, or with a wrong password, nothing.
    refused(Skopeo(reg_node, None).inspect("own/app"))
    refused(Skopeo(reg_node, "owner:not-it").inspect("own/app"))
    img, src = layout(tmp_path, "anon-push")
    refused(Skopeo(reg_node, None).push(src, "own/other"))
    refused(ctr_pull(ctrd, f"{reg_node.hostport}/own/app:v1", None))
    no_secret_logged(reg_node)


async def test_admin_user(
    reg_node: NodeProcess, ctrd: Containerd, podman: Podman, tmp_path: Path, admin: Admin
) -> None:
    refused(Skopeo(reg_node, f"{REGISTRY}:anything").inspect("own/app"))  # off by default
    made = await admin.set_admin_enabled(REGISTRY, True)
    p1, p2 = (p["value"] for p in made["passwords"])
    try:
        check_clients(reg_node, ctrd, podman, tmp_path, REGISTRY, p1, "adm/app")
        # Either password works (one can be rotated while the other is in use).
        assert ok(Skopeo(reg_node, f"{REGISTRY}:{p2}").inspect("adm/app"), p2)
    finally:
        await admin.set_admin_enabled(REGISTRY, False)

    await eventually(
        lambda: Skopeo(reg_node, f"{REGISTRY}:{p1}").inspect("adm/app").returncode != 0
    )
    refused(Skopeo(reg_node, f"{REGISTRY}:{p1}").inspect("adm/app"), p1)
    no_secret_logged(reg_node, p1, p2)


async def test_service_principal_with_acr_push(
    reg_node: NodeProcess, ctrd: Containerd, podman: Podman, tmp_path: Path, admin: Admin
) -> None:
    sp = await admin.create_sp("ci-pusher", {REGISTRY: ["AcrPush"]})
    secret = sp["secret"]
    try:
        check_clients(reg_node, ctrd, podman, tmp_path, "ci-pusher", secret, "sp/app")
        # AcrPush holds no delete.
        sk = Skopeo(reg_node, f"ci-pusher:{secret}")
        refused(sk.run("delete", "--tls-verify=false", sk.ref("sp/app")), secret)
        assert json.loads(ok(sk.inspect("sp/app"), secret))["Digest"]
    finally:
        await admin.delete_sp("ci-pusher")
    no_secret_logged(reg_node, secret)


async def test_repository_token_with_a_scope_map(
    reg_node: NodeProcess, ctrd: Containerd, podman: Podman, tmp_path: Path, admin: Admin
) -> None:
    await admin.create_scope_map(
        REGISTRY, "team-rw", {"team/*": ["content/read", "content/write", "metadata/read"]}
    )
    made = await admin.create_token(REGISTRY, "team-bot", "team-rw")
    password = made["passwords"][0]["value"]
    check_clients(reg_node, ctrd, podman, tmp_path, "team-bot", password, "team/app")
    # Outside its scope map: no push, no pull.
    sk = Skopeo(reg_node, f"team-bot:{password}")
    img, src = layout(tmp_path, "outside")
    refused(sk.push(src, "elsewhere/app"), password)
    ok(Skopeo(reg_node, OWNER_CREDS).push(src, "elsewhere/app"))
    refused(sk.inspect("elsewhere/app"), password)
    ref = f"{reg_node.hostport}/elsewhere/app:v1"
    refused(ctr_pull(ctrd, ref, f"team-bot:{password}"), password)
    no_secret_logged(reg_node, password)


async def test_anonymous_pull(
    reg_node: NodeProcess, ctrd: Containerd, podman: Podman, tmp_path: Path, admin: Admin
) -> None:
    img, src = layout(tmp_path, "public")
    ok(Skopeo(reg_node, OWNER_CREDS).push(src, "public/app"))
    anon = Skopeo(reg_node, None)
    ref = f"{reg_node.hostport}/public/app:v1"
    refused(anon.inspect("public/app"))
    await admin.update_settings(REGISTRY, anonymous_pull=True)
    try:
        await eventually(lambda: anon.inspect("public/app").returncode == 0)
        # No credentials anywhere: skopeo, podman (never logged in), ctr.
        assert json.loads(ok(anon.inspect("public/app")))["Digest"] == img.digest
        out = tmp_path / "anon-out"
        ok(anon.pull("public/app", out))
        check_pulled(out, img)
        ok(podman.pull(ref))
        assert podman.digest(ref) == img.digest
        ok(ctr_pull(ctrd, ref, None))
        assert ctrd.images()[ref] == (im.OCI_MANIFEST, img.digest)
        # Pull only.
        _, src2 = layout(tmp_path, "anon-write")
        refused(anon.push(src2, "public/app"))
        refused(anon.run("delete", "--tls-verify=false", anon.ref("public/app")))
    finally:
        await admin.update_settings(REGISTRY, anonymous_pull=False)
    await eventually(lambda: anon.inspect("public/app").returncode != 0)


async def eventually(probe: Callable[[], bool]) -> None:
    """Wait (bounded) until the node acts on a change made in the namespace
    (``probe`` runs a client; the namespace's watch runs in between)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not probe():
        assert loop.time() < deadline, "the node never acted on the change"
        await asyncio.sleep(0.1)


# -- the open mode --------------------------------------------------------------------------------


def test_open_mode_anyone_pushes_and_pulls_and_the_node_says_so(tmp_path: Path) -> None:
    """``--no-auth``: no challenge, no token endpoint, any client pushes,
    pulls and deletes without credentials; the node logs that auth is off.
    A node with authentication (the default) never logs that."""
    node = NodeProcess(tmp_path / "open" / "data", extra=["--no-auth"]).start()
    try:
        reg = im.Registry(node.url, auth=None)
        status, hdrs, body = reg.request("GET", "/v2/")
        assert status == 200 and "WWW-Authenticate" not in hdrs, (status, hdrs, body)
        assert reg.request("GET", "/oauth2/token")[0] == 404
        img, src = layout(tmp_path, "open")
        anon = Skopeo(node, None)
        ok(anon.push(src, "open/app"))
        assert json.loads(ok(anon.inspect("open/app")))["Digest"] == img.digest
        assert reg.get_manifest("open/app", "v1")[2] == img.digest
        for b in img.blobs():
            assert reg.get_blob("open/app", b.digest) == b.data
        ok(anon.run("delete", "--tls-verify=false", anon.ref("open/app")))
        assert reg.request("GET", f"/v2/open/app/manifests/{img.digest}")[0] == 404
        logs = node.logs()
        assert "authentication is OFF (--no-auth)" in logs, logs[-2000:]
    finally:
        node.stop()
    secured = NodeProcess(tmp_path / "secured" / "data").start()
    try:
        status, hdrs, _ = im.Registry(secured.url, auth=None).request("GET", "/v2/")
        assert status == 401 and hdrs["WWW-Authenticate"].startswith("Bearer "), hdrs
    finally:
        secured.stop()
    assert "authentication is OFF" not in secured.logs()
