"""Configuration of one node: CLI flags, each with a MERIDIAN_* twin."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from cluster.runtime import split_hostport
from cluster.units import parse_size


@dataclass
class NodeConfig:
    listen: str = "127.0.0.1:5000"
    data: str = "./data"
    region: str = "local"
    etcd: str = ""  # comma-separated endpoints; empty = embedded namespace
    grpc_listen: str = ""  # host:port of the replication gRPC server; empty = none
    grpc_advertise: str = ""  # host:port other regions dial (default: grpc_listen)
    advertise: str = ""  # base URL other regions and the router use for HTTP
    registry: str = "default"  # registry served when the host names none
    domain: str = ""  # <registry>.<domain> selects a registry by Host
    loop: str = "uvloop"  # measured: faster small requests; blobs keep sendfile
    access_log: bool = False
    log_level: str = "info"
    max_blob_size: int = 0  # 0 = unlimited
    upload_ttl: int = 24 * 3600  # abandoned upload sessions are removed after this
    replication_concurrency: int = 4  # background transfers at once; 0 = no replicator
    replication_bandwidth: int = 0  # bytes/s per source region (background only); 0 = no cap
    reclaim_interval: float = 0.0  # seconds between reclaim passes; 0 = never reclaim
    reclaim_grace: float = 3600.0  # only reclaim unreferenced bytes older than this

    @property
    def host(self) -> str:
        return split_hostport(self.listen)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.listen)[1]

    @property
    def base_url(self) -> str:
        return self.advertise or f"http://{self.listen}"


def _env(name: str, default: str) -> str:
    return os.environ.get("MERIDIAN_" + name.upper().replace("-", "_"), default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = NodeConfig()
    p.add_argument("--listen", default=_env("listen", d.listen), help="HTTP host:port")
    p.add_argument("--data", default=_env("data", d.data), help="data directory")
    p.add_argument("--region", default=_env("region", d.region))
    p.add_argument("--etcd", default=_env("etcd", d.etcd), help="etcd endpoints (comma-separated)")
    p.add_argument(
        "--grpc-listen",
        default=_env("grpc_listen", d.grpc_listen),
        help="host:port of the replication gRPC server (empty: none)",
    )
    p.add_argument(
        "--grpc-advertise",
        default=_env("grpc_advertise", d.grpc_advertise),
        help="host:port other regions dial for gRPC (default: --grpc-listen)",
    )
    p.add_argument("--advertise", default=_env("advertise", d.advertise))
    p.add_argument("--registry", default=_env("registry", d.registry))
    p.add_argument("--domain", default=_env("domain", d.domain))
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default=_env("loop", d.loop))
    p.add_argument(
        "--access-log",
        action="store_true",
        default=_env("access_log", "") not in ("", "0", "false"),
    )
    p.add_argument("--log-level", default=_env("log_level", d.log_level))
    p.add_argument(
        "--max-blob-size", type=int, default=int(_env("max_blob_size", str(d.max_blob_size)))
    )
    p.add_argument("--upload-ttl", type=int, default=int(_env("upload_ttl", str(d.upload_ttl))))
    p.add_argument(
        "--replication-concurrency",
        type=int,
        default=int(_env("replication_concurrency", str(d.replication_concurrency))),
        help="background transfers at once (0: no replicator; read-through still works)",
    )
    p.add_argument(
        "--replication-bandwidth",
        type=parse_size,
        default=parse_size(_env("replication_bandwidth", str(d.replication_bandwidth))),
        help="background bytes/s per source region, e.g. 20M (0: no cap)",
    )
    p.add_argument(
        "--reclaim-interval",
        type=float,
        default=float(_env("reclaim_interval", str(d.reclaim_interval))),
        help="seconds between passes removing local bytes nothing references (0: off)",
    )
    p.add_argument(
        "--reclaim-grace",
        type=float,
        default=float(_env("reclaim_grace", str(d.reclaim_grace))),
        help="never reclaim bytes younger than this many seconds",
    )


def from_args(ns: argparse.Namespace) -> NodeConfig:
    return NodeConfig(**{f.name: getattr(ns, f.name) for f in fields(NodeConfig)})
