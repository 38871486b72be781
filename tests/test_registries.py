"""Registries as resources (issue 12): ``meridian registry`` and
``/meridian/v1/registries`` against a real node on a real etcd, with
authentication on and ``--domain``: create, list, show, update, delete;
bad input refused with nothing changed; the data plane refusing a registry
that does not exist; the tiers' limits (write operations per minute, storage
quota, network rules only on Premium); delete removing every key and, with
the reclaimer, the bytes no other registry references; and skopeo pushing
to ``<name>.<domain>:<port>`` resolved in a private mount namespace
(``tests.hostnames``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import registries, skus
from cluster.etcd import EtcdKV
from cluster.namespace import REG, Cache, ManifestRecord, Namespace
from node.replication.reclaim import referenced_digests
from tests import oci
from tests.etcd_server import EtcdServer, etcd_fixture, running_etcd
from tests.hostnames import with_hosts
from tests.images import build_image, write_layout
from tests.oci import Client, assert_error
from tests.procs import OWNER_CREDS, NodeProcess, creds_args, redact, require_tool
from tests.test_manage_identities import OWNER_BASIC, Cli, basic, http
from tests.test_router import RouterProcess

pytestmark = pytest.mark.timeout(300)

DOMAIN = "meridian.test"
REGION = "eastus"
API = "/meridian/v1/registries"
etcd = etcd_fixture(scope="module")


@pytest.fixture(scope="module")
def reg_node(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("registries") / "data"
    extra = ["--domain", DOMAIN, "--trusted-proxies", "127.0.0.1/32"]  # a router may front it
    n = NodeProcess(data, region=REGION, etcd=etcd.client_url, extra=extra).start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
def cli(tmp_path: Path, reg_node: NodeProcess) -> Cli:
    c = Cli(tmp_path / "home", tmp_path / "docker")
    r = c.login(reg_node.url)
    assert r.returncode == 0, r.stderr
    return c


def name(prefix: str = "reg") -> str:
    return prefix + uuid.uuid4().hex[:10]


def call(
    node: NodeProcess, method: str, path: str, body: Any = None, auth: dict | None = None
) -> tuple[int, Any]:
    status, _, raw = http(
        method, node.url + path, body=body, headers=OWNER_BASIC if auth is None else auth
    )
    return status, (json.loads(raw) if raw else None)


def error(doc: Any) -> tuple[str, str]:
    e = doc["errors"][0]
    return e["code"], e["message"]


def host(reg: str) -> str:
    return f"{reg}.{DOMAIN}"


async def keys_under(etcd: EtcdServer, prefix: str) -> list[str]:
    ns = Namespace(EtcdKV(etcd.endpoints), "tests")
    await ns.start()
    try:
        return [e.key for e in await ns.refresh(prefix)]
    finally:
        await ns.close()


async def configs(etcd: EtcdServer) -> dict[str, bytes]:
    """Every registry's config and identity record, as etcd holds them (the
    node writes usage and audit records of its own meanwhile)."""
    ns = Namespace(EtcdKV(etcd.endpoints), "tests")
    await ns.start()
    try:
        entries = await ns.refresh(REG)
        return {e.key: e.value for e in entries if e.key.endswith("/config") or "/auth/" in e.key}
    finally:
        await ns.close()


def listed(node: NodeProcess) -> dict[str, dict]:
    status, doc = call(node, "GET", API)
    assert status == 200, doc
    return {r["name"]: r for r in doc["registries"]}


# -- create, list, show, update, delete with the CLI -----------------------------------


def test_registry_lifecycle_with_the_cli(cli: Cli, reg_node: NodeProcess) -> None:
    reg = name("Team")  # any case in, lower case kept
    r = cli("registry", "create", reg, "--sku", "Basic", "-o", "json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    low = reg.lower()
    assert made["name"] == low and made["sku"] == "Basic" and made["location"] == REGION
    assert made["replicas"] == [REGION]  # its home region until replications are added
    assert made["login_server"] == f"{low}.{DOMAIN}:{reg_node.port}"
    assert made["limits"] == skus.BASIC.to_dict() and made["storage"]["used"] == 0
    assert made["created"] <= time.time()
    # The note on stderr: the hosts line clients need.
    assert f"127.0.0.1 {low}.{DOMAIN}" in r.stderr and "/etc/hosts" in r.stderr

    rows = {d["name"]: d for d in cli.ok("registry", "list")["registries"]}
    assert rows[low]["sku"] == "Basic" and rows["default"]["default"] is True
    table = cli("registry", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["Name", "LoginServer", "Sku"], table
    assert any(line.startswith(low + " ") for line in table), table
    tsv = cli("registry", "list", "-o", "tsv").stdout.splitlines()
    assert f"{low}\t{low}.{DOMAIN}:{reg_node.port}\tBasic" in "\n".join(tsv), tsv

    shown = cli.ok("registry", "show", reg.upper())
    assert shown["limits"]["write_ops_per_min"] == skus.BASIC.write_ops_per_min
    assert shown["storage"]["quota"] == skus.BASIC.storage_bytes

    up = cli.ok("registry", "update", low, "--sku", "Standard", "--anonymous-pull-enabled", "true")
    assert up["sku"] == "Standard" and up["anonymous_pull"] is True
    assert up["limits"] == skus.STANDARD.to_dict()
    up = cli.ok("registry", "update", low, "--storage-quota", "1G")
    assert up["storage"]["quota"] == 1 << 30 and up["storage"]["storage_quota"] == 1 << 30
    up = cli.ok("registry", "update", low, "--storage-quota", "none")
    assert up["storage"]["quota"] == skus.STANDARD.storage_bytes
    # Anonymous pull took effect: a token without credentials.
    status, _, raw = http("GET", f"{reg_node.url}/oauth2/token", headers={"Host": host(low)})
    assert status == 200 and json.loads(raw)["token"], raw

    line = cli.fails(2, "registry", "delete", low)
    assert line.endswith(
        f"this deletes every image of {low} in every region and cannot be undone: add --yes"
    ), line
    assert low in listed(reg_node)
    r = cli("registry", "delete", low, "--yes")
    assert r.returncode == 0, r.stderr
    assert low not in listed(reg_node)
    assert "does not exist" in cli.fails(6, "registry", "show", low)
    assert "does not exist" in cli.fails(6, "registry", "delete", low, "--yes")
    # The CLI's own checks, and the server's, are one line with an exit code.
    assert "5-50 letters or digits" in cli.fails(2, "registry", "create", "ab", "--sku", "Basic")
    assert "unknown SKU" in cli.fails(2, "registry", "create", name(), "--sku", "Gold")
    assert "nothing to change" in cli.fails(2, "registry", "update", name())
    assert "--storage-quota" in cli.fails(2, "registry", "update", name(), "--storage-quota", "x")


# -- bad input changes nothing -------------------------------------------------------------


async def test_bad_input_is_refused_and_changes_nothing(
    reg_node: NodeProcess, etcd: EtcdServer
) -> None:
    reg = name()
    status, doc = call(reg_node, "POST", API, {"name": reg, "sku": "Premium"})
    assert status == 201, doc
    before = listed(reg_node)
    records = await configs(etcd)
    for body, code, words in [
        ({"name": "abcd", "sku": "Basic"}, "INVALID", "5-50 letters or digits"),
        ({"name": "a" * 51, "sku": "Basic"}, "INVALID", "5-50 letters or digits"),
        ({"name": "my-reg1", "sku": "Basic"}, "INVALID", "5-50 letters or digits"),
        ({"name": "my_reg1", "sku": "Basic"}, "INVALID", "5-50 letters or digits"),
        ({"name": 12345, "sku": "Basic"}, "INVALID", "invalid registry name"),
        ({"name": reg.upper(), "sku": "Basic"}, "ALREADY_EXISTS", "exists already"),
        ({"name": "default", "sku": "Basic"}, "ALREADY_EXISTS", "default registry"),
        ({"name": name(), "sku": "Gold"}, "INVALID", "unknown SKU"),
        ({"name": name(), "sku": "Basic", "location": "atlantis"}, "INVALID", "unknown location"),
        ({"name": name()}, "INVALID", "sku"),
        ({"name": name(), "sku": "Basic", "tier": "x"}, "INVALID", "unknown field"),
    ]:
        status, doc = call(reg_node, "POST", API, body)
        want = 409 if code == "ALREADY_EXISTS" else 400
        assert status == want and error(doc)[0] == code and words in error(doc)[1], (body, doc)
    status, doc = call(reg_node, "DELETE", f"{API}/default")
    assert status == 400 and "cannot be deleted" in error(doc)[1], doc
    status, doc = call(reg_node, "DELETE", f"{API}/{name()}")
    assert status == 404 and error(doc)[0] == "NOT_FOUND", doc
    status, doc = call(reg_node, "PATCH", f"{API}/{reg}", {"sku": "Platinum"})
    assert status == 400 and "unknown SKU" in error(doc)[1], doc
    status, doc = call(reg_node, "PATCH", f"{API}/{reg}", {"storage_quota": -1})
    assert status == 400 and "storage_quota" in error(doc)[1], doc
    status, doc = call(reg_node, "PATCH", f"{API}/default", {"sku": "Basic"})
    assert status == 400 and "default registry" in error(doc)[1], doc

    # Not the owner: a service principal with Owner on the registry shows and
    # updates it, but neither creates, deletes nor changes its tier.
    status, sp = call(
        reg_node, "POST", "/meridian/v1/serviceprincipals", {"roles": {reg: ["Owner"]}}
    )
    assert status == 201, sp
    lead = basic(sp["id"], sp["secret"])
    status, doc = call(reg_node, "GET", f"{API}/{reg}", auth=lead)
    assert status == 200 and doc["name"] == reg, doc
    status, doc = call(reg_node, "GET", API, auth=lead)
    assert status == 200 and [r["name"] for r in doc["registries"]] == [reg], doc
    for method, path, body in [
        ("POST", API, {"name": name(), "sku": "Basic"}),
        ("DELETE", f"{API}/{reg}", None),
        ("PATCH", f"{API}/{reg}", {"sku": "Basic"}),
    ]:
        status, doc = call(reg_node, method, path, body, auth=lead)
        assert status == 403 and error(doc)[0] == "DENIED", (method, path, doc)
    status, doc = call(reg_node, "GET", f"{API}/{reg}", auth=basic(sp["id"], "wrong"))
    assert status == 401, doc
    status, doc = call(reg_node, "DELETE", f"/meridian/v1/serviceprincipals/{sp['id']}")
    assert status == 204, doc

    assert listed(reg_node) == before
    assert await configs(etcd) == records


# -- the data plane --------------------------------------------------------------------


async def test_a_registry_that_does_not_exist_is_name_unknown(
    reg_node: NodeProcess, etcd: EtcdServer
) -> None:
    ghost = name("ghost")
    blob = oci.blob_bytes(512)
    async with Client.connect(reg_node.url, host=host(ghost)) as c:
        r = await c.post("/v2/app/blobs/uploads/", params={"digest": oci.digest(blob)}, data=blob)
        assert_error(r, 404, "NAME_UNKNOWN")
        message = r.json()["errors"][0]["message"]
        assert ghost in message and f"meridian registry create {ghost}" in message, r
        assert_error(await c.get("/v2/"), 404, "NAME_UNKNOWN")
        assert_error(await c.get("/v2/app/tags/list"), 404, "NAME_UNKNOWN")
    # Its token endpoint too, before any credential is looked at.
    status, _, raw = http("GET", f"{reg_node.url}/oauth2/token", headers={"Host": host(ghost)})
    assert status == 404 and json.loads(raw)["errors"][0]["code"] == "NAME_UNKNOWN", raw
    # The management API's per-registry routes.
    status, doc = call(reg_node, "GET", f"/meridian/v1/registries/{ghost}/tokens")
    assert status == 404 and "does not exist" in error(doc)[1], doc
    assert await keys_under(etcd, f"{REG}{ghost}/") == []
    # The default registry (no Host of the domain) is always there.
    async with Client.connect(reg_node.url) as c:
        assert (await c.get("/v2/")).status == 200


async def test_basic_tier_write_operations_per_minute(reg_node: NodeProcess) -> None:
    reg = name("basic")
    oci.create_registry(reg_node.url, reg, "Basic")
    limit = skus.BASIC.write_ops_per_min
    assert limit is not None
    async with Client.connect(reg_node.url, host=host(reg)) as c:
        statuses = []
        for _ in range(2 * limit):
            r = await c.delete(f"/v2/app/manifests/{oci.unknown_digest()}")
            statuses.append(r.status)
            if r.status == 429:
                break
        # Every write op up to the limit is served (here: 404, nothing to delete).
        assert 429 not in statuses[:limit], statuses
        assert statuses[-1] == 429, statuses
        assert_error(r, 429, "TOOMANYREQUESTS")
        assert 1 <= int(r.headers["Retry-After"]) <= 60, r
        assert f"{limit} write operations per minute" in r.json()["errors"][0]["message"], r
        # Reads have their own budget; the default registry has none.
        assert (await c.get("/v2/")).status == 200
    async with Client.connect(reg_node.url) as c:
        for _ in range(3):
            r = await c.delete(f"/v2/app/manifests/{oci.unknown_digest()}")
            assert r.status == 404, r


def test_the_operation_window_slides() -> None:
    """The one-second-bucket window: the limit within any minute, then one
    slot back per second as the oldest ones leave (no clock: times given)."""
    w = registries.Window(3)
    assert [w.take(100.2), w.take(100.9), w.take(130.0)] == [0, 0, 0]
    assert w.take(130.5) == 30  # the oldest two leave at 160
    assert w.take(159.5) == 1
    assert w.take(160.0) == 0  # 100's two are gone: two slots
    assert w.take(160.1) == 0
    assert w.take(160.2) == 30  # 130's two ops leave at 190
    assert w.take(1000.0) == 0  # long idle: everything gone


async def test_storage_quota_refuses_a_push_and_changes_nothing(reg_node: NodeProcess) -> None:
    reg = name("quota")
    oci.create_registry(reg_node.url, reg, "Basic")
    first, second = oci.blob_bytes(2000), oci.blob_bytes(2000)
    status, doc = call(reg_node, "PATCH", f"{API}/{reg}", {"storage_quota": 3000})
    assert status == 200 and doc["storage"]["quota"] == 3000, doc
    async with Client.connect(reg_node.url, host=host(reg)) as c:
        await c.push_blob("app", first)
        r = await c.post(
            "/v2/app/blobs/uploads/", params={"digest": oci.digest(second)}, data=second
        )
        assert_error(r, 403, "DENIED")
        message = r.json()["errors"][0]["message"]
        assert f"registry {reg} is over its storage quota" in message, r
        assert f"meridian registry update {reg} --sku" in message, r
        assert_error(await c.head(f"/v2/app/blobs/{oci.digest(second)}"), 404)
        # A chunked upload's completion too; the session stays for a retry.
        up = await c.start_upload("app")
        r = await c.patch(up.location, data=second)
        assert r.status == 202, r
        r = await c.put(up.location, params={"digest": oci.digest(second)})
        assert_error(r, 403, "DENIED")
        assert (await c.get(up.location)).status == 204
        # The same bytes again take no room: already stored.
        await c.push_blob("other", first)
        status, doc = call(reg_node, "GET", f"{API}/{reg}")
        assert doc["storage"]["used"] == 2000, doc

        # A manifest push that would pass the quota is refused, no tag appears.
        img = oci.image([first])
        for b in img.blobs:
            if b != first:
                await c.push_blob("app", b)
        used = call(reg_node, "GET", f"{API}/{reg}")[1]["storage"]["used"]
        call(reg_node, "PATCH", f"{API}/{reg}", {"storage_quota": used + len(img.body) - 1})
        r = await c.put_manifest("app", "v1", img.body)
        assert_error(r, 403, "DENIED")
        assert_error(await c.get("/v2/app/manifests/v1"), 404)
        # A quota below what is stored: refused, saying what to do first.
        status, doc = call(reg_node, "PATCH", f"{API}/{reg}", {"storage_quota": 100})
        assert status == 409 and "delete images first" in error(doc)[1], doc
        # Back to the tier's: the push goes through.
        call(reg_node, "PATCH", f"{API}/{reg}", {"storage_quota": None})
        assert (await c.put_manifest("app", "v1", img.body)).status == 201
        assert (await c.get("/v2/app/manifests/v1")).body == img.body
    status, doc = call(reg_node, "GET", f"{API}/{reg}")
    assert doc["storage"]["used"] == used + len(img.body), doc


async def test_network_rules_only_on_premium(reg_node: NodeProcess) -> None:
    basic_reg, premium = name("basic"), name("prem")
    oci.create_registry(reg_node.url, basic_reg, "Basic")
    oci.create_registry(reg_node.url, premium, "Premium")
    rules = "/meridian/v1/registries/{}/networkrules"
    settings = "/meridian/v1/registries/{}/settings"
    for method, path, body in [
        ("POST", rules.format(basic_reg), {"cidr": "10.0.0.0/8"}),
        ("PATCH", settings.format(basic_reg), {"public_access": False}),
        ("PATCH", settings.format(basic_reg), {"allowed_cidrs": ["10.0.0.0/8"]}),
        ("PATCH", f"{API}/{basic_reg}", {"public_access": False}),
        ("PATCH", f"{API}/{basic_reg}", {"default_action": "Deny"}),
    ]:
        status, doc = call(reg_node, method, path, body)
        assert status == 400 and "need the Premium tier" in error(doc)[1], (path, doc)
    status, doc = call(reg_node, "GET", settings.format(basic_reg))
    assert doc["public_access"] is True and doc["allowed_cidrs"] == [], doc
    # Turning them off is always allowed.
    status, doc = call(reg_node, "PATCH", settings.format(basic_reg), {"public_access": True})
    assert status == 200, doc

    status, doc = call(reg_node, "POST", rules.format(premium), {"cidr": "10.0.0.0/8"})
    assert status == 201, doc
    # A downgrade the rules do not fit is refused, saying what to remove.
    status, doc = call(reg_node, "PATCH", f"{API}/{premium}", {"sku": "Standard"})
    assert status == 409 and "remove them first" in error(doc)[1], doc
    assert call(reg_node, "GET", f"{API}/{premium}")[1]["sku"] == "Premium"
    status, _ = call(reg_node, "DELETE", rules.format(premium) + "?cidr=10.0.0.0/8")
    assert status == 204
    status, doc = call(reg_node, "PATCH", f"{API}/{premium}", {"sku": "Standard"})
    assert status == 200 and doc["sku"] == "Standard", doc


async def test_a_downgrade_with_replicas_elsewhere_is_refused(
    reg_node: NodeProcess, etcd: EtcdServer
) -> None:
    reg = name("geo")
    oci.create_registry(reg_node.url, reg, "Premium")
    ns = Namespace(EtcdKV(etcd.endpoints), "tests")
    await ns.start()
    try:  # as `meridian replication create` records a replica
        await ns.update_registry_config(reg, lambda c: {**c, "replicas": [REGION, "westus"]})
    finally:
        await ns.close()
    status, doc = call(reg_node, "PATCH", f"{API}/{reg}", {"sku": "Basic"})
    assert status == 409 and "meridian replication delete" in error(doc)[1], doc
    assert "westus" in error(doc)[1], doc


async def test_a_downgrade_below_the_webhooks_held_is_refused(reg_node: NodeProcess) -> None:
    reg = name("hooks")
    oci.create_registry(reg_node.url, reg, "Standard")
    allowed = skus.BASIC.webhooks
    assert allowed is not None
    for i in range(allowed + 1):
        body = {"name": f"hook{i}abc", "uri": "http://127.0.0.1:9/hook", "actions": ["push"]}
        status, doc = call(reg_node, "POST", f"{API}/{reg}/webhooks", body)
        assert status == 201, doc
    status, doc = call(reg_node, "PATCH", f"{API}/{reg}", {"sku": "Basic"})
    assert status == 409 and f"allows {allowed} webhooks" in error(doc)[1], doc
    assert call(reg_node, "GET", f"{API}/{reg}")[1]["sku"] == "Standard"
    status, _ = call(reg_node, "DELETE", f"{API}/{reg}/webhooks/hook0abc")
    assert status == 204
    status, doc = call(reg_node, "PATCH", f"{API}/{reg}", {"sku": "Basic"})
    assert status == 200 and doc["sku"] == "Basic", doc


# -- delete ----------------------------------------------------------------------------


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of the test's own: its node's quick reclaimer (link
    collection is cluster-wide) never touches the module's registries."""
    with running_etcd(str(tmp_path / "etcd")) as server:
        yield server


async def test_delete_removes_everything_and_keeps_what_another_registry_holds(
    tmp_path: Path, own_etcd: EtcdServer
) -> None:
    """Two registries hold one layer; deleting one removes every key under
    it, its content stops being served, its own bytes are reclaimed and the
    shared layer stays and is served by the other."""
    etcd = own_etcd
    node = NodeProcess(
        tmp_path / "data",
        region=REGION,
        etcd=etcd.client_url,
        extra=["--domain", DOMAIN, "--reclaim-interval", "0.5", "--reclaim-grace", "5"],
    ).start()
    try:
        doomed, kept = name("doomed"), name("kept")
        for reg in (doomed, kept):
            oci.create_registry(node.url, reg)
        shared, own = oci.blob_bytes(3000), oci.blob_bytes(5000)
        mine, theirs = oci.image([shared, own]), oci.image([shared])
        async with Client.connect(node.url, host=host(doomed)) as c:
            await c.push("team/app", mine, "v1")
        async with Client.connect(node.url, host=host(kept)) as c:
            await c.push("team/app", theirs, "v1")
        status, tok = call(
            node,
            "POST",
            f"/meridian/v1/registries/{doomed}/tokens",
            {"name": "ci", "scope_map": "_repositories_pull"},
        )
        assert status == 201, tok
        roles = {doomed: ["AcrPull"], kept: ["AcrPush"]}
        status, sp = call(node, "POST", "/meridian/v1/serviceprincipals", {"roles": roles})
        assert status == 201, sp
        assert len(await keys_under(etcd, f"{REG}{doomed}/")) > 5

        status, doc = call(node, "DELETE", f"{API}/{doomed}")
        assert status == 204, doc
        assert await keys_under(etcd, f"{REG}{doomed}/") == []
        # Roles on it go too: a registry made later under its name starts bare.
        status, doc = call(node, "GET", f"/meridian/v1/serviceprincipals/{sp['id']}")
        assert status == 200 and doc["roles"] == {kept: ["AcrPush"]}, doc
        refs = referenced_digests(await _fresh(etcd))
        assert oci.digest(shared) in refs and oci.digest(own) not in refs
        async with Client.connect(node.url, host=host(doomed)) as c:
            assert_error(await c.get("/v2/team/app/manifests/v1"), 404, "NAME_UNKNOWN")
        # Its own layer's bytes go with the reclaimer; the shared ones stay.
        own_file = oci.digest(own).split(":")[1]
        deadline = time.monotonic() + 120
        while list((tmp_path / "data").rglob(own_file)):
            assert time.monotonic() < deadline, "the deleted registry's bytes stayed"
            await asyncio.sleep(0.5)
        async with Client.connect(node.url, host=host(kept)) as c:
            r = await c.get(f"/v2/team/app/blobs/{oci.digest(shared)}")
            assert r.status == 200 and r.body == shared, r
            assert (await c.get("/v2/team/app/manifests/v1")).body == theirs.body
        # The name is free again: a new registry starts empty.
        oci.create_registry(node.url, doomed, "Basic")
        async with Client.connect(node.url, host=host(doomed)) as c:
            assert (await c.get("/v2/_catalog")).json()["repositories"] == []
    finally:
        node.stop()


async def _fresh(etcd: EtcdServer) -> list:
    ns = Namespace(EtcdKV(etcd.endpoints), "tests")
    await ns.start()
    try:
        return await ns.refresh(REG)
    finally:
        await ns.close()


async def test_an_interrupted_delete_is_finished_by_deleting_again(
    reg_node: NodeProcess, etcd: EtcdServer
) -> None:
    reg = name("half")
    oci.create_registry(reg_node.url, reg)
    async with Client.connect(reg_node.url, host=host(reg)) as c:
        await c.push("app", oci.image(1), "v1")
    # What a node killed mid-delete leaves: the mark, and keys not yet removed.
    ns = Namespace(EtcdKV(etcd.endpoints), "tests")
    await ns.start()
    try:
        await ns.update_registry_config(reg, lambda c: {**c, "state": registries.DELETING})
    finally:
        await ns.close()
    async with Client.connect(reg_node.url, host=host(reg)) as c:
        deadline = time.monotonic() + 30
        while (r := await c.get("/v2/app/manifests/v1")).status == 200:
            assert time.monotonic() < deadline, "the node never saw the mark"
            await asyncio.sleep(0.05)
        assert_error(r, 404, "NAME_UNKNOWN")
        assert "is being deleted" in r.json()["errors"][0]["message"], r
    status, doc = call(reg_node, "POST", API, {"name": reg, "sku": "Basic"})
    assert status == 409 and "being deleted" in error(doc)[1], doc
    assert call(reg_node, "GET", f"{API}/{reg}")[1]["state"] == "deleting"
    status, doc = call(reg_node, "DELETE", f"{API}/{reg}")
    assert status == 204, doc
    assert await keys_under(etcd, f"{REG}{reg}/") == []
    assert reg not in listed(reg_node)


# -- host names --------------------------------------------------------------------------


def test_skopeo_pushes_and_pulls_by_the_registry_s_host_name(
    cli: Cli, reg_node: NodeProcess, etcd: EtcdServer, tmp_path: Path
) -> None:
    """skopeo pushes through the router to ``<name>.<domain>:<router port>``
    and reads back from the node's ``<name>.<domain>:<port>``, both names
    resolved only inside a private mount namespace."""
    skopeo = require_tool("skopeo")
    reg = name("hosted")
    r = cli("registry", "create", reg, "--sku", "Standard", "-o", "json")
    assert r.returncode == 0, r.stderr
    login_server = json.loads(r.stdout)["login_server"]
    hosts_line = next(ln for ln in r.stderr.splitlines() if "/etc/hosts" in ln)
    addr, hostname = hosts_line.split("'")[1].split()
    assert (addr, hostname) == ("127.0.0.1", host(reg)), hosts_line
    names = {hostname: addr}
    layout = write_layout(tmp_path / "layout", {"v1": build_image([4096, 1500], seed=reg)})
    router = RouterProcess(etcd.client_url, tmp_path, ("--domain", DOMAIN)).start()
    try:

        def run(*args: str) -> Any:
            res = with_hosts(names, [skopeo, *args])
            assert res.returncode == 0, redact(f"{args}: {res.stderr}")
            return res

        via_router = f"{hostname}:{router.port}"
        run(
            "copy",
            *creds_args("copy"),
            "--dest-tls-verify=false",
            f"oci:{layout}:v1",
            f"docker://{via_router}/team/app:v1",
        )
        for server in (via_router, login_server):
            info = json.loads(
                run(
                    "inspect",
                    *creds_args("inspect"),
                    "--tls-verify=false",
                    f"docker://{server}/team/app:v1",
                ).stdout
            )
            assert info["Name"] == f"{server}/team/app", info
        tags = json.loads(
            run(
                "list-tags",
                "--creds",
                OWNER_CREDS,
                "--tls-verify=false",
                f"docker://{login_server}/team/app",
            ).stdout
        )
        assert tags["Tags"] == ["v1"], tags
        # It landed in that registry, not the default one.
        res = with_hosts(
            names,
            [
                skopeo,
                "inspect",
                *creds_args("inspect"),
                "--tls-verify=false",
                f"docker://{reg_node.hostport}/team/app:v1",
            ],
        )
        assert res.returncode != 0 and "unknown" in res.stderr.lower(), redact(res.stderr)
        # A registry nobody created: the router's answer is the node's 404.
        res = with_hosts(
            {f"nosuch1.{DOMAIN}": "127.0.0.1"},
            [
                skopeo,
                "inspect",
                *creds_args("inspect"),
                "--tls-verify=false",
                f"docker://nosuch1.{DOMAIN}:{router.port}/team/app:v1",
            ],
        )
        assert res.returncode != 0 and "nosuch1" in res.stderr, redact(res.stderr)
    finally:
        router.stop()
    # Outside the private namespace the name does not resolve.
    res = subprocess.run(["getent", "hosts", hostname], capture_output=True, text=True)
    assert res.returncode != 0, res.stdout


# -- storage use, counted as keys come and go ---------------------------------------------


def test_stored_bytes_count_distinct_digests_incrementally() -> None:
    cache = Cache()
    rev = iter(range(1, 1000))

    def put(key: str, value: dict | bytes) -> None:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        cache.apply(f"{REG}r/repo/{key}", raw, next(rev))

    def drop(key: str) -> None:
        cache.apply(f"{REG}r/repo/{key}", None, next(rev))

    a, b, m = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
    put(f"one/_b/{a}", {"size": 100, "t": 1})
    put(f"two/_b/{a}", {"size": 100, "t": 1})  # the same digest in another repository
    put(f"one/_b/{b}", {"size": 50, "t": 1})
    assert cache.registries["r"].stored == 150
    put(f"one/_m/{m}", ManifestRecord(m, "x", 30, blobs=(a, b)).to_json())
    put(f"one/_m/{m}", ManifestRecord(m, "x", 30, blobs=(a, b)).to_json())  # rewritten
    assert cache.registries["r"].stored == 180
    drop(f"one/_b/{a}")  # still linked in "two"
    assert cache.registries["r"].stored == 180
    drop(f"two/_b/{a}")
    drop(f"one/_m/{m}")
    drop(f"one/_m/{m}")  # deleting what is gone changes nothing
    assert cache.registries["r"].stored == 50
    drop(f"one/_b/{b}")
    assert cache.registries["r"].stored == 0
