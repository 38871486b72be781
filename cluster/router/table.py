"""The router's table of regions: endpoints, health, latency, ranking.

``RegionTable`` mirrors the region records of the namespace
(``/meridian/regions/<name>``) and keeps, for each region:

- one aiohttp client session (its own connection pool) to the region's
  advertised HTTP endpoint;
- an active probe: ``GET /healthz`` every ``probe_interval`` (0.5 s) with a
  ``probe_timeout`` (1 s). A probe fails on a connection error, a timeout,
  a non-200 answer or an answer from another region (``{"region": ...}`` must
  be the record's name: a record pointing at the wrong endpoint never gets
  traffic). One failed probe takes the region out of rotation; two
  consecutive good probes put it back. A region that dies is out within
  ``probe_interval``; one that hangs (accepts connections, never answers)
  within ``probe_interval + probe_timeout`` (1.5 s);
- passive signals from real requests (``report_*``): connection errors and
  timeouts take a region out at once, repeated 5xx answers after three in a
  row, and the latency of small requests feeds the same estimate as probes;
- a smoothed round-trip time (EWMA, like TCP's SRTT/RTTVAR) and a p95 over
  the last 64 samples (the hedging delay) -- with the health above, the
  tracker ``cluster.health.Health`` that the nodes use for their peers too;
- what the region says about itself (``GET /meridian/v1/status``, the
  contract in ``cluster/status.py``, read every ``status_interval``): its
  gRPC round-trip time to every other region it reaches and its
  replication backlog.

``ranked(holders)`` orders the regions for one request: healthy regions by
the expected time to serve it, then (as a last resort) the regions out of
rotation. A region that holds the content costs its RTT; one that does not
(the namespace has no placement for it there yet) costs its RTT plus a
read-through from its nearest healthy holder (the holder link's RTT as the
region measures it, or -- unknown -- the router's own RTT to the holder) plus
a small penalty. So the nearest healthy region wins unless the content is
only elsewhere and fetching it through would be slower than going there.

``holders_first(holders)`` is the order for a blob redirect, which must send
the client to a complete copy: the healthy holders nearest first, then the
rest as ``ranked`` orders them (see ``cluster.router.proxy``).

Many nodes per region (``Namespace.nodes()``): every node of a region gets
its own entry (a ``Region`` with its ``node`` id, its own session, probes
and health). ``regions[name]`` is the region's main entry (the endpoint of
its record); the others are ``siblings[name]``. The orders above hold
entries: a region's healthy nodes stand together and take turns at its
place (round robin per request), so a retry or hedge after a failed node
goes to its sibling first, and a region is in rotation (``region_up``, the
``region_up`` gauge, status) while any of its nodes is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import Gauge

from cluster.health import Health
from cluster.namespace import NodeInfo, RegionInfo
from cluster.status import PATH as STATUS_PATH
from cluster.status import NodeStatus

log = logging.getLogger("meridian.router")

# Every router process (--workers) probes: the latest measurement wins.
REGION_UP = Gauge(
    "meridian_router_region_up",
    "1 when the region is in rotation",
    ["region"],
    multiprocess_mode="livemostrecent",
)
REGION_RTT = Gauge(
    "meridian_router_region_rtt_seconds",
    "Smoothed round trip to the region",
    ["region"],
    multiprocess_mode="livemostrecent",
)

READTHROUGH_PENALTY = 0.002  # seconds: a fetch-through does more work than a local read
UNKNOWN_RTT = 1.0  # cost of a region never measured (ranks after every measured one)


@dataclass
class TableSettings:
    probe_interval: float = 0.5
    probe_timeout: float = 1.0
    connect_timeout: float = 1.0
    read_timeout: float = 60.0
    status_interval: float = 2.0
    up_after: int = 2  # consecutive good probes to come back
    fail_after: int = 3  # consecutive 5xx answers to go out
    pool_size: int = 512
    ssl_context: ssl.SSLContext | None = None  # verifies HTTPS regions (None: the system's roots)


def normalize_base(url: str) -> tuple[str, str]:
    """(base URL without trailing slash, "") or ("", why it is unusable)."""
    if not isinstance(url, str) or not url:
        return "", "no http endpoint"
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        return "", f"bad endpoint URL {url!r}: {e}"
    if u.scheme not in ("http", "https") or not u.hostname:
        return "", f"bad endpoint URL {url!r}"
    if u.query or u.fragment or u.username:
        return "", f"bad endpoint URL {url!r}"
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    netloc = host if port is None else f"{host}:{port}"
    return f"{u.scheme}://{netloc}{u.path.rstrip('/')}", ""


class Region(Health):
    """One region as the router sees it: its endpoint and session, and its
    health and latency (``cluster.health.Health``)."""

    def __init__(
        self, info: RegionInfo, settings: TableSettings, node: str = "", *, main: bool = True
    ) -> None:
        base, invalid = normalize_base(info.http)
        super().__init__(
            info.name,
            up=False,
            reason=invalid or "not probed yet",
            up_after=settings.up_after,
            fail_after=settings.fail_after,
        )
        self.info = info
        self.settings = settings
        self.base, self.invalid = base, invalid
        self.session: aiohttp.ClientSession | None = None
        self.alive = False  # its leased liveness key exists
        self.peers: dict[str, float] = {}  # region -> its gRPC RTT there (s)
        self.backlog: int | None = None
        self.backlog_bytes: int | None = None
        self.routed = 0
        self.redirected = 0
        self.node = node  # the node's id ("" when the region's nodes are not known)
        self.main = main  # the region's main entry (its gauges are the region's)
        self.task: asyncio.Task[None] | None = None  # its probe loop
        self._gauges = (REGION_UP.labels(self.name), REGION_RTT.labels(self.name))

    # -- latency -----------------------------------------------------------

    def observe(self, seconds: float) -> None:
        super().observe(seconds)
        if self.srtt is not None and self.main:
            self._gauges[1].set(self.srtt)

    @property
    def key(self) -> str:
        """What names this entry in an upload pin: ``region`` or ``region/node``."""
        return f"{self.name}/{self.node}" if self.node else self.name

    @property
    def cost(self) -> float:
        return UNKNOWN_RTT if self.srtt is None else self.srtt

    def hedge_delay(self) -> float:
        """How long to wait for this region before asking the next one: about
        its p95 latency (never less than 1.5 x its smoothed RTT + 1 ms)."""
        if self.srtt is None:
            return 0.25
        return max(self.p95 or 0.0, 1.5 * self.srtt) + 0.001

    def attempt_timeout(self, last: float) -> float:
        """How long one attempt may wait for response headers before the
        region is judged hung and the next is tried (``last`` for the final
        candidate)."""
        if self.srtt is None:
            return min(last, 2.0)
        return min(last, max(0.5, 8 * self.srtt + 0.3))

    # -- health ------------------------------------------------------------

    def set_up(self, up: bool, reason: str) -> bool:
        if not super().set_up(up, reason):
            return False
        if self.main:
            self._gauges[0].set(1 if up else 0)
        log.info(
            "region %s%s %s: %s",
            self.name,
            f" node {self.node}" if self.node else "",
            "in rotation" if up else "out of rotation",
            reason,
        )
        return True

    def as_dict(self) -> dict:
        return {
            "region": self.name,
            "node": self.node,
            "http": self.info.http,
            "grpc": self.info.grpc,
            "up": self.up,
            "reason": self.reason,
            "alive": self.alive,
            "since": round(self.changed, 3),
            "rtt_ms": None if self.srtt is None else round(self.srtt * 1000, 3),
            "p95_ms": None if self.p95 is None else round(self.p95 * 1000, 3),
            "hedge_ms": round(self.hedge_delay() * 1000, 3),
            "peers_rtt_ms": {k: round(v * 1000, 3) for k, v in sorted(self.peers.items())},
            "backlog": self.backlog,
            "backlog_bytes": self.backlog_bytes,
            "routed": self.routed,
            "redirected": self.redirected,
            "errors": self.errors,
            "probes": self.probes,
            "probe_failures": self.probe_failures,
        }


class RegionTable:
    def __init__(self, settings: TableSettings | None = None) -> None:
        self.settings = settings or TableSettings()
        self.regions: dict[str, Region] = {}  # each region's main entry
        self.siblings: dict[str, dict[str, Region]] = {}  # region -> node -> its other nodes
        self._turn: dict[str, int] = {}  # region -> round-robin counter among its nodes
        self._order: list[Region] = []  # healthy by cost, then the rest
        self._closed = False
        self.changed = asyncio.Event()  # set on every up/down change (tests, status)

    # -- membership --------------------------------------------------------

    def sync(
        self,
        infos: dict[str, RegionInfo],
        alive: set[str],
        nodes: dict[str, dict[str, NodeInfo]] | None = None,
    ) -> None:
        """Make the table match the namespace's region records and (given)
        each region's live nodes."""
        if self._closed:
            return
        for name in list(self.regions):
            if name not in infos:
                self._drop(name)
        for name, info in infos.items():
            want: dict[str, tuple[str, RegionInfo]] = {}  # base URL -> (node, its info)
            for node, n in sorted((nodes or {}).get(name, {}).items()):
                base = normalize_base(n.http)[0]
                if base and base not in want:
                    want[base] = (node, RegionInfo(name, n.http, n.grpc))
            pool = {m.base: m for m in self.siblings.pop(name, {}).values()}
            r = self.regions.get(name)
            if r is not None and r.info.http != info.http:
                del self.regions[name]
                if r.base and r.base not in pool:
                    pool[r.base] = r  # still a node of the region, maybe
                else:
                    self._close(r)
                r = None
            if r is None:
                base = normalize_base(info.http)[0]
                r = pool.pop(base, None) if base else None
                if r is None:
                    r = self._new(info)
                self.regions[name] = r
            r.info, r.main = info, True
            r.node = want[r.base][0] if r.base in want else ""
            sibs: dict[str, Region] = {}
            for base, (node, ninfo) in want.items():
                if base == r.base:
                    continue
                s = pool.pop(base, None) or self._new(ninfo)
                s.info, s.node, s.main = ninfo, node, False
                sibs[node] = s
            if sibs:
                self.siblings[name] = sibs
            for s in pool.values():
                self._close(s)
            for m in self.members(name):
                m.alive = name in alive
        self._reorder()

    def _new(self, info: RegionInfo) -> Region:
        r = Region(info, self.settings)
        if r.base:
            r.session = self._session()
            r.task = asyncio.create_task(self._probe_loop(r), name=f"probe-{info.name}")
        else:
            log.warning("region %s: %s", info.name, r.invalid)
        return r

    def _close(self, r: Region) -> None:
        if r.task is not None:
            r.task.cancel()
        if r.session is not None:
            asyncio.create_task(_close_later(r.session, r.task))

    def members(self, name: str) -> list[Region]:
        """A region's entries: its main one, then its other nodes."""
        main = self.regions.get(name)
        return ([main] if main is not None else []) + list(self.siblings.get(name, {}).values())

    def entries(self) -> list[Region]:
        return [m for name in self.regions for m in self.members(name)]

    def region_up(self, name: str) -> bool:
        """In rotation: any of its nodes is."""
        return any(m.up for m in self.members(name))

    def entry(self, key: str) -> Region | None:
        """The entry an upload pin names (``Region.key``); a node that is gone
        gives way to its region's nearest healthy node (a shared data dir
        has the session), else the main entry."""
        name, _, node = key.partition("/")
        main = self.regions.get(name)
        if not node or main is None or main.node == node:
            return main
        s = self.siblings.get(name, {}).get(node)
        if s is not None:
            return s
        up = [m for m in self._order if m.name == name and m.up]
        return up[0] if up else main

    def _session(self) -> aiohttp.ClientSession:
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=s.pool_size,
            limit_per_host=0,
            keepalive_timeout=30,
            ttl_dns_cache=10,
            ssl=s.ssl_context if s.ssl_context is not None else True,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout
            ),
        )

    def _drop(self, name: str) -> None:
        gone = self.members(name)
        self.regions.pop(name, None)
        self.siblings.pop(name, None)
        self._turn.pop(name, None)
        if gone:
            with contextlib.suppress(KeyError):
                REGION_UP.remove(name)
                REGION_RTT.remove(name)
        for r in gone:
            self._close(r)

    async def close(self) -> None:
        self._closed = True
        entries = self.entries()
        tasks = [r.task for r in entries if r.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for r in entries:
            if r.session is not None:
                await r.session.close()

    # -- ranking -----------------------------------------------------------

    def _reorder(self) -> None:
        regions = [r for r in self.entries() if r.base]
        up = sorted((r for r in regions if r.up), key=_cost_key)
        down = sorted((r for r in regions if not r.up), key=_down_key)
        self._order = up + down

    def nearest(self) -> list[Region]:
        return self._spread(self._order)

    def _spread(self, order: list[Region]) -> list[Region]:
        """``order`` with each region's healthy nodes together at the place
        of its first, taking turns (one step per call) at the head."""
        groups: dict[str, list[Region]] = {}
        for r in order:
            if r.up:
                groups.setdefault(r.name, []).append(r)
        if all(len(g) < 2 for g in groups.values()):
            return order
        out: list[Region] = []
        for r in order:
            if not r.up:
                out.append(r)
                continue
            g = groups.pop(r.name, None)
            if g is None:
                continue  # placed with its region
            if len(g) > 1:
                k = self._turn.get(r.name, 0)
                self._turn[r.name] = k + 1
                k %= len(g)
                g = g[k:] + g[:k]
            out.extend(g)
        return out

    def ranked(self, holders: Collection[str] | None = None) -> list[Region]:
        """Candidates for a request, best first (see the module docstring).
        After the best one come the healthy holders, then the other healthy
        regions, then the regions out of rotation: a retry or a hedge goes to
        a region that has the content before one that would fetch it."""
        return self._spread(self._ranked(holders))

    def _ranked(self, holders: Collection[str] | None) -> list[Region]:
        order = self._order
        if not holders or not order:
            return order
        held = holders if isinstance(holders, set | frozenset) else set(holders)
        live = [r for r in order if r.up and r.name in held]
        if not live:
            return order  # nobody healthy holds it: nearest first
        first = order[0]
        if first.name not in held:

            def cost(r: Region) -> float:
                if r.name in held:
                    return r.cost
                through = min(r.peers.get(h.name, h.cost) for h in live)
                return r.cost + through + READTHROUGH_PENALTY

            first = min((r for r in order if r.up), key=cost)
        return [first] + sorted(
            (r for r in order if r is not first), key=lambda r: (not r.up, r.name not in held)
        )

    def holders_first(self, holders: Collection[str] | None) -> list[Region]:
        """Candidates for a blob redirect: the healthy regions that hold the
        blob per the namespace's placements (recorded only once a region's
        copy is whole and verified), nearest first; then the others in
        ``ranked`` order, for when no healthy holder answers. Never a region
        that would read the blob through while a healthy holder exists."""
        order = self._ranked(holders)
        if not holders:
            return self._spread(order)
        held = holders if isinstance(holders, set | frozenset) else set(holders)
        live = [r for r in self._order if r.up and r.name in held]
        if not live:
            return self._spread(order)
        return self._spread(live + [r for r in order if r not in live])

    @staticmethod
    def within(
        cands: list[Region], replicas: Collection[str] | None, *, only: bool
    ) -> list[Region]:
        """``cands`` for a registry held in ``replicas`` only (its config's
        ``replicas``; None: every region): those regions first, in their
        order; with ``only`` (writes: pushes go to a replica region), those
        alone -- unless the table knows none of them, then ``cands``."""
        if not replicas:
            return cands
        inside = [r for r in cands if r.name in replicas]
        if only or not inside:
            return inside or cands
        return inside + [r for r in cands if r.name not in replicas]

    def status(self) -> list[dict]:
        """One row per region (its main entry's), up while any node is; with
        ``nodes`` (each node's row) when the region's nodes are known."""
        out = []
        for name in sorted(self.regions):
            members = self.members(name)
            row = members[0].as_dict()
            if any(m.node for m in members):
                row["nodes"] = [m.as_dict() for m in members]
                up = [m for m in members if m.up]
                row["up"] = bool(up)
                if up and not members[0].up:
                    row["reason"] = f"node {up[0].node}: {up[0].reason}"
            out.append(row)
        return out

    # -- signals -----------------------------------------------------------

    def _after_change(self) -> None:
        self._reorder()
        for name in self.regions:
            if name in self.siblings:
                REGION_UP.labels(name).set(1 if self.region_up(name) else 0)
        self.changed.set()

    def report_ok(self, r: Region, latency: float | None) -> None:
        """A request to ``r`` was answered (below 500)."""
        r.request_ok(latency)
        if latency is not None:
            self._reorder()

    def report_slow(self, r: Region, waited: float) -> None:
        """A request to ``r`` lost to a hedge (or was abandoned) after
        ``waited`` seconds: it is at least that slow. A lower bound only ever
        raises the estimate."""
        if r.slow(waited):
            self._reorder()

    def report_error(self, r: Region, why: str, *, fatal: bool) -> None:
        """A request to ``r`` failed: ``fatal`` (connection error, timeout)
        takes it out of rotation now; other failures (5xx) after
        ``fail_after`` in a row. Only for failures of the region: an error
        the router made itself is never reported."""
        if r.request_failed(why, fatal=fatal):
            self._after_change()

    # -- probing -----------------------------------------------------------

    async def _probe_loop(self, r: Region) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        next_status = 0.0
        reading: asyncio.Task[None] | None = None
        try:
            while True:
                started = loop.time()
                await self.probe(r)
                if started >= next_status and (reading is None or reading.done()) and r.up:
                    next_status = started + s.status_interval
                    reading = asyncio.create_task(self.read_status(r))
                await asyncio.sleep(max(0.0, s.probe_interval - (loop.time() - started)))
        finally:
            if reading is not None:
                reading.cancel()

    async def probe(self, r: Region) -> bool:
        assert r.session is not None
        s = self.settings
        t0 = time.perf_counter()
        why = ""
        try:
            async with r.session.get(
                r.base + "/healthz",
                timeout=aiohttp.ClientTimeout(total=s.probe_timeout),
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                elapsed = time.perf_counter() - t0
                if resp.status != 200:
                    why = f"probe answered {resp.status}"
                else:
                    try:
                        doc = json.loads(body)
                        who = doc.get("region") if isinstance(doc, dict) else None
                    except ValueError:
                        who = None
                    if who != r.name:
                        why = (
                            f"endpoint answers as region {who!r}"
                            if who
                            else "endpoint is not a Meridian node"
                        )
        except TimeoutError:
            why = f"probe timed out after {s.probe_timeout:g}s"
        except aiohttp.ClientConnectorError as e:
            why = f"cannot connect: {e.os_error or e}"
        except (aiohttp.ClientError, OSError, ValueError) as e:
            why = f"probe failed: {type(e).__name__}: {e}"
        if why:
            if r.probe_failed(why):
                self._after_change()
            return False
        if r.probe_ok(elapsed):
            self._after_change()
        else:
            self._reorder()
        return True

    async def read_status(self, r: Region) -> None:
        """Read what the region says about itself (``cluster.status``): its
        peers' RTTs and its backlog. A node that does not answer one (an
        older one, or a failure) leaves what was known before."""
        assert r.session is not None
        try:
            async with r.session.get(
                r.base + STATUS_PATH, timeout=aiohttp.ClientTimeout(total=2.0)
            ) as resp:
                if resp.status != 200:
                    return
                st = NodeStatus.from_json(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return
        if st.region != r.name:
            return  # the probe takes such an endpoint out of rotation
        r.peers = st.peers_rtt_s
        r.backlog = st.backlog_items
        r.backlog_bytes = st.backlog_bytes


def _cost_key(r: Region) -> tuple[float, str]:
    return (r.cost, r.name)


def _down_key(r: Region) -> tuple[float, float, str]:
    # Most recently healthy first, then nearest.
    return (-r.last_ok, r.cost, r.name)


async def _close_later(session: aiohttp.ClientSession, task: asyncio.Task[None] | None) -> None:
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await session.close()
