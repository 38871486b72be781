"""``meridian up``: a complete local multi-region cluster in one command.

On loopback, as child processes of this one (each with its own log under
``<data>/logs``, started and stopped by :mod:`localcluster.supervisor`):

- **etcd** -- a real etcd, its own ports, data in ``<data>/etcd``;
- **regions** -- ``--nodes-per-region`` ``meridian node`` processes per
  region (one by default; ``--region <name>`` on their command lines, node
  ids ``<region>-<i>``), each with HTTP and gRPC on its own ports. Their
  blob store: ``--storage fs`` (the default) -- the region's nodes share
  the data dir ``<data>/regions/<name>``; ``--storage azurite`` -- one
  Azurite (Microsoft's Azure Storage emulator, ``localcluster.azurite``,
  data in ``<data>/azurite``) for the cluster, a container per region
  (``meridian-<region>``), each node its own data dir
  ``<data>/regions/<name>/<node-id>``; the connection string reaches the
  nodes by environment only;
- **a WAN emulator** (``python -m localcluster.wan --config``, a process) --
  a TCP proxy per node between "this site" and the node (its region's
  RTT from here), and one into each node's gRPC service whose latency
  depends on which region connects (the inter-region RTTs). Nodes advertise
  the emulator's addresses (``--advertise``, ``--grpc-advertise``): whoever
  reaches a region -- the router, a redirected client, another region --
  crosses its emulated link;
- **the router** on ``127.0.0.1:<port>`` (5000): the endpoint clients use.

With ``--workers N`` every node and the router run N processes on their
port (``--workers N`` on their command lines: :mod:`cluster.workers`; the
nodes here always have etcd, which more than one process needs).

It prints what runs where, stays in the foreground with a status line
(regions in rotation and their RTT, replication backlog, requests routed),
and on Ctrl-C (SIGINT) or SIGTERM stops everything by PID: router, regions,
emulator, etcd (SIGTERM, then SIGKILL after 10 s). Children also get
SIGTERM if this process dies (PR_SET_PDEATHSIG). Ports are remembered in
``<data>/ports.json`` and reused, so a second ``meridian up`` on the same
data dir brings the same cluster back; ``<data>/up.json`` describes the
running cluster (PIDs, addresses) for scripts and tests.

Authentication is on: the cluster owner (user ``owner``) gets
``MERIDIAN_OWNER_PASSWORD``, else the password kept in
``<data>/owner-password`` (mode 0600) from an earlier start, else a new one;
it reaches the nodes by environment only, and the start-up table prints it
with ready ``skopeo login``/``podman login`` lines. Nodes take
``X-Forwarded-For`` from the router (``--trusted-proxies``). ``--no-auth``
runs the open mode, and says so. ``--tls``: a local CA and certificates
(``<data>/tls/``, :mod:`cluster.pki`) for the router and every region, which
then serve HTTPS; the table says how to point skopeo, podman, containerd and
curl at the CA.

:class:`Cluster` is the same cluster for programs (the load tests start
theirs with it): ``Cluster(ClusterOptions(data=..., topology=...))``, then
``start()``, ``start_router()`` for more routers, ``stop()``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cluster import pki, preflight, procfs, settings
from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
from cluster.auth.secrets import generate
from cluster.discovery import UP_STATE
from cluster.preflight import CliError
from cluster.runtime import free_port
from cluster.settings import setting
from cluster.workers import parse_count
from localcluster import topology as topo
from localcluster.supervisor import (
    Child,
    MissingProgram,
    StartError,
    find_etcd,
    get_json,
    meridian_argv,
    python_env,
    registry_answers,
    spawn,
    start_etcd,
    stop_all,
    stop_pid,
)

STOP_GRACE = 10.0
UP_LOCK = "up.lock"
OWNER_PASSWORD_FILE = "owner-password"
TLS_DIR = "tls"
#: Who the nodes take X-Forwarded-For from: the router, on loopback (as is
#: the WAN emulator that carries its connections).
TRUSTED_PROXIES = "127.0.0.1/32"
# tiers, stopped highest first
ETCD, WAN, REGIONS, ROUTERS = 0, 1, 2, 3
STORAGES = ("fs", "azurite")
AZURE_CONNECTION_ENV = "MERIDIAN_AZURE_CONNECTION_STRING"
MAX_NODES_PER_REGION = 16
# Registries answer on <name>.meridian.test (``*.localhost`` would need no
# hosts line, but Go clients such as skopeo do not resolve it by themselves).
DEFAULT_DOMAIN = "meridian.test"

#: A router whose process carries ``--region <source>`` on its command line
#: (``meridian router`` takes no such flag): the WAN emulator tells its
#: connections apart by it, as it does the regions'.
_ROUTER_AS = "import sys; from cluster.cli import main; sys.exit(main(sys.argv[3:]))"


class _BadValue(argparse.ArgumentTypeError, ValueError):
    """A bad value with its own message, from a flag (argparse shows it) or
    from the environment (``cluster.settings`` does)."""


def _at_least_one(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise _BadValue(f"not a whole number: {value!r}") from None
    if n < 1:
        raise _BadValue(f"must be at least 1, not {value}")
    return n


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise _BadValue(f"not a number of seconds: {value!r}") from None
    if not 0 <= n < float("inf"):
        raise _BadValue(f"must be 0 or more seconds, not {value}")
    return n


def _some_seconds(value: str) -> float:
    n = _seconds(value)
    if n == 0:
        raise _BadValue("must be more than 0 seconds")
    return n


@dataclass
class UpConfig:
    """The flags of ``meridian up``."""

    port: int = setting(5000, "the router's port on 127.0.0.1", env="MERIDIAN_UP_PORT")
    data: str = setting(
        "./meridian-data",
        "where etcd, the regions and the logs keep their files",
        env="MERIDIAN_UP_DATA",
    )
    regions: int = setting(
        0,
        "how many regions: the first N of the topology",
        parse=_at_least_one,
        env="MERIDIAN_UP_REGIONS",
        show="all of them",
    )
    config: str = setting(
        "",
        "topology file (TOML or JSON): regions and latencies",
        env="MERIDIAN_UP_CONFIG",
        show="3 built-in regions",
    )
    status_interval: float = setting(
        1.0, "seconds between status lines", env="MERIDIAN_UP_STATUS_INTERVAL"
    )
    auth: bool = setting(
        True,
        "require logins (user owner; its password is printed at start); --no-auth: anyone "
        "who reaches the cluster may push, pull and delete",
        env="MERIDIAN_UP_AUTH",
    )
    tls: bool = setting(
        False,
        f"HTTPS for the router and the regions, with a local CA made in <data>/{TLS_DIR}/",
        env="MERIDIAN_UP_TLS",
    )
    nodes_per_region: int = setting(
        1,
        "nodes per region, sharing its blob store (the router balances across them)",
        parse=_at_least_one,
        env="MERIDIAN_UP_NODES_PER_REGION",
    )
    storage: str = setting(
        "fs",
        "the regions' blob store: fs (each region's data dir, shared by its nodes) or azurite "
        "(an Azurite emulator started here, a container per region)",
        choices=STORAGES,
        env="MERIDIAN_UP_STORAGE",
    )
    domain: str = setting(
        DEFAULT_DOMAIN,
        "registries answer on <name>.<domain> (meridian registry create); the /etc/hosts line "
        "a client needs is printed; empty: the default registry only",
        env="MERIDIAN_UP_DOMAIN",
    )
    reclaim_interval: float = setting(
        30.0,
        "seconds between the regions' reclaim passes (removing bytes nothing references: "
        "after a replication or registry delete); 0: off",
        parse=_seconds,
        env="MERIDIAN_UP_RECLAIM_INTERVAL",
    )
    reclaim_grace: float = setting(
        600.0,
        "never reclaim bytes younger than this many seconds (an image still being pushed)",
        parse=_seconds,
        env="MERIDIAN_UP_RECLAIM_GRACE",
    )
    usage_interval: float = setting(
        60.0,
        "seconds between the nodes' writes of their usage counts (meridian usage)",
        parse=_some_seconds,
        env="MERIDIAN_UP_USAGE_INTERVAL",
    )
    workers: int = setting(
        1,
        "processes of every node and of the router, sharing its port (SO_REUSEPORT; their "
        "--workers); auto or 0: one per CPU",
        parse=parse_count,
        env="MERIDIAN_UP_WORKERS",
    )


@dataclass
class ClusterOptions:
    """What :class:`Cluster` runs.

    ``emulate``: regions advertise the emulator's addresses, so clients and
    the router reach them through their emulated link (else directly;
    replication crosses the emulator either way). ``sources``: more emulated
    places, by name, with their round trip (ms) to each region: a process
    whose command line carries ``--region <name>`` gets those latencies on
    the links into the regions (see :meth:`Cluster.start_router`).

    ``auth``: nodes require logins; the cluster owner's password is
    ``MERIDIAN_OWNER_PASSWORD``, else the one kept in ``<data>/owner-password``,
    else a new one (kept there, mode 0600). ``tls``: the router and the
    regions serve HTTPS with certificates of a local CA (``<data>/tls/``)."""

    data: Path
    topology: topo.Topology = field(default_factory=topo.default)
    port: int = 5000
    emulate: bool = True
    sources: dict[str, dict[str, float]] = field(default_factory=dict)
    status_interval: float = 1.0
    auth: bool = True
    tls: bool = False
    nodes_per_region: int = 1
    storage: str = "fs"  # or "azurite"
    domain: str = ""  # --domain of nodes and router: registries on <name>.<domain>
    reclaim_interval: float = 0.0  # the nodes' --reclaim-interval (0: no reclaim)
    reclaim_grace: float = 3600.0  # the nodes' --reclaim-grace
    usage_interval: float = 60.0  # the nodes' --usage-interval
    workers: int = 1  # the nodes' and the routers' --workers (processes on each one's port)


@dataclass(frozen=True)
class NodeSpec:
    """One node of a region: its id, ports, data dir and names."""

    region: str
    index: int  # 0 for the region's first node
    ports: dict[str, int]  # http, grpc, site, link
    data: Path

    @property
    def id(self) -> str:
        return f"{self.region}-{self.index + 1}"

    @property
    def child(self) -> str:
        """Its name among the children (and its log's)."""
        return f"region {self.region}" + (f" node {self.index + 1}" if self.index else "")

    @property
    def link(self) -> str:
        """The suffix of its emulated links' names."""
        return self.region + (f"~{self.index + 1}" if self.index else "")


class DataDirInUse(CliError):
    """Another ``meridian up`` holds the data dir."""

    def __init__(self, message: str) -> None:
        super().__init__(message, preflight.UNAVAILABLE)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Ports:
    """Ports by role, remembered in ``ports.json`` and reused while free."""

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
        if port is not None and port not in taken and port_free(port):
            taken.add(port)
            return port
        port = free_port(taken)
        self.values[key] = port
        return port

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.values, indent=1, sort_keys=True))


class Cluster:
    """etcd, a node per region, the WAN emulator and the router, as children."""

    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self.topo = options.topology
        self.data = Path(options.data).resolve()
        self.logs = self.data / "logs"
        self.children: list[tuple[int, Child]] = []
        self.env = python_env()
        # The owner's password goes to the nodes alone (by environment, never
        # on a command line).
        self.env.pop(OWNER_PASSWORD_ENV, None)
        self.owner_password: str | None = None
        self.password_file = self.data / OWNER_PASSWORD_FILE
        self.tls_dir = self.data / TLS_DIR
        self.scheme = "https" if options.tls else "http"
        # How this process (and its clients) verify the cluster's HTTPS.
        self.client_ssl: ssl.SSLContext | None = None
        self.addr: dict[str, Any] = {}
        self._ports = Ports()
        self._taken: set[int] = set()
        self._lock_fd: int | None = None
        self._azure_connection = ""
        self.notes: list[str] = []  # what start() noticed and did about it
        for name in options.sources:
            if name in {r.name for r in self.topo.regions}:
                raise ValueError(f"source {name!r} has a region's name")

    # -- what runs where -----------------------------------------------------

    @property
    def router(self) -> str:
        return str(self.addr["router"])

    @property
    def etcd(self) -> str:
        return str(self.addr["etcd"])

    @property
    def regions(self) -> dict[str, dict[str, Any]]:
        return dict(self.addr.get("regions", {}))

    @property
    def ca(self) -> Path:
        """The local CA's certificate (``--tls``)."""
        return self.tls_dir / "ca.crt"

    @property
    def cert_dir(self) -> Path:
        """A directory holding only ``ca.crt``: skopeo's and podman's ``--cert-dir``."""
        return self.tls_dir / "client"

    @property
    def hosts_dir(self) -> Path:
        """containerd's hosts directory for the router (``ctr --hosts-dir``)."""
        return self.tls_dir / "hosts"

    def open(self, url: str, timeout: float = 2.0) -> Any:
        """``urllib.request.urlopen`` trusting the cluster's CA."""
        return urllib.request.urlopen(url, timeout=timeout, context=self.client_ssl)

    def get_json(self, url: str, timeout: float = 2.0) -> Any:
        with self.open(url, timeout) as resp:
            return json.loads(resp.read())

    def registry_answers(self, url: str) -> bool:
        """A registry's ``GET /v2/`` answers 200, or 401 (up, wants a token)."""
        try:
            with self.open(url) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        return registry_answers(status, body)

    def child(self, name: str) -> Child | None:
        for _, c in self.children:
            if c.name == name:
                return c
        return None

    def pids(self) -> dict[str, int]:
        return {c.name: c.pid for _, c in self.children}

    def rtt_ms(self, source: str, region: str) -> float:
        """Round trip between an emulated place (this site's regions, or a
        source of the options) and ``region``."""
        if source in self.options.sources:
            return float(self.options.sources[source][region])
        if source == region:
            return 0.0
        return self.topo.between(source, region).rtt_ms

    # -- start ---------------------------------------------------------------

    def _spawn(
        self, name: str, tier: int, argv: list[str], env: dict[str, str] | None = None
    ) -> Child:
        child = spawn(
            name,
            argv,
            self.logs / f"{name.replace(' ', '-')}.log",
            env=self.env if env is None else env,
            die_with_parent=True,
        )
        self.children.append((tier, child))
        return child

    def start(self) -> None:
        """Start everything, in order. Before anything is written: etcd (and
        with ``--storage azurite`` Azurite) must exist (MissingProgram), the
        data dir must not be another ``meridian up``'s (DataDirInUse) and the
        router's port must be free (CliError)."""
        etcd_binary = find_etcd()
        if self.options.storage == "azurite":
            from localcluster.azurite import find_azurite

            find_azurite()  # MissingProgram (with the install step) before anything starts
        created = self._lock()
        try:
            preflight.check_port(f"127.0.0.1:{self.options.port}", "--port")
        except CliError:
            self._unlock(remove=created)
            raise
        self._replace_stale_state()
        self.logs.mkdir(exist_ok=True)
        if self.options.auth:
            self._choose_owner_password()
        if self.options.tls:
            self._make_certificates()
        ports_file = self.data / "ports.json"
        self._ports = ports = Ports.load(ports_file)
        router_port = self.options.port
        self._taken = taken = {router_port}
        etcd_client = ports.get("etcd-client", taken)
        etcd_peer = ports.get("etcd-peer", taken)
        wan_control = ports.get("wan-control", taken)
        regions = self._node_specs(ports, taken)
        azurite_port = ports.get("azurite", taken) if self.options.storage == "azurite" else 0
        ports.save(ports_file)

        self._start_etcd(etcd_binary, etcd_client, etcd_peer)
        if azurite_port:
            self._start_azurite(azurite_port)
        control = self._start_wan(regions, wan_control)
        self._start_regions(regions)
        with contextlib.suppress(OSError, urllib.error.URLError):
            req = urllib.request.Request(
                f"http://{control}/sources",
                data=json.dumps(
                    {r.name: self.child(f"region {r.name}").pid for r in self.topo.regions}  # type: ignore[union-attr]
                ).encode(),
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(req, timeout=2).read()
        if self.options.auth:
            first = regions[self.topo.regions[0].name][0]
            self._check_owner(f"{self.scheme}://127.0.0.1:{first.ports['http']}")
        self.addr["router"] = self.start_router("router", port=router_port)
        if self.options.tls:
            self._write_hosts_dir()
        self.addr["regions"] = {}
        for r in self.topo.regions:
            nodes = [self._node_addr(n) for n in regions[r.name]]
            self.addr["regions"][r.name] = {
                **{k: v for k, v in nodes[0].items() if k not in ("id", "pid")},
                "rtt_ms": r.rtt_ms,
                "data": str(self.data / "regions" / r.name),
                "nodes": nodes,
            }
        self._write_state()

    def _node_specs(self, ports: Ports, taken: set[int]) -> dict[str, list[NodeSpec]]:
        """Every region's nodes, with their ports (the first node's keep the
        names they had before regions had several nodes)."""
        out: dict[str, list[NodeSpec]] = {}
        for r in self.topo.regions:
            rdir = self.data / "regions" / r.name
            out[r.name] = []
            for i in range(self.options.nodes_per_region):
                prefix = r.name if i == 0 else f"{r.name}~{i + 1}"
                p = {k: ports.get(f"{prefix}-{k}", taken) for k in ("http", "grpc", "site", "link")}
                spec = NodeSpec(r.name, i, p, rdir)
                if self.options.storage == "azurite":  # the store is Azurite: own dirs
                    spec = NodeSpec(r.name, i, p, rdir / spec.id)
                out[r.name].append(spec)
        return out

    def _node_addr(self, n: NodeSpec) -> dict[str, Any]:
        scheme = self.scheme
        http = f"{scheme}://127.0.0.1:{n.ports['http']}"
        child = self.child(n.child)
        return {
            "id": n.id,
            "pid": child.pid if child is not None else None,
            "node": http,
            "advertised": f"{scheme}://127.0.0.1:{n.ports['site']}"
            if self.options.emulate
            else http,
            "grpc": f"127.0.0.1:{n.ports['grpc']}",
            "grpc_advertised": f"127.0.0.1:{n.ports['link']}",
            "node_data": str(n.data),
        }

    def _start_azurite(self, port: int) -> None:
        from localcluster.azurite import Azurite

        az = Azurite(self.data / "azurite", port)
        az.start()
        assert az.child is not None
        self.children.append((ETCD, az.child))
        self.addr["azurite"] = az.blob_endpoint
        # The account key reaches the nodes by environment only.
        self._azure_connection = az.connection_string

    # -- identity and TLS ------------------------------------------------------

    def _choose_owner_password(self) -> None:
        """``MERIDIAN_OWNER_PASSWORD``, else the one kept from an earlier
        start of this data dir, else a new one; kept in
        ``<data>/owner-password`` (mode 0600) either way. An owner exists
        once: a password from the environment that differs from the kept
        one is noted and not used (the owner's password is not changed by a
        restart)."""
        from_env = os.environ.get(OWNER_PASSWORD_ENV) or None
        try:
            kept: str | None = self.password_file.read_text().strip() or None
        except FileNotFoundError:
            kept = None
        if kept is not None and from_env is not None and from_env != kept:
            self.notes.append(
                f"{OWNER_PASSWORD_ENV} differs from the owner password this data dir was "
                f"created with (in {self.password_file}); the owner keeps that one"
            )
        password = kept or from_env or generate(18)
        if password != kept:
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        os.chmod(self.password_file, 0o600)
        self.owner_password = password

    def _check_owner(self, node: str) -> None:
        """Whether the owner's password is the cluster's (a data dir whose
        password file was replaced or removed, say): one login at a node."""
        assert self.owner_password is not None
        basic = base64.b64encode(f"{OWNER}:{self.owner_password}".encode()).decode()
        req = urllib.request.Request(
            node + "/oauth2/token", headers={"Authorization": f"Basic {basic}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.client_ssl) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 401:
                self.notes.append(
                    f"the owner password in {self.password_file} is not accepted: this "
                    "cluster's owner was created with another one (set "
                    f"{OWNER_PASSWORD_ENV} to it, or start on a new --data)"
                )
        except OSError:
            pass

    def _make_certificates(self) -> None:
        """The local CA (made once, kept) and certificates for the router and
        every region (made at every start), for 127.0.0.1 and localhost; the
        CA alone in ``tls/client/`` for skopeo's and podman's ``--cert-dir``."""
        ca, _ = pki.ensure_ca(self.tls_dir, "Meridian local cluster CA")
        hosts = ["127.0.0.1", "localhost"]
        if self.options.domain:  # every registry's host name
            hosts.append(f"*.{self.options.domain}")
        for leaf in ["router", *(f"region-{r.name}" for r in self.topo.regions)]:
            pki.issue(self.tls_dir, leaf, hosts)
        self.cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(ca, self.cert_dir / "ca.crt")
        self.client_ssl = ssl.create_default_context(cafile=str(ca))

    def _domain(self) -> list[str]:
        return ["--domain", self.options.domain] if self.options.domain else []

    def _workers(self) -> list[str]:
        """``--workers N`` for nodes and routers (none for one process)."""
        n = self.options.workers
        return ["--workers", str(n)] if n > 1 else []

    def hosts_line(self, registry: str) -> str:
        """The /etc/hosts line a client needs to reach ``registry`` by name."""
        return f"127.0.0.1 {registry}.{self.options.domain}"

    def _leaf(self, name: str) -> list[str]:
        """``--tls-cert``/``--tls-key`` for a leaf certificate (``--tls``)."""
        if not self.options.tls:
            return []
        d = self.tls_dir
        return ["--tls-cert", str(d / f"{name}.crt"), "--tls-key", str(d / f"{name}.key")]

    def _write_hosts_dir(self) -> None:
        """containerd's hosts.toml for the router, trusting the CA."""
        host = self.router.split("://", 1)[1]
        d = self.hosts_dir / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(
            f'server = "{self.router}"\n\n'
            f'[host."{self.router}"]\n'
            '  capabilities = ["pull", "resolve", "push"]\n'
            f'  ca = "{self.ca}"\n'
        )

    # -- the data dir is ours -------------------------------------------------

    def _lock(self) -> bool:
        """Hold ``<data>/up.lock`` (flock) while this cluster runs: a second
        ``meridian up`` on the same data dir is refused at once, naming the
        PID in it, before it writes anything. Whether it created the data dir."""
        created = not self.data.exists()
        self.data.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data / UP_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(
                f"{self.data} is in use by meridian up (PID {holder}); stop that one first "
                f"(Ctrl-C where it runs, or kill {holder}) or choose another --data"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return created

    def _unlock(self, remove: bool = False) -> None:
        if self._lock_fd is None:
            return
        if remove:  # refused before anything: leave no trace
            with contextlib.suppress(OSError):
                (self.data / UP_LOCK).unlink()
                self.data.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _replace_stale_state(self) -> None:
        """An ``up.json`` here while we hold the lock was left by a
        ``meridian up`` that died without cleaning up (SIGKILL): say so,
        stop what it started that is still running, and remove it."""
        path = self.data / UP_STATE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            state = {}
        pid = state.get("pid") if isinstance(state, dict) else None
        self.notes.append(f"replacing {path} left by meridian up PID {pid}, which is not running")
        leftovers = []
        for name, c in (state.get("children") or {}).items() if isinstance(state, dict) else ():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                if procfs.cmdline(int(c["pid"])) == list(c["cmd"]):
                    leftovers.append((name, int(c["pid"])))
        for name, child_pid in leftovers:
            self.notes.append(f"stopping {name} (PID {child_pid}), left running by it")
            stop_pid(child_pid)
        path.unlink()

    def _start_etcd(self, binary: str, client_port: int, peer_port: int) -> None:
        etcd_dir = self.data / "etcd"
        peer_url = f"http://127.0.0.1:{peer_port}"
        meta = self.data / "etcd-urls.json"
        extra = [
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "10000",
            "--log-level", "warn",
        ]  # fmt: skip
        if etcd_dir.exists() and meta.exists():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(meta.read_text()).get("peer") != peer_url:
                    extra.append("--force-new-cluster")  # one member, new peer address
        child = start_etcd(
            etcd_dir,
            self.logs / "etcd.log",
            binary=binary,
            client_port=client_port,
            peer_port=peer_port,
            extra=extra,
            env=self.env,
            die_with_parent=True,
        )
        self.children.append((ETCD, child))
        client_url = child.extra["client_url"]
        meta.write_text(json.dumps({"client": client_url, "peer": peer_url}))
        self.addr["etcd"] = client_url

    def _wan_links(self, regions: dict[str, list[NodeSpec]]) -> list[dict[str, Any]]:
        links = []
        for r in self.topo.regions:
            for n in regions[r.name]:
                links += self._node_links(r, n)
        return links

    def _node_links(self, r: topo.RegionSpec, n: NodeSpec) -> list[dict[str, Any]]:
        p = n.ports
        site: dict[str, Any] = {
            "name": f"site>{n.link}",
            "listen": f"127.0.0.1:{p['site']}",
            "target": f"127.0.0.1:{p['http']}",
            "latency": r.rtt_ms / 2000,
            "bandwidth": r.bandwidth,
        }
        if self.options.sources:
            site["identify"] = True
            site["source_latency"] = {
                s: self.rtt_ms(s, r.name) / 2000 for s in self.options.sources
            }
        link = {
            "name": f"regions>{n.link}",
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
        return [site, link]

    def _start_wan(self, regions: dict[str, list[NodeSpec]], control_port: int) -> str:
        wan_cfg = self.data / "wan.json"
        wan_cfg.write_text(json.dumps({"links": self._wan_links(regions)}, indent=1))
        control = f"127.0.0.1:{control_port}"
        argv = [sys.executable, "-m", "localcluster.wan", "--config", str(wan_cfg)]
        child = self._spawn("wan", WAN, [*argv, "--control", control])
        child.wait_ready(check=lambda: get_json(f"http://{control}/healthz")["status"] == "ok")
        self.addr["wan"] = f"http://{control}"
        return control

    def _start_regions(self, regions: dict[str, list[NodeSpec]]) -> None:
        started: list[tuple[Child, str]] = []
        for r in self.topo.regions:
            for n in regions[r.name]:
                started.append(self._start_node(n))
        for child, url in started:
            child.wait_ready(
                check=lambda url=url: self.registry_answers(url), timeout=60, interval=0.1
            )

    def _start_node(self, n: NodeSpec) -> tuple[Child, str]:
        p = n.ports
        n.data.mkdir(parents=True, exist_ok=True)
        http = f"127.0.0.1:{p['http']}"
        advertise = f"127.0.0.1:{p['site']}" if self.options.emulate else http
        env = dict(self.env)
        if self.options.auth:
            auth = ["--auth", "--trusted-proxies", TRUSTED_PROXIES]
            assert self.owner_password is not None
            env[OWNER_PASSWORD_ENV] = self.owner_password
        else:
            auth = ["--no-auth"]
        storage: list[str] = []
        if self.options.storage == "azurite":
            storage = ["--storage", "azure"]
            env[AZURE_CONNECTION_ENV] = self._azure_connection
        child = self._spawn(
            n.child,
            REGIONS,
            meridian_argv(
                "node",
                "--region", n.region,
                "--node-id", n.id,
                "--listen", http,
                "--data", str(n.data),
                "--etcd", self.addr["etcd"],
                "--grpc-listen", f"127.0.0.1:{p['grpc']}",
                "--grpc-advertise", f"127.0.0.1:{p['link']}",
                "--advertise", f"{self.scheme}://{advertise}",
                *storage,
                *auth,
                *self._domain(),
                "--reclaim-interval", str(self.options.reclaim_interval),
                "--reclaim-grace", str(self.options.reclaim_grace),
                "--usage-interval", str(self.options.usage_interval),
                *self._workers(),
                *self._leaf(f"region-{n.region}"),
            ),
            env,
        )  # fmt: skip
        return child, f"{self.scheme}://{http}/v2/"

    def start_router(self, name: str, *, source: str | None = None, port: int = 0) -> str:
        """Start a router (``name`` in the status and logs) on ``port`` (a
        free one by default) and wait until every region is in its rotation;
        its URL. With ``source`` (one of the options' sources) its process
        carries ``--region <source>``, so the emulator applies that source's
        latencies to its connections."""
        port = port or free_port(self._taken)
        url = f"{self.scheme}://127.0.0.1:{port}"
        args = ["router", "--etcd", self.addr["etcd"], "--listen", f"127.0.0.1:{port}"]
        args += [*self._domain(), *self._workers()]
        if self.options.tls:
            args += [*self._leaf("router"), "--tls-ca", str(self.ca)]
        if source is None:
            argv = meridian_argv(*args)
        else:
            argv = [sys.executable, "-c", _ROUTER_AS, "--region", source, *args]
        child = self._spawn(name, ROUTERS, argv)
        want = len(self.topo.regions)
        child.wait_ready(
            check=lambda: (
                sum(r["up"] for r in self.get_json(url + "/meridian/v1/router")["regions"]) >= want
            ),
            timeout=60,
            interval=0.1,
        )
        return url

    def _write_state(self) -> None:
        state = {
            **self.addr,
            "pid": os.getpid(),
            "data": str(self.data),
            "logs": str(self.logs),
            "children": {
                c.name: {"pid": c.pid, "log": str(c.log), "cmd": c.argv} for _, c in self.children
            },
            "topology": self.topo.as_dict(),
            "auth": self.options.auth,
            "domain": self.options.domain or None,
            "workers": self.options.workers,  # processes per node and per router
            # Where the owner's password is (never the password itself).
            "owner": {"user": OWNER, "password_file": str(self.password_file)}
            if self.options.auth
            else None,
            "tls": {
                "ca": str(self.ca),
                "cert_dir": str(self.cert_dir),
                "hosts_dir": str(self.hosts_dir),
            }
            if self.options.tls
            else None,
        }
        tmp = self.data / (UP_STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.data / UP_STATE)

    # -- report --------------------------------------------------------------

    def summary(self) -> str:
        rows = [("router", self._pid("router"), self.addr["router"], "the endpoint clients use")]
        rows.append(("etcd", self._pid("etcd"), self.addr["etcd"], f"data {self.data / 'etcd'}"))
        rows.append(("wan emulator", self._pid("wan"), self.addr["wan"], "control API"))
        if self.options.auth:
            rows.append(
                (
                    "owner",
                    "-",
                    f"user {OWNER}",
                    f"password {self.owner_password} (kept in {self.password_file}, mode 0600)",
                )
            )
        if "azurite" in self.addr:
            rows.append(
                (
                    "azurite",
                    self._pid("azurite"),
                    self.addr["azurite"],
                    f"blob storage emulator, a container per region; data {self.data / 'azurite'}",
                )
            )
        for r in self.topo.regions:
            a = self.addr["regions"][r.name]
            several = len(a["nodes"]) > 1
            for n in a["nodes"]:
                rows.append(
                    (
                        f"region {r.name}" + (f" {n['id']}" if several else ""),
                        str(n["pid"] or "-"),
                        n["advertised"],
                        f"{r.rtt_ms:g} ms RTT from here; node {n['node']}, gRPC {n['grpc']} "
                        f"(via {n['grpc_advertised']})",
                    )
                )
        width = max(len(r[0]) for r in rows)
        per = self.options.nodes_per_region
        workers = self.options.workers
        lines = [
            f"Meridian is up: {len(self.topo.regions)} regions"
            + (f" of {per} nodes each" if per > 1 else "")
            + (f", {workers} processes per node and router" if workers > 1 else "")
            + f" on loopback, blobs on {self.options.storage} "
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
        lines += ["", *self._howto()]
        lines += [
            "",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)

    def _howto(self) -> list[str]:
        """How to log in, point clients at the CA, and try it."""
        router = self.addr["router"]
        host = router.split("://", 1)[1]
        ref = f"{host}/library/alpine:latest"
        pw = self.password_file
        if self.options.tls:
            verify = f"--cert-dir {self.cert_dir}"
            lines = [
                f"HTTPS with a local CA ({self.ca}); point clients at it:",
                f"  skopeo, podman: --cert-dir {self.cert_dir} (it holds ca.crt), or copy "
                f"ca.crt to /etc/containers/certs.d/{host}/",
                f"  containerd:     --hosts-dir {self.hosts_dir} (hosts.toml with ca = ...)",
                f"  curl:           --cacert {self.ca}",
                "",
            ]
            copy_verify = f"--dest-cert-dir {self.cert_dir}"
            ctr = f"ctr images pull --hosts-dir {self.hosts_dir}"
            curl = f"curl -s --cacert {self.ca}"
        else:
            verify = "--tls-verify=false"
            lines = ["Plain HTTP on loopback (meridian up --tls for HTTPS):"]
            copy_verify = "--dest-tls-verify=false"
            ctr = "ctr images pull --plain-http"
            curl = "curl -s"
        if self.options.auth:
            lines += [
                f"Log in as {OWNER} (the password is in {pw}):",
                f"  skopeo login {verify} -u {OWNER} --password-stdin {host} < {pw}",
                f"  podman login {verify} -u {OWNER} --password-stdin {host} < {pw}",
            ]
            ctr += f' --user "{OWNER}:$(cat {pw})"'
        else:
            lines += [
                "AUTHENTICATION IS OFF (--no-auth): anyone who can reach the cluster may "
                "push, pull and delete anything.",
            ]
        lines += [
            "Try it:",
            f"  skopeo copy {copy_verify} docker://docker.io/library/alpine:latest docker://{ref}",
            f"  skopeo inspect {verify} docker://{ref}",
            f"  {ctr} {ref}",
            f"  meridian regions --etcd {self.addr['etcd']}",
            f"  {curl} {router}/meridian/v1/router",
        ]
        if self.options.domain:
            port = host.rpartition(":")[2]
            lines += [
                f"Registries of their own answer on <name>.{self.options.domain}:{port}:",
                "  meridian registry create myregistry1 --sku Premium",
                "  then, since Go clients (skopeo, ctr) resolve names only through /etc/hosts "
                "and DNS, add:",
                f"  {self.hosts_line('myregistry1')}",
            ]
        return lines

    def _pid(self, name: str) -> str:
        c = self.child(name)
        return "-" if c is None else str(c.pid)

    def status_line(self) -> str:
        """Regions in rotation with their RTT, replication backlog, requests
        routed, and which children exited."""
        parts = []
        try:
            st = self.get_json(self.addr["router"] + "/meridian/v1/router", timeout=0.5)
            regions = st["regions"]
            up = [r for r in regions if r["up"]]
            parts.append(f"regions {len(up)}/{len(regions)} in rotation")
            parts.append(
                ", ".join(
                    (
                        f"{r['region']} {r['rtt_ms']:.0f}ms"
                        if r["up"] and r["rtt_ms"] is not None
                        else f"{r['region']} DOWN"
                    )
                    + _nodes_up(r)
                    for r in sorted(regions, key=lambda r: (not r["up"], r["rtt_ms"] or 0))
                )
            )
            backlog = [r["backlog"] for r in regions if r.get("backlog") is not None]
            parts.append(f"backlog {sum(backlog):.0f}" if backlog else "backlog ?")
            routed = sum(r["routed"] for r in regions)
            redirected = sum(r["redirected"] for r in regions)
            parts.append(f"routed {routed} ({redirected} redirects)")
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
            parts.append("router not answering")
        dead = [c.name for _, c in self.children if not c.running()]
        if dead:
            parts.append("exited: " + ", ".join(dead))
        return time.strftime("%H:%M:%S ") + " | ".join(parts)

    # -- stop ----------------------------------------------------------------

    def stop(self) -> None:
        """Routers, then regions, the emulator, etcd: each tier by PID
        (SIGTERM, SIGKILL after 10 s)."""
        for tier in sorted({t for t, _ in self.children}, reverse=True):
            stop_all([c for t, c in self.children if t == tier], STOP_GRACE)
        with contextlib.suppress(OSError):
            (self.data / UP_STATE).unlink()
        self._unlock()


def _nodes_up(row: dict[str, Any]) -> str:
    """`` (2/3 nodes)`` for a region of several nodes in a router status row."""
    nodes = row.get("nodes") or []
    if len(nodes) < 2:
        return ""
    return f" ({sum(1 for n in nodes if n.get('up'))}/{len(nodes)} nodes)"


def _out(stream: IO[str], text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.write(text)
        stream.flush()


def options_from(cfg: UpConfig) -> ClusterOptions:
    """The cluster ``meridian up``'s flags describe (TopologyError if wrong)."""
    if cfg.nodes_per_region > MAX_NODES_PER_REGION:
        raise topo.TopologyError(
            f"--nodes-per-region {cfg.nodes_per_region}: at most {MAX_NODES_PER_REGION}"
        )
    if cfg.config:
        topology = topo.load(cfg.config)
        if cfg.regions:
            topology = topology.first(cfg.regions)
    else:
        topology = topo.default(cfg.regions or 3)
    return ClusterOptions(
        data=Path(cfg.data),
        topology=topology,
        port=cfg.port,
        status_interval=cfg.status_interval,
        auth=cfg.auth,
        tls=cfg.tls,
        nodes_per_region=cfg.nodes_per_region,
        storage=cfg.storage,
        domain=cfg.domain.strip().lower().strip("."),
        reclaim_interval=cfg.reclaim_interval,
        reclaim_grace=cfg.reclaim_grace,
        usage_interval=cfg.usage_interval,
        workers=cfg.workers,
    )


def up_main(argv: list[str]) -> int:
    p = preflight.Parser(
        prog="meridian up",
        description="a complete local multi-region cluster on loopback: etcd, regions, "
        "a WAN emulator and the router, in the foreground until Ctrl-C",
    )
    settings.add_arguments(p, UpConfig)
    cfg = settings.from_args(UpConfig, p.parse_args(argv))
    try:
        options = options_from(cfg)
    except topo.TopologyError as e:
        print(f"meridian up: {e}", file=sys.stderr)
        return 2
    if not 0 < options.port < 65536:
        print("meridian up: --port must be between 1 and 65535", file=sys.stderr)
        return 2

    cluster = Cluster(options)
    stop_signal: list[int] = []
    prog = "meridian up"
    if not options.auth:
        print(
            f"{prog}: AUTHENTICATION IS OFF (--no-auth): anyone who can reach the cluster "
            "may push, pull and delete anything",
            file=sys.stderr,
            flush=True,
        )

    def on_signal(signum: int, _frame: Any) -> None:
        stop_signal.append(signum)
        if len(stop_signal) == 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        try:
            cluster.start()
        except CliError as e:  # refused before starting anything
            print(f"{prog}: {e}", file=sys.stderr)
            code = e.code
            return code
        except MissingProgram as e:
            print(f"{prog}: {e}", file=sys.stderr)
            code = preflight.UNAVAILABLE
            return code
        except StartError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            code = preflight.FAILED
            return code
        finally:
            for note in cluster.notes:
                print(f"{prog}: {note}", flush=True)
        print(cluster.summary(), flush=True)
        # On a terminal the status line is redrawn in place; elsewhere (a
        # file, a pipe) a line every --status-interval.
        tty = sys.stdout.isatty()
        while True:
            line = cluster.status_line()
            _out(sys.stdout, "\r\x1b[K" + line if tty else line + "\n")
            time.sleep(options.status_interval)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cluster.children:
            storage = ", Azurite" if options.storage == "azurite" else ""
            _out(sys.stdout, f"\nstopping: router, regions, WAN emulator, etcd{storage} ...\n")
            cluster.stop()
            _out(sys.stdout, "stopped\n")
    return code
