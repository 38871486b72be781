"""Webhook events: which webhooks an action fires, their payloads (ACR's
webhook schema), and the namespace writes that queue them.

Push and delete events are written in the namespace transaction that
records the push or the delete (``Namespace.put_manifest``,
``delete_manifest`` and ``delete_tag`` take them as extra puts), so an
acknowledged change always has its events and a refused one has none.
They go to every webhook of the registry that asks for them, whatever its
region: the namespace is shared, so the change is the same
everywhere. ``replicated`` is regional: a region's webhooks get it when an
image has fully arrived there -- at once in the region that took the push
(same transaction), and when the replicator has copied all of it in every
other region (written right after the copy's placement, retried until the
namespace takes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from cluster.backoff import Backoff
from cluster.kv import Put
from cluster.namespace import TXN_BATCH, ManifestRecord, Namespace
from node.webhooks.records import Webhook, events_prefix, hooks_prefix, parse_hook_key

log = logging.getLogger("meridian.webhooks")

_seq = itertools.count(1)
MAX_PENDING_WRITES = 10_000  # replicated events waiting for the namespace


async def until_done(step: Callable[[], Awaitable[object]], what: str, cap: float = 30.0) -> None:
    """``step()`` again and again (back-off with jitter, up to ``cap`` s)
    until it does not raise: what must reach the namespace eventually."""
    backoff = Backoff(base=0.5, cap=cap, jitter=0.2)
    while True:
        try:
            await step()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            delay = backoff.failed()
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, e)
            await asyncio.sleep(delay)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def request_info(request: web.Request | None) -> dict[str, str] | None:
    if request is None:
        return None
    return {
        "id": request.headers.get("X-Request-Id") or uuid.uuid4().hex,
        "host": request.host,
        "method": request.method,
        "useragent": request.headers.get("User-Agent", ""),
    }


def payload(
    action: str,
    *,
    registry: str,
    region: str,
    repository: str = "",
    tag: str = "",
    digest: str = "",
    media_type: str = "",
    size: int | None = None,
    request: dict[str, str] | None = None,
    event_id: str | None = None,
    ts: float | None = None,
) -> dict[str, Any]:
    """An event as ACR sends it (``id``, ``timestamp``, ``action``,
    ``target``, ``request``), plus the ``registry`` and the ``region`` it
    happened in."""
    target: dict[str, Any] = {}
    if media_type:
        target["mediaType"] = media_type
    if size is not None:
        target["size"] = size
    if digest:
        target["digest"] = digest
    if size is not None:
        target["length"] = size
    if repository:
        target["repository"] = repository
    if tag:
        target["tag"] = tag
    doc: dict[str, Any] = {
        "id": event_id or str(uuid.uuid4()),
        "timestamp": iso(time.time() if ts is None else ts),
        "action": action,
    }
    if target:
        doc["target"] = target
    if request is not None:
        doc["request"] = request
    doc["registry"] = registry
    doc["region"] = region
    return doc


def event_value(hook: Webhook, doc: dict[str, Any]) -> bytes:
    """A queued event: the payload to send and when it was made (its age
    bounds the retries); ``seq`` orders events of one transaction."""
    rec = {"hook": hook.name, "created": round(time.time(), 3), "seq": next(_seq), "payload": doc}
    return json.dumps(rec, separators=(",", ":")).encode()


class Hooks:
    """Every webhook of every registry, as this node's namespace cache sees
    them (a listener on the cache; the records themselves are not part of
    the cache, so they are read once at start)."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self._by_reg: dict[str, dict[str, tuple[str, Webhook]]] = {}
        self.changed = asyncio.Event()
        ns.cache.listeners.append(self._on_change)

    def _on_change(self, key: str, value: bytes | None) -> None:
        parsed = parse_hook_key(key)
        if parsed is None:
            return
        reg, name = parsed
        hooks = self._by_reg.setdefault(reg, {})
        if value is None:
            hooks.pop(name, None)
        else:
            try:
                hooks[name] = (key, Webhook.from_json(value))
            except (ValueError, TypeError, KeyError):
                log.warning("ignoring a malformed webhook record %s", key)
        self.changed.set()

    async def load(self) -> None:
        for reg in self.ns.registries():
            entries = await self.ns.refresh(hooks_prefix(reg))
            for e in entries:
                # Only if the cache still has the key at that revision (a
                # change seen meanwhile was applied by the listener).
                if self.ns.cache.revs.get(e.key) == e.mod_revision:
                    self._on_change(e.key, e.value)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.ns.cache.listeners.remove(self._on_change)

    def of(self, reg: str) -> list[Webhook]:
        """``reg``'s webhooks (those whose keys the cache still holds: a
        reload after a compaction does not report deletions)."""
        hooks = self._by_reg.get(reg)
        if not hooks:
            return []
        revs = self.ns.cache.revs
        return [h for key, h in hooks.values() if key in revs]

    def get(self, reg: str, name: str) -> Webhook | None:
        hit = self._by_reg.get(reg, {}).get(name)
        if hit is None or hit[0] not in self.ns.cache.revs:
            return None
        return hit[1]


class Emitter:
    """Builds the event puts for pushes and deletes (committed by the caller
    with the change) and writes ``replicated`` events for the replicator."""

    def __init__(self, ns: Namespace, hooks: Hooks) -> None:
        self.ns = ns
        self.hooks = hooks
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def region(self) -> str:
        return self.ns.region

    def _put(self, reg: str, hook: Webhook, doc: dict[str, Any]) -> Put:
        key = events_prefix(reg, hook.location, hook.name) + doc["id"]
        return Put(key, event_value(hook, doc))

    def push_ops(
        self,
        reg: str,
        repo: str,
        rec: ManifestRecord,
        tags: list[str],
        request: web.Request | None,
    ) -> list[Put]:
        """Events of a manifest push: ``push`` for each tag (or one without
        a tag) to every webhook asking for it; ``replicated`` to this
        region's webhooks (the image is whole here as the push commits)."""
        hooks = self.hooks.of(reg)
        if not hooks:
            return []
        req = request_info(request)
        ops: list[Put] = []
        replicated: set[str] = set()
        for tag in tags or [""]:
            for hook in hooks:
                for action in ("push", "replicated"):
                    if action == "replicated" and (
                        hook.location != self.region or hook.name in replicated
                    ):
                        continue
                    if not hook.fires(action, repo, tag):
                        continue
                    if action == "replicated":
                        replicated.add(hook.name)
                    doc = payload(
                        action,
                        registry=reg,
                        region=self.region,
                        repository=repo,
                        tag=tag,
                        digest=rec.digest,
                        media_type=rec.media_type,
                        size=rec.size,
                        request=req,
                    )
                    ops.append(self._put(reg, hook, doc))
        return ops

    def delete_ops(
        self,
        reg: str,
        repo: str,
        *,
        digest: str = "",
        tags: Iterable[str] = (),
        media_type: str = "",
        request: web.Request | None = None,
    ) -> list[Put]:
        """Events of a manifest delete (``digest``, and the tags it took
        with it) or of a tag delete (``tags`` only)."""
        hooks = self.hooks.of(reg)
        if not hooks:
            return []
        req = request_info(request)
        ops: list[Put] = []
        for tag in list(tags) or [""]:
            for hook in hooks:
                if hook.fires("delete", repo, tag):
                    doc = payload(
                        "delete",
                        registry=reg,
                        region=self.region,
                        repository=repo,
                        tag=tag,
                        digest=digest,
                        media_type=media_type,
                        request=req,
                    )
                    ops.append(self._put(reg, hook, doc))
        return ops

    # -- replicated (node.replication.worker hooks) ----------------------------

    def replicated(self, ev: Any) -> None:
        """A ``ReplicatedEvent``: the image is whole in this region. Its
        events are written now unless they were committed with the placement
        that completed the image (``replicated_ops``, the usual case)."""
        if ev.committed:
            return
        ops = self.replicated_ops(ev)
        if not ops:
            return
        if len(self._tasks) >= MAX_PENDING_WRITES:
            log.error("dropping %d replicated events: too many writes pending", len(ops))
            return
        task = asyncio.get_running_loop().create_task(self._write(ops))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def replicated_ops(self, ev: Any) -> list[Put]:
        """The event records of this region's webhooks for ``ev``."""
        hooks = [h for h in self.hooks.of(ev.registry) if h.location == self.region]
        if not hooks:
            return []
        ops: list[Put] = []
        for repo in ev.repos:
            rs = self.ns.repo(ev.registry, repo)
            tags = sorted(t for t, d in (rs.tags.items() if rs else ()) if d == ev.digest)
            for hook in hooks:
                tag = next((t for t in tags or [""] if hook.fires("replicated", repo, t)), None)
                if tag is None:
                    continue
                rec = self.ns.manifest(ev.registry, repo, ev.digest)
                doc = payload(
                    "replicated",
                    registry=ev.registry,
                    region=self.region,
                    repository=repo,
                    tag=tag,
                    digest=ev.digest,
                    media_type=ev.media_type,
                    size=rec.size if rec is not None else None,
                )
                ops.append(self._put(ev.registry, hook, doc))
        return ops

    async def _write(self, ops: list[Put]) -> None:
        for i in range(0, len(ops), TXN_BATCH):
            batch = list(ops[i : i + TXN_BATCH])
            await until_done(lambda b=batch: self.ns.commit([], b), "writing replicated events")

    async def write(self, ops: list[Put]) -> None:
        """Events that did not fit in their change's transaction."""
        for i in range(0, len(ops), TXN_BATCH):
            await self.ns.commit([], list(ops[i : i + TXN_BATCH]))

    async def close(self) -> None:
        """Let pending replicated writes finish briefly, then stop them."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for t in pending:
                t.cancel()
