"""Real clients logging in, through the router and directly at the regions,
over plain HTTP and over HTTPS with the CA ``meridian up --tls`` makes.

One ``meridian up`` at a time (two regions, module-scoped, once per
scheme). The clients are the real ones, each with its own way of holding
credentials: skopeo with ``--creds`` and with ``skopeo login`` (an auth file
of its own), podman with ``podman login`` (pull and push), containerd's
``ctr --user``. Then, at the HTTP level: a token one region issued is good
at the other; a blob GET through the router is redirected with a grant the
region honours without ``Authorization`` (and refuses without the grant);
a signing-key rotation breaks neither old nor new tokens; a wrong password
through the router gets the router's own challenge.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import jwt
import pytest

from cluster.auth import tokens
from cluster.etcd import EtcdKV
from cluster.namespace import Namespace
from tests import images as im
from tests.containerd import Containerd
from tests.procs import OWNER_CREDS, OWNER_PASSWORD, free_port, require_tool
from tests.test_up import Up, meridian, token

pytestmark = pytest.mark.timeout(600)

TOPOLOGY = """
[[region]]
name = "alpha"
rtt_ms = 2

[[region]]
name = "beta"
rtt_ms = 8
"""


@dataclass
class Site:
    """A running ``meridian up`` as its clients see it."""

    up: Up
    tls: bool
    router: str  # URL
    regions: dict[str, str]  # region -> its node's own URL
    etcd: str
    cert_dir: Path  # --tls: the directory holding only ca.crt
    ca: Path

    @property
    def context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca)) if self.tls else None

    def verify(self, side: str = "") -> list[str]:
        """skopeo's (``side``: src, dest) or podman's flags to trust the cluster."""
        prefix = f"--{side}-" if side else "--"
        if self.tls:
            return [f"{prefix}cert-dir", str(self.cert_dir)]
        return [f"{prefix}tls-verify=false"]

    def bases(self) -> list[str]:
        """Through the router, and directly at the regions."""
        return [self.router, *self.regions.values()]


def hostport(url: str) -> str:
    return url.split("://", 1)[1]


@pytest.fixture(scope="module", params=["http", "https"])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    base = tmp_path_factory.mktemp(f"tls-{request.param}")
    config = base / "topology.toml"
    config.write_text(TOPOLOGY)
    tls = request.param == "https"
    up = Up(base / "meridian-data", config, free_port(), *(["--tls"] if tls else []))
    try:
        up.wait_ready()
        state = up.state()
        assert state["router"] == up.router
        s = Site(
            up=up,
            tls=tls,
            router=state["router"],
            regions={name: r["node"] for name, r in state["regions"].items()},
            etcd=state["etcd"],
            cert_dir=Path(state["tls"]["cert_dir"]) if tls else Path(),
            ca=Path(state["tls"]["ca"]) if tls else Path(),
        )
        if tls:
            assert all(url.startswith("https://") for url in s.bases())
            assert sorted(p.name for p in s.cert_dir.iterdir()) == ["ca.crt"]
        else:
            assert state["tls"] is None
        yield s
    finally:
        up.kill_all()


def skopeo(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    exe = require_tool("skopeo")
    r = subprocess.run(
        [exe, "--insecure-policy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"skopeo {' '.join(args)} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )
    return r


def push_image(site: Site, tmp: Path, repo: str, img: im.Image) -> None:
    """Push through the router with skopeo --dest-creds (the upload goes to
    the region the router picks: its Location points there)."""
    layout = im.write_layout(tmp / f"layout-{repo.replace('/', '-')}", {"v1": img})
    skopeo(
        "copy",
        "-q",
        *site.verify("dest"),
        "--dest-creds",
        OWNER_CREDS,
        f"oci:{layout}:v1",
        f"docker://{hostport(site.router)}/{repo}:v1",
    )


# -- skopeo ----------------------------------------------------------------------------


def test_skopeo_with_creds_and_with_login(site: Site, tmp_path: Path) -> None:
    img = im.build_image([200_000, 30_000], seed=f"tls-skopeo-{site.tls}")
    repo = "tls/skopeo"
    push_image(site, tmp_path, repo, img)
    for base in site.bases():
        ref = f"docker://{hostport(base)}/{repo}:v1"
        info = json.loads(skopeo("inspect", *site.verify(), "--creds", OWNER_CREDS, ref).stdout)
        assert info["Digest"] == img.digest, base
        # No credentials: refused.
        r = skopeo("inspect", *site.verify(), "--no-creds", ref, check=False)
        assert r.returncode != 0 and "unauthorized" in r.stderr.lower(), r.stderr

    # skopeo login (an auth file of its own, the password on stdin), then
    # copies that name no credentials: pull from each, push to each.
    authfile = tmp_path / "auth.json"
    for n, base in enumerate(site.bases()):
        host = hostport(base)
        r = skopeo(
            "login", *site.verify(), "--authfile", str(authfile), "-u", "owner",
            "--password-stdin", host, stdin=OWNER_PASSWORD + "\n",
        )  # fmt: skip
        assert "Login Succeeded" in r.stdout, r.stdout + r.stderr
        out = tmp_path / f"pulled-{n}"
        skopeo(
            "copy", "-q", *site.verify("src"), "--authfile", str(authfile),
            f"docker://{host}/{repo}:v1", f"oci:{out}:v1",
        )  # fmt: skip
        assert im.read_layout(out).ref("v1").digest == img.digest
        assert im.verify_layout(out) == len(img.blobs()) + 1
        skopeo(
            "copy", "-q", *site.verify("dest"), "--authfile", str(authfile),
            f"oci:{out}:v1", f"docker://{host}/tls/skopeo-login-{n}:v1",
        )  # fmt: skip
        info = json.loads(
            skopeo("inspect", *site.verify(), "--creds", OWNER_CREDS,
                   f"docker://{hostport(site.router)}/tls/skopeo-login-{n}:v1").stdout
        )  # fmt: skip
        assert info["Digest"] == img.digest

    # A wrong password is refused at login, through the router too.
    r = skopeo(
        "login", *site.verify(), "--authfile", str(tmp_path / "wrong.json"), "-u", "owner",
        "--password-stdin", hostport(site.router), stdin="not-the-password\n", check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "Login Succeeded" not in r.stdout
    wrong = tmp_path / "wrong.json"
    assert not wrong.exists() or hostport(site.router) not in wrong.read_text()


def test_the_password_file_logs_in(site: Site, tmp_path: Path) -> None:
    """The login line meridian up prints works as printed (the password file
    on stdin)."""
    password_file = site.up.data / "owner-password"
    line = next(
        line.strip()
        for line in site.up.output.splitlines()
        if line.strip().startswith("skopeo login")
    )
    assert line.endswith(f"< {password_file}")
    argv = line.split(" < ")[0].split()[2:]  # after "skopeo login"
    r = skopeo(
        "login",
        "--authfile",
        str(tmp_path / "auth.json"),
        *argv,
        stdin=password_file.read_text(),
    )
    assert "Login Succeeded" in r.stdout


# -- podman ------------------------------------------------------------------------------


def test_podman_login_pull_and_push(site: Site, tmp_path: Path) -> None:
    exe = require_tool("podman")
    img = im.build_image([150_000, 10_000], seed=f"tls-podman-{site.tls}")
    repo = "tls/podman"
    push_image(site, tmp_path, repo, img)
    runroot = tempfile.mkdtemp(prefix="mpod-", dir="/tmp")  # podman wants a short path
    authfile = tmp_path / "auth.json"
    base = [
        exe, "--root", str(tmp_path / "proot"), "--runroot", runroot,
        "--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs",
    ]  # fmt: skip

    def podman(*args: str, stdin: str | None = None) -> str:
        r = subprocess.run([*base, *args], input=stdin, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stderr[-3000:]}"
        return r.stdout

    try:
        router = hostport(site.router)
        for n, url in enumerate(site.bases()):
            host = hostport(url)
            out = podman(
                "login", *site.verify(), "--authfile", str(authfile), "-u", "owner",
                "--password-stdin", host, stdin=OWNER_PASSWORD,
            )  # fmt: skip
            assert "Login Succeeded" in out
            ref = f"{host}/{repo}:v1"
            podman("pull", "-q", *site.verify(), "--authfile", str(authfile), ref)
            info = json.loads(podman("image", "inspect", ref))[0]
            assert info["Digest"] == img.digest
            assert info["Id"] == img.config.digest.split(":")[1]
            # Push back through this endpoint (through the router, the upload
            # goes to a region's own URL: podman logs in there as well).
            pushed = f"{host}/tls/podman-pushed-{n}:v1"
            podman("tag", ref, pushed)
            podman("push", "-q", *site.verify(), "--authfile", str(authfile), pushed)
            info = json.loads(
                skopeo("inspect", *site.verify(), "--creds", OWNER_CREDS,
                       f"docker://{router}/tls/podman-pushed-{n}:v1").stdout
            )  # fmt: skip
            assert len(info["Layers"]) == len(img.layers)
    finally:
        subprocess.run([*base, "rmi", "-a", "-f"], capture_output=True, timeout=120)
        shutil.rmtree(runroot, ignore_errors=True)


# -- containerd --------------------------------------------------------------------------


def test_ctr_user_pull(site: Site, tmp_path: Path) -> None:
    img = im.build_image([250_000, 20_000], seed=f"tls-ctr-{site.tls}")
    repo = "tls/ctr"
    push_image(site, tmp_path, repo, img)
    hosts = tmp_path / "certs.d"

    def how(url: str) -> list[str]:
        """How ctr reaches ``url``: plain HTTP, or a hosts dir trusting the CA
        (for the router, the one meridian up wrote)."""
        if not site.tls:
            return ["--plain-http"]
        if url == site.router:
            return ["--hosts-dir", str(site.up.data / "tls" / "hosts")]
        host = hostport(url)
        (hosts / host).mkdir(parents=True, exist_ok=True)
        (hosts / host / "hosts.toml").write_text(
            f'server = "{url}"\n\n[host."{url}"]\n'
            f'  capabilities = ["pull", "resolve"]\n  ca = "{site.ca}"\n'
        )
        return ["--hosts-dir", str(hosts)]

    with Containerd(tmp_path / "containerd") as ctrd:
        for url in site.bases():
            ref = f"{hostport(url)}/{repo}:v1"
            ctrd.ctr(
                "images", "pull", *how(url), "--user", OWNER_CREDS,
                "--snapshotter", ctrd.snapshotter, ref,
            )  # fmt: skip
            assert ctrd.images()[ref] == (im.OCI_MANIFEST, img.digest)
        for layer in img.layers:
            assert ctrd.content_bytes(layer.digest) == layer.data
        # Without credentials: refused (no such image, no anonymous pull).
        r = ctrd.ctr(
            "images", "pull", *how(site.router), "--snapshotter", ctrd.snapshotter,
            f"{hostport(site.router)}/tls/ctr-none:v1", check=False,
        )  # fmt: skip
        assert r.returncode != 0 and "401" in r.stderr + r.stdout, r.stderr


# -- meridian regions ------------------------------------------------------------------


def rtts(rows: list[dict]) -> dict[str, object]:
    """Each region's and each node's ``rtt_ms`` in ``meridian regions --json``."""
    out: dict[str, object] = {}
    for row in rows:
        out[row["region"]] = row["rtt_ms"]
        out.update({f"{row['region']}/{n['node']}": n["rtt_ms"] for n in row["nodes"]})
    return out


def measured(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_meridian_regions_measures_every_region(site: Site, tmp_path: Path) -> None:
    """``meridian regions`` shows an RTT for every region and node, over
    HTTPS too: found by its up.json, it trusts the CA that names; given
    ``--etcd`` or ``--node``, the CA ``--tls-ca`` names."""
    r = meridian("regions", "--json", cwd=site.up.data.parent)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["region"] for row in rows} == set(site.regions)
    assert all(row["alive"] and row["reachable"] and row["nodes"] for row in rows), rows
    found = rtts(rows)
    assert all(measured(v) for v in found.values()), found
    table = meridian("regions", cwd=site.up.data.parent)
    assert table.returncode == 0, table.stderr
    for name in site.regions:
        line = next(x for x in table.stdout.splitlines() if x.startswith(name + " "))
        assert line.split()[2].endswith("ms"), table.stdout

    # Named explicitly, from elsewhere: the etcd, or one node's API.
    ca = ["--tls-ca", str(site.ca)] if site.tls else []
    for where in (["--etcd", site.etcd], ["--node", site.regions["alpha"]]):
        r = meridian("regions", "--json", *where, *ca, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert rtts(json.loads(r.stdout)).keys() == found.keys()
        assert all(measured(v) for v in rtts(json.loads(r.stdout)).values()), r.stdout
    if not site.tls:
        return
    # Without the CA the regions' certificates are not trusted: no RTT, and
    # one line says what to pass.
    r = meridian("regions", "--etcd", site.etcd, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--tls-ca" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Asked through one node's API without the CA: one line, exit 2.
    for verb in (["regions"], ["replication", "status"]):
        r = meridian(*verb, "--node", site.regions["alpha"], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "--tls-ca" in r.stderr, r.stderr
    r = meridian(
        "replication", "status", "--json", "--node", site.regions["alpha"], *ca, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert {row["region"] for row in json.loads(r.stdout)} == set(site.regions)
    # A CA file that is not there: one line, exit 2.
    r = meridian(
        "regions", "--etcd", site.etcd, "--tls-ca", str(tmp_path / "none.pem"), cwd=tmp_path
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--tls-ca" in r.stderr, r.stderr


# -- tokens, grants and rotation, at the HTTP level --------------------------------------


def request(
    site: Site, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request, no redirect followed: status, headers, body."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *_: object, **__: object) -> None:
            return None

    opener = urllib.request.build_opener(
        NoRedirect, urllib.request.HTTPSHandler(context=site.context)
    )
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def test_tokens_cross_regions_grants_and_challenges(site: Site, tmp_path: Path) -> None:
    img = im.build_image([120_000], seed=f"tls-tokens-{site.tls}")
    repo = "tls/tokens"
    push_image(site, tmp_path, repo, img)
    alpha, beta = site.regions["alpha"], site.regions["beta"]
    manifest = f"/v2/{repo}/manifests/v1"
    accept = {"Accept": im.OCI_MANIFEST}

    # A token issued by region alpha is accepted by region beta (and the router).
    tok = token(alpha, repo, context=site.context)
    for base in (beta, site.router, alpha):
        status, _, body = request(
            site, "GET", base + manifest, {**accept, "Authorization": f"Bearer {tok}"}
        )
        assert status == 200 and body == img.manifest, base

    # Without a token, through the router: the challenge names the router's
    # own token endpoint (its scheme too), the service and the scope.
    # (meridian up gives nodes a --domain: the default registry's service is
    # default.<domain>, whatever host the client used.)
    service = f"default.{site.up.state()['domain']}"
    status, headers, _ = request(site, "GET", site.router + manifest, accept)
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        f'Bearer realm="{site.router}/oauth2/token",service="{service}",'
        f'scope="repository:{repo}:pull"'
    )
    # A wrong password through the router: 401 with the router's realm.
    wrong = base64.b64encode(b"owner:not-the-password").decode()
    status, headers, _ = request(
        site, "GET", f"{site.router}/oauth2/token?scope=repository:{repo}:pull",
        {"Authorization": f"Basic {wrong}"},
    )  # fmt: skip
    assert status == 401
    assert headers["WWW-Authenticate"].startswith(f'Bearer realm="{site.router}/oauth2/token"')

    # A blob GET through the router: redirected with a grant that the region
    # honours from a client sending no Authorization, and only with it.
    layer = img.layers[0]
    status, headers, _ = request(
        site, "GET", f"{site.router}/v2/{repo}/blobs/{layer.digest}",
        {"Authorization": f"Bearer {tok}"},
    )  # fmt: skip
    assert status == 307
    location = headers["Location"]
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}" in set(site.up.state()["regions"][r]["advertised"]
                                                     for r in site.regions)  # fmt: skip
    assert "meridian_grant" in parse_qs(parts.query)
    status, _, body = request(site, "GET", location)
    assert status == 200 and body == layer.data
    bare = urlunsplit(parts._replace(query=""))
    status, headers, _ = request(site, "GET", bare)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer ")
    # A grant is for its blob only.
    other = img.config.digest
    status, _, _ = request(site, "GET", location.replace(layer.digest, other))
    assert status == 401


def test_signing_key_rotation_breaks_no_client(site: Site, tmp_path: Path) -> None:
    img = im.build_image([60_000], seed=f"tls-rotation-{site.tls}")
    repo = "tls/rotation"
    push_image(site, tmp_path, repo, img)
    manifest = f"/v2/{repo}/manifests/v1"
    accept = {"Accept": im.OCI_MANIFEST}
    before = token(site.router, repo, context=site.context)
    old_kid = jwt.get_unverified_header(before)["kid"]

    async def rotate() -> str:
        ns = Namespace(EtcdKV.from_flag(site.etcd), region="")
        await ns.start()
        try:
            ring = tokens.KeyRing(ns)
            key = await ring.ensure(now=time.time() + tokens.ROTATE_AFTER + 60)
            assert {k.kid for k in ring.keys()} >= {old_kid}  # the old key stays
            return key.kid
        finally:
            await ns.close()

    new_kid = asyncio.run(rotate())
    assert new_kid != old_kid
    # Every region signs with the new key once its namespace watch has it.
    deadline = time.monotonic() + 30
    fresh: dict[str, str] = {}
    while time.monotonic() < deadline and len(fresh) < len(site.regions):
        for name, url in site.regions.items():
            t = token(url, repo, context=site.context)
            if jwt.get_unverified_header(t)["kid"] == new_kid:
                fresh[name] = t
        time.sleep(0.1)
    assert set(fresh) == set(site.regions), "the regions never signed with the new key"
    for tok in (before, *fresh.values()):
        for base in site.bases():
            status, _, body = request(
                site, "GET", base + manifest, {**accept, "Authorization": f"Bearer {tok}"}
            )
            assert status == 200 and body == img.manifest, (base, jwt.get_unverified_header(tok))
    # And a real client logs in and pulls after the rotation.
    info = json.loads(
        skopeo("inspect", *site.verify(), "--creds", OWNER_CREDS,
               f"docker://{hostport(site.router)}/{repo}:v1").stdout
    )  # fmt: skip
    assert info["Digest"] == img.digest
