"""Wiring of everything a node runs that spans regions.

``Replication`` owns the gRPC server other regions fetch from (serving the
region's own store), the peers (channels, RTT, health), the transfer engine,
the read-through store the node's API reads through (``store``), the
background replicator and the reclaimer.
"""

from __future__ import annotations

from cluster.namespace import Namespace
from node.grpc_service import GrpcServer, GrpcTLS, Peers
from node.replication.claims import Claims, Leader
from node.replication.reclaim import Reclaimer
from node.replication.transfer import Fetcher
from node.replication.worker import Replicator
from node.storage.base import BlobStore
from node.storage.readthrough import ReadThroughStore


class Replication:
    def __init__(
        self,
        ns: Namespace,
        local: BlobStore,
        *,
        grpc_listen: str = "",
        concurrency: int = 4,
        bandwidth: int = 0,
        reclaim_interval: float = 0.0,
        reclaim_grace: float = 3600.0,
        tls: GrpcTLS | None = None,
        node_id: str = "",
    ) -> None:
        self.ns = ns
        self.local = local
        self.server = GrpcServer(grpc_listen, ns, local, tls=tls) if grpc_listen else None
        self.peers = Peers(ns, ns.region, tls=tls)
        self.fetcher = Fetcher(ns, local, self.peers, bandwidth=bandwidth, node_id=node_id)
        # What the node's API reads: local bytes, else fetched from a holder.
        self.store: BlobStore = ReadThroughStore(local, self.fetcher)
        self.claims = Claims(ns.kv, node_id or f"{ns.region}-{id(self):x}")
        self.replicator = (
            Replicator(ns, local, self.fetcher, concurrency=concurrency, claims=self.claims)
            if concurrency > 0
            else None
        )
        self.reclaimer = (
            Reclaimer(
                ns,
                local,
                self.fetcher,
                reclaim_interval,
                reclaim_grace,
                leader=Leader(self.claims, ns.region, "reclaim"),
            )
            if reclaim_interval > 0
            else None
        )

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
        self.peers.start()
        if self.replicator is not None:
            self.replicator.start()
        if self.reclaimer is not None:
            self.reclaimer.start()

    async def stop(self) -> None:
        if self.reclaimer is not None:
            await self.reclaimer.close()
        if self.replicator is not None:
            await self.replicator.close()
        await self.fetcher.close()
        await self.claims.close()
        if self.server is not None:
            await self.server.stop()
        await self.peers.close()
