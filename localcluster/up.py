"""``meridian up``: a complete local multi-region cluster in one command.

On loopback, as child processes of this one (each with its own log under
``<data>/logs``):

- **etcd** -- a real etcd, its own ports, data in ``<data>/etcd``;
- **regions** -- one ``meridian node`` per region (``--region <name>`` on its
  command line), data in ``<data>/regions/<name>``, HTTP and gRPC on their
  own ports;
- **a WAN emulator** (``python -m localcluster.wan --config``, run as a process,
  not imported) -- a TCP proxy per region between "this site" and the region
  (the region's RTT from here), and one into each region's gRPC service whose
  latency depends on which region connects (the inter-region RTTs). Nodes
  advertise the emulator's addresses (``--advertise``, ``--grpc-advertise``):
  whoever reaches a region -- the router, a redirected client, another
  region -- crosses its emulated link;
- **the router** on ``127.0.0.1:<port>`` (5000): the endpoint clients use.

It prints what runs where, stays in the foreground with a status line
(regions in rotation and their RTT, replication backlog, requests routed),
and on Ctrl-C (SIGINT) or SIGTERM stops everything by PID: router, regions,
emulator, etcd (SIGTERM, then SIGKILL after 10 s). Children also get
SIGTERM if this process dies (PR_SET_PDEATHSIG). Ports are remembered in
``<data>/ports.json`` and reused, so a second ``meridian up`` on the same
data dir brings the same cluster back; ``<data>/up.json`` describes the
running cluster (PIDs, addresses) for scripts and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cluster.etcd import single_member_argv
from cluster.runtime import free_port
from localcluster import topology as topo

ETCD_HINT = "etcd not found: apt-get install -y etcd-server (or put etcd on PATH)"
STOP_GRACE = 10.0


def _pythonpath() -> str:
    """So children find the packages in a source checkout too."""
    root = str(Path(__file__).resolve().parent.parent)
    prior = os.environ.get("PYTHONPATH", "")
    return root if not prior else f"{root}{os.pathsep}{prior}"


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _get_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait(
    what: str, check: Any, proc: subprocess.Popen | None, log: Path | None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = _tail(log) if log else ""
            raise StartError(f"{what} exited with code {proc.returncode} while starting\n{tail}")
        try:
            if check():
                return
        except (OSError, ValueError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.1)
    tail = _tail(log) if log else ""
    raise StartError(f"{what} did not become ready in {timeout:.0f}s ({last})\n{tail}")


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


class StartError(Exception):
    pass


@dataclass
class Child:
    name: str
    tier: int  # stopped highest first: router 3, regions 2, wan 1, etcd 0
    cmd: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    exited_reported: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Ports:
    values: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Ports:
        try:
            doc = json.loads(path.read_text())
            return cls({str(k): int(v) for k, v in doc.items()})
        except (OSError, ValueError, TypeError, AttributeError):
            return cls()

    def get(self, key: str, taken: set[int]) -> int:
        port = self.values.get(key)
        if port is not None and port not in taken and _port_free(port):
            taken.add(port)
            return port
        port = free_port(taken)
        self.values[key] = port
        return port

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.values, indent=1, sort_keys=True))


class Cluster:
    def __init__(self, args: argparse.Namespace, topology: topo.Topology) -> None:
        self.args = args
        self.topo = topology
        self.data = Path(args.data).resolve()
        self.logs = self.data / "logs"
        self.children: list[Child] = []
        self.stopping = False
        self.env = dict(os.environ, PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1")
        self.addr: dict[str, Any] = {}

    # -- start ---------------------------------------------------------------

    def _spawn(self, name: str, tier: int, cmd: list[str]) -> Child:
        log = self.logs / f"{name.replace(' ', '-')}.log"
        child = Child(name, tier, cmd, log)
        with open(log, "ab") as f:
            child.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
                preexec_fn=_pdeathsig,
            )
        self.children.append(child)
        return child

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        ports_file = self.data / "ports.json"
        ports = Ports.load(ports_file)
        router_port = self.args.port
        if not _port_free(router_port):
            raise StartError(
                f"port {router_port} is in use (another meridian up?); choose one with --port"
            )
        taken = {router_port}
        etcd_client = ports.get("etcd-client", taken)
        etcd_peer = ports.get("etcd-peer", taken)
        wan_control = ports.get("wan-control", taken)
        regions: dict[str, dict[str, int]] = {}
        for r in self.topo.regions:
            regions[r.name] = {
                k: ports.get(f"{r.name}-{k}", taken) for k in ("http", "grpc", "site", "link")
            }
        ports.save(ports_file)

        # etcd
        etcd_bin = os.environ.get("MERIDIAN_ETCD_BINARY") or shutil.which("etcd")
        if not etcd_bin and os.access("/usr/bin/etcd", os.X_OK):
            etcd_bin = "/usr/bin/etcd"
        if not etcd_bin:
            raise StartError(ETCD_HINT)
        etcd_dir = self.data / "etcd"
        client_url = f"http://127.0.0.1:{etcd_client}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        meta = self.data / "etcd-urls.json"
        cmd = [
            *single_member_argv(etcd_bin, "meridian", str(etcd_dir), client_url, peer_url),
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "10000",
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]
        if etcd_dir.exists() and meta.exists():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(meta.read_text()).get("peer") != peer_url:
                    cmd.append("--force-new-cluster")  # one member, new peer address
        child = self._spawn("etcd", 0, cmd)
        _wait(
            "etcd",
            lambda: (
                b'"health":"true"'
                in urllib.request.urlopen(client_url + "/health", timeout=1).read()
            ),
            child.proc,
            child.log,
        )
        meta.write_text(json.dumps({"client": client_url, "peer": peer_url}))
        self.addr["etcd"] = client_url

        # WAN emulator
        links = []
        for r in self.topo.regions:
            p = regions[r.name]
            links.append(
                {
                    "name": f"site>{r.name}",
                    "listen": f"127.0.0.1:{p['site']}",
                    "target": f"127.0.0.1:{p['http']}",
                    "latency": r.rtt_ms / 2000,
                    "bandwidth": r.bandwidth,
                }
            )
            links.append(
                {
                    "name": f"regions>{r.name}",
                    "listen": f"127.0.0.1:{p['link']}",
                    "target": f"127.0.0.1:{p['grpc']}",
                    # from an unidentified source: as from this site
                    "latency": r.rtt_ms / 2000,
                    "source_latency": {
                        o.name: self.topo.between(o.name, r.name).rtt_ms / 2000
                        for o in self.topo.regions
                        if o.name != r.name
                    },
                    "identify": True,
                }
            )
        wan_cfg = self.data / "wan.json"
        wan_cfg.write_text(json.dumps({"links": links}, indent=1))
        control = f"127.0.0.1:{wan_control}"
        child = self._spawn(
            "wan",
            1,
            [
                sys.executable,
                "-m",
                "localcluster.wan",
                "--config",
                str(wan_cfg),
                "--control",
                control,
            ],
        )
        _wait(
            "the WAN emulator",
            lambda: _get_json(f"http://{control}/healthz")["status"] == "ok",
            child.proc,
            child.log,
        )
        self.addr["wan"] = f"http://{control}"

        # regions
        nodes: list[tuple[str, Child, str]] = []
        for r in self.topo.regions:
            p = regions[r.name]
            rdir = self.data / "regions" / r.name
            rdir.mkdir(parents=True, exist_ok=True)
            child = self._spawn(
                f"region {r.name}",
                2,
                [
                    sys.executable,
                    "-m",
                    "cluster.cli",
                    "node",
                    "--region",
                    r.name,
                    "--listen",
                    f"127.0.0.1:{p['http']}",
                    "--data",
                    str(rdir),
                    "--etcd",
                    client_url,
                    "--grpc-listen",
                    f"127.0.0.1:{p['grpc']}",
                    "--grpc-advertise",
                    f"127.0.0.1:{p['link']}",
                    "--advertise",
                    f"http://127.0.0.1:{p['site']}",
                ],
            )
            nodes.append((r.name, child, f"http://127.0.0.1:{p['http']}"))
        for name, child, url in nodes:
            _wait(
                f"region {name}",
                lambda url=url: urllib.request.urlopen(url + "/v2/", timeout=1).status == 200,
                child.proc,
                child.log,
                timeout=60,
            )
        with contextlib.suppress(OSError, urllib.error.URLError):
            req = urllib.request.Request(
                f"http://{control}/sources",
                data=json.dumps({n: c.pid for n, c, _ in nodes}).encode(),
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(req, timeout=2).read()

        # router
        router_url = f"http://127.0.0.1:{router_port}"
        child = self._spawn(
            "router",
            3,
            [
                sys.executable,
                "-m",
                "cluster.cli",
                "router",
                "--etcd",
                client_url,
                "--listen",
                f"127.0.0.1:{router_port}",
            ],
        )
        want = len(self.topo.regions)
        _wait(
            "the router",
            lambda: (
                sum(r["up"] for r in _get_json(router_url + "/meridian/v1/router")["regions"])
                >= want
            ),
            child.proc,
            child.log,
            timeout=60,
        )
        self.addr["router"] = router_url
        self.addr["regions"] = {
            r.name: {
                "node": f"http://127.0.0.1:{regions[r.name]['http']}",
                "advertised": f"http://127.0.0.1:{regions[r.name]['site']}",
                "grpc": f"127.0.0.1:{regions[r.name]['grpc']}",
                "grpc_advertised": f"127.0.0.1:{regions[r.name]['link']}",
                "rtt_ms": r.rtt_ms,
                "data": str(self.data / "regions" / r.name),
            }
            for r in self.topo.regions
        }
        self._write_state()

    def _write_state(self) -> None:
        state = {
            **self.addr,
            "pid": os.getpid(),
            "data": str(self.data),
            "logs": str(self.logs),
            "children": {
                c.name: {"pid": c.pid, "log": str(c.log), "cmd": c.cmd} for c in self.children
            },
            "topology": self.topo.as_dict(),
        }
        tmp = self.data / "up.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.data / "up.json")

    # -- report --------------------------------------------------------------

    def summary(self) -> str:
        rows = [("router", self._pid("router"), self.addr["router"], "the endpoint clients use")]
        rows.append(("etcd", self._pid("etcd"), self.addr["etcd"], f"data {self.data / 'etcd'}"))
        rows.append(("wan emulator", self._pid("wan"), self.addr["wan"], "control API"))
        for r in self.topo.regions:
            a = self.addr["regions"][r.name]
            rows.append(
                (
                    f"region {r.name}",
                    self._pid(f"region {r.name}"),
                    a["advertised"],
                    f"{r.rtt_ms:g} ms RTT from here; node {a['node']}, gRPC {a['grpc']} "
                    f"(via {a['grpc_advertised']})",
                )
            )
        width = max(len(r[0]) for r in rows)
        lines = [
            f"Meridian is up: {len(self.topo.regions)} regions on loopback "
            f"(data {self.data}, logs {self.logs})",
            "",
            f"  {'COMPONENT':<{width}}  {'PID':>7}  {'ADDRESS':<24}  NOTES",
        ]
        for name, pid, addr, notes in rows:
            lines.append(f"  {name:<{width}}  {pid:>7}  {addr:<24}  {notes}")
        pairs = [
            f"{a.name}-{b.name} {self.topo.between(a.name, b.name).rtt_ms:g} ms"
            for i, a in enumerate(self.topo.regions)
            for b in self.topo.regions[i + 1 :]
        ]
        if pairs:
            lines += ["", "  between regions (gRPC): " + ", ".join(pairs)]
        host = self.addr["router"].removeprefix("http://")
        lines += [
            "",
            "Try it (plain HTTP on loopback, so no TLS):",
            f"  skopeo copy --dest-tls-verify=false docker://docker.io/library/alpine:latest "
            f"docker://{host}/library/alpine:latest",
            f"  skopeo inspect --tls-verify=false docker://{host}/library/alpine:latest",
            f"  ctr images pull --plain-http {host}/library/alpine:latest",
            f"  meridian regions --etcd {self.addr['etcd']}",
            f"  curl -s {self.addr['router']}/meridian/v1/router",
            "",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)

    def _pid(self, name: str) -> str:
        for c in self.children:
            if c.name == name:
                return str(c.pid)
        return "-"

    def status_line(self) -> tuple[str, str]:
        """The status line, and a key that changes only when something more
        than the RTT figures does (when to print it again off a terminal)."""
        parts = []
        key: list[str] = []
        try:
            st = _get_json(self.addr["router"] + "/meridian/v1/router", timeout=0.5)
            regions = st["regions"]
            up = [r for r in regions if r["up"]]
            parts.append(f"regions {len(up)}/{len(regions)} in rotation")
            key += [r["region"] for r in up]
            parts.append(
                ", ".join(
                    f"{r['region']} {r['rtt_ms']:.0f}ms"
                    if r["up"] and r["rtt_ms"] is not None
                    else f"{r['region']} DOWN"
                    for r in sorted(regions, key=lambda r: (not r["up"], r["rtt_ms"] or 0))
                )
            )
            backlog = [r["backlog"] for r in regions if r.get("backlog") is not None]
            parts.append(f"backlog {sum(backlog):.0f}" if backlog else "backlog ?")
            routed = sum(r["routed"] for r in regions)
            redirected = sum(r["redirected"] for r in regions)
            parts.append(f"routed {routed} ({redirected} redirects)")
            key += [parts[-2], parts[-1]]
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
            parts.append("router not answering")
            key.append(parts[-1])
        dead = [c.name for c in self.children if not c.running()]
        if dead:
            parts.append("exited: " + ", ".join(dead))
            key.append(parts[-1])
        return time.strftime("%H:%M:%S ") + " | ".join(parts), "|".join(key)

    # -- stop ----------------------------------------------------------------

    def stop(self) -> None:
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            group = [c for c in self.children if c.tier == tier and c.running()]
            for c in group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + STOP_GRACE
            for c in group:
                assert c.proc is not None
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(c.proc.pid, signal.SIGKILL)
                    c.proc.wait()
        with contextlib.suppress(OSError):
            (self.data / "up.json").unlink()


def _out(stream: IO[str], text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.write(text)
        stream.flush()


def up_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="meridian up",
        description="a complete local multi-region cluster on loopback: etcd, regions, "
        "a WAN emulator and the router, in the foreground until Ctrl-C",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("MERIDIAN_UP_PORT", "5000")),
        help="the router's port on 127.0.0.1 (default 5000)",
    )
    p.add_argument(
        "--data",
        default=os.environ.get("MERIDIAN_UP_DATA", "./meridian-data"),
        help="where etcd, the regions and the logs keep their files (default ./meridian-data)",
    )
    p.add_argument("--regions", type=int, default=None, help="how many regions (default 3)")
    p.add_argument("--config", help="topology file (TOML or JSON): regions and latencies")
    p.add_argument(
        "--status-interval", type=float, default=1.0, help="seconds between status updates"
    )
    args = p.parse_args(argv)
    try:
        if args.config:
            topology = topo.load(args.config)
            if args.regions is not None:
                topology = topology.first(args.regions)
        else:
            topology = topo.default(3 if args.regions is None else args.regions)
    except topo.TopologyError as e:
        print(f"meridian up: {e}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print("meridian up: --port must be between 1 and 65535", file=sys.stderr)
        return 2

    cluster = Cluster(args, topology)
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop_signal.append(signum)
        cluster.stopping = True
        if len(stop_signal) == 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        try:
            cluster.start()
        except StartError as e:
            print(f"meridian up: {e}", file=sys.stderr)
            code = 1
            return code
        print(cluster.summary(), flush=True)
        tty = sys.stdout.isatty()
        last = ""
        last_print = 0.0
        while True:
            line, key = cluster.status_line()
            now = time.monotonic()
            if tty:
                _out(sys.stdout, "\r\x1b[K" + line)
            elif key != last or now - last_print >= 30:
                _out(sys.stdout, line + "\n")
                last, last_print = key, now
            time.sleep(args.status_interval)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cluster.children:
            _out(sys.stdout, "\nstopping: router, regions, WAN emulator, etcd ...\n")
            cluster.stop()
            _out(sys.stdout, "stopped\n")
    return code
