"""Configuration of the router: every setting declared once, with its flag,
its ``MERIDIAN_*`` twin, help and default (``cluster.settings``). The
server-side limits (client header/body timeouts, keep-alive, connection
cap) come from ``cluster.httpserver.ServerLimits``. With ``--tls-cert`` and
``--tls-key`` the router serves HTTPS; it verifies HTTPS regions with
``--tls-ca`` (default: the system's trusted roots)."""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass

from cluster import settings
from cluster.etcd_options import EtcdOptions
from cluster.httpserver import ServerLimits
from cluster.router.table import TableSettings
from cluster.runtime import ListenAddress
from cluster.settings import setting
from cluster.units import parse_size
from cluster.workers import parse_count


@dataclass
class RouterConfig(ListenAddress, ServerLimits, EtcdOptions):
    etcd: str = setting("", "etcd endpoints, comma-separated (required)")
    listen: str = setting("127.0.0.1:5000", "HTTP host:port", env="MERIDIAN_ROUTER_LISTEN")
    registry: str = setting("default", "registry of a Host that names none (as the nodes')")
    domain: str = setting("", "<registry>.<domain> in Host selects a registry (as the nodes')")
    probe_interval: float = setting(0.5, "seconds between health probes of a region")
    probe_timeout: float = setting(1.0, "a probe without an answer in this many seconds fails")
    connect_timeout: float = setting(1.0, "TCP connect timeout to a region")
    request_timeout: float = setting(30.0, "longest wait for a region's response headers")
    read_timeout: float = setting(60.0, "longest silence while streaming a region's body")
    hedge: bool = setting(True, "ask the next region when the first is slower than its p95")
    verify_redirects: bool = setting(
        True, "HEAD the chosen region before redirecting a blob GET to it"
    )
    redirect_blobs: bool = setting(True, "answer blob GETs with a redirect (else proxy the bytes)")
    direct_uploads: bool = setting(True, "point upload URLs at the chosen region itself")
    tls_cert: str = setting("", "PEM certificate (chain) to serve HTTPS with; none: plain HTTP")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_ca: str = setting(
        "", "PEM CA file to verify HTTPS regions with", show="the system's trusted roots"
    )
    loop: str = setting("uvloop", "event loop", choices=("asyncio", "uvloop"))
    manifest_cache: int = setting(
        64 << 20,
        "bytes of manifests the router keeps to answer manifest GET/HEAD itself "
        "(e.g. 64M; 0: proxy every one)",
        parse=parse_size,
        show="64M",
    )
    usage_interval: float = setting(
        60.0, "seconds between writes of the pulls the router answered to the usage records"
    )
    audit_flush_interval: float = setting(
        60.0, "seconds between writes of the pull audit records of manifests the router answered"
    )
    access_log: bool = setting(False, "log every request")
    log_level: str = setting(
        "info", "log level", parse=str.lower, choices=("debug", "info", "warning", "error")
    )
    workers: int = setting(
        1,
        "router processes serving on the port (SO_REUSEPORT), each a whole router; "
        "auto or 0: one per CPU",
        parse=parse_count,
    )

    def check(self) -> str | None:
        """What is wrong with the settings together, or None."""
        if not self.etcd:
            return "--etcd is required (or MERIDIAN_ETCD)"
        if bool(self.tls_cert) != bool(self.tls_key):
            return "--tls-cert and --tls-key go together"
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-ca", self.tls_ca),
        ):
            if path and not os.access(path, os.R_OK):
                return f"{flag}: cannot read {path}"
        return self.etcd_problem(self.etcd)

    def client_ssl(self) -> ssl.SSLContext:
        """How the router verifies HTTPS regions: ``--tls-ca``, else the
        system's trusted roots."""
        return ssl.create_default_context(cafile=self.tls_ca or None)

    def table_settings(self) -> TableSettings:
        return TableSettings(
            probe_interval=self.probe_interval,
            probe_timeout=self.probe_timeout,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            ssl_context=self.client_ssl(),
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    settings.add_arguments(p, RouterConfig)


def from_args(ns: argparse.Namespace) -> RouterConfig:
    return settings.from_args(RouterConfig, ns)
