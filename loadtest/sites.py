"""A Meridian cluster for the load tests: ``meridian up``'s
(:class:`localcluster.up.Cluster`: etcd, one node per region, the WAN
emulator, the router; every part a child process stopped by PID), with
what a load test adds through its public options:

- **client sites**: for each site (named after the region it sits next to),
  its own router, started with ``--region site-<name>`` on its command line,
  and on the emulator's link into each region a latency for that site:
  ``site_rtt_ms`` to its own region, the inter-region round trip to the
  others. The emulator tells a connection's site by the ``--region`` of the
  process that opened it, so a site's router and its client workers
  (:mod:`loadtest.workers` starts them with ``--region site-<name>``) see
  that site's latencies, while everything else (seeding, checks) goes
  straight through;
- **no emulation** (``emulate=False``): nodes advertise their own addresses,
  so clients and the router reach them directly (for measuring the servers,
  not the emulator's Python proxy); replication still crosses it.

Authentication is on, as in ``meridian up``: the owner's password is
``$MERIDIAN_OWNER_PASSWORD`` (the harness sets it before starting one, so its
clients and workers log in with it), :attr:`LocalCluster.owner_password`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.runtime import free_port
from localcluster import topology as topo
from localcluster.supervisor import get_json
from localcluster.up import Cluster, ClusterOptions


def site_name(region: str) -> str:
    return f"site-{region}"


class LocalCluster:
    def __init__(
        self,
        data: Path,
        topology: topo.Topology,
        *,
        sites: list[str] | None = None,
        site_rtt_ms: float = 2.0,
        emulate: bool = True,
    ) -> None:
        self.topo = topology
        self.sites = list(sites or [])
        self.site_rtt_ms = site_rtt_ms
        for s in self.sites:
            topology.region(s)  # KeyError for an unknown site
        sources = {
            site_name(s): {r.name: self.rtt_ms(s, r.name) for r in topology.regions}
            for s in self.sites
        }
        self.cluster = Cluster(
            ClusterOptions(
                data=Path(data),
                topology=topology,
                port=free_port(),
                emulate=emulate,
                sources=sources,
            )
        )
        self.site_routers: dict[str, str] = {}

    def rtt_ms(self, site: str, region: str) -> float:
        """Round trip between a client site (next to region ``site``) and ``region``."""
        if site == region:
            return self.site_rtt_ms
        return self.topo.between(site, region).rtt_ms

    def start(self) -> None:
        self.cluster.start()
        for s in self.sites:
            self.site_routers[s] = self.cluster.start_router(
                f"router {site_name(s)}", source=site_name(s)
            )

    def stop(self) -> None:
        self.cluster.stop()

    # -- what a load test reads -------------------------------------------------------

    @property
    def router(self) -> str:
        return self.cluster.router

    @property
    def owner_password(self) -> str | None:
        """The password the cluster's owner was created with (once started)."""
        return self.cluster.owner_password

    def regions(self) -> dict[str, dict[str, Any]]:
        return self.cluster.regions

    def server_pids(self) -> dict[str, int]:
        """The processes that serve (nodes, routers, etcd), not the emulator."""
        return {k: v for k, v in self.cluster.pids().items() if k != "wan"}

    def router_status(self, url: str | None = None) -> dict[str, Any]:
        return get_json((url or self.router) + "/meridian/v1/router", timeout=5)
