"""Issue 12's tutorial, end to end: ACR's "create a private container
registry" walk-through (``reference/acr-notes.md``) as a new user follows the
README, against ``meridian up`` with real clients.

One ``meridian up`` (two regions, etcd, the WAN emulator, the router; auth
on; reclaim passes every second with a short grace, usage written every
second), the ``meridian`` CLI as a subprocess with a HOME of its own (so
``meridian login`` writes its own docker config), skopeo in a private mount
namespace whose ``/etc/hosts`` names ``myregistry007.meridian.test``
(``tests.hostnames``) with its own auth file, and CNCF Distribution on
loopback as the import's source. Every step checks what a user can observe
(exit codes, the CLI's JSON, the bytes skopeo pulls, files in each region's
store, keys in etcd); every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.etcd import EtcdKV
from cluster.namespace import Namespace
from cluster.registries import DELETING
from cluster.usage import Counters, UsageRecorder
from loadtest.reference import Server
from localcluster.supervisor import meridian_argv
from localcluster.up import DEFAULT_DOMAIN
from tests import images as im
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.hostnames import with_hosts
from tests.procs import OWNER_CREDS, OWNER_PASSWORD, ROOT, free_port, redact, require_tool
from tests.test_import import assert_pulled, dist, source  # noqa: F401 (dist: a fixture)
from tests.test_manage_identities import Cli
from tests.test_up import Up

pytestmark = pytest.mark.timeout(600)

REG = "myregistry007"
HOST = f"{REG}.{DEFAULT_DOMAIN}"
TOPOLOGY = """
[[region]]
name = "eastus"
rtt_ms = 2

[[region]]
name = "westeurope"
rtt_ms = 8
"""
# A reclaim pass every second; bytes younger than the grace stay (an image
# being pushed is never cut), so a copy goes a few seconds after its delete.
UP_FLAGS = ("--reclaim-interval", "1", "--reclaim-grace", "5", "--usage-interval", "1")
WITHIN = 120.0  # seconds any eventual thing gets (a slow, shared machine)


class User(Cli):
    """``meridian`` and skopeo as one user at one machine: a HOME of their
    own (the CLI's login and docker config), skopeo's auth file under their
    own XDG_RUNTIME_DIR, and a hosts file naming the registry."""

    def __init__(self, home: Path, names: dict[str, str]) -> None:
        super().__init__(home, None)
        self.names = names
        self.runtime = home / "run"
        self.runtime.mkdir(mode=0o700, exist_ok=True)

    def skopeo_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.env().items() if k != "REGISTRY_AUTH_FILE"}
        env["XDG_RUNTIME_DIR"] = str(self.runtime)
        return env

    def skopeo(self, *args: str) -> subprocess.CompletedProcess[str]:
        """skopeo ``args`` where the registry's name resolves."""
        exe = require_tool("skopeo")
        return with_hosts(self.names, [exe, *args], env=self.skopeo_env())

    def skopeo_ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = self.skopeo(*args)
        assert r.returncode == 0, redact(f"skopeo {args}: {r.stderr}")
        return r

    def skopeo_login(self, server: str, password_file: Path) -> subprocess.CompletedProcess[str]:
        """README's line: ``skopeo login ... --password-stdin SERVER < <data>/owner-password``."""
        require_tool("skopeo")
        script = 'exec skopeo login --tls-verify=false -u owner --password-stdin "$1" < "$2"'
        return with_hosts(
            self.names,
            ["sh", "-c", script, "sh", server, str(password_file)],
            env=self.skopeo_env(),
        )

    def pull(self, ref: str, dest: Path, *more: str) -> Path:
        """``skopeo copy`` into a ``dir:`` (skopeo verifies every digest)."""
        self.skopeo_ok("copy", "--src-tls-verify=false", *more, f"docker://{ref}", f"dir:{dest}")
        return dest


def sizes(*items: im.Image | im.Index) -> dict[str, int]:
    """Every digest ``items`` store (manifests and blobs) -> its size."""
    out: dict[str, int] = {}
    for item in items:
        out.update({d: len(body) for d, body, _ in item.manifests()})
        out.update({b.digest: b.size for b in item.all_blobs()})
    return out


def held(region_data: Path, digests: set[str]) -> set[str]:
    """Which of ``digests`` the region's blob store (``--storage fs``) holds."""
    found = set()
    for d in digests:
        alg, hexa = d.split(":", 1)
        if (region_data / "blobs" / alg / hexa[:2] / hexa).is_file():
            found.add(d)
    return found


def etcd_keys(endpoint: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` in the cluster's etcd, read there directly."""

    async def read() -> list[str]:
        kv = EtcdKV([endpoint])
        await kv.start()
        try:
            entries, _ = await kv.range(prefix)
            return [e.key for e in entries]
        finally:
            await kv.close()

    return asyncio.run(read())


def v2_get(up: Up, path: str) -> tuple[int, dict[str, Any]]:
    """``GET path`` through the router with the registry's Host header and
    the owner's Basic credentials: status and JSON body."""
    req = urllib.request.Request(
        up.router + path,
        headers={
            "Host": f"{HOST}:{up.port}",
            "Authorization": "Basic " + base64.b64encode(OWNER_CREDS.encode()).decode(),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Up]:
    # Audit records are written every second (default: a minute), so the flow
    # can read them back; nodes take the setting from their environment.
    monkeypatch.setenv("MERIDIAN_AUDIT_FLUSH_INTERVAL", "1")
    config = tmp_path / "topology.toml"
    config.write_text(TOPOLOGY)
    cluster = Up(tmp_path / "meridian-data", config, free_port(), *UP_FLAGS)
    try:
        cluster.wait_ready()
        yield cluster
        assert cluster.stop(signal.SIGTERM) == 0, cluster.output[-3000:]
    finally:
        cluster.kill_all()


def test_the_acr_tutorial_with_real_clients(
    up: Up,
    dist: Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    state = up.state()
    regions = {name: Path(r["data"]) for name, r in state["regions"].items()}
    login_server = f"{HOST}:{up.port}"
    user = User(tmp_path / "home", {HOST: "127.0.0.1"})

    def ok(*args: str) -> Any:
        return user.ok(*args)

    def wait(pred: Any, what: str) -> None:
        up.wait(pred, what, timeout=WITHIN)

    def registries() -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in ok("registry", "list")["registries"]}

    def replications() -> dict[str, dict[str, Any]]:
        doc = ok("replication", "list", "--registry", REG)
        return {r["region"]: r for r in doc["replications"]}

    def tags(repo: str) -> dict[str, dict[str, Any]]:
        doc = ok("repository", "show-tags", "--registry", REG, "--repository", repo, "--detail")
        return {t["name"]: t for t in doc["tags"]}

    # 1. Log in (the credential goes where docker keeps it), create the registry.
    r = user.login(up.router)
    assert r.returncode == 0 and "Login Succeeded" in r.stdout, redact(r.stderr)
    docker_config = json.loads((user.home / ".docker" / "config.json").read_text())
    assert up.host in docker_config["auths"], docker_config
    assert "Registries of their own answer on <name>.meridian.test" in up.output

    r = user("registry", "create", REG, "--sku", "Premium", "-o", "json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["login_server"] == login_server and created["sku"] == "Premium"
    home = created["location"]
    assert home in regions and created["replicas"] == [home]
    away = next(name for name in regions if name != home)
    # The /etc/hosts line the client needs, on stderr.
    assert f"'127.0.0.1 {HOST}' to /etc/hosts" in r.stderr, r.stderr

    # Bad input changes nothing: an invalid name, a duplicate (whatever its
    # case), a Basic registry asking for a replica, deleting what does not exist.
    before = registries()
    assert set(before) == {"default", REG}
    for bad in ("bad", "my-registry", "x" * 51):
        line = user.fails(2, "registry", "create", bad, "--sku", "Premium")
        assert "5-50 letters or digits" in line, line
    assert "exists already" in user.fails(7, "registry", "create", REG.upper(), "--sku", "Basic")
    assert ok("registry", "create", "tutbasic01", "--sku", "Basic")["sku"] == "Basic"
    line = user.fails(2, "replication", "create", "--registry", "tutbasic01", "--location", away)
    assert "Premium" in line and "meridian registry update tutbasic01 --sku Premium" in line
    assert list(ok("replication", "list", "--registry", "tutbasic01")["replications"]) == [
        {
            "registry": "tutbasic01",
            "region": home,
            "home": True,
            "status": "ready",
            "pending_items": 0,
            "pending_bytes": 0,
        }
    ]
    assert ok("registry", "delete", "tutbasic01", "--yes") is None
    assert "does not exist" in user.fails(6, "registry", "delete", "nosuchreg404", "--yes")
    assert "does not exist" in user.fails(
        6, "replication", "create", "--registry", "nosuchreg404", "--location", away
    )
    after = registries()
    assert after.keys() == before.keys()
    assert {k: (v["sku"], v["replicas"]) for k, v in after.items()} == {
        k: (v["sku"], v["replicas"]) for k, v in before.items()
    }

    # 2. skopeo logs in to the registry's host name (through the router) and pushes.
    r = user.skopeo_login(login_server, up.data / "owner-password")
    assert r.returncode == 0 and "Login Succeeded" in r.stdout, redact(r.stderr)
    assert (
        login_server in json.loads((user.runtime / "containers" / "auth.json").read_text())["auths"]
    )
    img = im.build_image([40_000, 6_000], seed="tutorial-v1")
    layout = im.write_layout(tmp_path / "layout", {"v1": img})
    user.skopeo_ok(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{layout}:v1",
        f"docker://{login_server}/team/app:v1",
    )
    mine = sizes(img)

    # 3. List repositories and tags.
    repos = ok("repository", "list", "--registry", REG)["repositories"]
    assert [(x["name"], x["tag_count"], x["manifest_count"]) for x in repos] == [("team/app", 1, 1)]
    v1 = tags("team/app")["v1"]
    assert (v1["digest"], v1["size"], v1["media_type"]) == (
        img.digest,
        len(img.manifest),
        img.media_type,
    )
    table = user("repository", "show-tags", "--registry", REG, "--repository", "team/app")
    assert table.returncode == 0 and "v1" in table.stdout.split(), table.stderr
    # It is in myregistry007, not in the default registry.
    assert ok("repository", "list")["repositories"] == []

    # 4. Pull it back (through the router); skopeo verifies every digest.
    assert_pulled(user.pull(f"{login_server}/team/app:v1", tmp_path / "pulled"), img)

    # 5. A replica in the other region: it syncs, then that region's own
    # node serves it; deleted, its copy is reclaimed and the home copy stays.
    layers = {b.digest for b in img.all_blobs()}
    assert held(regions[home], set(mine)) >= layers
    assert not held(regions[away], set(mine))
    row = ok("replication", "create", "--registry", REG, "--location", away)
    assert row["region"] == away and row["home"] is False
    assert row["status"] in ("syncing", "ready")
    wait(lambda: replications()[away]["status"] == "ready", f"{away} ready")
    rows = replications()
    assert {k: (v["status"], v["pending_items"]) for k, v in rows.items()} == {
        home: ("ready", 0),
        away: ("ready", 0),
    }
    assert held(regions[away], set(mine)) >= layers
    away_node = state["regions"][away]["node"].split("//", 1)[1]  # 127.0.0.1:port
    away_server = f"{HOST}:{away_node.rsplit(':', 1)[1]}"
    assert_pulled(
        user.pull(f"{away_server}/team/app:v1", tmp_path / "from-away", "--src-creds", OWNER_CREDS),
        img,
    )
    assert "home location" in user.fails(
        2, "replication", "delete", "--registry", REG, "--location", home, "--yes"
    )
    assert ok("replication", "delete", "--registry", REG, "--location", away, "--yes") is None
    assert list(replications()) == [home]
    wait(lambda: not held(regions[away], set(mine)), f"{away} reclaims its copy")
    assert held(regions[home], set(mine)) >= layers
    assert_pulled(user.pull(f"{login_server}/team/app:v1", tmp_path / "pulled-again"), img)
    assert f"{away} is not a replica of {REG!r}" in user.fails(
        6, "replication", "delete", "--registry", REG, "--location", away, "--yes"
    )

    # 6. Import a multi-arch index from CNCF Distribution: digest preserved,
    # every platform pullable.
    platforms = (("linux", "amd64", None), ("linux", "arm64", "v8"))
    idx = im.build_index((3_000, 1_500), platforms=platforms, seed="tutorial-multi")
    im.Registry(dist.base_url, auth=None).push("lib/multi", "1.0", idx)
    doc = ok(
        "import", "--registry", REG, "--source", source(dist, "lib/multi:1.0"),
        "--image", "mirror/multi:1.0",
    )  # fmt: skip
    assert doc["digest"] == idx.digest and doc["manifests"] == 3
    assert doc["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert tags("mirror/multi")["1.0"]["digest"] == idx.digest
    assert_pulled(user.pull(f"{login_server}/mirror/multi:1.0", tmp_path / "multi", "--all"), idx)
    line = user.fails(
        7, "import", "--registry", REG, "--source", source(dist, "lib/multi:1.0"),
        "--image", "mirror/multi:1.0",
    )  # fmt: skip
    assert "exists already" in line and "--force" in line, line
    mine.update(sizes(idx))

    # 7. Lock the tag: skopeo cannot overwrite it (the refusal says how to
    # unlock) and it still names v1's digest; unlocked, the push goes in.
    locked = ok(
        "repository", "update", "--registry", REG, "--image", "team/app:v1",
        "--write-enabled", "false",
    )  # fmt: skip
    assert locked["write_enabled"] is False, locked
    img2 = im.build_image([9_000], seed="tutorial-v2")
    layout2 = im.write_layout(tmp_path / "layout2", {"v1": img2})
    push2 = [
        "copy",
        "--dest-tls-verify=false",
        f"oci:{layout2}:v1",
        f"docker://{login_server}/team/app:v1",
    ]
    r = user.skopeo(*push2)
    assert r.returncode != 0
    assert "tag v1 is locked (write-enabled false)" in r.stderr, redact(r.stderr)
    assert f"meridian repository update --registry {REG} --image team/app:v1" in r.stderr
    assert tags("team/app")["v1"]["digest"] == img.digest
    assert_pulled(user.pull(f"{login_server}/team/app:v1", tmp_path / "still-v1"), img)
    unlocked = ok(
        "repository", "update", "--registry", REG, "--image", "team/app:v1",
        "--write-enabled", "true",
    )  # fmt: skip
    assert unlocked["write_enabled"] is True, unlocked
    user.skopeo_ok(*push2)
    assert tags("team/app")["v1"]["digest"] == img2.digest
    mine.update(sizes(img2))

    # 8. Usage: the bytes the registry holds (each distinct digest once: the
    # untagged first v1 stays until deleted), five pushes: the two skopeo
    # made (the refused one is not counted) and the import's three manifests
    # (an import counts as the push of its image: two platforms and the
    # index, as skopeo's push of that index would), the pulls counted
    # in the region that served them (the away region's own node served one).
    def usage() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        doc = ok("usage", "--registry", REG)
        return doc["total"], {r["region"]: r for r in doc["regions"]}

    def settled() -> bool:
        total, by_region = usage()
        return (
            total["stored_bytes"] == sum(mine.values())
            and total["pushes"] >= 5
            and by_region[home]["pulls"] >= 3
            and by_region[away]["pulls"] >= 1
        )

    wait(settled, "usage counts the pushes, the pulls and every byte stored")
    total, by_region = usage()
    assert total["pushes"] == by_region[home]["pushes"] == 5, by_region
    assert by_region[home]["home"] is True and by_region[away]["home"] is False
    assert by_region[home]["stored_bytes"] == sum(mine.values())
    assert by_region[away]["stored_bytes"] == 0  # its copy was reclaimed
    assert by_region[away]["bytes_served"] >= img.total_bytes
    assert total["bytes_served"] > by_region[away]["bytes_served"]
    assert total["gib_days"] > 0
    table = user("usage", "--registry", REG)
    assert table.returncode == 0 and home in table.stdout, table.stderr

    # Audit (issue 13): the flow's logins, pushes, pulls and management
    # changes are recorded, with who did them and the outcome.
    def audited() -> dict[str, list[dict[str, Any]]]:
        by_action: dict[str, list[dict[str, Any]]] = {}
        for rec in ok("audit", "list", "--registry", REG)["records"]:
            by_action.setdefault(rec["action"], []).append(rec)
        return by_action

    wait(
        lambda: {"login", "push", "pull", "manage"} <= set(audited()),
        "audit records of the flow's logins, pushes, pulls and management changes",
    )
    records = audited()
    assert any(r["identity"] == "owner" and r["outcome"] == "success" for r in records["login"])
    assert any(r.get("repository") == "team/app" for r in records["push"]), records["push"]
    assert any(r.get("repository") == "team/app" for r in records["pull"]), records["pull"]
    manage = " ".join(r.get("detail", "") for r in records["manage"])
    assert away in manage, manage  # the replication added and deleted
    assert "set attributes of" in manage, manage  # the tag's lock and unlock
    assert "imported" in manage, manage

    # 9. Delete the registry: nothing of it remains, in etcd or any region.
    assert "--yes" in user.fails(2, "registry", "delete", REG)
    assert ok("registry", "show", REG)["name"] == REG  # not without --yes
    assert held(regions[home], set(mine))
    assert ok("registry", "delete", REG, "--yes") is None
    assert etcd_keys(state["etcd"], f"/meridian/reg/{REG}/") == []
    assert set(registries()) == {"default"}
    assert "does not exist" in user.fails(6, "registry", "show", REG)
    assert "does not exist" in user.fails(6, "registry", "delete", REG, "--yes")
    status, body = v2_get(up, "/v2/team/app/manifests/v1")
    assert status == 404 and body["errors"][0]["code"] == "NAME_UNKNOWN", body
    assert REG in body["errors"][0]["message"]
    r = user.skopeo("inspect", "--tls-verify=false", f"docker://{login_server}/team/app:v1")
    assert r.returncode != 0 and "404" in r.stderr, redact(r.stderr)
    wait(
        lambda: not any(held(data, set(mine)) for data in regions.values()),
        "every region reclaims the registry's bytes",
    )
    assert etcd_keys(state["etcd"], f"/meridian/reg/{REG}/") == []
    # The registry's creation and deletion are the cluster's own audit records.
    wait(
        lambda: (
            sum(REG in r.get("detail", "") for r in ok("audit", "list", "--cluster")["records"])
            >= 2
        ),
        "cluster audit records of the registry's creation and deletion",
    )
    # The owner's password went by login and files only: no process logged it.
    logs = sorted((up.data / "logs").glob("*.log"))
    assert len(logs) >= 5, logs  # etcd, wan, two regions, router
    for log in logs:
        assert OWNER_PASSWORD not in log.read_text(errors="replace"), log.name


def test_up_refuses_bad_reclaim_and_usage_intervals(tmp_path: Path) -> None:
    """The tutorial's ``meridian up`` flags: a bad value is one line, exit
    code 2, and nothing is started or written."""
    data = tmp_path / "d"
    for flag, value, message in (
        ("--reclaim-interval", "-1", "must be 0 or more seconds"),
        ("--reclaim-grace", "soon", "not a number of seconds"),
        ("--reclaim-grace", "inf", "must be 0 or more seconds"),
        ("--usage-interval", "0", "must be more than 0 seconds"),
    ):
        r = subprocess.run(
            meridian_argv("up", "--data", str(data), "--port", str(free_port()), flag, value),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, (flag, value, r.stderr)
        assert r.stderr.strip().splitlines() == [
            f"meridian up: argument {flag}: {message}"
            + (f", not {value}" if "0 or more" in message else "")
            + (f": {value!r}" if "not a number" in message else "")
            + " (see meridian up --help)"
        ], r.stderr
        assert not data.exists()


etcd = etcd_fixture()


async def test_usage_is_not_written_for_a_registry_being_deleted(etcd: EtcdServer) -> None:
    """A node's usage flush skips a registry marked ``deleting``: a record
    written then could land after the delete's last sweep and outlive the
    registry (step 9 wants nothing of it left in etcd). Live again, its
    usage is written."""
    reg, region = "usagedel1", "delregion"
    key = f"/meridian/reg/{reg}/usage/{region}"
    config = {"sku": "Premium", "location": region, "replicas": [region]}
    ns = Namespace(EtcdKV(etcd.endpoints), region)
    await ns.start()
    try:
        await ns.set_registry_config(reg, {**config, "state": DELETING})
        await ns.link_blob(reg, "app", "sha256:" + "ab" * 32, 4096)  # bytes held here
        counters = Counters()
        counters.push(reg)
        recorder = UsageRecorder(ns, counters, 3600, "default")
        await ns.caught_up()
        assert await recorder.flush_once() == 0
        assert await ns.kv.get(key) is None

        await ns.set_registry_config(reg, config)
        await ns.caught_up()
        counters.push(reg)
        assert await recorder.flush_once() == 1
        entry = await ns.kv.get(key)
        assert entry is not None
        doc = json.loads(entry.value)
        assert (doc["pushes"], doc["stored_bytes"]) == (1, 4096)
    finally:
        await ns.close()
