"""Assembly and lifecycle of one node: HTTP app, the wrapper every request goes
through (errors, metrics, access log), serve."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from cluster import runtime, workers
from cluster.auth.identities import OWNER_PASSWORD_ENV, ensure_owner
from cluster.httpserver import WRAP_HANDLER, Handler, Wrapper, skips_app, start_server
from cluster.kv import KVRefused, KVStore, KVUnavailable
from cluster.membership import default_node_id, keep_registered
from cluster.namespace import Namespace, RegionInfo
from cluster.pki import server_context
from cluster.preflight import USAGE, CliError
from cluster.runtime import setup_logging, wait_for_stop_signal
from cluster.status import PATH as STATUS_PATH
from cluster.status import NodeStatus
from node.api import Registry, map_store_errors
from node.auth import GRANT_PARAM, MAX_AUTH_HEADER, TOKEN_PATH, Gate
from node.config import NodeConfig
from node.manage import NodeContext
from node.manage import add_routes as add_manage_routes
from node.replication.plan import status_rows
from node.storage.base import BlobStore
from node.storage.filesystem import FilesystemBlobStore, SpaceReserve
from node.uploads import UploadManager
from node.webhooks.service import Activity
from ocidist.errors import Code, RegistryError
from ocidist.paths import API_HEADERS, API_VERSION, API_VERSION_HEADER, normalize_domain

log = logging.getLogger("meridian.node")

REQUESTS = Counter("meridian_http_requests_total", "HTTP requests served", ["method", "status"])
LATENCY = Histogram(
    "meridian_http_request_duration_seconds",
    "HTTP request latency",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)

REGISTRY_KEY = web.AppKey("registry", Registry)
# node.replication.service.Replication, when regions share a namespace (set before start)
REPLICATION_KEY = web.AppKey("replication", object)
# In a worker (``cluster.workers``): where the primary publishes its replication backlog
BACKLOG_KEY = web.AppKey("backlog", str)
# In multiprocess mode: the registry summing every process's metrics
_MULTIPROCESS = workers.multiprocess_registry()
_WORKER = workers.index()


def _error_response(err: RegistryError, request_id: str) -> web.Response:
    headers = {
        **API_HEADERS,
        "Content-Type": "application/json",
        **err.headers,
        "X-Request-Id": request_id,
    }
    return web.Response(status=err.status, body=err.body(), headers=headers)


def _logged_path(request: web.Request) -> str:
    """Path and query for the access log, a blob grant (a bearer credential
    for a minute) blanked."""
    if GRANT_PARAM not in request.query:
        return request.path_qs
    return str(request.rel_url.update_query({GRANT_PARAM: "REDACTED"}))


class _Metrics:
    """The request counter and latency histogram, their labelled children
    kept: ``labels()`` costs a lock and a tuple key per call, and the hot
    path asks for the same few (method, status) pairs all day."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], Any] = {}
        self._latency: dict[str, Any] = {}

    def observe(self, method: str, status: int, elapsed: float) -> None:
        count = self._counts.get((method, status))
        if count is None:
            if len(self._counts) > 256:  # odd methods: no unbounded growth
                self._counts.clear()
            count = self._counts[(method, status)] = REQUESTS.labels(method, str(status))
        count.inc()
        latency = self._latency.get(method)
        if latency is None:
            if len(self._latency) > 64:
                self._latency.clear()
            latency = self._latency[method] = LATENCY.labels(method)
        latency.observe(elapsed)


V2Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def _request_id(request: web.BaseRequest) -> str:
    """The client's ``X-Request-Id``, or a new one: only errors and the
    access log show it, so the hot path never pays for making one."""
    return request.headers.get("X-Request-Id") or _new_request_id()


class _RequestIds:
    """Request ids unique across processes and restarts without a random
    draw (a syscall) per request: a random prefix per process, then a
    counter. An id names a request in logs; it is not a secret."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):08x}"


_new_request_id = _RequestIds()


def observe_requests(access_log: bool, v2: V2Handler | None = None) -> Wrapper:
    """The node's wrapper around every request (``WRAP_HANDLER``): the API
    version header, errors as the spec's JSON, metrics, the access log.

    ``v2`` (``Registry.serve``) answers ``/v2/...`` straight from here,
    what ``cluster.httpserver.skips_app`` allows (the API has one route)."""
    observed = _Metrics()

    def wrap(handler: Handler) -> Handler:
        async def observe(request: web.BaseRequest) -> web.StreamResponse:
            start = time.perf_counter()
            try:
                path = request.path
                if v2 is not None and path.startswith("/v2/") and skips_app(request, path):
                    resp = await v2(request, path[4:])  # type: ignore[arg-type]
                else:
                    resp = await handler(request)
                resp.headers[API_VERSION_HEADER] = API_VERSION
            except web.HTTPException as e:
                e.headers.update(API_HEADERS)
                raise
            except Exception as e:
                resp = _failed(request, e)
            elapsed = time.perf_counter() - start
            observed.observe(request.method, resp.status, elapsed)
            if access_log:
                log.info(
                    "request",
                    extra={
                        "request_id": resp.headers.get("X-Request-Id") or _request_id(request),
                        "method": request.method,
                        "path": _logged_path(request),
                        "status": resp.status,
                        "ms": round(elapsed * 1000, 2),
                    },
                )
            return resp

        return observe

    return wrap


def _failed(request: web.BaseRequest, e: Exception) -> web.Response:
    """The JSON error answering a handler's exception; one that is not a
    client's or the storage's fault is logged with the request's id."""
    request_id = _request_id(request)
    if isinstance(e, RegistryError):
        return _error_response(e, request_id)
    if isinstance(e, (ConnectionResetError, asyncio.IncompleteReadError)):
        err = RegistryError(Code.BLOB_UPLOAD_INVALID, "request body ended early", str(e))
        return _error_response(err, request_id)
    mapped = map_store_errors(e)
    if mapped is None:
        log.exception(
            "unhandled error",
            extra={"request_id": request_id, "method": request.method, "path": request.path},
        )
        mapped = RegistryError(Code.UNAVAILABLE, "internal error", status=500)
    return _error_response(mapped, request_id)


async def metrics(_: web.Request) -> web.Response:
    if _MULTIPROCESS is None:
        body = generate_latest()
    else:
        body = await asyncio.to_thread(generate_latest, _MULTIPROCESS)  # reads every file
    resp = web.Response(body=body)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


async def healthz(request: web.Request) -> web.Response:
    reg = request.app[REGISTRY_KEY]
    return web.json_response(
        {
            "status": "ok",
            "region": reg.ns.region,
            "namespace_synced": reg.ns.synced.is_set(),
            "worker": _WORKER,  # which of the node's processes answered (0: the primary)
        }
    )


async def regions(request: web.Request) -> web.Response:
    ns = request.app[REGISTRY_KEY].ns
    alive = ns.alive_regions()
    nodes = ns.nodes()
    out = [
        {
            **dataclasses.asdict(info),
            "alive": name in alive,
            "nodes": [dataclasses.asdict(n) for _, n in sorted(nodes.get(name, {}).items())],
        }
        for name, info in sorted(ns.regions().items())
    ]
    return web.json_response({"regions": out})


async def status(request: web.Request) -> web.Response:
    """``GET /meridian/v1/status``: the contract in ``cluster/status.py``."""
    ns = request.app[REGISTRY_KEY].ns
    replication = request.app.get(REPLICATION_KEY)
    peers = getattr(replication, "peers", None)
    replicator = getattr(replication, "replicator", None)
    items = len(replicator.plan) if replicator is not None else None
    pending = replicator.pending_bytes if replicator is not None else None
    shared = request.app.get(BACKLOG_KEY)
    if shared is not None:  # a worker: the primary's replicator
        items, pending = workers.read_backlog(shared)
    doc = NodeStatus(
        region=ns.region,
        peers_rtt_s=peers.rtts() if peers is not None else {},
        backlog_items=items,
        backlog_bytes=pending,
        namespace_synced=ns.synced.is_set(),
    )
    return web.Response(body=doc.to_json(), content_type="application/json")


def make_kv(cfg: NodeConfig) -> KVStore:
    if cfg.etcd:
        from cluster.etcd import EtcdKV

        return EtcdKV.from_flag(cfg.etcd, options=cfg.etcd_options())
    from cluster.embedded import EmbeddedKV

    return EmbeddedKV(os.path.join(cfg.data, "namespace.sqlite"))


async def replication_status(request: web.Request) -> web.Response:
    """``GET /meridian/v1/replication``: every region's backlog and lag
    (``status_rows``), from this node's cache of the namespace."""
    return web.json_response({"regions": status_rows(request.app[REGISTRY_KEY].ns)})


def process_node_id(cfg: NodeConfig) -> str:
    """The node id this process writes under: the node's, or ``<node>-w<i>``
    in worker ``i`` (audit keys, staged files, transfer parts never collide)."""
    return (cfg.node_id or default_node_id(cfg.port)) + workers.worker_suffix()


def build_app(cfg: NodeConfig, ns: Namespace, store: BlobStore) -> web.Application:
    """The node's HTTP app over ``store`` (the region's blob store, or one
    reading through to the other regions). In a worker process
    (``cluster.workers``) without what runs once per node: webhook delivery and
    the purge of upload sessions."""
    primary = not workers.is_worker()
    share = workers.worker_count()
    uploads = UploadManager(
        cfg.data,
        store,
        cfg.max_blob_size,
        max_per_repo=cfg.max_uploads_per_repo,
        max_total=cfg.max_uploads,
    )
    gate = (
        Gate(
            ns,
            domain=normalize_domain(cfg.domain),
            default_registry=cfg.registry,
            trusted_proxies=cfg.proxies(),
        )
        if cfg.auth
        else None
    )
    if gate is not None:  # every process counts its own failed logins
        gate.limiter.allowed = workers.share(gate.limiter.allowed, share)
    registry = Registry(
        ns, store, uploads, default_registry=cfg.registry, domain=cfg.domain, gate=gate
    )
    registry.guard.workers = share
    activity = Activity(
        ns,
        process_node_id(cfg),
        source=gate.source if gate is not None else None,
        timeout=cfg.webhook_timeout,
        max_age=cfg.webhook_max_age,
        retry_cap=cfg.webhook_retry_max,
        concurrency=cfg.webhook_concurrency,
        history=cfg.webhook_history,
        audit_flush=cfg.audit_flush_interval,
        audit_retention=cfg.audit_retention,
    )
    registry.activity = activity
    if gate is not None:
        gate.on_login = activity.login
    # Manifests are read with their own 4 MiB limit; blob bodies are streamed.
    app = web.Application(client_max_size=0)
    app[WRAP_HANDLER] = observe_requests(cfg.access_log, registry.serve)
    app[REGISTRY_KEY] = registry
    app.router.add_route("*", "/v2/{path:.*}", registry.dispatch)
    if gate is not None:
        app.router.add_route("GET", TOKEN_PATH, gate.token)
        app.router.add_route("POST", TOKEN_PATH, gate.token)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/meridian/v1/regions", regions)
    app.router.add_get(STATUS_PATH, status)
    add_manage_routes(
        app,
        ns,
        gate,
        default_registry=cfg.registry,
        domain=cfg.domain,
        node=NodeContext(cfg, registry),
    )

    async def purge_uploads(app: web.Application):  # noqa: ANN202
        async def loop() -> None:
            while True:
                try:
                    await uploads.purge_older_than(cfg.upload_ttl, cfg.upload_empty_ttl)
                except Exception:
                    log.exception("purging upload sessions failed")
                shortest = min(cfg.upload_ttl, cfg.upload_empty_ttl)
                await asyncio.sleep(min(3600, max(shortest / 4, 1)))

        task = asyncio.create_task(loop())
        yield
        task.cancel()

    if primary:
        app.cleanup_ctx.append(purge_uploads)

    async def webhooks_and_audit(app: web.Application):  # noqa: ANN202
        if primary:
            await activity.start()
        else:  # events are emitted here, delivered by the primary
            await activity.hooks.load()
            activity.audit.start()
        yield
        await activity.stop()

    app.cleanup_ctx.append(webhooks_and_audit)
    return app


def show_owner_password(password: str, data: str) -> None:
    """Show a generated owner password once: on the terminal, or, when
    stderr is not one (a log file), in a file only its owner can read --
    never in a log line."""
    if sys.stderr.isatty():
        print(
            f"meridian: created the cluster owner: user name 'owner', password {password}\n"
            f"meridian: it is not shown again (set {OWNER_PASSWORD_ENV} to choose it)",
            file=sys.stderr,
            flush=True,
        )
        return
    path = os.path.join(os.path.abspath(data), "owner-password")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    log.warning(
        "created the cluster owner (user name 'owner'); its generated password is in %s "
        "(readable by this user only): read it, then delete the file",
        path,
    )


async def serve(cfg: NodeConfig) -> None:
    os.makedirs(cfg.data, exist_ok=True)
    # Names this node's staged files in a data dir the region's nodes may share.
    node = cfg.node_id or default_node_id(cfg.port)
    # --workers N: this process is the primary (index 0) or worker i (cluster.workers).
    index = workers.index()
    primary = index == 0
    count = workers.worker_count()
    if not primary:
        workers.die_with_parent()
    # Space held back for the embedded namespace on a full disk; released
    # first, so the namespace opens even on a disk that filled up.
    reserve = SpaceReserve(os.path.join(cfg.data, "reserve"), cfg.storage_reserve)
    if primary:
        reserve.release()
    ns = Namespace(make_kv(cfg), cfg.region)
    while True:
        try:
            await ns.start()
            break
        except KVRefused as e:  # TLS or credentials: waiting does not help
            await ns.close()
            raise CliError(f"etcd {cfg.etcd}: {e}", USAGE) from None
        except KVUnavailable as e:
            log.warning("namespace store unreachable, retrying: %s", e)
            await asyncio.sleep(1)
    if primary and cfg.auth:  # (a worker starts after the primary made the owner)
        generated = await ensure_owner(ns, os.environ.get(OWNER_PASSWORD_ENV))
        if generated is not None:
            show_owner_password(generated, cfg.data)
    elif primary:
        log.warning(
            "authentication is OFF (--no-auth): anyone who can reach this node may "
            "push, pull and delete anything"
        )
    if cfg.storage == "azure":
        from node.storage.azure import connect

        local: BlobStore = await connect(
            cfg.azure_connection_string, cfg.azure_container_name, redirect=cfg.storage_redirect
        )
    else:
        local = FilesystemBlobStore(cfg.data, reserve=reserve, node_id=process_node_id(cfg))
    store: BlobStore = local
    replication = None
    if cfg.etcd or cfg.grpc_listen:
        # Regions share a namespace: serve and fetch bytes over gRPC, and
        # read through to the other regions what is not here yet.
        from node.grpc_service import GrpcTLS
        from node.replication.service import Replication

        grpc_tls = (
            GrpcTLS(cfg.grpc_tls_ca, cfg.grpc_tls_cert, cfg.grpc_tls_key)
            if cfg.grpc_tls_ca
            else None
        )
        # A worker only reads through: the gRPC server, the replicator and
        # the reclaimer run in the primary.
        replication = Replication(
            ns,
            local,
            grpc_listen=cfg.grpc_listen if primary else "",
            concurrency=cfg.replication_concurrency if primary else 0,
            bandwidth=cfg.replication_bandwidth,
            reclaim_interval=cfg.reclaim_interval if primary else 0.0,
            reclaim_grace=cfg.reclaim_grace,
            tls=grpc_tls,
            node_id=process_node_id(cfg),
        )
        store = replication.store
    # A standalone node reclaims too: nothing to fetch, same collector.
    reclaimer = None
    if primary and replication is None and cfg.reclaim_interval > 0:
        from node.replication.reclaim import Reclaimer

        reclaimer = Reclaimer(ns, local, None, cfg.reclaim_interval, cfg.reclaim_grace)
        reclaimer.start()
    app = build_app(cfg, ns, store)
    status_file = workers.status_path(workers.run_dir(cfg.data, node))
    if replication is not None:
        app.router.add_get("/meridian/v1/replication", replication_status)
        app[REPLICATION_KEY] = replication
        if not primary:
            app[BACKLOG_KEY] = status_file
        activity = app[REGISTRY_KEY].activity
        if replication.replicator is not None and activity is not None:
            replication.replicator.hooks.append(activity.emitter.replicated)
            replication.replicator.event_ops.append(activity.emitter.replicated_ops)
        await replication.start()
    ssl_context = server_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    runner = await start_server(
        app,
        cfg.host,
        cfg.port,
        cfg.limits(),
        ssl_context=ssl_context,
        reuse_port=count > 1,
        # aiohttp's 8190-byte field limit would answer an over-long
        # Authorization with a plain-text 400 before the gate's 401 (MAX_AUTH_HEADER).
        max_field_size=2 * MAX_AUTH_HEADER,
    )
    if not primary:
        log.info("node worker %d listening (pid %d)", index, os.getpid())
        stop = asyncio.ensure_future(wait_for_stop_signal())
        gone = asyncio.ensure_future(workers.parent_gone())
        await asyncio.wait([stop, gone], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        gone.cancel()
        await runner.cleanup()
        if replication is not None:
            await replication.stop()
        await ns.close()
        await local.close()
        return
    log.info(
        "node listening",
        extra={"path": f"{'https' if ssl_context else 'http'}://{cfg.listen}"},
    )
    pool = None
    background = []
    if count > 1:
        pool = workers.Workers(count)
        pool.start()
        log.info("node serving with %d processes", count)
        if replication is not None and replication.replicator is not None:
            background.append(
                asyncio.create_task(workers.publish_backlog(status_file, replication.replicator))
            )
    info = RegionInfo(
        name=cfg.region, http=cfg.base_url, grpc=cfg.grpc_advertise or cfg.grpc_listen
    )
    membership = asyncio.create_task(keep_registered(ns, info, node=node), name="membership")
    await wait_for_stop_signal()
    for task in background:
        task.cancel()
    if pool is not None:
        await asyncio.gather(runner.cleanup(), pool.stop())
    else:
        await runner.cleanup()
    if replication is not None:
        await replication.stop()
    if reclaimer is not None:
        await reclaimer.close()
    # Revokes the region's lease: not alive from now on, rather than a TTL
    # later (after replication stopped: it would see that change).
    membership.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await membership
    await ns.close()
    await local.close()


def run(cfg: NodeConfig) -> None:
    # --workers N: re-executes this process once (same PID) for metrics in files.
    node = cfg.node_id or default_node_id(cfg.port)
    workers.become_primary(workers.run_dir(cfg.data, node), cfg.workers)
    setup_logging(cfg.log_level)
    runtime.run(serve(cfg), cfg.loop)
