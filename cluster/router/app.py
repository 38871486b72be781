"""The router's process: the namespace watch that feeds its region table,
its own endpoints, the aiohttp application, ``serve``/``run`` and the
``meridian router`` command.

The router learns the regions from the namespace (a watch on etcd; with etcd
unreachable it keeps the last table it had), keeps their health and latency
(``cluster.router.table``) and sends every OCI Distribution request to the
region that will serve it fastest (``cluster.router.proxy``). It serves with
the client-side limits of ``cluster.httpserver``.

Own endpoints: ``/healthz``, ``/metrics`` (``meridian_router_*``) and
``/meridian/v1/router`` (the table as JSON). ``/oauth2/token`` is proxied to
a region (the token endpoint). Anything else that is not under ``/v2/`` is
``404 UNSUPPORTED``, answered by the router itself. With ``--tls-cert`` and
``--tls-key`` the router serves HTTPS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cluster import runtime, workers
from cluster.auth.access import GRANT_PARAM, TOKEN_PATH
from cluster.backoff import Backoff
from cluster.httpserver import WRAP_HANDLER, api_first, start_server
from cluster.kv import KVStore
from cluster.namespace import ALIVE, REGIONS, Namespace
from cluster.pki import server_context
from cluster.router import config
from cluster.router.config import RouterConfig
from cluster.router.proxy import Proxy, error_response
from cluster.router.table import RegionTable
from cluster.runtime import setup_logging, wait_for_stop_signal
from ocidist.errors import Code, RegistryError

log = logging.getLogger("meridian.router")


class Router(Proxy):
    """The proxy, plus what keeps its view of the cluster current (the
    namespace watch and store check) and the router's own endpoints."""

    def __init__(self, cfg: RouterConfig, ns: Namespace, table: RegionTable) -> None:
        super().__init__(cfg, ns, table)
        self.started = time.time()
        self.etcd_checked = 0.0
        self._sync_pending = False

    # -- namespace ---------------------------------------------------------

    def on_change(self, key: str, _value: bytes | None) -> None:
        if key.startswith((REGIONS, ALIVE)) and not self._sync_pending:
            self._sync_pending = True
            asyncio.get_running_loop().call_soon(self.sync_regions)

    def sync_regions(self) -> None:
        self._sync_pending = False
        self.table.sync(self.ns.regions(), self.ns.alive_regions(), self.ns.nodes())

    async def start_namespace(self, backoff: Backoff | None = None) -> None:
        """Load the namespace, retrying (0.2 s, doubling, at most 2 s) until
        etcd answers; meanwhile the router answers 503."""
        self.ns.cache.listeners.append(self.on_change)
        backoff = backoff or Backoff(base=0.2, cap=2.0)
        while True:
            try:
                await self.ns.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("namespace unreachable, retrying: %s", e)
                await asyncio.sleep(backoff.failed())
        backoff.succeeded()
        self.synced_once = True
        self.sync_regions()
        log.info("namespace loaded: %d regions", len(self.table.regions))

    async def check_store(self, interval: float = 2.0) -> None:
        """Whether the namespace store answers (the watch itself resumes
        silently, so this is what status and health report). Runs until
        cancelled."""
        while True:
            try:
                await asyncio.wait_for(self.ns.kv.get(REGIONS), timeout=interval)
                ok = True
            except asyncio.CancelledError:
                raise
            except Exception:
                ok = False
            if ok != self.etcd_ok:
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    "namespace store %s",
                    "reachable" if ok else "unreachable: routing on the last known table",
                )
            self.etcd_ok, self.etcd_checked = ok, time.time()
            await asyncio.sleep(interval)

    # -- own endpoints ---------------------------------------------------------

    def status(self) -> dict:
        return {
            "namespace_loaded": self.synced_once,
            "namespace_reachable": self.etcd_ok,
            "namespace_revision": self.ns.cache.revision,
            "uptime_s": round(time.time() - self.started, 1),
            "requests": self.requests,
            "retries": self.retries,
            "hedges": self.hedges,
            "shared_heads": self.shared_heads,
            "nearest": list(dict.fromkeys(r.name for r in self.table.nearest() if r.up)),
            "regions": self.table.status(),
        }

    async def status_handler(self, _: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def healthz(self, _: web.Request) -> web.Response:
        up = sum(1 for name in self.table.regions if self.table.region_up(name))
        body = {
            "status": "ok" if up else "no region in rotation",
            "role": "router",
            "regions_up": up,
            "regions": len(self.table.regions),
            "namespace_loaded": self.synced_once,
            "namespace_reachable": self.etcd_ok,
            "worker": workers.index(),  # which of the router's processes answered
        }
        return web.json_response(body, status=200 if up else 503)

    async def metrics(self, _: web.Request) -> web.Response:
        if _MULTIPROCESS is None:
            body = generate_latest()
        else:  # every router process's files (--workers)
            body = await asyncio.to_thread(generate_latest, _MULTIPROCESS)
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def not_found(self, request: web.Request) -> web.Response:
        """Not the registry API and not the router's own: answered here, never
        proxied, never counted against a region."""
        return error_response(
            RegistryError(Code.UNSUPPORTED, "no such endpoint", {"path": request.path}, status=404)
        )


# -- assembly -----------------------------------------------------------------

# With --workers N: the registry summing every router process's metrics
_MULTIPROCESS = workers.multiprocess_registry()


def make_kv(cfg: RouterConfig) -> KVStore:
    from cluster.etcd import EtcdKV

    return EtcdKV.from_flag(cfg.etcd, options=cfg.etcd_options())


STATUS_PATH = "/meridian/v1/router"
# The nodes' management API (node/manage.py), forwarded to a region.
MANAGE_PATHS = (
    "/meridian/v1/whoami",
    "/meridian/v1/serviceprincipals",
    "/meridian/v1/serviceprincipals/{tail:.*}",
    "/meridian/v1/registries",  # meridian registry create, list
    "/meridian/v1/registries/{tail:.*}",
    "/meridian/v1/regions/{tail:.*}",  # meridian region remove
    "/meridian/v1/audit",
)


def build_app(router: Router) -> web.Application:
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/v2", router.handle)
    app.router.add_route("*", "/v2/{tail:.*}", router.handle)
    app.router.add_route("GET", TOKEN_PATH, router.token)
    app.router.add_route("POST", TOKEN_PATH, router.token)
    for path in MANAGE_PATHS:
        app.router.add_route("*", path, router.token)
    app.router.add_get("/healthz", router.healthz)
    app.router.add_get("/metrics", router.metrics)
    app.router.add_get(STATUS_PATH, router.status_handler)
    app.router.add_route("*", "/{tail:.*}", router.not_found)
    return app


def make_access_log_middleware():  # noqa: ANN201 - aiohttp middleware type
    @web.middleware
    async def access(request: web.Request, handler):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        resp = await handler(request)
        log.info(
            "request",
            extra={
                "method": request.method,
                "path": _redacted(request),
                "status": resp.status,
                "ms": round((time.perf_counter() - t0) * 1000, 2),
            },
        )
        return resp

    return access


def _redacted(request: web.Request) -> str:
    """The request's path and query for the log, a blob grant blanked."""
    if GRANT_PARAM not in request.query:
        return request.path_qs
    query = request.query.copy()
    query[GRANT_PARAM] = "REDACTED"
    return str(request.rel_url.with_query(query))


async def serve(cfg: RouterConfig, ready: Callable[[Router], None] | None = None) -> None:
    problem = cfg.check()
    if problem:
        raise SystemExit(f"meridian router: {problem}")
    ssl_context = server_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    ns = Namespace(make_kv(cfg), region="")
    table = RegionTable(cfg.table_settings())
    router = Router(cfg, ns, table)
    app = build_app(router)
    if cfg.access_log:
        app.middlewares.append(make_access_log_middleware())
    else:  # the API straight to the router (a middleware runs only through the app)
        app[WRAP_HANDLER] = api_first(router.handle)
    count = workers.worker_count()
    runner = await start_server(
        app, cfg.host, cfg.port, cfg.limits(), ssl_context=ssl_context, reuse_port=count > 1
    )
    pool = None
    if workers.is_worker():
        workers.die_with_parent()
    elif count > 1:
        pool = workers.Workers(count)
        pool.start()
    starter = asyncio.create_task(router.start_namespace(), name="namespace-start")
    checker = asyncio.create_task(router.check_store(), name="namespace-check")
    log.info("router listening (etcd %s)", cfg.etcd, extra={"path": f"{cfg.scheme}://{cfg.listen}"})
    if ready is not None:
        ready(router)
    if workers.is_worker():  # ends with the primary, even one that was SIGKILLed
        stop = asyncio.ensure_future(wait_for_stop_signal())
        gone = asyncio.ensure_future(workers.parent_gone())
        await asyncio.wait([stop, gone], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        gone.cancel()
    else:
        await wait_for_stop_signal()
    if pool is not None:
        await pool.stop()
    for task in (starter, checker):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await runner.cleanup()
    await router.manifests.close()
    await table.close()
    await ns.close()


def run(cfg: RouterConfig) -> None:
    # --workers N: re-executes this process once (same PID) for metrics in files.
    rundir = os.path.join(tempfile.gettempdir(), f"meridian-router-{os.getuid()}-{cfg.port}")
    workers.become_primary(rundir, cfg.workers)
    setup_logging(cfg.log_level)
    runtime.run(serve(cfg), cfg.loop)


def router_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="meridian router",
        description="the latency-aware endpoint clients pull from: routes every request "
        "to the region that serves it fastest",
    )
    config.add_arguments(p)
    cfg = config.from_args(p.parse_args(argv))
    problem = cfg.check()
    if problem:
        p.error(problem)
    run(cfg)
    return 0
