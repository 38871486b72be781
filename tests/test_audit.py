"""Audit records end to end (issue 13): a real node with authentication on,
real clients (skopeo, the meridian CLI, the token endpoint), the records
read back through ``meridian audit list|export`` and the API's JSON lines.

Each action of the tutorial flow leaves a record: a failed and a good login,
a push, pulls (counted per minute), a delete, management changes; with who,
where (region, source address), when and the outcome; never a secret. Old
records go after the retention.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.images import build_image, write_layout
from tests.procs import OWNER_PASSWORD, NodeProcess, skopeo
from tests.test_manage_identities import Cli, basic, http
from tests.test_replication import wait_until

pytestmark = pytest.mark.timeout(300)

FAST = ["--audit-flush-interval", "0.3"]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "data", extra=FAST).start()
    try:
        yield n
    finally:
        n.stop()


def records(node: NodeProcess, query: str = "") -> list[dict[str, Any]]:
    status, _, raw = http(
        "GET",
        f"{node.url}/meridian/v1/registries/default/audit?{query}",
        headers=basic("owner", OWNER_PASSWORD),
    )
    assert status == 200, raw
    return json.loads(raw)["records"]


def token_login(node: NodeProcess, user: str, password: str) -> int:
    status, _, _ = http("GET", f"{node.url}/oauth2/token", headers=basic(user, password))
    return status


def test_every_action_of_the_flow_leaves_a_record(node: NodeProcess, tmp_path: Path) -> None:
    wrong = "not-the-password-" + "x" * 8
    assert token_login(node, "mallory", wrong) == 401
    assert token_login(node, "owner", OWNER_PASSWORD) == 200
    image = build_image([2000, 3000], seed="audit-1")
    layout = write_layout(tmp_path / "layout", {"v1": image})
    ref = f"docker://{node.hostport}/audit/app:v1"
    skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", ref)
    for _ in range(3):
        skopeo("inspect", "--tls-verify=false", "--raw", ref)
    skopeo("delete", "--tls-verify=false", ref)
    cli = Cli(tmp_path / "home", tmp_path / "docker")
    assert cli.login(node.url).returncode == 0
    cli.ok("token", "create", "ci-token", "--scope-map", "_repositories_pull")

    def actions() -> set[str]:
        return {r["action"] for r in records(node)}

    wait_until(lambda: {"login", "push", "pull", "delete", "manage"} <= actions(), "records")
    got = cli.ok("audit", "list", "--registry", "default")["records"]
    for r in got:
        assert r["region"] == "local" and r["registry"] == "default"
        assert r["source"] == "127.0.0.1" and r["time"].endswith("Z")
        assert r["outcome"] in ("success", "failure")

    def only(action: str) -> list[dict[str, Any]]:
        return [r for r in got if r["action"] == action]

    failed = [r for r in only("login") if r["outcome"] == "failure"]
    assert [r["identity"] for r in failed] == ["mallory"]
    assert any(r["identity"] == "owner" and r["outcome"] == "success" for r in only("login"))
    (pushed,) = [r for r in only("push") if r["repository"] == "audit/app"]
    assert pushed["identity"] == "owner" and pushed["target"]["digest"] == image.digest
    assert pushed["target"]["tag"] == "v1"
    pulls = [r for r in only("pull") if r["repository"] == "audit/app"]
    assert sum(r["count"] for r in pulls) >= 3  # counted per minute, not a record each
    assert len(pulls) < sum(r["count"] for r in pulls)
    (deleted,) = only("delete")
    assert deleted["target"]["digest"] == image.digest and deleted["identity"] == "owner"
    assert any("ci-token" in r["detail"] and r["identity"] == "owner" for r in only("manage"))

    # Filters, on the CLI and the API
    logins = cli.ok("audit", "list", "--registry", "default", "--action", "login")["records"]
    assert logins and {r["action"] for r in logins} == {"login"}
    by_mallory = cli.ok("audit", "list", "--registry", "default", "--identity", "mallory")
    assert [r["outcome"] for r in by_mallory["records"]] == ["failure"]
    later = cli.ok("audit", "list", "--registry", "default", "--since", str(time.time() + 60))
    assert later["records"] == []
    assert cli.ok("audit", "list", "--registry", "default", "--since", "1h")["records"]
    assert records(node, "action=delete") == [deleted]
    # JSON lines for log shippers: the CLI's export and the API's format=jsonl
    export = cli("audit", "export", "--registry", "default")
    assert export.returncode == 0, export.stderr
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert lines and {r["action"] for r in lines} >= {"login", "push", "pull", "delete", "manage"}
    status, headers, raw = http(
        "GET",
        f"{node.url}/meridian/v1/registries/default/audit?format=jsonl&action=push",
        headers=basic("owner", OWNER_PASSWORD),
    )
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    assert [json.loads(line)["action"] for line in raw.decode().splitlines()] == ["push"]
    # Never a secret
    text = export.stdout + cli("audit", "list", "--registry", "default").stdout
    assert OWNER_PASSWORD not in text and wrong not in text
    assert OWNER_PASSWORD not in node.logs() and wrong not in node.logs()
    # Bad input: one line, exit 2, nothing else
    assert "--action" in cli.fails(2, "audit", "list", "--registry", "default", "--action", "x")
    assert "--since" in cli.fails(2, "audit", "list", "--registry", "default", "--since", "soon")
    status, _, raw = http(
        "GET",
        f"{node.url}/meridian/v1/registries/default/audit?since=tomorrow",
        headers=basic("owner", OWNER_PASSWORD),
    )
    assert status == 400 and b"since" in raw


def test_records_survive_a_restart_and_go_after_the_retention(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", extra=FAST).start()
    try:
        assert token_login(node, "alice", "wrong-password") == 401
        node.stop()  # a clean stop writes what it holds
        node.start()
        logins = records(node, "identity=alice")
        assert [r["outcome"] for r in logins] == ["failure"]
    finally:
        node.stop()
    short = NodeProcess(tmp_path / "data", extra=[*FAST, "--audit-retention", "2"]).start()
    try:
        assert token_login(short, "bob", "wrong-password") == 401
        wait_until(lambda: records(short, "identity=bob"), "bob's record written")
        wait_until(
            lambda: not records(short, "identity=alice") and not records(short, "identity=bob"),
            "records older than the retention removed",
            timeout=60,
        )
    finally:
        short.stop()
