"""Configuration of one node: every setting declared once, with its flag,
its ``MERIDIAN_*`` twin, help and default (``cluster.settings``)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass

from cluster import settings
from cluster.etcd_options import EtcdOptions
from cluster.httpserver import ServerLimits
from cluster.membership import valid_node_id
from cluster.runtime import ListenAddress
from cluster.settings import Secret, setting
from cluster.units import parse_size
from cluster.workers import parse_count

STORAGE_DRIVERS = ("fs", "azure")
# Azure container names: 3-63 of a-z, 0-9 and single hyphens, starting and
# ending with a letter or digit.
_CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@dataclass
class NodeConfig(ListenAddress, ServerLimits, EtcdOptions):
    listen: str = setting("127.0.0.1:5000", "HTTP host:port to serve the OCI API on")
    data: str = setting("./data", "data directory (blobs, uploads, embedded namespace)")
    region: str = setting("local", "the region this node serves")
    node_id: str = setting(
        "", "this node's id within its region (many nodes per region)", show="<hostname>-<port>"
    )
    etcd: str = setting(
        "", "etcd endpoints, comma-separated; none: an embedded namespace in the data dir"
    )
    grpc_listen: str = setting("", "host:port of the replication gRPC server; none: no server")
    grpc_advertise: str = setting(
        "", "host:port other regions dial for gRPC (default: --grpc-listen)"
    )
    grpc_tls_ca: str = setting(
        "", "PEM cluster CA: gRPC between regions is mutual TLS, certificates signed by it"
    )
    grpc_tls_cert: str = setting(
        "",
        "PEM certificate of this region for gRPC (server and client auth; names the host of "
        "--grpc-advertise)",
    )
    grpc_tls_key: str = setting("", "PEM private key of --grpc-tls-cert")
    advertise: str = setting(
        "", "base URL the router and other regions use for HTTP", show="http://<listen>"
    )
    auth: bool = setting(
        True,
        "require authentication (Docker token flow); --no-auth lets anyone push, pull and "
        "delete: for experiments only",
    )
    trusted_proxies: str = setting(
        "",
        "comma-separated CIDRs of the routers in front of this node: their X-Forwarded-For "
        "names the client (rate limits, network rules)",
    )
    tls_cert: str = setting("", "PEM certificate (chain) to serve HTTPS with; none: plain HTTP")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    registry: str = setting("default", "registry served when the Host names none")
    domain: str = setting("", "<registry>.<domain> in Host selects a registry")
    loop: str = setting("uvloop", "event loop", choices=("asyncio", "uvloop"))
    access_log: bool = setting(False, "log every request")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    max_blob_size: int = setting(
        0, "largest blob accepted, e.g. 10G; 0: unlimited", parse=parse_size
    )
    upload_ttl: int = setting(24 * 3600, "seconds after which an abandoned upload is removed")
    upload_empty_ttl: int = setting(
        15 * 60, "seconds after which an upload session that never received a byte is removed"
    )
    max_uploads_per_repo: int = setting(
        1000, "upload sessions open at once in one repository (more: 429); 0: no cap"
    )
    max_uploads: int = setting(
        10000, "upload sessions open at once on this node (more: 429); 0: no cap"
    )
    storage_reserve: int = setting(
        8 << 20,
        "bytes of the data dir's disk held back for the namespace, released when it fills",
        parse=parse_size,
        show="8M",
    )
    storage: str = setting("fs", "blob storage driver", choices=STORAGE_DRIVERS)
    azure_connection_string: str = setting(
        "",
        "Azure Storage connection string for --storage azure (with AccountKey for redirects); "
        "prefer the environment variable: a flag shows in the process list",
        parse=Secret,
    )
    azure_container: str = setting(
        "", "Azure container of the region's blobs (created if missing)", show="meridian-<region>"
    )
    storage_redirect: bool = setting(
        True,
        "blob GETs answer 307 to a signed storage URL valid for minutes (azure); "
        "off: the node streams the bytes (for storage that clients cannot reach)",
    )
    replication_concurrency: int = setting(
        4, "background transfers at once (0: no replicator; read-through still works)"
    )
    replication_bandwidth: int = setting(
        0, "background bytes/s per source region, e.g. 20M; 0: no cap", parse=parse_size
    )
    reclaim_interval: float = setting(
        0.0, "seconds between passes removing local bytes nothing references; 0: off"
    )
    reclaim_grace: float = setting(3600.0, "never reclaim bytes younger than this many seconds")
    webhook_timeout: float = setting(10.0, "seconds a webhook receiver has to answer a delivery")
    webhook_max_age: float = setting(
        12 * 3600.0,
        "seconds a webhook event is retried (receiver down, timing out or 5xx) before it is "
        "given up",
    )
    webhook_retry_max: float = setting(
        600.0, "longest pause between two tries of a webhook delivery (back-off with jitter)"
    )
    webhook_concurrency: int = setting(8, "webhooks a region's deliverer sends to at once")
    webhook_history: int = setting(50, "finished deliveries kept per webhook (list-events)")
    audit_flush_interval: float = setting(
        60.0, "seconds between writes of this node's audit records (one batch per registry)"
    )
    audit_retention: float = setting(7 * 86400.0, "seconds audit records are kept (default 7 days)")
    usage_interval: float = setting(
        60.0, "seconds between writes of this node's usage counts (meridian usage) to the namespace"
    )
    workers: int = setting(
        1,
        "processes serving HTTP on the port (SO_REUSEPORT); auto or 0: one per CPU; "
        "more than 1 needs --etcd",
        parse=parse_count,
    )

    @property
    def base_url(self) -> str:
        return self.advertise or f"{self.scheme}://{self.listen}"

    def proxies(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [
            ipaddress.ip_network(c.strip(), strict=False)
            for c in self.trusted_proxies.split(",")
            if c.strip()
        ]

    @property
    def azure_container_name(self) -> str:
        if self.azure_container:
            return self.azure_container
        name = re.sub(r"[^a-z0-9-]+", "-", f"meridian-{self.region.lower()}")
        return re.sub(r"-{2,}", "-", name)[:63].strip("-")

    def check(self) -> str | None:
        """What is wrong with the settings together, or None."""
        if bool(self.tls_cert) != bool(self.tls_key):
            return "--tls-cert and --tls-key go together"
        grpc_tls = (self.grpc_tls_ca, self.grpc_tls_cert, self.grpc_tls_key)
        if any(grpc_tls) and not all(grpc_tls):
            return "--grpc-tls-ca, --grpc-tls-cert and --grpc-tls-key go together"
        flags = ("--grpc-tls-ca", "--grpc-tls-cert", "--grpc-tls-key")
        for flag, path in zip(flags, grpc_tls, strict=True):
            if path and not os.access(path, os.R_OK):
                return f"{flag}: cannot read {path}"
        if self.node_id and not valid_node_id(self.node_id):
            return f"--node-id: {self.node_id!r} is not 1-63 of A-Z a-z 0-9 . _ - (a letter first)"
        if self.workers > 1 and not self.etcd:
            return (
                f"--workers {self.workers} needs --etcd: the embedded namespace is one "
                "process's (run etcd, or use --workers 1)"
            )
        problem = self.etcd_problem(self.etcd)
        if problem is not None:
            return problem
        for cidr in filter(None, (c.strip() for c in self.trusted_proxies.split(","))):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                return f"--trusted-proxies: {cidr!r} is not a CIDR (e.g. 10.0.0.0/8)"
        if self.storage == "azure":
            if not self.azure_connection_string:
                return (
                    "--storage azure needs --azure-connection-string "
                    "(or MERIDIAN_AZURE_CONNECTION_STRING)"
                )
            if not _CONTAINER.match(self.azure_container_name):
                return (
                    f"invalid Azure container name {self.azure_container_name!r}: 3-63 of a-z, "
                    "0-9 and single hyphens (set --azure-container)"
                )
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    settings.add_arguments(p, NodeConfig)


def from_args(ns: argparse.Namespace) -> NodeConfig:
    cfg = settings.from_args(NodeConfig, ns)
    problem = cfg.check()
    if problem is not None:
        parser = getattr(ns, "_settings_parser", None)
        if parser is None:
            raise ValueError(problem)
        parser.error(problem)
    return cfg
