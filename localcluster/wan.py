"""A userspace WAN emulator: TCP proxies with latency, bandwidth, partitions
and byte corruption, for putting traffic between emulated regions on one
machine through a "wide-area link".

One ``Link`` listens on a loopback port and forwards every connection to a
target ``host:port``. Controls (thread-safe when the emulator runs in its
own thread, as tests do):

- ``latency``: one-way delay added to every byte, each direction (seconds);
- ``bandwidth``: bytes per second, each direction (0 = unlimited);
- ``cut()`` / ``heal()``: a partition -- ``cut`` resets every open
  connection and refuses new ones (``blackhole=True`` instead accepts and
  silently drops, as a dead route does); ``heal`` lets traffic through again;
- ``corrupt_at(n)``: flip one byte of the target->client stream at absolute
  offset ``n`` of the link's downstream byte count (once).

``Wan`` runs links on an event loop in a background thread::

    wan = Wan().start()
    link = wan.link("127.0.0.1:50051", latency=0.04, bandwidth=10 << 20)
    ... point clients at link.address ...
    link.cut(); link.heal()
    wan.stop()

From the command line (one link, runs until interrupted)::

    python -m localcluster.wan --listen 127.0.0.1:9000 --target 127.0.0.1:50051 \\
        --latency 40ms --bandwidth 10M

Per-source latency (a link into one region, reached from several): when a
link has ``identify`` set, each accepted connection is attributed to a source
(``proc_source``: the local process that owns the connecting socket, found
through ``/proc``, named by the ``--region`` on its command line), and
``source_latency[source]`` replaces ``latency`` for that connection. That is
how one advertised gRPC address per region still gives every pair of regions
its own round-trip time.

Many links with an HTTP control API (what ``meridian up`` runs)::

    python -m localcluster.wan --config links.json --control 127.0.0.1:9100

``links.json``: ``{"links": [{"name", "listen", "target", "latency",
"bandwidth", "source_latency": {source: seconds}, "identify": bool}],
"sources": {name: pid}}``. Control: ``GET /links``; ``POST /links/<name>``
with any of ``latency``, ``bandwidth``, ``source_latency``, ``cut`` (true /
false), ``blackhole``; ``POST /sources`` with ``{name: pid}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cluster import procfs
from cluster.runtime import setup_logging
from cluster.units import parse_size

READ_SIZE = 64 << 10
log = logging.getLogger("meridian.wan")


class _Bucket:
    def __init__(self) -> None:
        self.tokens = 0.0
        self.stamp = time.monotonic()

    async def take(self, n: int, rate: int) -> None:
        if rate <= 0:
            return
        now = time.monotonic()
        burst = max(rate / 20, READ_SIZE)  # 50 ms worth
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / rate)


class Link:
    def __init__(
        self,
        target: str,
        *,
        latency: float = 0.0,
        bandwidth: int = 0,
        listen: str = "127.0.0.1:0",
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host or "127.0.0.1", int(port))
        self.listen = listen
        self.latency = latency
        self.bandwidth = bandwidth
        self.is_cut = False
        self.blackhole = False
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.connections = 0
        self.corruptions = 0
        self._corrupt_at: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._buckets = {"up": _Bucket(), "down": _Bucket()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        # Per-source one-way latency (see the module docstring): ``identify``
        # names the source of a connection from (peer, local) addresses.
        self.source_latency: dict[str, float] = {}
        self.identify: Callable[[tuple[str, int], tuple[str, int]], str | None] | None = None
        self.sources_seen: dict[str, int] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Link:
        self._loop = asyncio.get_running_loop()
        host, _, port = self.listen.rpartition(":")
        self._server = await asyncio.start_server(self._accept, host or "127.0.0.1", int(port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._reset_all()

    # -- controls --------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or _running_in(loop):
            fn()
        else:
            done: Future[None] = Future()

            def run() -> None:
                try:
                    fn()
                    done.set_result(None)
                except BaseException as e:  # pragma: no cover
                    done.set_exception(e)

            loop.call_soon_threadsafe(run)
            done.result(5)

    def cut(self, *, blackhole: bool = False) -> None:
        def do() -> None:
            self.is_cut = True
            self.blackhole = blackhole
            if not blackhole:
                self._reset_all()

        self._call(do)

    def heal(self) -> None:
        def do() -> None:
            self.is_cut = False
            self.blackhole = False

        self._call(do)

    def corrupt_at(self, offset: int) -> None:
        """Flip one byte of the downstream stream at link offset ``offset``."""

        def do() -> None:
            self._corrupt_at = offset

        self._call(do)

    def set(self, *, latency: float | None = None, bandwidth: int | None = None) -> None:
        def do() -> None:
            if latency is not None:
                self.latency = latency
            if bandwidth is not None:
                self.bandwidth = bandwidth

        self._call(do)

    def set_source_latency(self, source: str, latency: float | None) -> None:
        """One-way latency for connections from ``source`` (None: the link's)."""

        def do() -> None:
            if latency is None:
                self.source_latency.pop(source, None)
            else:
                self.source_latency[source] = latency

        self._call(do)

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "target": f"{self.target[0]}:{self.target[1]}",
            "latency": self.latency,
            "bandwidth": self.bandwidth,
            "cut": self.is_cut,
            "blackhole": self.blackhole,
            "source_latency": dict(self.source_latency),
            "connections": self.connections,
            "sources_seen": dict(self.sources_seen),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }

    # -- proxying ----------------------------------------------------------------

    def _reset_all(self) -> None:
        for a, b in list(self._conns):
            for w in (a, b):
                with contextlib.suppress(Exception):
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        # RST, not FIN: like a middlebox dropping the flow.
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                    w.transport.abort()
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut and not self.blackhole:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_w)
        self._conns.add(pair)
        source: str | None = None
        if self.identify is not None:
            peer = writer.get_extra_info("peername")
            local = writer.get_extra_info("sockname")
            with contextlib.suppress(Exception):
                source = await asyncio.to_thread(self.identify, peer[:2], local[:2])
            key = source or "?"
            self.sources_seen[key] = self.sources_seen.get(key, 0) + 1
        try:
            await asyncio.gather(
                self._pump(reader, up_w, "up", source),
                self._pump(up_r, writer, "down", source),
            )
        except Exception:
            pass
        finally:
            self._conns.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: str,
        source: str | None = None,
    ) -> None:
        # Bytes in flight on the "wire": bounded, so a slow receiver pushes
        # back on the sender as TCP would.
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=256)

        async def deliver() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    return
                due, data = item
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.is_cut and self.blackhole:
                    continue  # dropped on the floor
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            while not sender.done():
                data = await src.read(READ_SIZE)
                if not data:
                    break
                if self.is_cut and self.blackhole:
                    continue
                await self._buckets[direction].take(len(data), self.bandwidth)
                if direction == "down":
                    data = self._maybe_corrupt(data)
                    self.bytes_down += len(data)
                else:
                    self.bytes_up += len(data)
                latency = self.latency
                if source is not None:
                    latency = self.source_latency.get(source, latency)
                await queue.put((time.monotonic() + latency, data))
        finally:
            if not sender.done():
                with contextlib.suppress(Exception):
                    await queue.put(None)
                with contextlib.suppress(Exception):
                    await sender
            with contextlib.suppress(Exception):
                dst.write_eof()

    def _maybe_corrupt(self, data: bytes) -> bytes:
        at = self._corrupt_at
        if at is None or not (self.bytes_down <= at < self.bytes_down + len(data)):
            return data
        i = at - self.bytes_down
        buf = bytearray(data)
        buf[i] ^= 0xFF
        self._corrupt_at = None
        self.corruptions += 1
        return bytes(buf)


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class Wan:
    """Links on an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.links: list[Link] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="wan", daemon=True)

    def start(self) -> Wan:
        self._thread.start()
        return self

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def link(self, target: str, **kwargs: Any) -> Link:
        link = self._run(Link(target, **kwargs).start())
        self.links.append(link)
        return link

    def stop(self) -> None:
        for link in self.links:
            with contextlib.suppress(Exception):
                self._run(link.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Wan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- who is connecting: /proc ---------------------------------------------------


def region_arg(argv: list[str]) -> str | None:
    """The value of ``--region`` on a command line."""
    for i, a in enumerate(argv[:-1]):
        if a == "--region":
            return argv[i + 1]
    for a in argv:
        if a.startswith("--region="):
            return a[len("--region=") :]
    return None


def proc_source(
    peer: tuple[str, int], local: tuple[str, int], known: dict[str, int] | None = None
) -> str | None:
    """Name of the local process that opened the connection ``peer`` ->
    ``local``: a ``known`` name -> pid first, else the ``--region`` on the
    command line of whichever process owns the socket. Linux only; None when
    it cannot tell (another host, another namespace, no permission)."""
    names = {pid: name for name, pid in (known or {}).items()}
    pid = procfs.socket_owner(tuple(peer), tuple(local), list(names))  # type: ignore[arg-type]
    if pid is None:
        return None
    return names.get(pid) or region_arg(procfs.cmdline(pid))


# -- many links, with a control API (``--config``) -------------------------------


class Topology:
    """Named links built from a config dict, plus an HTTP control API."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.links: dict[str, Link] = {}
        self.sources: dict[str, int] = {
            str(k): int(v) for k, v in (config.get("sources") or {}).items()
        }

    def _identify(self, peer: tuple[str, int], local: tuple[str, int]) -> str | None:
        return proc_source(peer, local, dict(self.sources))

    async def start(self) -> Topology:
        for spec in self.config.get("links", []):
            name = str(spec["name"])
            link = Link(
                str(spec["target"]),
                latency=float(spec.get("latency", 0.0)),
                bandwidth=int(spec.get("bandwidth", 0)),
                listen=str(spec.get("listen", "127.0.0.1:0")),
            )
            link.source_latency = {
                str(k): float(v) for k, v in (spec.get("source_latency") or {}).items()
            }
            if spec.get("identify"):
                link.identify = self._identify
            self.links[name] = await link.start()
        return self

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()

    def describe(self) -> dict[str, Any]:
        return {
            "links": {name: link.as_dict() for name, link in self.links.items()},
            "sources": dict(self.sources),
        }

    def apply(self, name: str, change: dict[str, Any]) -> dict[str, Any]:
        link = self.links[name]
        if "latency" in change or "bandwidth" in change:
            lat = change.get("latency")
            bw = change.get("bandwidth")
            link.set(
                latency=None if lat is None else float(lat),
                bandwidth=None if bw is None else int(bw),
            )
        for src, lat in (change.get("source_latency") or {}).items():
            link.set_source_latency(str(src), None if lat is None else float(lat))
        if change.get("cut") is True:
            link.cut(blackhole=bool(change.get("blackhole", False)))
        elif change.get("cut") is False:
            link.heal()
        return link.as_dict()

    async def serve_control(self, listen: str) -> Any:
        from aiohttp import web

        async def get_links(_: web.Request) -> web.Response:
            return web.json_response(self.describe())

        async def post_link(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if name not in self.links:
                return web.json_response({"error": f"no link {name!r}"}, status=404)
            try:
                change = await request.json()
                if not isinstance(change, dict):
                    raise ValueError("expected a JSON object")
                return web.json_response(self.apply(name, change))
            except (ValueError, TypeError) as e:
                return web.json_response({"error": str(e)}, status=400)

        async def post_sources(request: web.Request) -> web.Response:
            try:
                doc = await request.json()
                self.sources.update({str(k): int(v) for k, v in doc.items()})
            except (ValueError, TypeError, AttributeError) as e:
                return web.json_response({"error": str(e)}, status=400)
            return web.json_response({"sources": self.sources})

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "links": len(self.links)})

        app = web.Application()
        app.router.add_get("/links", get_links)
        app.router.add_post("/links/{name}", post_link)
        app.router.add_post("/sources", post_sources)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(runner, host or "127.0.0.1", int(port))
        await site.start()
        return runner


def _serve_topology(config_path: str, control: str) -> int:
    import signal

    with open(config_path) as f:
        config = json.load(f)

    async def run() -> None:
        topo = await Topology(config).start()
        runner = await topo.serve_control(control) if control else None
        for name, link in topo.links.items():
            log.info(f"wan link {name} {link.address} -> {link.target[0]}:{link.target[1]}")
        log.info(f"wan ready control={control or '-'}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if runner is not None:
            await runner.cleanup()
        await topo.close()

    asyncio.run(run())
    return 0


def _duration(v: str) -> float:
    v = v.strip().lower()
    if v.endswith("ms"):
        return float(v[:-2]) / 1000
    return float(v.removesuffix("s"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m localcluster.wan", description="one emulated WAN link"
    )
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--target", help="host:port to forward to (one-link mode)")
    p.add_argument("--latency", type=_duration, default=0.0, help="one-way, e.g. 40ms")
    p.add_argument("--bandwidth", type=parse_size, default=0, help="per direction, e.g. 10M")
    p.add_argument("--config", help="JSON file of many links (see the module docstring)")
    p.add_argument("--control", default="", help="host:port of the control API (--config)")
    args = p.parse_args(argv)
    setup_logging("info")  # JSON lines on stderr, as every Meridian process logs
    if args.config:
        return _serve_topology(args.config, args.control)
    if not args.target:
        p.error("--target is required (or --config)")

    async def run() -> None:
        link = await Link(
            args.target, latency=args.latency, bandwidth=args.bandwidth, listen=args.listen
        ).start()
        log.info(f"wan link {link.address} -> {args.target}")
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
