"""What every long-running Meridian process shares: JSON-lines logging, the
event-loop choice, waiting for SIGINT/SIGTERM, and host:port parsing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

LOG_FIELDS = ("request_id", "method", "path", "status", "ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in LOG_FIELDS:
            if hasattr(record, k):
                out[k] = getattr(record, k)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run ``main`` on uvloop or the standard asyncio loop."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def wait_for_stop_signal() -> None:
    """Return on the first SIGINT or SIGTERM (then shut down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


PORT_RANGE_ENV = "MERIDIAN_PORT_RANGE"
# Below Linux's ephemeral range (32768-60999): a port chosen here is never
# taken meanwhile as the source port of some outgoing connection, which a
# port the kernel handed out for bind(0) can be.
DEFAULT_PORT_RANGE = (10000, 32000)
_handed_out: set[int] = set()


def _port_range() -> tuple[int, int]:
    lo, _, hi = os.environ.get(PORT_RANGE_ENV, "").partition("-")
    try:
        first, last = int(lo), int(hi)
    except ValueError:
        return DEFAULT_PORT_RANGE
    return (first, last) if 1024 <= first < last <= 65535 else DEFAULT_PORT_RANGE


def free_port(taken: set[int] | None = None) -> int:
    """A loopback TCP port that was free a moment ago, from
    ``$MERIDIAN_PORT_RANGE`` (``LO-HI``; default 10000-32000, below the
    ephemeral range): never etcd's default 2379/2380, never one this process
    handed out before, never one in ``taken`` (which then records it).
    Processes that choose ports at once (parallel test workers) give each a
    range of its own."""
    first, last = _port_range()
    while True:
        port = random.randint(first, last)
        if port in (2379, 2380) or port in _handed_out or (taken and port in taken):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        if taken is not None:
            taken.add(port)
        return port


class ListenAddress:
    """What a server's ``listen`` and ``tls_cert`` settings imply: its host,
    port and URL scheme (mixed into the node's and the router's configs)."""

    listen: str
    tls_cert: str

    @property
    def host(self) -> str:
        return split_hostport(self.listen)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.listen)[1]

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


def split_hostport(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], nudge: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until every one has finished. Cancels
    again each ``nudge`` seconds: on Python 3.11 ``asyncio.wait_for`` can
    swallow a cancellation that arrives as its inner awaitable completes,
    and a loop around it then runs on; one ``cancel`` + ``gather`` would
    hang shutdown."""
    while pending := [t for t in tasks if not t.done()]:
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=nudge)
