"""The replication service of a region (server) and its view of the other
regions (client): ``proto/replication.proto`` over grpc.aio, on the node's
own event loop beside the HTTP server.

Server: ``Ping`` (latency, health), ``Stat`` (which blobs are here whole),
``FetchBlob`` (stream a blob from an offset in bounded chunks, each with a
CRC-32 of its data; the requested chunk size is clamped to ``MIN_CHUNK`` ..
``MAX_CHUNK``). Only whole blobs are served: the blob store's files,
never a partial download.

Client: ``Peers`` keeps one channel per remote region (address from the
namespace's region records), pings every region on an interval to keep an
RTT estimate (EWMA) and a health mark (``cluster.health.Health``, the
tracker the router uses too), and ranks candidate source regions nearest
first; a failed transfer holds a peer off until a ping succeeds again or its
back-off passes.

Transport settings, chosen deliberately:

- messages are bounded (``MAX_MESSAGE`` = 4 MiB; chunks are at most
  ``MAX_CHUNK`` = 1 MiB of data), so no single message can balloon memory;
- HTTP/2 flow control is left to gRPC's BDP probing (windows grow to fit the
  link's bandwidth-delay product); a receiver that reads slowly (bandwidth
  cap) therefore slows the sender instead of queueing in memory;
- keepalive pings every 10 s from clients (permitted without calls), with a
  5 s ack timeout, so a silently cut link is noticed in ~15 s; the server
  accepts pings that often and sends its own every 20 s;
- reconnect backoff is short (0.2 s .. 5 s): regions come back quickly;
- gRPC's own retries are off: the fetcher resumes from its offset itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterable

import grpc
from prometheus_client import Counter, Gauge

from cluster.health import Health
from cluster.namespace import Namespace
from node.storage.base import BlobNotFound, BlobStore
from ocidist.digests import is_digest
from proto import replication_pb2 as pb
from proto import replication_pb2_grpc as pb_grpc

log = logging.getLogger("meridian.grpc")

MAX_CHUNK = 1 << 20
# FetchBlob raises a smaller requested chunk_size to this (not an error: a
# client asking for tiny chunks gets fewer, larger ones; one message per byte
# would cost the server a gRPC message and a CRC per byte).
MIN_CHUNK = 64 << 10
MAX_MESSAGE = 4 << 20
MAX_STAT_DIGESTS = 1000
CRC_INLINE = 256 << 10  # larger chunks are checksummed off the event loop

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_concurrent_streams", 64),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.bdp_probe", 1),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.bdp_probe", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.enable_retries", 0),
]

SERVED_FETCHES = Counter(
    "meridian_replication_served_fetches_total",
    "FetchBlob calls this region's gRPC server answered, by outcome",
    ["outcome"],
)
SERVED_BYTES = Counter(
    "meridian_replication_served_bytes_total", "Blob bytes streamed to other regions"
)
PEER_RTT = Gauge(
    "meridian_replication_peer_rtt_seconds", "Smoothed gRPC Ping round trip", ["region"]
)
PEER_UP = Gauge("meridian_replication_peer_up", "1 when the region answers Ping", ["region"])


# -- server ------------------------------------------------------------------


async def _crc32(data: bytes) -> int:
    if len(data) < CRC_INLINE:
        return zlib.crc32(data)
    return await asyncio.get_running_loop().run_in_executor(None, zlib.crc32, data)


class ReplicationService(pb_grpc.ReplicationServicer):
    """Serves the region's own store (never a read-through one: only bytes
    held here, whole)."""

    def __init__(self, region: str, store: BlobStore) -> None:
        self.region = region
        self.store = store
        self.active = 0

    async def Ping(  # noqa: N802 - gRPC method name
        self, request: pb.PingRequest, context: grpc.aio.ServicerContext
    ) -> pb.PingReply:
        return pb.PingReply(
            region=self.region,
            sent_unix_nanos=request.sent_unix_nanos,
            server_unix_nanos=time.time_ns(),
            active_fetches=self.active,
        )

    async def Stat(  # noqa: N802
        self, request: pb.StatRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatReply:
        if len(request.digests) > MAX_STAT_DIGESTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_STAT_DIGESTS} digests per call"
            )
        out = []
        for d in request.digests:
            size = await self.store.stat(d) if is_digest(d) else None
            out.append(pb.BlobStat(digest=d, present=size is not None, size=size or 0))
        return pb.StatReply(blobs=out)

    async def FetchBlob(  # noqa: N802
        self, request: pb.FetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        digest = request.digest
        if not is_digest(digest):
            SERVED_FETCHES.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid digest {digest!r}")
        chunk = min(max(request.chunk_size or MAX_CHUNK, MIN_CHUNK), MAX_CHUNK)
        length = request.length if request.length > 0 else None
        self.active += 1
        outcome = "error"
        try:
            async with self.store.open(digest, request.offset, length) as reader:
                size, offset = reader.size, reader.offset
                if reader.length == 0:
                    yield pb.Chunk(offset=offset, data=b"", crc32=0, total_size=size)
                async for block in reader:
                    for i in range(0, len(block), chunk):
                        data = block[i : i + chunk] if len(block) > chunk else block
                        yield pb.Chunk(
                            offset=offset, data=data, crc32=await _crc32(data), total_size=size
                        )
                        SERVED_BYTES.inc(len(data))
                        offset += len(data)
            outcome = "ok"
        except BlobNotFound:
            outcome = "not_found"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{digest} is not in {self.region}")
        except ValueError as e:
            outcome = "out_of_range"
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.active -= 1
            SERVED_FETCHES.labels(outcome).inc()


class GrpcServer:
    """The region's gRPC server, started and stopped on the running loop."""

    def __init__(self, listen: str, region: str, store: BlobStore) -> None:
        self.listen = listen
        self.service = ReplicationService(region, store)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_ReplicationServicer_to_server(self.service, self.server)
        self.port = self.server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {self.listen}")
        await self.server.start()
        log.info("grpc listening", extra={"path": self.listen})

    async def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None


# -- client ------------------------------------------------------------------


class Peer(Health):
    """One other region's gRPC endpoint: its channel, and its RTT, health and
    hold-off (``cluster.health.Health``). Optimistic: up until a ping fails;
    one good ping brings it back."""

    def __init__(
        self,
        region: str,
        address: str,
        channel: grpc.aio.Channel,
        stub: pb_grpc.ReplicationStub,
    ) -> None:
        super().__init__(region, up=True, reason="not pinged yet", up_after=1)
        self.region = region
        self.address = address
        self.channel = channel
        self.stub = stub


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class Peers:
    """Channels to the other regions, their RTT and health."""

    def __init__(
        self, ns: Namespace, region: str, *, ping_interval: float = 2.0, ping_timeout: float = 2.0
    ) -> None:
        self.ns = ns
        self.region = region
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.peers: dict[str, Peer] = {}
        self._task: asyncio.Task[None] | None = None
        self._first_round = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._ping_loop(), name="peers-ping")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self.peers.values():
            await p.channel.close()
        self.peers.clear()

    def peer(self, region: str) -> Peer | None:
        """The channel to ``region``, (re)opened if its address changed."""
        if region == self.region:
            return None
        info = self.ns.regions().get(region)
        if info is None or not info.grpc:
            return None
        p = self.peers.get(region)
        if p is not None and p.address == info.grpc:
            return p
        if p is not None:
            asyncio.get_running_loop().create_task(p.channel.close())
        channel = open_channel(info.grpc)
        p = Peer(region, info.grpc, channel, pb_grpc.ReplicationStub(channel))
        self.peers[region] = p
        return p

    async def ping(self, region: str) -> float | None:
        p = self.peer(region)
        if p is None:
            return None
        start = time.perf_counter()
        try:
            reply = await p.stub.Ping(
                pb.PingRequest(from_region=self.region, sent_unix_nanos=time.time_ns()),
                timeout=self.ping_timeout,
            )
        except grpc.aio.AioRpcError as e:
            p.probe_failed(f"ping failed: {e.code().name}")
            PEER_UP.labels(region).set(0)
            return None
        rtt = time.perf_counter() - start
        if reply.region and reply.region != region:
            log.warning("region %s answered as %s at %s", region, reply.region, p.address)
        p.probe_ok(rtt)
        PEER_UP.labels(region).set(1)
        if p.srtt is not None:
            PEER_RTT.labels(region).set(p.srtt)
        return rtt

    def rtts(self) -> dict[str, float]:
        """Smoothed RTT (seconds) to every region reached now (its last ping
        answered): the ``peers_rtt_s`` of the node's status."""
        return {r: p.srtt for r, p in self.peers.items() if p.up and p.srtt is not None}

    async def _ping_loop(self) -> None:
        while True:
            targets = [r for r, i in self.ns.regions().items() if i.grpc and r != self.region]
            if targets:
                await asyncio.gather(*(self.ping(r) for r in targets), return_exceptions=True)
            self._first_round.set()
            await asyncio.sleep(self.ping_interval)

    async def wait_measured(self, within: float) -> None:
        """Wait (briefly) for the first round of pings, so the first choice
        of a source is informed."""
        try:
            await asyncio.wait_for(self._first_round.wait(), within)
        except TimeoutError:
            pass

    def report_failure(self, region: str) -> None:
        """A transfer from ``region`` failed: hold it off (back-off)."""
        p = self.peers.get(region)
        if p is not None:
            p.transfer_failed()

    def report_success(self, region: str) -> None:
        p = self.peers.get(region)
        if p is not None:
            p.transfer_ok()

    def ranked(self, candidates: Iterable[str]) -> list[str]:
        """Candidate source regions, best first: reachable and alive before
        the rest, then by measured RTT (unmeasured last). Regions held off
        after a failure go to the end rather than away: the last resort is
        still a resort."""
        now = time.monotonic()
        alive = self.ns.alive_regions()
        scored = []
        for r in candidates:
            p = self.peer(r)
            if p is None:
                continue
            held = p.held(now)
            rtt = p.srtt if p.srtt is not None else 1e9
            scored.append(((held, not p.up, r not in alive, rtt, r), r))
        scored.sort()
        return [r for _, r in scored]
