"""Where the cluster is, for the management verbs (``meridian regions``,
``meridian replication list``), in this order:

1. ``--etcd`` (or ``MERIDIAN_ETCD``): the cluster's etcd;
2. ``--node`` (or ``MERIDIAN_NODE``): one node's management API;
3. a running ``meridian up``: its ``up.json`` in its data dir
   (``MERIDIAN_UP_DATA``, default ``./meridian-data``) names its etcd.

Otherwise, or when that ``up.json`` is left from a ``meridian up`` that is no
longer running, :class:`NoCluster` says so in one line and what to do
(exit code 4, see :mod:`cluster.preflight`).

``meridian up`` writes ``up.json`` (:data:`UP_STATE`) once its cluster
runs and removes it when it stops.

Nodes that serve HTTPS with a private CA (``meridian up --tls``) are
verified with ``--tls-ca`` (or ``MERIDIAN_TLS_CA``), else with the CA a
running ``meridian up --tls`` names in its ``up.json``, else with the
system's trusted roots (:meth:`Where.ssl_context`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from cluster import etcd_options, procfs
from cluster.kv import KVRefused, KVUnavailable
from cluster.preflight import NO_CLUSTER, USAGE, CliError

DEFAULT_UP_DATA = "./meridian-data"
UP_STATE = "up.json"


class NoCluster(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, NO_CLUSTER)


@dataclass(frozen=True)
class Where:
    """How to reach the cluster: its etcd, or else one node's API."""

    etcd: str = ""
    node: str = ""
    found_in: str = ""  # the up.json it was read from, if it was
    ca: str = ""  # PEM CA file the nodes' HTTPS is verified with ("": the system's roots)

    def ssl_context(self) -> ssl.SSLContext | bool:
        """How to verify the nodes' HTTPS: a context trusting :attr:`ca`, or
        True (the system's trusted roots). A CA file that cannot be read is a
        one-line :class:`CliError`."""
        if not self.ca:
            return True
        try:
            return ssl.create_default_context(cafile=self.ca)
        except OSError as e:  # ssl.SSLError too: not PEM
            why = e.strerror or str(e)
            raise CliError(
                f"--tls-ca {self.ca}: not a readable PEM CA file ({why[:120]}); "
                "pass the CA certificate that signed the nodes' certificates",
                USAGE,
            ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--etcd``, ``--node``, ``--json``, ``--tls-ca`` (the nodes' CA) and
    the etcd TLS and auth options (``cluster.etcd_options``): what the
    management verbs take."""
    p.add_argument(
        "--etcd",
        default=os.environ.get("MERIDIAN_ETCD", ""),
        help="etcd endpoints of the cluster, comma-separated (env MERIDIAN_ETCD; default: "
        f"the etcd of a running meridian up, from {DEFAULT_UP_DATA}/{UP_STATE} or "
        "$MERIDIAN_UP_DATA)",
    )
    p.add_argument(
        "--node",
        default=os.environ.get("MERIDIAN_NODE", ""),
        help="ask this node's management API instead of etcd, e.g. http://127.0.0.1:5001 "
        "(env MERIDIAN_NODE)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("MERIDIAN_TLS_CA", ""),
        help="PEM CA file to verify the nodes' HTTPS with (env MERIDIAN_TLS_CA; default: the "
        "CA of a running meridian up --tls, else the system's trusted roots)",
    )
    etcd_options.add_arguments(p)


def up_data_dir() -> Path:
    return Path(os.environ.get("MERIDIAN_UP_DATA") or DEFAULT_UP_DATA)


def running_up(data: Path | None = None) -> dict[str, Any] | None:
    """The state of the ``meridian up`` running on ``data`` (default
    :func:`up_data_dir`), None when there is no ``up.json``; NoCluster when
    the one there is stale (its ``meridian up`` is gone)."""
    path = (data or up_data_dir()) / UP_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NoCluster(f"{path} cannot be read ({e}); pass --etcd URL") from None
    pid = state.get("pid") if isinstance(state, dict) else None
    if not isinstance(pid, int) or not up_is_running(pid):
        raise NoCluster(
            f"{path} is left from a meridian up that is not running any more (PID {pid}); "
            f"start it again with `meridian up --data {path.parent}`, or pass --etcd URL"
        )
    return state


def up_is_running(pid: int) -> bool:
    """Whether ``pid`` is a live ``meridian up`` (not a reused PID)."""
    argv = procfs.cmdline(pid)
    return bool(argv) and "up" in argv[1:]


@contextlib.contextmanager
def answering(where: Where) -> Iterator[None]:
    """Around the calls to the cluster: a cluster that does not answer is
    :class:`NoCluster`'s one line, not a traceback."""
    found = f" (found in {where.found_in}: is that meridian up still starting?)"
    try:
        yield
    except KVRefused as e:  # TLS or credentials: says which option to fix
        raise CliError(f"etcd at {where.etcd}: {e}", USAGE) from None
    except KVUnavailable as e:
        why = str(e).removeprefix("etcd unavailable: ")
        raise NoCluster(
            f"etcd at {where.etcd} does not answer ({why[:120]}); is the cluster running? "
            + (found if where.found_in else "check --etcd")
        ) from None
    except (aiohttp.ClientResponseError, urllib.error.HTTPError) as e:
        status = getattr(e, "status", None) or getattr(e, "code", "?")
        raise NoCluster(
            f"{where.node} answered HTTP {status}; --node wants a Meridian node's URL"
        ) from None
    except (OSError, aiohttp.ClientError, TimeoutError) as e:
        why = getattr(e, "reason", e)  # urllib's URLError wraps what failed
        if isinstance(why, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
            raise CliError(
                f"{where.node}: its certificate is not trusted; pass --tls-ca CA.pem "
                "(or set MERIDIAN_TLS_CA) with the CA that signed it",
                USAGE,
            ) from None
        raise NoCluster(
            f"{where.node} does not answer ({str(e)[:120] or type(e).__name__}); "
            "is the node running? check --node"
        ) from None
    except ValueError as e:
        if where.etcd and "endpoint" in str(e):  # "bad etcd endpoint: ..."
            raise CliError(f"--etcd {where.etcd}: {e}", USAGE) from None
        raise


def find_cluster(etcd: str = "", node: str = "", ca: str = "") -> Where:
    """The cluster to talk to, and the CA its nodes' HTTPS is verified with
    (see the module docstring)."""
    if etcd:
        return Where(etcd=etcd, ca=ca)
    if node:
        return Where(node=node, ca=ca)
    data = up_data_dir()
    state = running_up(data)
    if state is None or not state.get("etcd"):
        raise NoCluster(
            f"no cluster found: no --etcd given, MERIDIAN_ETCD unset, and no running "
            f"meridian up in {data}; pass --etcd URL, or start one with `meridian up`"
        )
    tls = state.get("tls")
    if not ca and isinstance(tls, dict) and tls.get("ca"):
        ca = str(tls["ca"])
    return Where(etcd=str(state["etcd"]), found_in=str(data / UP_STATE), ca=ca)
