"""Configuration of one node: CLI flags, each with a MERIDIAN_* twin."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass
class NodeConfig:
    listen: str = "127.0.0.1:5000"
    data: str = "./data"
    region: str = "local"
    etcd: str = ""  # comma-separated endpoints; empty = embedded namespace
    grpc_listen: str = ""
    advertise: str = ""  # base URL other regions and the router use for HTTP
    registry: str = "default"  # registry served when the host names none
    domain: str = ""  # <registry>.<domain> selects a registry by Host
    loop: str = "uvloop"  # measured: faster small requests; blobs keep sendfile
    access_log: bool = False
    log_level: str = "info"
    max_blob_size: int = 0  # 0 = unlimited
    upload_ttl: int = 24 * 3600  # abandoned upload sessions are removed after this

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0] or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

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
    p.add_argument("--grpc-listen", default=_env("grpc_listen", d.grpc_listen))
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


def from_args(ns: argparse.Namespace) -> NodeConfig:
    return NodeConfig(
        listen=ns.listen,
        data=ns.data,
        region=ns.region,
        etcd=ns.etcd,
        grpc_listen=ns.grpc_listen,
        advertise=ns.advertise,
        registry=ns.registry,
        domain=ns.domain,
        loop=ns.loop,
        access_log=ns.access_log,
        log_level=ns.log_level,
        max_blob_size=ns.max_blob_size,
        upload_ttl=ns.upload_ttl,
    )
