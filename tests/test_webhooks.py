"""Webhooks end to end (issue 13): real nodes with authentication on, real
HTTP receivers (aiohttp servers on loopback, run in a thread of the test
process), real etcd for the two-region cases.

What the issue asks to prove: push, delete and replicated events arrive
with the right content in each region's webhooks; a receiver that is down
for a while receives everything, in order, once back; a node SIGKILLed
with pending deliveries delivers them after restart; scope filters; the
signature verifies and a replayed delivery is detectable; a 4xx is
recorded and not retried forever; redirects are never followed; a tier's
webhook count is enforced; the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cluster import skus
from cluster.etcd import EtcdKV
from cluster.kv import Event, Put
from cluster.membership import default_node_id
from node.webhooks import signing
from node.webhooks.records import events_prefix
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.images import Image, Registry, build_image
from tests.oci import create_registry
from tests.procs import NodeProcess, free_port
from tests.test_manage_identities import OWNER_BASIC, Cli, api, error_code
from tests.test_replication import RegionNode, start_regions, wait_peers, wait_until

pytestmark = pytest.mark.timeout(300)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
FAST = ["--webhook-retry-max", "0.5", "--audit-flush-interval", "0.5"]


# -- a receiver ----------------------------------------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int  # the status the receiver gave it

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def id(self) -> str:
        return self.headers.get("X-Meridian-Delivery", "")


class Receiver:
    """An HTTP receiver on a loopback port, in a thread of its own: ``up()``
    listens, ``down()`` closes the port (connections refused); ``status``
    is what it answers (``location`` with a 3xx)."""

    def __init__(self, status: int = 200) -> None:
        self.port = free_port()
        self.status = status
        self.location = ""
        self.got: list[Delivery] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.got.append(Delivery(dict(request.headers), body, self.status))
        headers = {"Location": self.location} if self.location else None
        return web.Response(status=self.status, headers=headers)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def up(self) -> Receiver:
        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        if self._runner is None:
            self._runner = self._run(start())
        return self

    def down(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def deliveries(self, action: str | None = None) -> list[Delivery]:
        with self._lock:
            got = list(self.got)
        return [d for d in got if action is None or d.doc.get("action") == action]

    def wait(self, n: int, what: str, action: str | None = None, timeout: float = 90) -> None:
        wait_until(lambda: len(self.deliveries(action)) >= n, what, timeout, 0.05)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def receiver(receivers: list[Receiver], status: int = 200, *, up: bool = True) -> Receiver:
    r = Receiver(status)
    receivers.append(r)
    return r.up() if up else r


# -- the receiver's recipe (README), written here without Meridian's code ----------------


def verify(secret: str, headers: dict[str, str], body: bytes, seen: set[str], now: float) -> str:
    """'ok', or why a receiver refuses the delivery."""
    fields = dict(p.split("=", 1) for p in headers["X-Meridian-Signature"].split(","))
    ts = int(fields["t"])
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, fields["v1"]):
        return "bad signature"
    if abs(now - ts) > 300:
        return "stale"
    delivery = headers["X-Meridian-Delivery"]
    if delivery in seen:
        return "replay"
    seen.add(delivery)
    return "ok"


# -- helpers ------------------------------------------------------------------------------


def create_hook(node: NodeProcess, reg: str = "default", **body: Any) -> dict[str, Any]:
    status, doc = api(node, "POST", f"/registries/{reg}/webhooks", body)
    assert status == 201, doc
    return doc


def hook_events(node: NodeProcess, name: str, reg: str = "default") -> list[dict[str, Any]]:
    status, doc = api(node, "GET", f"/registries/{reg}/webhooks/{name}/events?top=1000")
    assert status == 200, doc
    return doc["events"]


def push(node: NodeProcess, repo: str, tag: str, seed: str) -> Image:
    image = build_image([600], seed=seed)
    Registry(node.url).push(repo, tag, image)
    return image


def delete_manifest(node: NodeProcess, repo: str, ref: str) -> None:
    status, _, body = Registry(node.url).request("DELETE", f"/v2/{repo}/manifests/{ref}")
    assert status == 202, body


def tags_of(deliveries: list[Delivery]) -> list[str]:
    return [d.doc["target"].get("tag", "") for d in deliveries]


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node (embedded namespace) shared by the module's single-region
    tests; each test uses its own webhooks, scoped to its own repository."""
    n = NodeProcess(tmp_path_factory.mktemp("hooks") / "data", extra=FAST).start()
    try:
        yield n
    finally:
        n.stop()


# -- one region -------------------------------------------------------------------------


def test_push_and_delete_events_carry_acr_s_payload(
    standalone: NodeProcess, receivers: list[Receiver]
) -> None:
    r = receiver(receivers)
    hook = create_hook(
        standalone,
        name="payloads1",
        uri=r.url,
        actions=["push", "delete"],
        scope="pay/app:*",
        headers={"X-Team": "platform"},
    )
    assert hook["secret"] and hook["headers"] == {"X-Team": "platform"}
    image = push(standalone, "pay/app", "v1", "pay-1")
    r.wait(1, "the push event")
    (d,) = r.deliveries("push")
    doc = d.doc
    assert doc["target"] == {
        "mediaType": OCI_MANIFEST,
        "size": len(image.manifest),
        "digest": image.digest,
        "length": len(image.manifest),
        "repository": "pay/app",
        "tag": "v1",
    }
    assert doc["request"]["method"] == "PUT"
    assert doc["request"]["host"] == standalone.hostport
    assert doc["request"]["useragent"] and doc["request"]["id"]
    assert doc["registry"] == "default" and doc["region"] == "local"
    assert doc["id"] == d.id and doc["timestamp"].endswith("Z")
    assert d.headers["X-Team"] == "platform"
    assert d.headers["Content-Type"] == "application/json"
    assert d.headers["X-Meridian-Event"] == "push"
    assert verify(hook["secret"], d.headers, d.body, set(), time.time()) == "ok"

    delete_manifest(standalone, "pay/app", image.digest)
    r.wait(1, "the delete event", "delete")
    (d,) = r.deliveries("delete")
    target = d.doc["target"]
    assert target["digest"] == image.digest and target["repository"] == "pay/app"
    assert target["tag"] == "v1"  # the tag the delete took with it
    assert d.doc["request"]["method"] == "DELETE"
    # list and show never give the secret or header values away
    status, doc = api(standalone, "GET", "/registries/default/webhooks/payloads1")
    assert status == 200 and "secret" not in doc and doc["headers"] == {"X-Team": "***"}
    status, doc = api(standalone, "GET", "/registries/default/webhooks/payloads1?secret=true")
    assert doc["secret"] == hook["secret"] and doc["headers"] == {"X-Team": "platform"}
    events = hook_events(standalone, "payloads1")
    assert [e["outcome"] for e in events] == ["delivered", "delivered"]
    assert events[0]["request"]["headers"]["X-Team"] == "***"
    assert events[0]["response"]["status"] == 200 and events[0]["latency_ms"] >= 0
    assert hook["secret"] not in json.dumps(events), "a delivery record shows no secret"
    assert hook["secret"] not in standalone.logs() and "platform" not in standalone.logs()


def test_a_receiver_down_for_a_while_gets_everything_in_order(
    standalone: NodeProcess, receivers: list[Receiver]
) -> None:
    r = receiver(receivers, up=False)  # connections refused
    create_hook(standalone, name="downhook1", uri=r.url, actions=["push"], scope="down/app:*")
    tags = [f"t{i}" for i in range(6)]
    for i, tag in enumerate(tags):
        push(standalone, "down/app", tag, f"down-{i}")  # answered while the receiver is down
    pending = hook_events(standalone, "downhook1")
    assert sorted(e["outcome"] for e in pending) == ["pending"] * 6
    r.status = 503  # back, but failing
    r.up()
    wait_until(lambda: len(r.deliveries()) >= 2, "503s retried")
    assert {d.id for d in r.deliveries()} == {r.deliveries()[0].id}, "in order: the first again"
    r.status = 200
    wait_until(
        lambda: len([d for d in r.deliveries() if d.answered == 200]) >= 6, "every event delivered"
    )
    assert tags_of([d for d in r.deliveries() if d.answered == 200]) == tags
    wait_until(
        lambda: [e["outcome"] for e in hook_events(standalone, "downhook1")] == ["delivered"] * 6,
        "the deliveries recorded",
    )
    first = hook_events(standalone, "downhook1")[-1]
    assert first["attempts"] >= 2 and first["request"]["body"]["target"]["tag"] == "t0"


def test_scope_filters(standalone: NodeProcess, receivers: list[Receiver]) -> None:
    r = receiver(receivers)
    create_hook(standalone, name="scoped1", uri=r.url, actions=["push"], scope="scope/app:v1*")
    latest = receiver(receivers)
    create_hook(standalone, name="scoped2", uri=latest.url, actions=["push"], scope="scope/app")
    for repo, tag in (
        ("scope/app", "v1.2"),
        ("scope/app", "latest"),
        ("scope/other", "v1"),
        ("scope/app", "v2"),
        ("scope/app", "v10"),
        ("scope/app", "v1-last"),
    ):
        push(standalone, repo, tag, f"{repo}-{tag}")
    # Delivered in order: once the last matching one is in, nothing else will come.
    r.wait(3, "the events in scope")
    assert tags_of(r.deliveries()) == ["v1.2", "v10", "v1-last"]
    assert {d.doc["target"]["repository"] for d in r.deliveries()} == {"scope/app"}
    latest.wait(1, "scope/app alone means its tag latest")
    assert tags_of(latest.deliveries()) == ["latest"]
    assert len(hook_events(standalone, "scoped2")) == 1


def test_signature_verifies_and_a_replay_is_detected(
    standalone: NodeProcess, receivers: list[Receiver]
) -> None:
    r = receiver(receivers)
    hook = create_hook(standalone, name="signed1", uri=r.url, actions=["push"], scope="sig/*:*")
    push(standalone, "sig/app", "v1", "sig-1")
    push(standalone, "sig/app", "v2", "sig-2")
    r.wait(2, "two signed deliveries")
    seen: set[str] = set()
    first, second = r.deliveries()
    assert verify(hook["secret"], first.headers, first.body, seen, time.time()) == "ok"
    assert verify(hook["secret"], second.headers, second.body, seen, time.time()) == "ok"
    # The same bytes sent again (a captured delivery): detected.
    assert verify(hook["secret"], first.headers, first.body, seen, time.time()) == "replay"
    # ...and once the window has passed, refused without any memory of ids.
    assert verify(hook["secret"], first.headers, first.body, set(), time.time() + 301) == "stale"
    # A body changed in transit, or another secret: refused.
    assert verify(hook["secret"], first.headers, first.body + b" ", set(), time.time()) != "ok"
    assert verify("another", first.headers, first.body, set(), time.time()) == "bad signature"
    # Meridian's own helper agrees with the recipe.
    sig = first.headers["X-Meridian-Signature"]
    assert signing.verify(hook["secret"], sig, first.body) is None
    mine: set[str] = set()
    assert signing.verify(hook["secret"], sig, first.body, seen=mine, delivery=first.id) is None
    again = signing.verify(hook["secret"], sig, first.body, seen=mine, delivery=first.id)
    assert again == "replayed delivery"
    # Rotating the secret: later deliveries are signed with the new one.
    status, doc = api(
        standalone, "PATCH", "/registries/default/webhooks/signed1", {"rotate_secret": True}
    )
    assert status == 200 and doc["secret"] != hook["secret"]
    push(standalone, "sig/app", "v3", "sig-3")
    r.wait(3, "a delivery after the rotation")
    third = r.deliveries()[2]
    assert verify(doc["secret"], third.headers, third.body, set(), time.time()) == "ok"
    assert verify(hook["secret"], third.headers, third.body, set(), time.time()) != "ok"


def test_4xx_is_not_retried_forever_and_redirects_are_not_followed(
    standalone: NodeProcess, receivers: list[Receiver]
) -> None:
    r = receiver(receivers, 400)
    elsewhere = receiver(receivers)
    create_hook(standalone, name="refuser1", uri=r.url, actions=["push"], scope="refuse/app:*")
    push(standalone, "refuse/app", "v1", "refuse-1")
    wait_until(
        lambda: [e["outcome"] for e in hook_events(standalone, "refuser1")] == ["rejected"],
        "the 400 recorded as rejected",
    )
    (event,) = hook_events(standalone, "refuser1")
    assert event["attempts"] == 3 and event["response"]["status"] == 400
    assert len(r.deliveries()) == 3
    # A redirect elsewhere: recorded, never followed.
    r.status, r.location = 307, elsewhere.url
    push(standalone, "refuse/app", "v2", "refuse-2")
    wait_until(
        lambda: (hook_events(standalone, "refuser1")[0]["response"] or {}).get("status") == 307,
        "the redirect recorded",
    )
    assert hook_events(standalone, "refuser1")[0]["outcome"] == "rejected"
    assert elsewhere.deliveries() == []
    # The queue is not stuck behind them.
    r.status, r.location = 200, ""
    push(standalone, "refuse/app", "v3", "refuse-3")
    wait_until(lambda: "v3" in tags_of(r.deliveries()), "a later event delivered")
    assert len(r.deliveries()) == 3 + 3 + 1


def test_ping_and_bad_input(standalone: NodeProcess, receivers: list[Receiver]) -> None:
    r = receiver(receivers)
    create_hook(standalone, name="pinged1", uri=r.url, actions=["push"], scope="nothing/here")
    status, doc = api(standalone, "POST", "/registries/default/webhooks/pinged1/ping")
    assert status == 200 and doc["outcome"] == "delivered" and doc["status"] == 200, doc
    (d,) = r.deliveries("ping")
    assert d.doc["id"] == doc["id"]
    assert hook_events(standalone, "pinged1")[0]["action"] == "ping"
    bad = [
        ({"name": "ab", "uri": r.url, "actions": ["push"]}, "INVALID"),
        ({"name": "badname1", "uri": "ftp://x", "actions": ["push"]}, "INVALID"),
        ({"name": "badname1", "uri": r.url, "actions": ["pull"]}, "INVALID"),
        ({"name": "badname1", "uri": r.url, "actions": ["push"], "scope": "UP:*"}, "INVALID"),
        ({"name": "badname1", "uri": r.url, "actions": ["push"], "location": "mars"}, "INVALID"),
        (
            {"name": "badname1", "uri": r.url, "actions": ["push"], "headers": {"Host": "x"}},
            "INVALID",
        ),
        ({"name": "pinged1", "uri": r.url, "actions": ["push"]}, "ALREADY_EXISTS"),
    ]
    for body, code in bad:
        status, doc = api(standalone, "POST", "/registries/default/webhooks", body)
        assert status in (400, 409) and error_code(doc) == code, (body, doc)
    status, doc = api(standalone, "GET", "/registries/default/webhooks/badname1")
    assert status == 404, doc
    status, doc = api(standalone, "GET", "/registries/default/webhooks")
    assert "badname1" not in [h["name"] for h in doc["webhooks"]]
    assert all("secret" not in h for h in doc["webhooks"])


def test_a_node_killed_with_pending_deliveries_delivers_them_after_restart(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    node = NodeProcess(tmp_path / "data", extra=FAST).start()
    try:
        r = receiver(receivers, up=False)
        create_hook(node, name="survivor1", uri=r.url, actions=["push"])
        for i in range(3):
            push(node, "crash/app", f"c{i}", f"crash-{i}")
        assert [e["outcome"] for e in hook_events(node, "survivor1")] == ["pending"] * 3
        node.kill()
        r.up()
        node.start()
        r.wait(3, "the pending events, after the restart")
        firsts = list(dict.fromkeys(d.id for d in r.deliveries()))
        by_id = {d.id: d for d in r.deliveries()}
        assert tags_of([by_id[i] for i in firsts]) == ["c0", "c1", "c2"]
    finally:
        node.stop()


# -- two regions on etcd ---------------------------------------------------------------------


etcd = etcd_fixture(scope="module")


@pytest.fixture(scope="module")
def regions(
    etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[RegionNode]]:
    base = tmp_path_factory.mktemp("regions")
    nodes = start_regions(base, etcd, ["eastus", "westus"], {n: FAST for n in ("eastus", "westus")})
    try:
        wait_peers(nodes)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def history(
    etcd: EtcdServer, prefix: str, since: int, until: Callable[[Event], bool]
) -> list[Event]:
    """Every change under ``prefix`` from revision ``since`` up to the first
    change ``until`` holds for, with the rest of that revision (a watch from
    ``since``: etcd's own history). Waiting for etcd's revision now instead
    could wait for ever: it may be a change outside ``prefix``, which no
    watch of it reports."""

    async def read() -> list[Event]:
        kv = EtcdKV(etcd.endpoints, timeout=5.0)
        await kv.start()
        try:
            seen: list[Event] = []
            async with asyncio.timeout(30):
                async for batch in kv.watch(prefix, since):
                    seen.extend(batch)  # a revision's changes come in one batch
                    if any(until(e) for e in batch):
                        return seen
            return seen
        finally:
            await kv.close()

    return asyncio.run(read())


def revision(etcd: EtcdServer) -> int:
    """etcd's revision now."""

    async def read() -> int:
        kv = EtcdKV(etcd.endpoints, timeout=5.0)
        await kv.start()
        try:
            return (await kv.range("/meridian/reg/default/config"))[1]
        finally:
            await kv.close()

    return asyncio.run(read())


def test_each_region_s_webhooks_get_push_replicated_and_delete(
    etcd: EtcdServer, regions: list[RegionNode], receivers: list[Receiver]
) -> None:
    east, west = regions
    east_r, west_r = receiver(receivers), receiver(receivers)
    east_hook = create_hook(
        east, name="easthook1", uri=east_r.url, actions=["push", "delete", "replicated"],
        location="eastus", scope="geo/app:*",
    )  # fmt: skip
    west_hook = create_hook(
        east, name="westhook1", uri=west_r.url, actions=["push", "replicated"],
        location="westus", scope="geo/app:*",
    )  # fmt: skip
    # westus learns of the webhooks through its namespace watch
    wait_until(
        lambda: (
            {"easthook1", "westhook1"}
            <= {h["name"] for h in api(west, "GET", "/registries/default/webhooks")[1]["webhooks"]}
        ),
        "westus sees the webhooks",
    )

    before = revision(etcd)
    image = push(east, "geo/app", "v1", "geo-1")
    east_r.wait(2, "push and replicated in eastus")
    west_r.wait(2, "push and replicated in westus")
    # Never lost: westus's replicated event was committed in the very
    # transaction that placed the manifest there (a node killed right after
    # the copy cannot drop it).
    placement = f"/meridian/reg/default/place/{image.digest}/westus"
    changes = history(
        etcd, "/meridian/reg/default/", before + 1, lambda e: e.key == placement and bool(e.value)
    )
    (placed,) = [c.mod_revision for c in changes if c.key == placement and c.value]
    queued = [
        c.mod_revision
        for c in changes
        if c.key.startswith("/meridian/reg/default/events/westus/westhook1/") and c.value
    ]
    assert placed in queued, (placed, queued)
    for r, hook, region in ((east_r, east_hook, "eastus"), (west_r, west_hook, "westus")):
        (pushed,) = r.deliveries("push")
        (replicated,) = r.deliveries("replicated")
        assert pushed.doc["region"] == "eastus", "the push happened in eastus"
        assert replicated.doc["region"] == region, "the image is whole in the hook's region"
        for d in (pushed, replicated):
            assert d.doc["target"]["digest"] == image.digest
            assert d.doc["target"]["repository"] == "geo/app"
            assert d.doc["target"]["tag"] == "v1"
            assert d.doc["target"]["mediaType"] == OCI_MANIFEST
            assert verify(hook["secret"], d.headers, d.body, set(), time.time()) == "ok"
    # westus's replicated event came once every byte was there
    assert west.has_all([b.digest for b in image.all_blobs()] + [image.digest])
    assert west_r.deliveries("replicated")[0].doc["target"]["size"] == len(image.manifest)

    delete_manifest(west, "geo/app", image.digest)  # a delete taken by the other region
    east_r.wait(1, "the delete in eastus", "delete")
    (deleted,) = east_r.deliveries("delete")
    assert deleted.doc["target"]["digest"] == image.digest
    assert deleted.doc["region"] == "westus"
    # westhook1 does not ask for deletes: nothing queued or sent for it
    assert "delete" not in [e["action"] for e in hook_events(east, "westhook1")]
    assert west_r.deliveries("delete") == []


def test_a_repository_delete_sends_one_delete_event(
    etcd: EtcdServer, regions: list[RegionNode], receivers: list[Receiver]
) -> None:
    """``meridian repository delete``: one signed ``delete`` event naming the
    repository alone (as ACR's), committed in the transaction that deletes
    the repository's last keys; a webhook scoped to another repository gets
    nothing of it."""
    east, west = regions
    r, other = receiver(receivers), receiver(receivers)
    hook = create_hook(
        east, name="repodel1", uri=r.url, actions=["push", "delete"], scope="repodel/app:*"
    )
    create_hook(
        east, name="repodel2", uri=other.url, actions=["push", "delete"], scope="repodel/keep:*"
    )
    for tag in ("v1", "v2"):
        push(east, "repodel/app", tag, f"repodel-{tag}")
    kept = push(east, "repodel/keep", "v1", "repodel-keep")
    r.wait(2, "the pushes' events", "push")

    before = revision(etcd)
    status, doc = api(west, "DELETE", "/registries/default/repository?repository=repodel/app")
    assert status == 200 and doc["deleted"] == {"tags": 2, "manifests": 2}, doc
    r.wait(1, "the repository's delete event", "delete")
    (d,) = r.deliveries("delete")
    assert d.doc["action"] == "delete" and d.doc["target"] == {"repository": "repodel/app"}
    assert d.doc["region"] == "westus" and d.doc["request"]["method"] == "DELETE"
    assert d.headers["X-Meridian-Event"] == "delete"
    assert verify(hook["secret"], d.headers, d.body, set(), time.time()) == "ok"
    assert [e["action"] for e in hook_events(east, "repodel1")].count("delete") == 1
    # In the delete's own transaction: the event key and the repository's
    # last deletions share one revision.
    queue = events_prefix("default", "eastus", "repodel1")

    def queued_event(c: Event) -> bool:
        return c.key.startswith(queue) and c.value is not None

    changes = history(etcd, "/meridian/reg/default/", before + 1, queued_event)
    queued = [c.mod_revision for c in changes if queued_event(c)]
    gone = {
        c.mod_revision
        for c in changes
        if c.key.startswith("/meridian/reg/default/repo/repodel/app/") and c.value is None
    }
    assert len(queued) == 1 and queued[0] == max(gone), (queued, gone)

    # repodel2's events come in commit order: once the later delete in its
    # scope is in, nothing about repodel/app is still on its way.
    delete_manifest(east, "repodel/keep", kept.digest)
    other.wait(1, "the delete in repodel2's scope", "delete")
    assert {d.doc["target"]["repository"] for d in other.deliveries()} == {"repodel/keep"}
    assert [d.doc["target"].get("digest") for d in other.deliveries("delete")] == [kept.digest]


def test_webhook_location_and_the_tier_s_webhook_count(
    etcd: EtcdServer, regions: list[RegionNode], receivers: list[Receiver]
) -> None:
    east, _ = regions
    r = receiver(receivers)

    async def basic_registry() -> None:
        kv = EtcdKV(etcd.endpoints, timeout=5.0)
        await kv.start()
        try:
            cfg = {"sku": "Basic", "replicas": ["eastus"], "created": time.time()}
            await kv.txn([], [Put("/meridian/reg/basicreg/config", json.dumps(cfg).encode())])
        finally:
            await kv.close()

    asyncio.run(basic_registry())
    wait_until(
        lambda: api(east, "GET", "/registries/basicreg/webhooks")[0] == 200,
        "the registry is known",
    )
    status, doc = api(
        east, "POST", "/registries/basicreg/webhooks",
        {"name": "where1", "uri": r.url, "actions": ["push"], "location": "westus"},
    )  # fmt: skip
    assert status == 400 and "replicas" in doc["errors"][0]["message"], doc
    for name in ("basic1", "basic2"):
        create_hook(east, "basicreg", name=name, uri=r.url, actions=["push"])
    status, doc = api(
        east, "POST", "/registries/basicreg/webhooks",
        {"name": "basic3", "uri": r.url, "actions": ["push"]},
    )  # fmt: skip
    assert status == 409 and error_code(doc) == "LIMIT_EXCEEDED", doc
    message = doc["errors"][0]["message"]
    assert "Basic" in message and "(2)" in message, message
    status, doc = api(east, "GET", "/registries/basicreg/webhooks")
    assert [h["name"] for h in doc["webhooks"]] == ["basic1", "basic2"]
    assert [h["location"] for h in doc["webhooks"]] == ["eastus", "eastus"]


async def test_racing_creates_never_pass_the_tier_s_webhook_count(
    regions: list[RegionNode], receivers: list[Receiver]
) -> None:
    """Creates fired at once on both regions' nodes: exactly the tier's
    count of them succeed, the others get the over-limit answer (409
    LIMIT_EXCEEDED); a delete frees a place again."""
    east, west = regions
    r = receiver(receivers)
    reg = "racereg1"
    create_registry(east.url, reg, "Standard", "eastus")
    limit = skus.parse("Standard").webhooks
    assert limit == 10
    wait_until(
        lambda: api(west, "GET", f"/registries/{reg}/webhooks")[0] == 200,
        "westus knows the registry",
    )

    async def create(session: aiohttp.ClientSession, node: RegionNode, i: int) -> tuple[int, Any]:
        body = {"name": f"race{i:03d}", "uri": r.url, "actions": ["push"]}
        url = f"{node.url}/meridian/v1/registries/{reg}/webhooks"
        async with session.post(url, json=body, headers=OWNER_BASIC) as resp:
            return resp.status, await resp.json()

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(create(session, (east, west)[i % 2], i) for i in range(limit + 6))
        )
    statuses = sorted(status for status, _ in results)  # no secrets in a failure's message
    assert statuses == [201] * limit + [409] * 6, statuses
    refused = [doc for status, doc in results if status == 409]
    assert {error_code(doc) for doc in refused} == {"LIMIT_EXCEEDED"}, refused
    assert all(f"({limit})" in doc["errors"][0]["message"] for doc in refused), refused
    made = sorted(doc["name"] for status, doc in results if status == 201)

    def listed(node: RegionNode) -> list[str]:
        status, doc = api(node, "GET", f"/registries/{reg}/webhooks")
        assert status == 200, doc
        return [h["name"] for h in doc["webhooks"]]

    for node in (east, west):
        wait_until(lambda n=node: listed(n) == made, f"{node.region} lists the {limit} webhooks")
    assert api(west, "DELETE", f"/registries/{reg}/webhooks/{made[0]}")[0] == 204
    status, doc = api(east, "POST", f"/registries/{reg}/webhooks",
                      {"name": "race999", "uri": r.url, "actions": ["push"]})  # fmt: skip
    assert status == 201, status
    status, doc = api(west, "POST", f"/registries/{reg}/webhooks",
                      {"name": "race998", "uri": r.url, "actions": ["push"]})  # fmt: skip
    assert status == 409 and error_code(doc) == "LIMIT_EXCEEDED", doc


def test_the_webhook_cli(
    regions: list[RegionNode], receivers: list[Receiver], tmp_path: Path
) -> None:
    east, _ = regions
    r = receiver(receivers)
    cli = Cli(tmp_path / "home", tmp_path / "docker")
    assert cli.login(east.url).returncode == 0
    made = cli.ok(
        "webhook", "create", "--registry", "default", "--name", "clihook1", "--uri", r.url,
        "--actions", "push,delete", "--scope", "cli/app:*", "--headers", "X-Key=abc",
    )  # fmt: skip
    assert made["name"] == "clihook1" and made["secret"]
    listed = cli.ok("webhook", "list", "--registry", "default")
    assert "clihook1" in [h["name"] for h in listed["webhooks"]]
    shown = cli.ok("webhook", "show", "--registry", "default", "--name", "clihook1")
    assert "secret" not in shown and shown["headers"] == {"X-Key": "***"}
    table = cli("webhook", "list", "--registry", "default")
    assert (
        table.returncode == 0 and "clihook1" in table.stdout and made["secret"] not in table.stdout
    )
    pinged = cli.ok("webhook", "ping", "--registry", "default", "--name", "clihook1")
    assert pinged["status"] == 200
    cli.ok(
        "webhook", "update", "--registry", "default", "--name", "clihook1", "--status", "disabled"
    )
    push(east, "cli/app", "v1", "cli-1")  # a disabled webhook does not fire
    cli.ok(
        "webhook", "update", "--registry", "default", "--name", "clihook1", "--status", "enabled"
    )
    push(east, "cli/app", "v2", "cli-2")
    r.wait(1, "the push after enabling", "push")
    assert tags_of(r.deliveries("push")) == ["v2"]
    events = cli.ok("webhook", "list-events", "--registry", "default", "--name", "clihook1")
    assert {e["action"] for e in events["events"]} == {"ping", "push"}
    line = cli.fails(2, "webhook", "create", "--registry", "default", "--name", "x1", "--uri",
                     r.url, "--actions", "pull")  # fmt: skip
    assert "unknown action" in line
    line = cli.fails(6, "webhook", "show", "--registry", "default", "--name", "nosuchhook")
    assert "nosuchhook" in line
    cli.ok("webhook", "delete", "--registry", "default", "--name", "clihook1")
    cli.fails(6, "webhook", "delete", "--registry", "default", "--name", "clihook1")


def test_another_node_of_the_region_takes_over_the_deliveries(
    etcd: EtcdServer, tmp_path: Path, receivers: list[Receiver]
) -> None:
    """Two nodes of one region: the one delivering is SIGKILLed (and stays
    dead) with events queued; the other takes the region's deliverer key
    over once the dead one's lease lapses, and sends them, in order."""
    nodes = [
        NodeProcess(tmp_path / name, region="solo", etcd=etcd.client_url, extra=FAST).start()
        for name in ("a", "b")
    ]
    try:
        r = receiver(receivers, up=False)
        create_hook(nodes[0], name="takeover1", uri=r.url, actions=["push"], location="solo")
        for i in range(3):
            push(nodes[i % 2], "takeover/app", f"k{i}", f"takeover-{i}")

        async def leader() -> str:
            kv = EtcdKV(etcd.endpoints, timeout=5.0)
            await kv.start()
            try:
                entry = await kv.get("/meridian/leaders/solo/webhooks")
                return json.loads(entry.value)["node"] if entry is not None else ""
            finally:
                await kv.close()

        wait_until(lambda: asyncio.run(leader()) != "", "a deliverer in the region")
        holder = asyncio.run(leader())
        dead = next(n for n in nodes if holder == default_node_id(n.port))
        alive = next(n for n in nodes if n is not dead)
        dead.kill()
        r.up()
        r.wait(3, "the queued events, from the surviving node")
        assert asyncio.run(leader()) == default_node_id(alive.port)
        ok = [d for d in r.deliveries() if d.answered == 200]
        firsts = list(dict.fromkeys(d.id for d in ok))
        assert tags_of([next(d for d in ok if d.id == i) for i in firsts]) == ["k0", "k1", "k2"]
    finally:
        for n in nodes:
            n.stop()
