"""An aiohttp server with the limits a server facing the network needs, for
the router and the node alike.

aiohttp's own server has a keep-alive timeout and nothing else: a client
that trickles its headers a byte at a time, stops sending an upload's body
half way, or opens connections until the process runs out of file
descriptors holds resources for as long as it likes. ``start_server`` serves
an ``aiohttp.web.Application`` with four limits (``ServerLimits``, declared
as settings so a component's config can inherit the flags):

``--client-header-timeout`` (10 s)
    from the first byte of a request to the end of its headers. A client
    slower than that gets ``408`` and the connection is closed.
``--keepalive-timeout`` (75 s)
    how long a connection may sit idle between requests (and before its
    first one) -- aiohttp's ``keepalive_timeout``.
``--client-body-timeout`` (60 s)
    the longest silence while a request body is being received (an upload,
    a body the router forwards). Only silence of the client counts: while
    the server itself stops reading (its handler is busy, flow control
    paused the socket) the clock does not run. The connection is closed;
    the handler's next read of the body raises ``ConnectionResetError``.
``--max-connections`` (4096, 0: no cap)
    client connections at once. A connection beyond the cap first closes an
    idle keep-alive connection (the one idle longest), then one that is
    still trickling the headers of a request (the oldest); when every
    connection is busy with a request, the new one is answered ``503``
    with ``Retry-After: 1`` and closed. A request in progress is never
    cut to make room.

Every limit is enforced per connection by one sweep per server (about four
times per shortest timeout, at most once a second), not by a timer per
request. ``meridian_http_connections`` (open now) and
``meridian_http_connections_cut_total{reason}`` (``header_timeout``,
``body_timeout``, ``shed``, ``refused``) are on ``/metrics``.

Use::

    runner = await start_server(app, host, port, cfg.limits())
    ...
    await runner.cleanup()

How it hooks into aiohttp: ``LimitedRunner`` is an ``AppRunner`` whose server
makes ``LimitedHandler`` protocols (an aiohttp ``RequestHandler`` that also
timestamps what it receives) and wraps the server's request factory to learn
when a request's headers are complete. "Idle" is aiohttp's own notion (the
handler waits for the next message), the one its keep-alive timeout uses.
``tests/test_httpserver.py`` proves each limit against real sockets, so an
aiohttp upgrade that changes these internals fails there first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import resource
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter, Gauge

from cluster.settings import setting
from ocidist.errors import Code, error_body

log = logging.getLogger("meridian.http")

OPEN = Gauge(
    "meridian_http_connections", "Client connections open now", multiprocess_mode="livesum"
)
CUT = Counter(
    "meridian_http_connections_cut_total",
    "Client connections the server closed to enforce a limit, by which",
    ["reason"],
)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Wrapper = Callable[[Handler], Handler]
# An app's outermost wrapper around every request (errors, metrics, access
# log): what a middleware does, without aiohttp's per-request middleware
# chain, which costs a partial, a wrapper coroutine and a lookup per request.
WRAP_HANDLER = web.AppKey("wrap_handler", Wrapper)


def skips_app(request: web.BaseRequest, path: str) -> bool:
    """Whether a request for the API (``path`` is ``/v2`` or under
    ``/v2/``) may be answered without aiohttp's Application (its route
    resolution and match info are about a fifth of a small request): all
    but those whose answer the Application would shape -- an ``Expect``
    header (its ``100 Continue``), a newline in the path (a route's ``.*``
    stops there)."""
    return (
        (path == "/v2" or path.startswith("/v2/"))
        and "\n" not in path
        and hdrs.EXPECT not in request.headers
    )


def api_first(api: Handler) -> Wrapper:
    """A ``WRAP_HANDLER`` sending what ``skips_app`` allows straight to
    ``api``, everything else through the app."""

    def wrap(handler: Handler) -> Handler:
        async def route(request: web.BaseRequest) -> web.StreamResponse:
            if skips_app(request, request.path):
                return await api(request)
            return await handler(request)

        return route

    return wrap


_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_BUSY_BODY = error_body(Code.UNAVAILABLE, "too many connections; retry shortly")
_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
    b"Content-Type: application/json\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


@dataclass
class ServerLimits:
    """The server-side limits, as settings (inherit this dataclass to get the
    flags ``--client-header-timeout``, ``--keepalive-timeout``,
    ``--client-body-timeout``, ``--max-connections`` and their
    ``MERIDIAN_*`` twins). 0 turns a limit off."""

    client_header_timeout: float = setting(
        10.0, "seconds from a request's first byte to the end of its headers; 0: no limit"
    )
    keepalive_timeout: float = setting(
        75.0, "seconds a client connection may stay idle between requests"
    )
    client_body_timeout: float = setting(
        60.0, "longest silence of a client sending a request body, in seconds; 0: no limit"
    )
    max_connections: int = setting(
        4096,
        "client connections at once; beyond it idle ones are closed first, "
        "then new ones answered 503; 0: no cap",
    )

    def limits(self) -> ServerLimits:
        """These limits alone (a config that inherits them passes itself on)."""
        return ServerLimits(
            client_header_timeout=self.client_header_timeout,
            keepalive_timeout=self.keepalive_timeout,
            client_body_timeout=self.client_body_timeout,
            max_connections=self.max_connections,
        )

    def sweep_interval(self) -> float:
        timeouts = [t for t in (self.client_header_timeout, self.client_body_timeout) if t > 0]
        return min(1.0, max(0.05, min(timeouts, default=4.0) / 4))


class LimitedHandler(RequestHandler):
    """One client connection (an aiohttp ``RequestHandler``) that knows when
    it last received bytes, when the headers it is receiving began, and the
    body of the request in progress."""

    __slots__ = ("_limited", "_rx_at", "_headers_at", "_body", "_body_at", "_idle_at", "_cut")

    def __init__(self, manager: LimitedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limited = manager
        now = manager.loop.time()
        self._rx_at = now  # last bytes received (or connected)
        self._headers_at: float | None = None  # first byte of headers not complete yet
        self._body: Any = None  # the request in progress's payload stream
        self._body_at = now
        self._idle_at: float | None = None  # idle since (as the sweep saw it)
        self._cut = False

    # -- events ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._limited.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._limited.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:  # (aiohttp calls it with b"" to resume parsing)
            now = self._limited.loop.time()
            self._rx_at = now
            if self._headers_at is None and (self._body is None or self._body.is_eof()):
                self._headers_at = now  # bytes outside a body: a request's headers begin
        super().data_received(data)

    def request_started(self, payload: Any) -> None:
        """The headers of a request are complete (from the request factory)."""
        now = self._limited.loop.time()
        self._headers_at = None
        self._body = payload
        self._body_at = now

    # -- state -----------------------------------------------------------------

    def idle(self) -> bool:
        """Waiting for the next request (aiohttp's test for its keep-alive
        timeout); a request's headers may be arriving."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def cut(self, reason: str, answer: bytes = b"") -> None:
        if self._cut:
            return
        self._cut = True
        CUT.labels(reason).inc()
        transport = self.transport
        if answer and transport is not None and not transport.is_closing():
            transport.write(answer)
        self.force_close()

    def check(self, now: float, limits: ServerLimits) -> None:
        if self._cut or self.transport is None:
            return
        if not self.idle():
            self._idle_at = None
        else:
            if self._idle_at is None:
                self._idle_at = now
            started = self._headers_at
            if (
                started is not None
                and limits.client_header_timeout > 0
                and now - started >= limits.client_header_timeout
            ):
                self.cut("header_timeout", _TIMEOUT_408)
            return
        body = self._body
        if body is None or body.is_eof() or limits.client_body_timeout <= 0:
            return
        if not self.transport.is_reading():
            self._rx_at = now  # the server is not reading: not the client's silence
            return
        if now - max(self._rx_at, self._body_at) >= limits.client_body_timeout:
            log.warning("client sent no body bytes for %.0fs; closing", now - self._rx_at)
            self.cut("body_timeout")

    def shed_key(self) -> tuple[int, float] | None:
        """Order in which idle connections are closed to make room (None:
        busy with a request, never shed): idle ones, longest idle first (one
        the sweep has not seen idle yet last), then those trickling headers,
        oldest first."""
        if self._cut or not self.idle():
            return None
        if self._headers_at is None:
            return (0, math.inf if self._idle_at is None else self._idle_at)
        return (1, self._headers_at)


class LimitedServer(web.Server):
    """aiohttp's ``Server`` making ``LimitedHandler`` connections, with the
    sweep and the connection cap."""

    def __init__(self, base: web.Server, limits: ServerLimits, wrap: Wrapper | None) -> None:
        self.loop = asyncio.get_running_loop()
        inner = base.request_factory
        handler = base.request_handler if wrap is None else wrap(base.request_handler)

        def request_factory(message, payload, protocol, writer, task):  # noqa: ANN001, ANN202
            if isinstance(protocol, LimitedHandler):
                protocol.request_started(payload)
            return inner(message, payload, protocol, writer, task)

        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=self.loop,
            **base._kwargs,  # what the app and the runner configured the handlers with
        )
        self.limits = limits
        self.open: dict[LimitedHandler, None] = {}  # insertion-ordered set
        self._sweeper = self.loop.create_task(self._sweep(), name="http-limits")

    def __call__(self) -> LimitedHandler:
        return LimitedHandler(self, loop=self.loop, **self._kwargs)

    def opened(self, h: LimitedHandler) -> None:
        self.open[h] = None
        OPEN.inc()
        cap = self.limits.max_connections
        if cap <= 0 or len(self.open) <= cap:
            return
        victim: LimitedHandler | None = None
        best: tuple[int, float] | None = None
        for other in self.open:
            if other is h:
                continue
            key = other.shed_key()
            if key is not None and (best is None or key < best):
                victim, best = other, key
        if victim is not None:
            victim.cut("shed")
        else:
            h.cut("refused", _BUSY_503)

    def closed(self, h: LimitedHandler) -> None:
        if h in self.open:
            del self.open[h]
            OPEN.dec()

    async def _sweep(self) -> None:
        interval = self.limits.sweep_interval()
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for h in list(self.open):
                try:
                    h.check(now, self.limits)
                except Exception:
                    log.exception("connection limit check failed")

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's
        self._sweeper.cancel()
        await super().shutdown(timeout)


class LimitedRunner(web.AppRunner):
    """``web.AppRunner`` serving with ``ServerLimits``."""

    def __init__(self, app: web.Application, limits: ServerLimits, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout)
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        return LimitedServer(await super()._make_server(), self.limits, self.app.get(WRAP_HANDLER))


FD_RESERVE = 256  # files the process needs besides client connections


def ensure_open_files(wanted: int) -> int | None:
    """Raise this process's soft limit on open files towards ``wanted`` (up
    to the hard limit); returns the limit in force (None: unlimited)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def fitted_cap(cap: int, open_files: int | None) -> int:
    """The connection cap the open-file limit can hold: a connection may
    hold two descriptors (a proxied one holds one to a backend as well) and
    the process keeps ``FD_RESERVE`` for its own files; so the cap always
    triggers before the process runs out of descriptors."""
    if open_files is None:
        return cap
    return max(8, min(cap, (open_files - FD_RESERVE) // 2))


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    limits: ServerLimits,
    *,
    backlog: int = 1024,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    **runner_kwargs: Any,
) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` with ``limits``; returns the started
    runner (``runner.addresses`` has the bound port when ``port`` is 0;
    stop it with ``await runner.cleanup()``); with ``ssl_context``, HTTPS;
    with ``reuse_port``, ``SO_REUSEPORT`` (processes of one server sharing
    the port, the kernel spreading connections among them).
    ``runner_kwargs`` go to
    aiohttp's ``AppRunner`` (default: no access log, no signal handling)."""
    if limits.max_connections > 0:
        wanted = 2 * limits.max_connections + FD_RESERVE
        cap = fitted_cap(limits.max_connections, ensure_open_files(wanted))
        if cap < limits.max_connections:
            log.warning(
                "the open-file limit holds %d connections, not --max-connections %d: "
                "capping at %d (raise ulimit -n for more)",
                cap,
                limits.max_connections,
                cap,
            )
            limits = dataclasses.replace(limits, max_connections=cap)
    runner_kwargs.setdefault("access_log", None)
    runner_kwargs.setdefault("handle_signals", False)
    runner = LimitedRunner(app, limits, **runner_kwargs)
    await runner.setup()
    site = web.TCPSite(
        runner,
        host,
        port,
        reuse_address=True,
        reuse_port=reuse_port or None,
        backlog=backlog,
        ssl_context=ssl_context,
    )
    await site.start()
    return runner
