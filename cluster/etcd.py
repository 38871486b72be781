"""``EtcdKV``: the key-value contract (cluster/kv.py) on a real etcd v3 cluster.

A thin layer over aetcd's generated etcd v3 gRPC stubs (``aetcd.rpc``:
KVStub, WatchStub, LeaseStub, with the etcd protobuf messages) on our own
``grpc.aio`` channels. aetcd's high-level ``aetcd.Client`` is not used: it
takes a single host:port (no endpoint list), its watch API hands out single
events (the per-revision batches and progress notifications the contract
needs are lost) and does not resume, and it has no way to grant a lease with
a chosen ID. Its stubs and messages import and work with protobuf 7.

Behaviour:

- Every failure to reach etcd (and every unexpected gRPC status) surfaces as
  ``KVUnavailable``; never a raw gRPC error. Client mistakes etcd rejects
  (unknown lease, request too large, ...) raise ``ValueError``, like
  ``EmbeddedKV``.
- Retries on UNAVAILABLE, with back-off 0.1 s doubling to 2 s, within the
  call's ``timeout`` budget, only for calls whose repetition is harmless:
  get, range, lease grant (the client picks the lease ID, so a repeat is
  recognised), lease keep-alive, lease revoke, compact. A txn is sent once:
  if its answer is lost it raises ``KVUnavailable`` (it may or may not have
  been applied; the caller re-reads).
- ``watch`` keeps one gRPC stream per watch and resumes from the last
  delivered revision + 1 after any stream failure (etcd restart, connection
  loss, leader loss), with the same back-off, until ``close()``. Progress
  notifications move the resume point forward. etcd reporting the resume
  revision as compacted raises ``WatchCompacted``. Events are delivered one
  batch per revision.
- Leases are kept alive every ttl/3 by a background task per lease. If etcd
  reports the lease gone (it expired while this client could not reach
  etcd, or someone revoked it), the task re-grants the SAME lease ID with the
  same TTL and then calls ``on_lease_regranted(lease_id)``; the keys that were
  attached are gone and re-putting them is the caller's job (the callback is
  where to do it). ``close()`` stops keep-alives without revoking: leases lapse
  after their TTL.
- ``start()`` does not need etcd to be up: channels connect lazily.
- Locked-down etcd (``cluster.etcd_options.EtcdOptions``): ``https://``
  endpoints (or any endpoint once ``etcd_ca``/``etcd_cert`` is given) are
  reached over TLS, trusting ``etcd_ca`` (else the system's roots) and
  presenting ``etcd_cert``/``etcd_key`` when given. With ``etcd_user``, the
  client calls ``Auth.Authenticate`` once and sends the token as the
  ``token`` metadata of every call and stream; when etcd answers that the
  token is invalid or expired (simple tokens lapse after etcd's
  ``--auth-token-ttl`` of idleness) or the auth store changed, it
  authenticates again and repeats the call once. A refusal retrying cannot
  fix -- an untrusted certificate, no client certificate, a wrong password,
  no user where etcd wants one, permission denied -- raises ``KVRefused``
  (a ``KVUnavailable``) at once, with one line naming the option to fix.
  The password is never logged nor put in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
from aetcd import rpc

from cluster.embedded import check_txn, prefix_end
from cluster.etcd_options import EtcdOptions
from cluster.kv import (
    Compare,
    Entry,
    Event,
    KVRefused,
    KVUnavailable,
    Op,
    Put,
    TxnResult,
    WatchCompacted,
)

__all__ = ["EtcdKV"]

log = logging.getLogger(__name__)

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
_PAGE_SIZE = 10_000  # keys per range page (large pages: fewer round trips)
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Detect a dead peer under an open watch stream (etcd allows pings every
    # 5 s while streams are open; none are sent without calls).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
_WATCH_METADATA = (("hasleader", "true"),)  # etcd cancels watches on a leaderless member

LeaseCallback = Callable[[int], Awaitable[None] | None]


class _Compacted(Exception):
    """etcd answered OUT_OF_RANGE: the requested revision is compacted."""


def _target(endpoint: str, tls: bool = False) -> tuple[str, bool]:
    """("host:port", secure) from "http://host:port", "https://..." or
    "host:port" (secure when ``tls``: the options ask for TLS)."""
    if "://" not in endpoint:
        return endpoint, tls
    u = urlsplit(endpoint)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"bad etcd endpoint: {endpoint!r}")
    if tls and u.scheme == "http":
        raise ValueError(
            f"etcd endpoint {endpoint} is plain http:// but --etcd-ca/--etcd-cert ask for "
            "TLS: write it https://"
        )
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    port = u.port or 2379
    return f"{host}:{port}", u.scheme == "https"


@dataclass(eq=False)
class _Endpoint:
    url: str
    channel: grpc.aio.Channel
    kv: Any
    watch: Any
    lease: Any
    auth: Any


@dataclass(eq=False)
class _Lease:
    ttl: int
    task: asyncio.Task[None] | None


class EtcdKV:
    """etcd-backed ``KVStore``.

    ``endpoints``: client URLs of the etcd members, e.g.
    ``["http://10.0.0.1:2379", "http://10.0.0.2:2379"]``; calls go to one
    member and move to the next when it is unavailable.
    ``timeout``: the budget in seconds of one call, retries included.
    ``on_lease_regranted``: called (sync or async) with a lease ID after that
    lease was found expired and granted again under the same ID.
    ``options``: TLS and user/password (``cluster.etcd_options``).
    """

    @classmethod
    def from_flag(cls, spec: str, **kwargs: Any) -> EtcdKV:
        """From the comma-separated endpoints of an ``--etcd`` flag."""
        return cls([e.strip() for e in spec.split(",") if e.strip()], **kwargs)

    def __init__(
        self,
        endpoints: list[str],
        *,
        timeout: float = 5.0,
        on_lease_regranted: LeaseCallback | None = None,
        options: EtcdOptions | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self._options = options or EtcdOptions()
        self._urls = list(endpoints)
        self._targets = [_target(e, self._options.etcd_tls) for e in self._urls]
        self._timeout = timeout
        self._on_lease_regranted = on_lease_regranted
        self._endpoints: list[_Endpoint] = []
        self._current = 0
        self._leases: dict[int, _Lease] = {}
        self._calls: set[Any] = set()
        self._closed_event = asyncio.Event()
        self._started = False
        self._closed = False
        # etcd auth: the token of Auth.Authenticate ("" when etcd has auth off)
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        credentials = None
        for url, (target, secure) in zip(self._urls, self._targets, strict=True):
            if secure:
                credentials = credentials or _tls_credentials(self._options)
                channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            self._endpoints.append(
                _Endpoint(
                    url,
                    channel,
                    rpc.KVStub(channel),
                    rpc.WatchStub(channel),
                    rpc.LeaseStub(channel),
                    rpc.AuthStub(channel),
                )
            )
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        tasks = [lease.task for lease in self._leases.values() if lease.task is not None]
        self._leases.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for call in list(self._calls):
            call.cancel()
        for ep in self._endpoints:
            await ep.channel.close()

    # -- reads -------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        if not key:
            raise ValueError("empty key")
        resp = await self._call("kv", "Range", rpc.RangeRequest(key=key.encode()), retry=True)
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return Entry(kv.key.decode(), bytes(kv.value), kv.mod_revision)

    async def range(self, prefix: str) -> tuple[list[Entry], int]:
        while True:
            entries: list[Entry] = []
            revision = 0
            try:
                async for page, rev in self._pages(prefix):
                    entries += page
                    revision = rev
            except _Compacted:
                continue  # compacted between two pages: take a new snapshot
            return entries, revision

    async def range_pages(self, prefix: str) -> AsyncIterator[tuple[list[Entry], int]]:
        """``range`` one page at a time (each with the snapshot's revision),
        for a caller that applies a large range without holding all of it
        (the namespace cache's load); ``WatchCompacted`` if the snapshot is
        compacted between two pages: start over."""
        try:
            async for page in self._pages(prefix):
                yield page
        except _Compacted as e:
            raise WatchCompacted(0) from e

    async def _pages(self, prefix: str) -> AsyncIterator[tuple[list[Entry], int]]:
        key = prefix.encode()
        end = prefix_end(key) or b"\0"
        key = key or b"\0"
        revision = 0
        while True:
            req = rpc.RangeRequest(
                key=key,
                range_end=end,
                limit=_PAGE_SIZE,
                revision=revision,
                # No sort option: etcd returns keys in ascending order anyway,
                # and asking for a sort costs each page work proportional to
                # every key after it (measured: 28 s vs 6 s for 200k keys).
            )
            resp = await self._call("kv", "Range", req, retry=True)
            if revision == 0:
                revision = resp.header.revision  # later pages read this snapshot
            page = [Entry(kv.key.decode(), bytes(kv.value), kv.mod_revision) for kv in resp.kvs]
            yield page, revision
            if not resp.more or not resp.kvs:
                return
            key = resp.kvs[-1].key + b"\0"

    # -- writes ------------------------------------------------------------

    async def txn(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        check_txn(compares, ops)
        req = rpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_request_op(op) for op in ops],
        )
        resp = await self._call("kv", "Txn", req, retry=False)
        return TxnResult(bool(resp.succeeded), resp.header.revision)

    async def compact(self, revision: int) -> None:
        """Compact etcd's history up to ``revision``: watches from earlier
        revisions then raise ``WatchCompacted``. Already compacted: no-op."""
        try:
            await self._call("kv", "Compact", rpc.CompactionRequest(revision=revision), retry=True)
        except _Compacted:
            pass

    # -- watch -------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        self._check_open()
        start = prefix.encode()
        key, end = start or b"\0", prefix_end(start) or b"\0"
        next_rev = max(start_revision, 1)
        backoff = _BACKOFF_MIN
        while not self._closed:
            ep = self._endpoint()
            try:
                auth = await self._auth_metadata()
            except KVUnavailable as exc:
                log.warning("etcd watch on %r cannot authenticate: %s", prefix, exc)
                auth = None
            call = None if auth is None else ep.watch.Watch(metadata=_WATCH_METADATA + auth)
            if call is not None:
                self._calls.add(call)
            try:
                if call is None:
                    raise _Retry()
                create = rpc.WatchCreateRequest(
                    key=key, range_end=end, start_revision=next_rev, progress_notify=True
                )
                await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        break
                    if resp.compact_revision:
                        raise WatchCompacted(resp.compact_revision)
                    if resp.canceled:
                        if self._stale(None, resp.cancel_reason, auth):
                            self._forget_token(auth)
                            log.info("etcd auth token expired; authenticating again")
                        elif _auth_refusal(resp.cancel_reason):
                            log.warning(
                                "etcd refused watch on %r: %s",
                                prefix,
                                self._refused_message(resp.cancel_reason) or resp.cancel_reason,
                            )
                        else:
                            log.info("etcd canceled watch on %r: %s", prefix, resp.cancel_reason)
                        break
                    if resp.created:
                        backoff = _BACKOFF_MIN
                        continue
                    if not resp.events:
                        # progress notification: no event below this revision is pending
                        next_rev = max(next_rev, resp.header.revision + 1)
                        continue
                    for batch in _by_revision(resp.events):
                        next_rev = batch[-1].mod_revision + 1
                        yield batch
            except _Retry:
                pass
            except grpc.aio.AioRpcError as exc:
                if self._closed:
                    return
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._forget_token(auth)
                refused = self._refusal(exc)
                if refused is not None:
                    log.warning("etcd watch on %r refused: %s", prefix, refused)
                elif exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._rotate(ep)
                log.info("etcd watch on %r lost (%s); resuming at %d", prefix, exc.code(), next_rev)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and (task is None or not task.cancelling()):
                    return  # our close() cancelled the call
                raise
            finally:
                if call is not None:
                    self._calls.discard(call)
                    call.cancel()
            if self._closed:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed_event.wait(), backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    # -- leases ------------------------------------------------------------

    async def grant_lease(self, ttl: int, *, keep_alive: bool = True) -> int:
        """A new lease of ``ttl`` seconds, kept alive every ttl/3 until
        ``revoke_lease``/``close`` (``keep_alive=False``: it just expires)."""
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        lease_id = secrets.randbits(62) + 1
        await self._grant(lease_id, ttl)
        self._leases[lease_id] = _Lease(ttl, None)
        if keep_alive:
            self._leases[lease_id].task = asyncio.create_task(
                self._keep_alive(lease_id, ttl), name=f"etcd-lease-{lease_id:x}"
            )
        return lease_id

    async def revoke_lease(self, lease: int) -> None:
        """Revoke: its keys are deleted. Revoking an unknown lease is a
        no-op. If etcd cannot be reached this raises ``KVUnavailable`` and the
        lease, no longer kept alive, lapses after its TTL."""
        state = self._leases.pop(lease, None)
        if state is not None and state.task is not None:
            state.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.task
        try:
            await self._call("lease", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease), retry=True)
        except ValueError:
            pass  # NOT_FOUND: already gone

    async def _grant(self, lease_id: int, ttl: int) -> None:
        req = rpc.LeaseGrantRequest(ID=lease_id, TTL=ttl)
        try:
            resp = await self._call("lease", "LeaseGrant", req, retry=True, duplicate_ok=True)
        except _DuplicateLease:
            return  # an earlier attempt whose answer was lost did grant it
        if resp.error:
            raise ValueError(f"etcd lease grant: {resp.error}")

    async def _keep_alive(self, lease_id: int, ttl: int) -> None:
        interval = ttl / 3
        delay = interval
        backoff = _BACKOFF_MIN
        while True:
            await asyncio.sleep(delay)
            try:
                remaining = await self._keep_alive_once(lease_id, min(self._timeout, interval))
                if remaining <= 0:
                    log.warning("etcd lease %x was lost; granting it again", lease_id)
                    await self._grant(lease_id, ttl)
                    await self._notify_regranted(lease_id)
                delay, backoff = interval, _BACKOFF_MIN
            except KVUnavailable as exc:
                log.info("etcd lease %x keep-alive failed: %s", lease_id, exc)
                delay, backoff = min(backoff, interval), min(backoff * 2, _BACKOFF_MAX)
            except ValueError as exc:
                log.error("etcd lease %x keep-alive: %s", lease_id, exc)
                delay = interval

    async def _keep_alive_once(self, lease_id: int, budget: float) -> int:
        self._check_open()
        ep = self._endpoint()
        auth = await self._auth_metadata()
        call = ep.lease.LeaseKeepAlive(timeout=max(budget, 0.05), metadata=auth)
        self._calls.add(call)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise KVUnavailable("etcd closed the lease keep-alive stream")
            return int(resp.TTL)
        except grpc.aio.AioRpcError as exc:
            if self._stale(exc.code(), exc.details(), auth):
                self._forget_token(auth)
                raise KVUnavailable("etcd auth token expired") from exc
            refused = self._refusal(exc)
            if refused is not None:
                raise refused from exc
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._rotate(ep)
            raise _translate(exc) from exc
        finally:
            self._calls.discard(call)
            call.cancel()

    async def _notify_regranted(self, lease_id: int) -> None:
        if self._on_lease_regranted is None:
            return
        try:
            result = self._on_lease_regranted(lease_id)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_lease_regranted(%x) failed", lease_id)

    # -- plumbing ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KVUnavailable("store closed")
        if not self._started:
            raise RuntimeError("EtcdKV.start() was not called")

    def _endpoint(self) -> _Endpoint:
        """The member to talk to: the current one, unless its channel is
        known to be failing and another one's is not (so even a txn, which
        is never retried, does not go to a member known to be down)."""
        n = len(self._endpoints)
        if n > 1:
            for i in range(n):
                ep = self._endpoints[(self._current + i) % n]
                state = ep.channel.get_state(try_to_connect=True)
                if state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    self._current = (self._current + i) % n
                    return ep
        return self._endpoints[self._current % n]

    def _rotate(self, failed: _Endpoint) -> None:
        if self._endpoint() is failed:
            self._current = (self._current + 1) % len(self._endpoints)

    async def _call(
        self,
        service: str,
        method: str,
        request: Any,
        *,
        retry: bool,
        duplicate_ok: bool = False,
        auth: bool = True,
    ) -> Any:
        """One unary call within ``timeout``. With ``retry``, UNAVAILABLE is
        retried (next endpoint, back-off) while the budget lasts. A call
        etcd refuses for a stale auth token is authenticated again and
        repeated once (whatever ``retry``: etcd did not apply it)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        backoff = _BACKOFF_MIN
        attempt = 0
        reauthenticated = False
        while True:
            ep = self._endpoint()
            fn = getattr(getattr(ep, service), method)
            attempt += 1
            metadata = await self._auth_metadata() if auth else ()
            try:
                return await fn(
                    request, timeout=max(deadline - loop.time(), 0.001), metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if auth and not reauthenticated and self._stale(code, exc.details(), metadata):
                    reauthenticated = True
                    self._forget_token(metadata)
                    continue
                refused = self._refusal(exc)
                if refused is not None:
                    raise refused from exc
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._rotate(ep)
                if (
                    duplicate_ok
                    and attempt > 1
                    and code == grpc.StatusCode.FAILED_PRECONDITION
                    and "lease already exists" in (exc.details() or "")
                ):
                    raise _DuplicateLease() from exc
                if not retry or code != grpc.StatusCode.UNAVAILABLE or self._closed:
                    raise _translate(exc) from exc
                if loop.time() + backoff >= deadline:
                    raise KVUnavailable(f"etcd unavailable: {exc.details()}") from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except grpc.aio.UsageError as exc:  # channel closed under us
                raise KVUnavailable(f"etcd client closed: {exc}") from exc

    # -- auth and TLS refusals ------------------------------------------------

    async def _auth_metadata(self) -> tuple[tuple[str, str], ...]:
        """The ``token`` metadata etcd auth wants (none without a user)."""
        if not self._options.etcd_user:
            return ()
        token = self._token
        if token is None:
            async with self._auth_lock:
                if self._token is None:
                    self._token = await self._authenticate()
                token = self._token
        return (("token", token),) if token else ()

    async def _authenticate(self) -> str:
        user = self._options.etcd_user
        req = rpc.AuthenticateRequest(name=user, password=str(self._options.etcd_password))
        try:
            resp = await self._call("auth", "Authenticate", req, retry=True, auth=False)
        except ValueError as exc:
            if "authentication is not enabled" in str(exc):
                log.info("etcd has authentication off; --etcd-user %s is not needed", user)
                return ""
            raise
        log.info("authenticated to etcd as %s", user)
        return str(resp.token)

    def _forget_token(self, metadata: tuple[tuple[str, str], ...] | None) -> None:
        """Drop the token a refused call carried (not a newer one)."""
        sent = dict(metadata or ()).get("token", "")
        if self._token is not None and self._token == sent:
            self._token = None

    def _stale(
        self,
        code: grpc.StatusCode | None,
        details: str | None,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> bool:
        """etcd refused the call's token as expired, or the auth store
        changed under it, or etcd turned auth on since (no token sent)."""
        if not self._options.etcd_user:
            return False
        details = details or ""
        if code == grpc.StatusCode.UNAUTHENTICATED or _token_stale(details):
            return True
        return not metadata and "user name is empty" in details

    def _refusal(self, exc: grpc.aio.AioRpcError) -> KVRefused | None:
        """The one-line ``KVRefused`` for an answer retrying cannot fix."""
        message = self._refused_message(exc.details() or "", exc.code())
        return KVRefused(message) if message else None

    def _refused_message(self, details: str, code: grpc.StatusCode | None = None) -> str | None:
        o = self._options
        if "CERTIFICATE_VERIFY_FAILED" in details or "handshake failed" in details.lower():
            if o.etcd_ca:
                return (
                    f"TLS handshake with etcd failed: its certificate is not signed by "
                    f"--etcd-ca {o.etcd_ca} or does not name the host of the endpoint"
                )
            return (
                "TLS handshake with etcd failed: its certificate is not trusted; "
                "pass the CA that signed it with --etcd-ca"
            )
        if "TSI_DATA_CORRUPTED" in details or "Unwrap failed" in details:
            if o.etcd_cert:
                return (
                    f"etcd refused the TLS session with --etcd-cert {o.etcd_cert}: it wants a "
                    "client certificate signed by its own CA"
                )
            return (
                "etcd refused the TLS session: it wants a client certificate signed by its CA "
                "(--etcd-cert, --etcd-key)"
            )
        if "authentication failed" in details:
            return (
                f"etcd refused user {o.etcd_user!r}: wrong user name or password "
                "(--etcd-user, MERIDIAN_ETCD_PASSWORD)"
            )
        if "user name is empty" in details and not o.etcd_user:
            return (
                "etcd requires authentication: pass --etcd-user and the password in "
                "MERIDIAN_ETCD_PASSWORD"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
            return (
                f"etcd user {o.etcd_user!r} is not allowed this (permission denied): grant "
                "it read and write on /meridian/"
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return "etcd refuses the auth token it just issued: check etcd's --auth-token"
        return None


class _DuplicateLease(Exception):
    pass


class _Retry(Exception):
    """The watch could not be (re)opened now: back off and try again."""


def _token_stale(details: str) -> bool:
    return "invalid auth token" in details or "auth store is old" in details


def _auth_refusal(details: str) -> bool:
    return any(
        s in details for s in ("user name is empty", "permission denied", "authentication failed")
    )


def _tls_credentials(options: EtcdOptions) -> grpc.ChannelCredentials:
    def read(flag: str, path: str) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{flag}: cannot read {path} ({e.strerror})") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read("--etcd-ca", options.etcd_ca),
        private_key=read("--etcd-key", options.etcd_key),
        certificate_chain=read("--etcd-cert", options.etcd_cert),
    )


def _translate(exc: grpc.aio.AioRpcError) -> Exception:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.OUT_OF_RANGE:
        if "future revision" in details:
            return ValueError(f"etcd: {details}")
        return _Compacted(details)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    ):
        return ValueError(f"etcd: {details}")
    return KVUnavailable(f"etcd {code.name}: {details}")


def _compare(c: Compare) -> Any:
    if c.mod_revision == 0:  # absent: version 0 (a key that exists has version >= 1)
        return rpc.Compare(
            key=c.key.encode(),
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.VERSION,
            version=0,
        )
    return rpc.Compare(
        key=c.key.encode(),
        result=rpc.Compare.EQUAL,
        target=rpc.Compare.MOD,
        mod_revision=c.mod_revision,
    )


def _request_op(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease or 0)
        )
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))


def _by_revision(events: Any) -> list[list[Event]]:
    batches: list[list[Event]] = []
    for ev in events:
        kv = ev.kv
        value = None if ev.type == rpc.Event.DELETE else bytes(kv.value)
        event = Event(kv.key.decode(), value, kv.mod_revision)
        if batches and batches[-1][-1].mod_revision == event.mod_revision:
            batches[-1].append(event)
        else:
            batches.append([event])
    return batches
