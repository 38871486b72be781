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

Who may call (issue 11: the replication port hands out blobs, so an
outsider must neither fetch nor probe):

- **Region credential, always on.** Every call carries the metadata
  ``authorization: Bearer <JWT>``: a token of type ``region`` for the
  subject ``region:<name>`` and the audience ``meridian-replication``,
  signed by the calling node with the cluster's signing keys
  (``cluster.auth.tokens.KeyRing``, in the namespace: only a process that
  can read the namespace, i.e. holds etcd access, can mint one). It lives
  ``REGION_TOKEN_TTL`` (2 minutes); the caller reuses it and mints the next
  ``RENEW_BEFORE`` seconds before it expires. The server verifies it
  (``Verifier``, cached until expiry: no signature check per call) and that
  the subject is a region registered in the namespace (read from the store
  once when the cache lacks it), else ``UNAUTHENTICATED`` -- for ``Ping``,
  ``Stat`` and ``FetchBlob`` alike. It does not depend on ``--auth``: the
  node's HTTP open mode leaves the internal port closed. Over plain TCP a
  token seen on the wire can be replayed until it expires (at most 2
  minutes, against this cluster's replication port only); on networks you
  do not trust, use mutual TLS too.
- **Mutual TLS, optional** (``GrpcTLS``: ``--grpc-tls-ca``,
  ``--grpc-tls-cert``, ``--grpc-tls-key``): the server requires a client
  certificate signed by the cluster CA and presents its own, which clients
  verify against the same CA (the certificate must name the host of the
  region's ``--grpc-advertise`` address); the region credential is still
  sent and checked (defence in depth).
- **Only what the registry references.** ``FetchBlob`` and ``Stat`` serve a
  digest only when the requested registry still references it
  (``Namespace.references``: a blob link or a manifest record in one of its
  repositories), else ``NOT_FOUND`` / not present: deleted content and
  other registries' content are never served. On a miss the server lets its
  namespace cache catch up with the store once (``Namespace.caught_up``:
  the caller may have seen a link an instant before this region did).

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
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge

from cluster.auth import tokens
from cluster.health import Health
from cluster.kv import KVUnavailable
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
# Every process of a node (--workers) pings: the latest measurement wins.
PEER_RTT = Gauge(
    "meridian_replication_peer_rtt_seconds",
    "Smoothed gRPC Ping round trip",
    ["region"],
    multiprocess_mode="livemostrecent",
)
PEER_UP = Gauge(
    "meridian_replication_peer_up",
    "1 when the region answers Ping",
    ["region"],
    multiprocess_mode="livemostrecent",
)
REFUSED = Counter(
    "meridian_replication_refused_calls_total",
    "gRPC calls refused for want of a valid region credential, by method",
    ["method"],
)

# -- who may call ----------------------------------------------------------------

REGION_AUDIENCE = "meridian-replication"
REGION_TOKEN_TYPE = "region"
REGION_SUBJECT = "region:"
REGION_TOKEN_TTL = 120  # seconds a region credential lives (the replay window)
RENEW_BEFORE = 40  # the caller mints the next one this long before expiry
REGISTER_WAIT = 5.0  # a starting node waits this long for its own region record


class CredentialUnavailable(Exception):
    """This node cannot mint a region credential now (no signing key and
    the namespace store unreachable)."""


@dataclass(frozen=True)
class GrpcTLS:
    """Mutual TLS on the replication port: PEM files of the cluster CA, and
    this region's certificate (server and client auth) and key. Read when a
    server starts or a channel opens, so renewed files are picked up by new
    channels (the server: at its next start)."""

    ca: str
    cert: str
    key: str

    def _read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for path in (self.ca, self.cert, self.key):
            with open(path, "rb") as f:
                out.append(f.read())
        return out[0], out[1], out[2]

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


class RegionCredential:
    """The caller's side: a region token minted with the cluster's signing
    keys, reused until ``RENEW_BEFORE`` seconds before it expires."""

    def __init__(self, ns: Namespace, region: str, *, ttl: int = REGION_TOKEN_TTL) -> None:
        self.ns = ns
        self.region = region
        self.ttl = ttl
        self.keys = tokens.KeyRing(ns)
        self._token = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self._registered = False

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying the credential."""
        if self._expires - time.time() < RENEW_BEFORE:
            async with self._lock:
                if self._expires - time.time() < RENEW_BEFORE:
                    await self._mint()
        return (("authorization", "Bearer " + self._token),)

    async def _mint(self) -> None:
        if not self._registered:
            # A node starts replicating a moment before it registers its
            # region: a token minted now would be refused.
            deadline = time.monotonic() + REGISTER_WAIT
            while self.region not in self.ns.cache.regions:
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
            self._registered = True
        try:
            key = await self.keys.ensure()
        except KVUnavailable as e:
            found = self.keys.signing_key()
            if found is None:
                raise CredentialUnavailable(f"no signing key and the store is down: {e}") from e
            key = found
        now = time.time()
        self._token = tokens.issue(
            key,
            subject=REGION_SUBJECT + self.region,
            kind="region",
            registry="",
            service=REGION_AUDIENCE,
            access=[],
            ttl=self.ttl,
            now=now,
            token_type=REGION_TOKEN_TYPE,
        )
        self._expires = now + self.ttl


class RegionAuth:
    """The server's side: which region calls, or ``UNAUTHENTICATED``."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.verifier = tokens.Verifier(tokens.KeyRing(ns))

    async def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The calling region, or ``tokens.InvalidToken`` saying why not."""
        header = ""
        for k, v in metadata or ():
            if k == "authorization" and isinstance(v, str):
                header = v
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise tokens.InvalidToken("no region credential")
        claims = await self.verifier.verify(
            token.strip(), REGION_AUDIENCE, token_type=REGION_TOKEN_TYPE
        )
        subject = str(claims.get("sub", ""))
        name = subject.removeprefix(REGION_SUBJECT)
        if not subject.startswith(REGION_SUBJECT) or not name:
            raise tokens.InvalidToken("not a region credential")
        if await self.ns.fresh_region(name) is None:
            raise tokens.InvalidToken(f"{name!r} is not a region of this cluster")
        return name

    async def check(self, context: grpc.aio.ServicerContext, method: str) -> str:
        try:
            return await self.caller(context.invocation_metadata())
        except tokens.InvalidToken as e:
            REFUSED.labels(method).inc()
            log.debug("refused %s: %s (peer %s)", method, e, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"refused: {e}")
            raise  # abort raises; for the type checker


# -- server ------------------------------------------------------------------


async def _crc32(data: bytes) -> int:
    if len(data) < CRC_INLINE:
        return zlib.crc32(data)
    return await asyncio.get_running_loop().run_in_executor(None, zlib.crc32, data)


class ReplicationService(pb_grpc.ReplicationServicer):
    """Serves the region's own store (never a read-through one: only bytes
    held here, whole), to other regions only, and only what the requested
    registry references."""

    def __init__(self, ns: Namespace, store: BlobStore) -> None:
        self.ns = ns
        self.region = ns.region
        self.store = store
        self.auth = RegionAuth(ns)
        self.active = 0

    async def _referenced(self, reg: str, digests: list[str]) -> list[bool]:
        """Which of ``digests`` ``reg`` references; on a miss, once more
        after this region's namespace cache caught up with the store."""
        refs = [self.ns.references(reg, d) for d in digests]
        if not all(refs) and await self.ns.caught_up():
            refs = [self.ns.references(reg, d) for d in digests]
        return refs

    async def Ping(  # noqa: N802 - gRPC method name
        self, request: pb.PingRequest, context: grpc.aio.ServicerContext
    ) -> pb.PingReply:
        await self.auth.check(context, "Ping")
        return pb.PingReply(
            region=self.region,
            sent_unix_nanos=request.sent_unix_nanos,
            server_unix_nanos=time.time_ns(),
            active_fetches=self.active,
        )

    async def Stat(  # noqa: N802
        self, request: pb.StatRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatReply:
        await self.auth.check(context, "Stat")
        if len(request.digests) > MAX_STAT_DIGESTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_STAT_DIGESTS} digests per call"
            )
        if not request.registry:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "registry is required")
        digests = list(request.digests)
        refs = await self._referenced(request.registry, digests)
        out = []
        for d, referenced in zip(digests, refs, strict=True):
            size = await self.store.stat(d) if referenced and is_digest(d) else None
            out.append(pb.BlobStat(digest=d, present=size is not None, size=size or 0))
        return pb.StatReply(blobs=out)

    async def FetchBlob(  # noqa: N802
        self, request: pb.FetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        await self.auth.check(context, "FetchBlob")
        digest = request.digest
        if not is_digest(digest):
            SERVED_FETCHES.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid digest {digest!r}")
        if not request.registry:
            SERVED_FETCHES.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "registry is required")
        if not (await self._referenced(request.registry, [digest]))[0]:
            SERVED_FETCHES.labels("unreferenced").inc()
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"{digest} is not referenced in registry {request.registry!r}",
            )
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
    """The region's gRPC server, started and stopped on the running loop;
    with ``tls``, mutual TLS only."""

    def __init__(
        self, listen: str, ns: Namespace, store: BlobStore, *, tls: GrpcTLS | None = None
    ) -> None:
        self.listen = listen
        self.tls = tls
        self.service = ReplicationService(ns, store)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_ReplicationServicer_to_server(self.service, self.server)
        if self.tls is not None:
            self.port = self.server.add_secure_port(self.listen, self.tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {self.listen}")
        await self.server.start()
        log.info(
            "grpc listening (%s)",
            "mutual TLS and region credentials"
            if self.tls is not None
            else "region credentials over plain TCP: use --grpc-tls-* on untrusted networks",
            extra={"path": self.listen},
        )

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


def open_channel(address: str, tls: GrpcTLS | None = None) -> grpc.aio.Channel:
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class Peers:
    """Channels to the other regions, their RTT and health; every call
    carries this region's credential (``call_metadata``)."""

    def __init__(
        self,
        ns: Namespace,
        region: str,
        *,
        ping_interval: float = 2.0,
        ping_timeout: float = 2.0,
        tls: GrpcTLS | None = None,
    ) -> None:
        self.ns = ns
        self.region = region
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.tls = tls
        self.credential = RegionCredential(ns, region)
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
        channel = open_channel(info.grpc, self.tls)
        p = Peer(region, info.grpc, channel, pb_grpc.ReplicationStub(channel))
        self.peers[region] = p
        return p

    async def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call to another region carries (its
        credential); raises ``CredentialUnavailable``."""
        return await self.credential.metadata()

    async def ping(self, region: str) -> float | None:
        p = self.peer(region)
        if p is None:
            return None
        try:
            metadata = await self.call_metadata()
        except CredentialUnavailable as e:
            p.probe_failed(f"no region credential: {e}")
            PEER_UP.labels(region).set(0)
            return None
        start = time.perf_counter()
        try:
            reply = await p.stub.Ping(
                pb.PingRequest(from_region=self.region, sent_unix_nanos=time.time_ns()),
                timeout=self.ping_timeout,
                metadata=metadata,
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

    def forget(self, region: str) -> None:
        """Drop a region that left the namespace: its channel, RTT and gauges."""
        p = self.peers.pop(region, None)
        if p is not None:
            asyncio.get_running_loop().create_task(p.channel.close())
        for gauge in (PEER_UP, PEER_RTT):
            try:
                gauge.remove(region)
            except KeyError:
                pass

    def rtts(self) -> dict[str, float]:
        """Smoothed RTT (seconds) to every region reached now (its last ping
        answered): the ``peers_rtt_s`` of the node's status."""
        return {r: p.srtt for r, p in self.peers.items() if p.up and p.srtt is not None}

    async def _ping_loop(self) -> None:
        while True:
            targets = [r for r, i in self.ns.regions().items() if i.grpc and r != self.region]
            for gone in set(self.peers) - set(targets):  # a region removed
                self.forget(gone)
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
