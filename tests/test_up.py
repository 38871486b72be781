"""``meridian up``: the local multi-region cluster in one command.

The whole command runs as a real process (etcd, the WAN emulator, three
nodes and the router as its children); the test pushes and pulls through its
router, kills a region the way an operator would find it (by ``--region`` on
its command line), then stops it with SIGINT and again with SIGTERM and
checks every child is gone. Waits are bounded polls, never timing
assertions.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.auth.identities import OWNER_PASSWORD_ENV
from loadtest.ocipush import TokenAuth
from localcluster import topology as topo
from localcluster.supervisor import meridian_argv, spawn
from tests import images as im
from tests.procs import OWNER_LOGIN, OWNER_PASSWORD, ROOT, free_port, skopeo
from tests.test_workers import FRESH_CONNECTIONS, children, counter, get_json

TOPOLOGY = """
[[region]]
name = "alpha"
rtt_ms = 4

[[region]]
name = "beta"
rtt_ms = 30

[[region]]
name = "gamma"
rtt_ms = 60
bandwidth = "200M"

[[link]]
regions = ["alpha", "gamma"]
rtt_ms = 50
"""


# -- topology files ----------------------------------------------------------------


def test_topology_file_and_defaults(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(TOPOLOGY)
    t = topo.load(f)
    assert [r.name for r in t.regions] == ["alpha", "beta", "gamma"]
    assert t.region("gamma").bandwidth == 200 << 20
    assert t.between("gamma", "alpha").rtt_ms == 50
    assert t.between("alpha", "beta").rtt_ms == 34  # default: through this site
    assert [r.name for r in t.first(2).regions] == ["alpha", "beta"]
    j = tmp_path / "t.json"
    j.write_text(json.dumps(t.as_dict()))
    assert topo.load(j).regions == t.regions
    d = topo.default()
    assert [(r.name, r.rtt_ms) for r in d.regions] == [
        ("eastus", 5),
        ("westeurope", 40),
        ("southeastasia", 120),
    ]
    assert len(topo.default(12).regions) == 12


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[region]]\nname='a'\n", "rtt_ms is required"),
        ("[[region]]\nname='A b'\nrtt_ms=1\n", "name must be"),
        ("[[region]]\nname='a'\nrtt_ms=-3\n", "between 0 and 60000"),
        ("[[region]]\nname='a'\nrtt_ms='fast'\n", "number of milliseconds"),
        ("[[region]]\nname='a'\nrtt_ms=1\nbandwidth='lots'\n", "bad bandwidth"),
        ("[[region]]\nname='a'\nrtt_ms=1\n[[region]]\nname='a'\nrtt_ms=2\n", "appears twice"),
        ("[[region]]\nname='a'\nrtt_ms=1\n[[link]]\nregions=['a','z']\nrtt_ms=1\n", "unknown"),
        ("[[region]]\nname='a'\nrtt_ms=1\ncolour='red'\n", "unknown keys colour"),
        ("regions = 3\n", "at least one"),
        ("this is = not toml [", "not valid TOML"),
    ],
)
def test_topology_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(topo.TopologyError, match=message):
        topo.load(f)


def test_up_refuses_bad_input_without_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[region]]\nname='a'\n")
    cmd = [sys.executable, "-m", "cluster.cli", "up", "--data", str(tmp_path / "d")]
    r = subprocess.run([*cmd, "--config", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "rtt_ms is required" in r.stderr
    r = subprocess.run([*cmd, "--regions", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--regions" in r.stderr
    r = subprocess.run([*cmd, "--workers", "many"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "choose 1-256 processes, or auto" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run(
        [*cmd, "--config", str(tmp_path / "missing.toml")], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and "cannot read" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*cmd, "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    # one line: what is wrong (and who holds the port), what to do
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"meridian up: 127.0.0.1:{port} is in use by PID {os.getpid()} "
        f"({' '.join(processes_with()[os.getpid()])[:80]}); choose another with --port"
    ]
    assert not (tmp_path / "d" / "etcd").exists()


# -- the real thing ------------------------------------------------------------------


class Up:
    """``meridian up`` as a process (:mod:`localcluster.supervisor`); its
    output in a file, read as it comes. ``env``: its whole environment
    (default: this process's, which names the tests' owner password)."""

    def __init__(
        self, data: Path, config: Path, port: int, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.data = data
        self.port = port
        self.scheme = "https" if "--tls" in extra else "http"
        self.out_path = data.parent / f"up-{port}-{time.monotonic_ns()}.out"
        self.child = spawn(
            "meridian up",
            meridian_argv(
                "up",
                "--port", str(port),
                "--data", str(data),
                "--config", str(config),
                "--status-interval", "0.5",
                *extra,
            ),
            self.out_path,
            cwd=ROOT,
            env=env,
            new_session=False,
        )  # fmt: skip
        self.proc = self.child.proc

    @property
    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def router(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ssl(self) -> ssl.SSLContext | None:
        """A client context trusting the cluster's CA (``--tls``), else None."""
        if self.scheme != "https":
            return None
        return ssl.create_default_context(cafile=str(self.data / "tls" / "ca.crt"))

    def state(self) -> dict[str, Any]:
        return json.loads((self.data / "up.json").read_text())

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"meridian up exited {self.proc.returncode}:\n{self.output}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                if pred():
                    return
            time.sleep(0.1)
        raise AssertionError(f"{what} did not happen; output:\n{self.output[-3000:]}")

    def router_status(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            self.router + "/meridian/v1/router", timeout=2, context=self.ssl()
        ) as r:
            return json.loads(r.read())

    def wait_ready(self) -> None:
        self.wait(lambda: "Ctrl-C stops everything" in self.output, "the cluster comes up")

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def wait_gone(self, pids: list[int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, [p for p in pids if alive(p)]
            time.sleep(0.1)

    def kill_all(self) -> None:
        """Test cleanup: whatever is left, by PID."""
        pids = []
        with contextlib.suppress(OSError, ValueError):
            pids = [c["pid"] for c in self.state()["children"].values()]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_with(*needles: str) -> dict[int, list[str]]:
    """pid -> argv of every process whose command line has all ``needles``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if all(any(n in a for a in argv) for n in needles):
            found[int(entry)] = argv
    return found


def environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [e.decode(errors="replace").partition("=") for e in f.read().split(b"\0") if e]
    return {k: v for k, _, v in pairs}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def token(
    base: str,
    repo: str,
    *,
    login: tuple[str, str] = OWNER_LOGIN,
    actions: str = "pull",
    context: ssl.SSLContext | None = None,
) -> str:
    """An access token for ``repo`` from ``base``'s token endpoint (Basic
    credentials, the Docker token flow's GET)."""
    basic = base64.b64encode(":".join(login).encode()).decode()
    req = urllib.request.Request(
        f"{base}/oauth2/token?scope=repository:{repo}:{actions}",
        headers={"Authorization": f"Basic {basic}"},
    )
    with urllib.request.urlopen(req, timeout=30, context=context) as r:
        return json.loads(r.read())["token"]


def pull(
    router: str,
    repo: str,
    img: im.Image,
    context: ssl.SSLContext | None = None,
    login: tuple[str, str] = OWNER_LOGIN,
) -> set[str]:
    """Pull ``img`` through the router as a Go client does: a token for the
    repository; each blob GET is redirected to a region with a grant in the
    URL and fetched there without ``Authorization``. The regions that served
    it."""
    bearer = {"Authorization": f"Bearer {token(router, repo, login=login, context=context)}"}
    served = set()
    req = urllib.request.Request(
        f"{router}/v2/{repo}/manifests/v1", headers={"Accept": im.OCI_MANIFEST, **bearer}
    )
    with urllib.request.urlopen(req, timeout=30, context=context) as r:
        assert r.read() == img.manifest
        served.add(r.headers["X-Meridian-Region"])
    no_redirect = urllib.request.build_opener(
        _NoRedirect, urllib.request.HTTPSHandler(context=context)
    )
    for blob in img.blobs():
        req = urllib.request.Request(f"{router}/v2/{repo}/blobs/{blob.digest}", headers=bearer)
        try:
            no_redirect.open(req, timeout=30)
            raise AssertionError("blob GET was not redirected")
        except urllib.error.HTTPError as e:
            assert e.code == 307, e.code
            served.add(e.headers["X-Meridian-Region"])
            location = e.headers["Location"]
        assert "meridian_grant=" in location, location
        with urllib.request.urlopen(location, timeout=30, context=context) as r:
            assert r.read() == blob.data
    return served


def meridian(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The ``meridian`` command run in ``cwd``, with no cluster named in its
    environment (it finds ``./meridian-data`` by itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERIDIAN_")}
    return subprocess.run(
        meridian_argv(*args),
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def snapshot(data: Path) -> dict[str, tuple[int, int]]:
    """What ``meridian up`` itself writes in its data dir: the files at its
    top, and the names of its logs (size and mtime of each)."""
    out = {}
    for p in [*data.iterdir(), *(data / "logs").iterdir()]:
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(data))] = (
                (st.st_size, st.st_mtime_ns) if p.parent == data else (0, 0)
            )
    return out


# What grpc-go inside etcd 3.4 prints itself (e.g. when etcd's gateway dials
# its own port an instant before it listens, on a restart), not etcd's logger.
GRPC_GO_LINE = re.compile(r"^(INFO|WARNING|ERROR): \d{4}/\d\d/\d\d [\d:.]+ \[core\] ")
STATUS_LINE = re.compile(r"^\d\d:\d\d:\d\d regions ", re.M)


def test_up_runs_a_cluster_and_stops_it_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "topology.toml"
    config.write_text(TOPOLOGY)
    data = tmp_path / "meridian-data"
    up = Up(data, config, free_port())
    try:
        up.wait_ready()
        # Off a terminal, a status line every --status-interval (0.5 s here),
        # not only when something changes.
        seen = len(STATUS_LINE.findall(up.output))
        up.wait(
            lambda: len(STATUS_LINE.findall(up.output)) >= seen + 5,
            "five more status lines",
            timeout=60,
        )
        out = up.output
        assert "router" in out and up.router in out
        for name, rtt in (("alpha", 4), ("beta", 30), ("gamma", 60)):
            assert f"region {name}" in out and f"{rtt} ms RTT from here" in out
        assert "alpha-gamma 50 ms" in out
        state = up.state()
        children = state["children"]
        assert set(children) == {
            "etcd",
            "wan",
            "region alpha",
            "region beta",
            "region gamma",
            "router",
        }
        # Each region is a process with --region on its command line.
        for name in ("alpha", "beta", "gamma"):
            found = processes_with("--region", name, str(data / "regions" / name))
            assert list(found) == [children[f"region {name}"]["pid"]], found
        st = up.router_status()
        assert st["nearest"] == ["alpha", "beta", "gamma"]
        for name, r in state["regions"].items():
            assert {x["region"]: x["http"] for x in st["regions"]}[name] == r["advertised"]

        # Identity: the owner's password (here the tests' own, from the
        # environment) is in the start-up table with ready login lines, kept
        # in a 0600 file that up.json names (never the password itself), and
        # reaches the nodes by environment alone.
        password_file = data / "owner-password"
        assert re.search(rf"owner +- +user owner +password {re.escape(OWNER_PASSWORD)} ", out)
        assert (
            f"skopeo login --tls-verify=false -u owner --password-stdin {up.host} "
            f"< {password_file}" in out
        )
        assert f"podman login --tls-verify=false -u owner --password-stdin {up.host}" in out
        assert password_file.read_text().strip() == OWNER_PASSWORD
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert state["auth"] is True and state["tls"] is None
        assert state["owner"] == {"user": "owner", "password_file": str(password_file)}
        assert OWNER_PASSWORD not in json.dumps(state)
        # Registries answer on <name>.meridian.test: nodes and router get the
        # domain, and the start-up text gives the /etc/hosts line clients need.
        assert state["domain"] == "meridian.test"
        for name, child in children.items():
            if name.startswith("region ") or name == "router":
                argv = child["cmd"]
                assert argv[argv.index("--domain") + 1] == "meridian.test", name
        assert "127.0.0.1 myregistry1.meridian.test" in out
        for name, child in children.items():
            assert OWNER_PASSWORD not in " ".join(child["cmd"]), name
            env = environ(child["pid"])
            if name.startswith("region "):
                assert env.get(OWNER_PASSWORD_ENV) == OWNER_PASSWORD, name
                argv = child["cmd"]
                assert "--auth" in argv
                assert argv[argv.index("--trusted-proxies") + 1] == "127.0.0.1/32"
            else:  # etcd, the emulator and the router need no password
                assert OWNER_PASSWORD_ENV not in env, name

        # The management verbs find it without flags: ./meridian-data/up.json.
        r = meridian("regions", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert {(x["region"], x["alive"]) for x in json.loads(r.stdout)} == {
            ("alpha", True),
            ("beta", True),
            ("gamma", True),
        }
        r = meridian("replication", "status", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert {x["region"] for x in json.loads(r.stdout)} == {"alpha", "beta", "gamma"}

        # A second meridian up on this data dir refuses at once, names the
        # PID holding it, and touches nothing.
        before = snapshot(data)
        r = meridian("up", "--data", str(data), "--port", str(free_port()), cwd=tmp_path)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert f"{data} is in use by meridian up (PID {up.proc.pid})" in r.stderr
        assert snapshot(data) == before

        img = im.build_image([400_000, 30_000], seed="meridian-up")
        assert im.Registry(up.router).push("demo/app", "v1", img) == img.digest
        assert pull(up.router, "demo/app", img) == {"alpha"}

        # Replication over the emulated inter-region links reaches every region.
        node = state["regions"]["alpha"]["node"]

        def in_sync() -> bool:
            with urllib.request.urlopen(node + "/meridian/v1/replication", timeout=2) as r:
                rows = json.loads(r.read())["regions"]
            return len(rows) == 3 and all(row["pending_items"] == 0 for row in rows)

        up.wait(in_sync, "replication to every region")
        with urllib.request.urlopen(state["wan"] + "/links", timeout=2) as r:
            links = json.loads(r.read())["links"]
        # beta and gamma fetched from alpha through the link into alpha's gRPC
        # service, which told them apart (each pair has its own latency).
        assert set(links["regions>alpha"]["sources_seen"]) >= {"beta", "gamma"}

        # Kill the nearest region: pulls keep working, from the next one.
        alpha = children["region alpha"]["pid"]
        os.kill(alpha, signal.SIGKILL)

        def moved() -> bool:
            return pull(up.router, "demo/app", img) == {"beta"}

        up.wait(moved, "traffic moved to beta")
        up.wait(lambda: "exited: region alpha" in up.output, "status shows alpha exited")
        assert "regions 2/3 in rotation" in up.output

        code = up.stop(signal.SIGINT)
        assert code == 0, up.output
        assert "stopped" in up.output
        for name, child in children.items():
            assert not alive(child["pid"]), f"{name} still running"
        assert not (data / "up.json").exists()
        # Every line of every log is JSON; no log holds the owner's password.
        logs = sorted((data / "logs").iterdir())
        assert {p.name for p in logs} >= {"etcd.log", "wan.log", "router.log", "region-alpha.log"}
        for log in logs:
            text = log.read_text(errors="replace")
            assert OWNER_PASSWORD not in text, log.name
            for line in text.splitlines():
                if log.name == "etcd.log" and GRPC_GO_LINE.match(line):
                    continue  # etcd's grpc-go library logs for itself, in its own format
                if line.strip():
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        doc = None
                    assert isinstance(doc, dict), (log.name, line)

        # Same data dir again: same ports, the namespace and bytes are still
        # there (alpha's copy is back too); SIGTERM stops it as cleanly.
        ports = json.loads((data / "ports.json").read_text())
        up = Up(data, config, up.port)
        up.wait_ready()
        assert json.loads((data / "ports.json").read_text()) == ports
        state = up.state()
        assert pull(up.router, "demo/app", img) == {"alpha"}

        # SIGKILL: no chance to clean up. Its children go with it
        # (PR_SET_PDEATHSIG); its up.json stays behind, stale.
        killed = up.proc.pid
        up.proc.kill()
        up.proc.wait()
        up.wait_gone([c["pid"] for c in state["children"].values()])
        assert json.loads((data / "up.json").read_text())["pid"] == killed
        r = meridian("regions", cwd=tmp_path)
        assert r.returncode == 4 and "not running" in r.stderr and f"PID {killed}" in r.stderr

        # The next meridian up on it notices and replaces the stale state;
        # SIGTERM stops it as cleanly.
        up = Up(data, config, up.port)
        up.wait_ready()
        assert f"left by meridian up PID {killed}, which is not running" in up.output
        state = up.state()
        assert state["pid"] == up.proc.pid
        assert pull(up.router, "demo/app", img) == {"alpha"}
        code = up.stop(signal.SIGTERM)
        assert code == 0, up.output
        for name, child in state["children"].items():
            assert not alive(child["pid"]), f"{name} still running"
    finally:
        up.kill_all()


ONE_REGION = """
[[region]]
name = "solo"
rtt_ms = 2
"""


def test_up_generates_the_owner_password_keeps_it_and_runs_open_on_request(
    tmp_path: Path,
) -> None:
    """Without MERIDIAN_OWNER_PASSWORD: a generated password, shown in the
    table, kept in <data>/owner-password (0600) and the same after a
    restart; one from the environment that differs is noted and not used;
    --no-auth is the open mode, said loudly."""
    config = tmp_path / "one.toml"
    config.write_text(ONE_REGION)
    data = tmp_path / "meridian-data"
    env = {k: v for k, v in os.environ.items() if k != OWNER_PASSWORD_ENV}
    img = im.build_image([20_000], seed="up-generated")
    up = Up(data, config, free_port(), env=env)
    try:
        up.wait_ready()
        shown = re.search(r"owner +- +user owner +password (\S+) ", up.output)
        assert shown, up.output
        password = shown.group(1)
        assert password != OWNER_PASSWORD and len(password) >= 20
        password_file = data / "owner-password"
        assert password_file.read_text() == password + "\n"
        assert password_file.stat().st_mode & 0o777 == 0o600
        # It is the owner's: a push with it works, one with another is refused.
        owner = TokenAuth("owner", password)
        assert im.Registry(up.router, auth=owner).push("gen/app", "v1", img) == img.digest
        assert pull(up.router, "gen/app", img, login=("owner", password)) == {"solo"}
        wrong = im.Registry(up.router, auth=TokenAuth("owner", password + "x"))
        with pytest.raises(im.HTTPStatusError) as e:
            wrong.push("gen/other", "v1", img)
        assert e.value.status == 401
        up.stop(signal.SIGINT)

        # A restart of the same data dir shows and uses the same password,
        # even with another one in the environment (the owner exists).
        up = Up(data, config, up.port, env={**env, OWNER_PASSWORD_ENV: "not-the-one"})
        up.wait_ready()
        assert f"password {password} " in up.output
        assert f"{OWNER_PASSWORD_ENV} differs from the owner password" in up.output
        assert password_file.read_text() == password + "\n"
        assert im.Registry(up.router, auth=owner).get_manifest("gen/app", "v1")[0] == img.manifest
        up.stop(signal.SIGTERM)

        # --no-auth: the open mode, said loudly; no password anywhere.
        up = Up(tmp_path / "open-data", config, free_port(), "--no-auth", env=env)
        up.wait_ready()
        assert "AUTHENTICATION IS OFF (--no-auth)" in up.output
        assert "password" not in up.output.split("Meridian is up")[1].split("Try it")[0]
        assert up.state()["auth"] is False and up.state()["owner"] is None
        assert not (tmp_path / "open-data" / "owner-password").exists()
        for child in up.state()["children"].values():
            if child["cmd"][3:4] == ["node"]:
                assert "--no-auth" in child["cmd"]
        assert im.Registry(up.router, auth=None).push("open/app", "v1", img) == img.digest
        assert up.stop(signal.SIGTERM) == 0
    finally:
        up.kill_all()


def test_up_with_two_workers_per_node_and_router(tmp_path: Path) -> None:
    """``meridian up --workers 2``: the node and the router each run two
    processes on their port; skopeo pushes and pulls through the router;
    the node's ``/metrics`` sums both of its processes; a worker killed is
    replaced; Ctrl-C stops every process."""
    config = tmp_path / "one.toml"
    config.write_text(ONE_REGION)
    up = Up(tmp_path / "meridian-data", config, free_port(), "--workers", "2")
    try:
        up.wait_ready()
        assert "2 processes per node and router" in up.output
        state = up.state()
        assert state["workers"] == 2
        node_pid = state["children"]["region solo"]["pid"]
        router_pid = state["children"]["router"]["pid"]
        for name in ("region solo", "router"):
            argv = state["children"][name]["cmd"]
            assert argv[argv.index("--workers") + 1] == "2", name
        node = state["regions"]["solo"]["node"]

        def answering(url: str) -> set[int]:  # each GET on a new connection, to either process
            return {get_json(url + "/healthz")["worker"] for _ in range(FRESH_CONNECTIONS)}

        up.wait(lambda: answering(node) == {0, 1}, "both node processes answering")
        up.wait(lambda: answering(up.router) == {0, 1}, "both router processes answering")
        assert len(children(node_pid)) == 1 and len(children(router_pid)) == 1

        img = im.build_image([3000, 70_000], seed="up-workers")
        layout = im.write_layout(tmp_path / "src", {"v1": img})
        ref = f"docker://{up.host}/workers/app:v1"
        skopeo("copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", ref)
        for i in range(3):  # each skopeo run opens new connections: either router process
            out = tmp_path / f"pulled{i}"
            skopeo("copy", "-q", "--src-tls-verify=false", ref, f"oci:{out}:v1")
            im.verify_layout(out)
            assert im.read_layout(out).ref("v1").digest == img.digest

        # The node's /metrics, whichever process answers it, counts both processes' requests.
        def node_metrics() -> str:
            with urllib.request.urlopen(node + "/metrics", timeout=10) as r:
                return r.read().decode()

        labels = {"method": "GET", "status": "401"}
        before = counter(node_metrics(), "meridian_http_requests_total", **labels)
        for _ in range(FRESH_CONNECTIONS):  # no token: 401, each on a new connection
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(node + "/v2/", timeout=10)
            assert e.value.code == 401
        for _ in range(8):
            got = counter(node_metrics(), "meridian_http_requests_total", **labels)
            assert got == before + FRESH_CONNECTIONS

        # A node worker killed is started again by its primary, and serves.
        (old,) = children(node_pid)
        os.kill(old, signal.SIGKILL)
        up.wait(lambda: len(children(node_pid) - {old}) == 1, "a new node worker")
        up.wait(lambda: answering(node) == {0, 1}, "both node processes answering again")
        raw = skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout
        assert raw.encode() == img.manifest

        workers = children(node_pid) | children(router_pid)
        assert up.stop(signal.SIGINT) == 0, up.output
        up.wait_gone([*workers, *(c["pid"] for c in state["children"].values())])
    finally:
        up.kill_all()
