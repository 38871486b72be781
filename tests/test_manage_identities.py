"""Identities and access, end to end: the ``meridian`` CLI (real processes)
and the management API of real nodes with authentication on.

Every test starts its own node (each node has its own failed-login limiter,
and these tests fail logins on purpose), with ``--domain meridian.test`` so
a request's ``Host: <registry>.meridian.test`` selects any registry, and
``--access-log`` so every request is logged; at the end of each test the
node's log is searched for every secret the test saw.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from tests.images import build_image, write_layout
from tests.oci import create_registry
from tests.procs import ROOT, NodeProcess, require_tool

pytestmark = pytest.mark.timeout(300)

DOMAIN = "meridian.test"
REGISTRIES = ("contoso", "fabrikam")  # what the tests' Host names select
OWNER_PASSWORD = os.environ.setdefault(OWNER_PASSWORD_ENV, secrets.token_urlsafe(18))
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CLUSTER_ENV = (
    "MERIDIAN_ETCD",
    "MERIDIAN_NODE",
    "MERIDIAN_SERVER",
    "MERIDIAN_REGISTRY",
    "MERIDIAN_OUTPUT",
    "XDG_CONFIG_HOME",
    "DOCKER_CONFIG",
    "REGISTRY_AUTH_FILE",
)


# -- a node, the CLI ---------------------------------------------------------------


class Node:
    def __init__(self, proc: NodeProcess) -> None:
        self.proc = proc
        self.url = proc.url
        self.seen: set[str] = set()  # every secret the test saw

    def secret(self, value: str) -> str:
        self.seen.add(value)
        return value

    def assert_no_secret_logged(self) -> None:
        log = self.proc.logs()
        assert "/meridian/v1/" in log  # the log is the one that saw the requests
        for s in self.seen | {OWNER_PASSWORD}:
            assert s not in log, "a secret is in the node's log"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    p = NodeProcess(tmp_path / "data", extra=["--auth", "--domain", DOMAIN, "--access-log"]).start()
    n = Node(p)
    for reg in REGISTRIES:  # registries exist once created (cluster.registries)
        create_registry(p.url, reg)
    try:
        yield n
        n.assert_no_secret_logged()
    finally:
        p.stop()


class Cli:
    """``meridian`` as a user runs it: its own HOME and docker config dir."""

    def __init__(self, home: Path, docker_config: Path | None) -> None:
        self.home = home
        self.docker_config = docker_config
        home.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
        env.update(
            PYTHONPATH=str(ROOT),
            HOME=str(self.home),
            MERIDIAN_UP_DATA=str(self.home / "no-meridian-up"),
        )
        if self.docker_config is not None:
            env["DOCKER_CONFIG"] = str(self.docker_config)
        return env

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cluster.cli", *args],
            cwd=self.home,
            env=self.env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str, stdin: str | None = None) -> Any:
        """Run with ``-o json``; exit 0; the parsed output (None if empty)."""
        r = self(*args, "-o", "json", stdin=stdin)
        assert r.returncode == 0, (args, r.returncode, r.stderr)
        return json.loads(r.stdout) if r.stdout.strip() else None

    def fails(self, code: int, *args: str) -> str:
        """Exit ``code`` with one line on stderr, no traceback; that line."""
        r = self(*args)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == code, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        return lines[0]

    def login(self, server: str, user: str = OWNER, password: str = OWNER_PASSWORD, *more: str):
        return self("login", "-u", user, "--password-stdin", *more, server, stdin=password + "\n")


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home", tmp_path / "docker")


def owner_cli(tmp_path: Path, node: Node) -> Cli:
    c = Cli(tmp_path / "home", tmp_path / "docker")
    r = c.login(node.url)
    assert r.returncode == 0, r.stderr
    return c


# -- plain HTTP: the management API and the registry's own token flow --------------


def http(
    method: str,
    url: str,
    *,
    body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    h = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


OWNER_BASIC = basic(OWNER, OWNER_PASSWORD)


def api(
    node: Node, method: str, path: str, body: Any = None, auth: dict[str, str] | None = None
) -> tuple[int, Any]:
    status, headers, raw = http(
        method,
        node.url + "/meridian/v1" + path,
        body=body,
        headers=OWNER_BASIC if auth is None else auth,
    )
    return status, (json.loads(raw) if raw else None)


def error_code(doc: Any) -> str:
    return doc["errors"][0]["code"]


def host(reg: str) -> dict[str, str]:
    return {"Host": f"{reg}.{DOMAIN}"}


def get_token(
    node: Node, reg: str, scope: str, creds: tuple[str, str] | None
) -> tuple[int, str, str]:
    """(status, granted scope, token) from the node's token endpoint for ``reg``."""
    headers = host(reg) | (basic(*creds) if creds else {})
    status, _, raw = http(
        "GET", f"{node.url}/oauth2/token?{urlencode({'scope': scope})}", headers=headers
    )
    if status != 200:
        return status, "", ""
    doc = json.loads(raw)
    return status, doc["scope"], doc["token"]


def v2(
    node: Node,
    reg: str,
    method: str,
    path: str,
    token: str = "",
    data: bytes | None = None,
    ctype: str = "application/octet-stream",
) -> tuple[int, dict[str, str]]:
    headers = host(reg) | {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, h, _ = http(method, f"{node.url}/v2/{path}", data=data, headers=headers)
    return status, h


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(node: Node, reg: str, repo: str, token: str, data: bytes) -> int:
    status, _ = v2(node, reg, "POST", f"{repo}/blobs/uploads/?digest={sha256(data)}", token, data)
    return status


def push_image(node: Node, reg: str, repo: str, tag: str) -> None:
    """A small image, pushed as the cluster owner."""
    status, _, tok = get_token(node, reg, f"repository:{repo}:pull,push", (OWNER, OWNER_PASSWORD))
    assert status == 200
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = os.urandom(256)
    for blob in (config, layer):
        assert push_blob(node, reg, repo, tok, blob) == 201
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    status, _ = v2(node, reg, "PUT", f"{repo}/manifests/{tag}", tok, manifest, OCI_MANIFEST)
    assert status == 201


def can_pull(node: Node, reg: str, repo: str, tag: str, creds: tuple[str, str] | None) -> bool:
    status, granted, tok = get_token(node, reg, f"repository:{repo}:pull", creds)
    if status != 200:
        return False
    return v2(node, reg, "GET", f"{repo}/manifests/{tag}", tok)[0] == 200


def can_push(node: Node, reg: str, repo: str, creds: tuple[str, str] | None) -> bool:
    status, granted, tok = get_token(node, reg, f"repository:{repo}:pull,push", creds)
    if status != 200:
        return False
    return push_blob(node, reg, repo, tok, os.urandom(64)) == 201


def login_ok(node: Node, reg: str, user: str, password: str) -> bool:
    return get_token(node, reg, "repository:x:pull", (user, password))[0] == 200


# -- login, the docker config, skopeo ----------------------------------------------------


def test_login_writes_a_docker_config_skopeo_and_the_cli_use(node: Node, tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    docker_dir = tmp_path / "docker"
    cli = Cli(tmp_path / "home", docker_dir)
    config = docker_dir / "config.json"
    docker_dir.mkdir()
    config.write_text(json.dumps({"auths": {"other.example": {"auth": "eDp5"}}, "x": 1}))

    # A wrong password: refused, nothing stored.
    r = cli.login(node.url, OWNER, "not-the-password")
    assert r.returncode == 5 and "refused" in r.stderr, r.stderr
    assert json.loads(config.read_text()) == {"auths": {"other.example": {"auth": "eDp5"}}, "x": 1}
    # Not logged in: the verbs say so.
    line = cli.fails(5, "token", "list", "--server", node.url)
    assert "not logged in" in line and "meridian login" in line

    r = cli.login(node.url)
    assert r.returncode == 0, r.stderr
    assert "Login Succeeded" in r.stdout
    doc = json.loads(config.read_text())
    key = node.proc.hostport
    assert base64.b64decode(doc["auths"][key]["auth"]).decode() == f"{OWNER}:{OWNER_PASSWORD}"
    assert doc["auths"]["other.example"] == {"auth": "eDp5"} and doc["x"] == 1  # others kept
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    # The CLI uses the stored login and server: no --server, no credentials given.
    assert cli.ok("token", "list") == []
    assert cli.ok("settings", "show")["registry"] == "default"

    # skopeo reads the same file: push and inspect with it, and only with it.
    layout = write_layout(tmp_path / "layout", {"v1": build_image([2048], seed=1)})
    ref = f"docker://{key}/team/app:v1"
    base = [skopeo]
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    env.update(HOME=str(tmp_path / "empty-home"), XDG_RUNTIME_DIR=str(tmp_path / "run"))

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *a], capture_output=True, text=True, env=env, timeout=120)

    pushed = run(
        "copy", "--dest-tls-verify=false", "--dest-authfile", str(config), f"oci:{layout}:v1", ref
    )
    assert pushed.returncode == 0, pushed.stderr
    inspected = run("inspect", "--tls-verify=false", "--authfile", str(config), ref)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Name"].endswith("team/app")
    refused = run("inspect", "--tls-verify=false", ref)  # no credentials anywhere: refused
    assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower(), refused.stderr

    # ...and from its default place when DOCKER_CONFIG is unset: ~/.docker/config.json.
    home_cli = Cli(tmp_path / "home2", None)
    assert home_cli.login(node.url).returncode == 0
    env["HOME"] = str(home_cli.home)
    by_default = run("inspect", "--tls-verify=false", ref)
    assert by_default.returncode == 0, by_default.stderr

    # logout forgets it; the verbs then say so.
    r = cli("logout", node.url)
    assert r.returncode == 0 and key not in json.loads(config.read_text())["auths"]
    assert "not logged in" in cli.fails(5, "token", "list", "--server", node.url)


# -- service principals -------------------------------------------------------------------


def test_service_principal_with_acrpull_pulls_but_cannot_push(node: Node, tmp_path: Path) -> None:
    cli = owner_cli(tmp_path, node)
    push_image(node, "contoso", "app", "v1")

    sp = cli.ok("sp", "create", "--id", "ci-pull", "--role", "contoso=AcrPull")
    secret = node.secret(sp["secret"])
    assert sp["id"] == "ci-pull" and sp["roles"] == {"contoso": ["AcrPull"]}
    creds = ("ci-pull", secret)

    status, granted, _ = get_token(node, "contoso", "repository:app:pull,push", creds)
    assert status == 200 and granted == "repository:app:pull"
    assert can_pull(node, "contoso", "app", "v1", creds)
    assert not can_push(node, "contoso", "app", creds)
    assert not can_pull(node, "fabrikam", "app", "v1", creds)  # no role there

    # The secret is shown once: never by list or show.
    listed = cli.ok("sp", "list")
    assert [s["id"] for s in listed] == ["ci-pull"] and "secret" not in listed[0]
    assert "secret" not in cli.ok("sp", "show", "ci-pull")
    table = cli("sp", "list")
    assert table.returncode == 0 and "ci-pull" in table.stdout and secret not in table.stdout
    assert cli("sp", "list", "-o", "tsv").stdout.split("\t")[0] == "ci-pull"

    # Generated client id, through the API; the owner's bearer token works too.
    status, granted, tok = get_token(node, "default", "registry:manage:*", (OWNER, OWNER_PASSWORD))
    assert granted == "registry:manage:*"
    bearer = {"Authorization": f"Bearer {tok}"}
    status, doc = api(
        node, "POST", "/serviceprincipals", {"roles": {"contoso": ["AcrPush"]}}, auth=bearer
    )
    assert status == 201, doc
    pusher = (doc["id"], node.secret(doc["secret"]))
    assert can_push(node, "contoso", "app", pusher)

    # Deleted: its login is refused at once.
    assert cli.ok("sp", "delete", "ci-pull") is None
    assert get_token(node, "contoso", "repository:app:pull", creds)[0] == 401
    assert "no service principal 'ci-pull'" in cli.fails(6, "sp", "delete", "ci-pull")


def test_owner_role_manages_its_registry_only(node: Node, tmp_path: Path) -> None:
    cli = owner_cli(tmp_path, node)
    sp = cli.ok("sp", "create", "--id", "team-lead", "--role", "contoso=Owner")
    lead = Cli(tmp_path / "lead-home", tmp_path / "lead-docker")
    assert lead.login(node.url, "team-lead", node.secret(sp["secret"])).returncode == 0

    tok = lead.ok(
        "token", "create", "ci", "--scope-map", "_repositories_pull", "--registry", "contoso"
    )
    for p in tok["passwords"]:
        node.secret(p["value"])
    assert lead.ok("token", "list", "--registry", "contoso")[0]["name"] == "ci"
    # Not another registry, not service principals.
    line = lead.fails(5, "token", "list", "--registry", "fabrikam")
    assert "may not manage registry 'fabrikam'" in line
    line = lead.fails(5, "sp", "create", "--id", "sneaky", "--role", "contoso=Owner")
    assert "only the cluster owner" in line
    status, doc = api(
        node,
        "POST",
        "/serviceprincipals",
        {"id": "sneaky2", "roles": {"contoso": ["Owner"]}},
        auth=basic("team-lead", sp["secret"]),
    )
    assert status == 403 and error_code(doc) == "DENIED"
    assert [s["id"] for s in cli.ok("sp", "list")] == ["team-lead"]  # nothing created

    # A pull-only service principal may not manage anything.
    puller = cli.ok("sp", "create", "--id", "puller", "--role", "contoso=AcrPull")
    status, doc = api(
        node,
        "GET",
        "/registries/contoso/tokens",
        auth=basic("puller", node.secret(puller["secret"])),
    )
    assert status == 403 and error_code(doc) == "DENIED"
    # Its bearer token does not get the manage scope either.
    _, granted, t = get_token(node, "contoso", "registry:manage:*", ("puller", puller["secret"]))
    assert granted == ""
    status, doc = api(
        node, "GET", "/registries/contoso/tokens", auth={"Authorization": f"Bearer {t}"}
    )
    assert status == 403


# -- tokens and scope maps ------------------------------------------------------------------


def test_token_with_a_team_scope_map(node: Node, tmp_path: Path) -> None:
    cli = owner_cli(tmp_path, node)
    reg = ["--registry", "contoso"]
    push_image(node, "contoso", "team-a/app", "v1")
    push_image(node, "contoso", "team-b/app", "v1")

    smap = cli.ok(
        "scope-map",
        "create",
        "team-a",
        "--repository",
        "team-a/*",
        "content/read",
        "content/write",
        "--description",
        "team A",
        *reg,
    )
    assert smap["actions"] == {"team-a/*": ["content/read", "content/write"]}
    tok = cli.ok(
        "token", "create", "team-a-ci", "--scope-map", "team-a", "--expiration-in-days", "30", *reg
    )
    p1, p2 = (node.secret(p["value"]) for p in tok["passwords"])
    assert tok["status"] == "enabled" and tok["expiry"].startswith("20")
    assert [p["name"] for p in tok["passwords"]] == ["password1", "password2"]

    for pw in (p1, p2):
        creds = ("team-a-ci", pw)
        assert can_pull(node, "contoso", "team-a/app", "v1", creds)
        assert can_push(node, "contoso", "team-a/app", creds)
        assert not can_pull(node, "contoso", "team-b/app", "v1", creds)
        assert not can_push(node, "contoso", "team-b/app", creds)
    _, granted, _ = get_token(
        node, "contoso", "repository:team-a/x:pull,push,delete", ("team-a-ci", p1)
    )
    assert granted == "repository:team-a/x:pull,push"

    # Disabled: refused; enabled again: back.
    assert cli.ok("token", "update", "team-a-ci", "--status", "disabled", *reg)["status"] == (
        "disabled"
    )
    assert not login_ok(node, "contoso", "team-a-ci", p1)
    cli.ok("token", "update", "team-a-ci", "--status", "enabled", *reg)
    assert login_ok(node, "contoso", "team-a-ci", p1)

    # Renew password1: the old one is refused, password2 still works.
    renewed = cli.ok("token", "renew", "team-a-ci", "--password1", *reg)
    assert [p["name"] for p in renewed["passwords"]] == ["password1"]
    new1 = node.secret(renewed["passwords"][0]["value"])
    assert not login_ok(node, "contoso", "team-a-ci", p1)
    assert login_ok(node, "contoso", "team-a-ci", p2)
    assert login_ok(node, "contoso", "team-a-ci", new1)

    # Scope map update: add team-b read; the token gets it.
    cli.ok("scope-map", "update", "team-a", "--add-repository", "team-b/app", "content/read", *reg)
    assert can_pull(node, "contoso", "team-b/app", "v1", ("team-a-ci", p2))
    assert not can_push(node, "contoso", "team-b/app", ("team-a-ci", p2))

    # A scope map a token uses cannot be deleted; nothing changes.
    line = cli.fails(7, "scope-map", "delete", "team-a", *reg)
    assert "used by token(s) team-a-ci" in line
    assert cli.ok("scope-map", "show", "team-a", *reg)["name"] == "team-a"
    assert cli.ok("token", "delete", "team-a-ci", *reg) is None
    assert not login_ok(node, "contoso", "team-a-ci", p2)
    assert cli.ok("scope-map", "delete", "team-a", *reg) is None
    names = [m["name"] for m in cli.ok("scope-map", "list", *reg)]
    assert names == ["_repositories_pull", "_repositories_push", "_repositories_admin"]

    # The same through the API: expiry in the past is refused, null clears it.
    status, doc = api(
        node,
        "POST",
        "/registries/contoso/tokens",
        {"name": "puller", "scope_map": "_repositories_pull"},
    )
    assert status == 201 and len(doc["passwords"]) == 2
    for p in doc["passwords"]:
        node.secret(p["value"])
    status, doc = api(node, "PATCH", "/registries/contoso/tokens/puller", {"expiry": 1})
    assert status == 400 and "in the past" in doc["errors"][0]["message"]
    status, doc = api(
        node, "PATCH", "/registries/contoso/tokens/puller", {"expiry": "2099-01-01T00:00:00Z"}
    )
    assert status == 200 and doc["expiry"] == "2099-01-01T00:00:00Z"
    status, doc = api(node, "PATCH", "/registries/contoso/tokens/puller", {"expiry": None})
    assert status == 200 and doc["expiry"] is None


# -- the admin user ---------------------------------------------------------------------------


def test_admin_user_enable_renew_disable(node: Node, tmp_path: Path) -> None:
    cli = owner_cli(tmp_path, node)
    reg = ["--registry", "contoso"]
    shown = cli.ok("credential", "show", *reg)
    assert shown == {"registry": "contoso", "username": "contoso", "enabled": False}
    line = cli.fails(6, "credential", "renew", "--password1", *reg)
    assert "meridian credential enable" in line

    enabled = cli.ok("credential", "enable", *reg)
    p1, p2 = (node.secret(p["value"]) for p in enabled["passwords"])
    assert enabled["enabled"] is True
    assert can_push(node, "contoso", "app", ("contoso", p1))  # user name: the registry's
    assert login_ok(node, "contoso", "contoso", p2)
    assert not login_ok(node, "fabrikam", "contoso", p1)  # only in its own registry
    # Enabled again: no new passwords, the old ones still work.
    assert "passwords" not in cli.ok("credential", "enable", *reg)
    assert login_ok(node, "contoso", "contoso", p1)

    renewed = cli.ok("credential", "renew", "--password2", *reg)
    new2 = node.secret(renewed["passwords"][0]["value"])
    assert not login_ok(node, "contoso", "contoso", p2)
    assert login_ok(node, "contoso", "contoso", p1)
    assert login_ok(node, "contoso", "contoso", new2)

    assert cli.ok("credential", "disable", *reg)["enabled"] is False
    assert not login_ok(node, "contoso", "contoso", p1)
    # Through the API.
    status, doc = api(node, "PATCH", "/registries/contoso/admin", {"enabled": True})
    assert status == 200 and doc["enabled"] is True and "passwords" not in doc
    assert login_ok(node, "contoso", "contoso", new2)


# -- settings: anonymous pull, network rules ------------------------------------------------------


def test_anonymous_pull_and_network_rules(node: Node, tmp_path: Path) -> None:
    cli = owner_cli(tmp_path, node)
    reg = ["--registry", "contoso"]
    owner = (OWNER, OWNER_PASSWORD)
    push_image(node, "contoso", "pub/app", "v1")
    assert not can_pull(node, "contoso", "pub/app", "v1", None)

    settings = cli.ok("settings", "update", "--anonymous-pull", "true", *reg)
    assert settings["anonymous_pull"] is True
    assert can_pull(node, "contoso", "pub/app", "v1", None)
    assert not can_push(node, "contoso", "pub/app", None)
    assert not can_pull(node, "fabrikam", "pub/app", "v1", None)  # another registry
    cli.ok("settings", "update", "--anonymous-pull", "false", *reg)
    assert not can_pull(node, "contoso", "pub/app", "v1", None)

    # Public access off, no allowed network: even the owner is kept out.
    settings = cli.ok("settings", "update", "--public-access", "false", *reg)
    assert settings["public_access"] is False and settings["allowed_cidrs"] == []
    status, _ = v2(node, "contoso", "GET", "")
    assert status == 403
    assert not can_pull(node, "contoso", "pub/app", "v1", owner)
    assert v2(node, "fabrikam", "GET", "")[0] == 401  # another registry is not closed
    rules = cli.ok("network-rule", "add", "127.0.0.1", *reg)
    assert rules["networkrules"] == [{"cidr": "127.0.0.1/32"}]
    assert can_pull(node, "contoso", "pub/app", "v1", owner)
    assert "already allowed" in cli.fails(7, "network-rule", "add", "127.0.0.1/32", *reg)
    assert cli.ok("network-rule", "list", *reg)["networkrules"] == [{"cidr": "127.0.0.1/32"}]
    assert cli.ok("network-rule", "remove", "127.0.0.1/32", *reg) is None
    assert not can_pull(node, "contoso", "pub/app", "v1", owner)
    assert "not an allowed network" in cli.fails(6, "network-rule", "remove", "127.0.0.1", *reg)
    # The management API is not behind the registry's network rules (it is how to fix them).
    status, doc = api(node, "PATCH", "/registries/contoso/settings", {"public_access": True})
    assert status == 200 and doc["public_access"] is True
    assert can_pull(node, "contoso", "pub/app", "v1", owner)
    status, doc = api(node, "GET", "/registries/contoso/settings")
    assert doc == {
        "registry": "contoso",
        "anonymous_pull": False,
        "public_access": True,
        "allowed_cidrs": [],
    }


async def test_settings_keep_the_registry_config_s_other_keys(tmp_path: Path) -> None:
    from cluster.auth.admin import Admin
    from cluster.embedded import EmbeddedKV
    from cluster.namespace import Namespace

    ns = Namespace(EmbeddedKV(str(tmp_path / "ns.sqlite")), "local")
    await ns.start()
    try:
        await ns.set_registry_replicas("contoso", ["eastus", "westeurope"])
        adm = Admin(ns)
        await adm.update_settings("contoso", anonymous_pull=True, public_access=False)
        await adm.add_network_rule("contoso", "10.1.0.0/16")
        config = json.loads((await ns.kv.get("/meridian/reg/contoso/config")).value)
        assert config == {
            "replicas": ["eastus", "westeurope"],
            "anonymous_pull": True,
            "network": {"public_access": False, "allowed_cidrs": ["10.1.0.0/16"]},
        }
        assert ns.registry_replicas("contoso") == {"eastus", "westeurope"}
    finally:
        await ns.close()


# -- mistakes: clear, one line, and nothing changes ------------------------------------------


def test_bad_input_is_refused_and_changes_nothing(node: Node, tmp_path: Path) -> None:
    cli = owner_cli(tmp_path, node)
    reg = ["--registry", "contoso"]
    cli.ok("scope-map", "create", "team-a", "--repository", "team-a/*", "content/read", *reg)
    tok = cli.ok("token", "create", "ci", "--scope-map", "team-a", *reg)
    p1 = node.secret(tok["passwords"][0]["value"])
    node.secret(tok["passwords"][1]["value"])
    sp = cli.ok("sp", "create", "--id", "ci-bot", "--role", "contoso=AcrPull")
    node.secret(sp["secret"])

    def state() -> Any:
        return (
            cli.ok("sp", "list"),
            cli.ok("token", "list", *reg),
            cli.ok("scope-map", "list", *reg),
            cli.ok("credential", "show", *reg),
            cli.ok("settings", "show", *reg),
        )

    before = state()
    # Through the CLI: exit 2 (invalid), 6 (missing), 7 (exists / in use).
    for code, args, says in [
        (2, ["token", "create", "bad name", "--scope-map", "team-a"], "invalid token name"),
        (2, ["token", "create", "x" * 65, "--scope-map", "team-a"], "invalid token name"),
        (2, ["sp", "create", "--id", "a/b", "--role", "AcrPull"], "invalid service principal"),
        (2, ["sp", "create", "--id", "x", "--role", "contoso=Reader"], "unknown role 'Reader'"),
        (2, ["sp", "create", "--id", "owner", "--role", "contoso=AcrPull"], "cluster owner"),
        (2, ["scope-map", "create", "m", "--repository", "Team/*", "content/read"],
         "invalid repository pattern"),
        (2, ["scope-map", "create", "m", "--repository", "a/**", "content/read"],
         "invalid repository pattern"),
        (2, ["scope-map", "create", "m", "--repository", "a", "content/push"],
         "unknown action 'content/push'"),
        (2, ["scope-map", "create", "_repositories_pull", "--repository", "a", "content/read"],
         "built-in"),
        (2, ["token", "update", "ci", "--status", "off"], "invalid choice"),
        (2, ["token", "create", "contoso", "--scope-map", "team-a"], "admin user"),
        (2, ["network-rule", "add", "10.0.0.300/8"], "invalid network"),
        (2, ["token", "list", "--registry", "Bad_Reg"], "invalid registry name"),
        (6, ["token", "create", "t2", "--scope-map", "nope"], "no scope map 'nope'"),
        (6, ["token", "delete", "nope"], "no token 'nope'"),
        (6, ["token", "renew", "nope", "--password1"], "no token 'nope'"),
        (6, ["scope-map", "delete", "nope"], "no scope map 'nope'"),
        (6, ["sp", "delete", "nope"], "no service principal 'nope'"),
        (7, ["token", "create", "ci", "--scope-map", "_repositories_admin"], "already exists"),
        (7, ["token", "create", "ci-bot", "--scope-map", "team-a"], "service principal"),
        (7, ["scope-map", "create", "team-a", "--repository", "x", "content/read"],
         "already exists"),
        (7, ["sp", "create", "--id", "ci-bot", "--role", "contoso=AcrPush"], "already exists"),
        (7, ["sp", "create", "--id", "ci", "--role", "contoso=AcrPush"], "token named 'ci'"),
        (7, ["scope-map", "delete", "team-a"], "used by token(s) ci"),
    ]:  # fmt: skip
        extra = reg if args[0] != "sp" and "--registry" not in args else []
        line = cli.fails(code, *args, *extra)
        assert says in line, (args, line)
        assert line.startswith("meridian "), line
    assert state() == before
    assert login_ok(node, "contoso", "ci", p1)  # the duplicate did not replace it

    # Through the API: status and code.
    for method, path, body, status, code in [
        ("POST", "/registries/contoso/tokens", {"name": "a b", "scope_map": "team-a"}, 400,
         "INVALID"),
        ("POST", "/registries/contoso/tokens", {"name": "t", "scope_map": "team-a", "x": 1}, 400,
         "INVALID"),
        ("POST", "/registries/contoso/tokens", {"name": "ci", "scope_map": "team-a"}, 409,
         "ALREADY_EXISTS"),
        ("POST", "/registries/Contoso/tokens", {"name": "t", "scope_map": "team-a"}, 400,
         "INVALID"),
        ("POST", "/serviceprincipals", {"roles": {"contoso": ["Admin"]}}, 400, "INVALID"),
        ("POST", "/serviceprincipals", {"roles": {}}, 400, "INVALID"),
        ("POST", "/registries/contoso/scopemaps", {"name": "m", "actions": {"a/*": []}}, 400,
         "INVALID"),
        ("PATCH", "/registries/contoso/scopemaps/team-a", {"remove": {"zzz": ["content/read"]}},
         404, "NOT_FOUND"),
        ("PATCH", "/registries/contoso/scopemaps/team-a",
         {"remove": {"team-a/*": ["content/read"]}}, 400, "INVALID"),
        ("PATCH", "/registries/contoso/settings", {"anonymous_pull": "yes"}, 400, "INVALID"),
        ("PATCH", "/registries/contoso/settings", {"allowed_cidrs": ["nope"]}, 400, "INVALID"),
        ("POST", "/registries/contoso/tokens/ci/passwords", {"name": "password3"}, 400,
         "INVALID"),
        ("DELETE", "/registries/contoso/tokens/nope", None, 404, "NOT_FOUND"),
        ("DELETE", "/serviceprincipals/nope", None, 404, "NOT_FOUND"),
        ("DELETE", "/registries/contoso/scopemaps/team-a", None, 409, "IN_USE"),
    ]:  # fmt: skip
        got, doc = api(node, method, path, body)
        assert (got, error_code(doc)) == (status, code), (method, path, body, doc)
        assert doc["errors"][0]["message"]
    status, _, raw = http(
        "POST",
        node.url + "/meridian/v1/registries/contoso/tokens",
        data=b"{not json",
        headers=OWNER_BASIC,
    )
    assert status == 400 and error_code(json.loads(raw)) == "INVALID"
    assert state() == before

    # No credentials, wrong ones: 401 with a Bearer challenge for the manage scope.
    for auth in ({}, basic(OWNER, "wrong"), {"Authorization": "Bearer junk"}):
        status, headers, raw = http(
            "GET", node.url + "/meridian/v1/serviceprincipals", headers=auth
        )
        assert status == 401 and error_code(json.loads(raw)) == "UNAUTHORIZED"
        challenge = headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer realm=") and 'scope="registry:manage:*"' in challenge
    # A token without the manage scope: 401 insufficient_scope (the owner may ask for it).
    _, _, tok = get_token(node, "default", "repository:a:pull", (OWNER, OWNER_PASSWORD))
    status, headers, _ = http(
        "GET",
        node.url + "/meridian/v1/serviceprincipals",
        headers={"Authorization": f"Bearer {tok}"},
    )
    assert status == 401 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert state() == before


def test_no_auth_node_serves_the_api_open_and_says_so(tmp_path: Path, cli: Cli) -> None:
    p = NodeProcess(tmp_path / "data", extra=["--no-auth"]).start()
    try:
        status, headers, raw = http("GET", p.url + "/meridian/v1/whoami")
        assert status == 200 and json.loads(raw)["auth"] is False
        status, headers, raw = http("GET", p.url + "/meridian/v1/registries/default/tokens")
        assert status == 200 and "authentication is off" in headers["Warning"]
        r = cli.login(p.url)
        assert r.returncode == 0 and "authentication off" in r.stdout
        assert not (tmp_path / "docker" / "config.json").exists()
        assert cli.ok("scope-map", "create", "m", "--repository", "a", "content/read")["name"]
    finally:
        p.stop()


def test_cli_without_a_server_or_with_a_dead_one(cli: Cli) -> None:
    line = cli.fails(4, "token", "list")
    assert "no server" in line and "--server" in line
    line = cli.fails(4, "sp", "list", "--server", "http://127.0.0.1:1")
    assert "does not answer" in line
    assert "not a server" in cli.fails(2, "sp", "list", "--server", "ftp://x/y")
    r = cli("token", "create")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
