"""A Meridian cluster for the load tests: ``meridian up``'s, started from here.

:class:`LocalCluster` is :class:`cluster.up.Cluster` (etcd, one node per
region, the WAN emulator, the router; every part a child process stopped by
PID) with two additions a load test needs:

- **client sites**: for each site (named after the region it sits next to),
  its own router (``meridian router``, started with ``--region site-<name>``
  on its command line) and, on the emulator's link into each region, a
  per-source latency for that site: ``site_rtt_ms`` to its own region, the
  inter-region round trip to the others. The emulator tells a connection's
  site by the ``--region`` of the process that opened it, so a site's router
  and its client workers (:mod:`loadtest.workers` starts them with
  ``--region site-<name>``) see that site's latencies, while everything
  else (seeding, checks) goes straight through;
- **no emulation** (``emulate=False``): nodes advertise their own addresses,
  so clients and the router reach them directly (for measuring the servers,
  not the emulator's Python proxy); replication still crosses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loadtest.reference import free_port
from localcluster import topology as topo
from localcluster.up import Child, Cluster, _get_json, _wait

ROUTER_ENTRY = "import sys; from cluster.cli import main; sys.exit(main(sys.argv[3:]))"


def site_name(region: str) -> str:
    return f"site-{region}"


class LocalCluster(Cluster):
    def __init__(
        self,
        data: Path,
        topology: topo.Topology,
        *,
        sites: list[str] | None = None,
        site_rtt_ms: float = 2.0,
        emulate: bool = True,
    ) -> None:
        args = argparse.Namespace(data=str(data), port=free_port())
        super().__init__(args, topology)
        self.sites = list(sites or [])
        self.site_rtt_ms = site_rtt_ms
        self.emulate = emulate
        self.site_routers: dict[str, str] = {}
        for s in self.sites:
            topology.region(s)  # KeyError for an unknown site

    def rtt_ms(self, site: str, region: str) -> float:
        """Round trip between a client site (next to region ``site``) and ``region``."""
        if site == region:
            return self.site_rtt_ms
        return self.topo.between(site, region).rtt_ms

    def _spawn(self, name: str, tier: int, cmd: list[str]) -> Child:
        if name == "wan" and self.sites:
            self._site_latencies()
        if name.startswith("region ") and not self.emulate and "--advertise" in cmd:
            listen = cmd[cmd.index("--listen") + 1]
            cmd[cmd.index("--advertise") + 1] = f"http://{listen}"
        return super()._spawn(name, tier, cmd)

    def _site_latencies(self) -> None:
        path = self.data / "wan.json"
        cfg = json.loads(path.read_text())
        for link in cfg["links"]:
            prefix, _, region = link["name"].partition(">")
            if prefix != "site":
                continue
            link["identify"] = True
            link["source_latency"] = {
                site_name(s): self.rtt_ms(s, region) / 2000 for s in self.sites
            }
        path.write_text(json.dumps(cfg, indent=1))

    def start(self) -> None:
        super().start()
        want = len(self.topo.regions)
        for s in self.sites:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            child = self._spawn(
                f"router {site_name(s)}",
                3,
                [sys.executable, "-c", ROUTER_ENTRY, "--region", site_name(s), "router"]
                + ["--etcd", self.addr["etcd"], "--listen", f"127.0.0.1:{port}"],
            )
            _wait(
                f"the router of {site_name(s)}",
                lambda url=url: (
                    sum(r["up"] for r in _get_json(url + "/meridian/v1/router")["regions"]) >= want
                ),
                child.proc,
                child.log,
                timeout=60,
            )
            self.site_routers[s] = url

    # -- what a load test reads -------------------------------------------------------

    @property
    def router(self) -> str:
        return str(self.addr["router"])

    def regions(self) -> dict[str, dict[str, Any]]:
        return dict(self.addr.get("regions", {}))

    def server_pids(self) -> dict[str, int]:
        """The processes that serve (nodes, routers, etcd), not the emulator."""
        return {c.name: c.pid for c in self.children if c.pid is not None and c.name != "wan"}

    def router_status(self, url: str | None = None) -> dict[str, Any]:
        return _get_json((url or self.router) + "/meridian/v1/router", timeout=5)
