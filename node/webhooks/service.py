"""The node's webhooks and audit log, wired to what happens on it.

``Activity`` is what the v2 API (``node.api.Registry.activity``), the token
endpoint (``node.auth.Gate.on_login``), the management API
(``node.manage.ManageAPI.audit``) and the replicator (its ``hooks``) call:

- a manifest push: its webhook events commit in the push's own namespace
  transaction (``Namespace.put_manifest``'s ``extra``; more than fit are
  written right after it, before the answer), and an audit record is held
  for the next batch;
- a manifest or tag delete: the same, in ``delete_manifest``'s or
  ``delete_tag``'s transaction, and an audit record;
- a whole repository's delete (the management API): one ``delete`` event
  per webhook, naming the repository, in the delete's last transaction;
- a manifest GET: one counter bump (pulls are audited per minute);
- a login, a management change: an audit record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cluster.kv import Put
from cluster.namespace import TXN_BATCH, ManifestRecord, Namespace
from node.audit import AuditLog, identity_of
from node.webhooks.delivery import Deliverer
from node.webhooks.events import Emitter, Hooks

log = logging.getLogger("meridian.webhooks")

ACCESS = "meridian.access"  # the request's node.auth.Access, set by the v2 API
PUSH_OPS = 3  # a push's own puts besides its tags: record, push counter, placement


@dataclass
class PushEvents:
    in_txn: list[Put] = field(default_factory=list)
    later: list[Put] = field(default_factory=list)


@dataclass
class DeleteInfo:
    registry: str
    repository: str
    ref: str
    digest: str = ""
    tags: list[str] = field(default_factory=list)
    media_type: str = ""
    later: list[Put] = field(default_factory=list)  # events too many for its transaction
    evented: bool = False  # delete_events gave the delete's transaction its events


class Activity:
    def __init__(
        self,
        ns: Namespace,
        node: str,
        *,
        source: Any = None,
        timeout: float = 10.0,
        max_age: float = 12 * 3600.0,
        retry_cap: float = 600.0,
        concurrency: int = 8,
        history: int = 50,
        audit_flush: float = 60.0,
        audit_retention: float = 7 * 86400.0,
    ) -> None:
        self.ns = ns
        self.hooks = Hooks(ns)
        self.emitter = Emitter(ns, self.hooks)
        self.deliverer = Deliverer(
            ns,
            self.hooks,
            node,
            timeout=timeout,
            max_age=max_age,
            retry_cap=retry_cap,
            concurrency=concurrency,
            history=history,
        )
        self.audit = AuditLog(ns, node, flush_interval=audit_flush, retention=audit_retention)
        self._source = source  # the client's address of a request (node.auth.Gate.source)
        self.timeout = timeout

    async def start(self) -> None:
        await self.hooks.load()
        self.deliverer.start()
        self.audit.start()

    async def stop(self) -> None:
        await self.deliverer.close()
        await self.emitter.close()
        await self.audit.close()
        self.hooks.close()

    def source(self, request: web.Request) -> str:
        if self._source is not None:
            return self._source(request)
        return request.remote or ""

    @staticmethod
    def identity(request: web.Request) -> str:
        return identity_of(request.get(ACCESS))

    # -- the v2 API ------------------------------------------------------------------

    def pulled(self, request: web.Request, reg: str, repo: str) -> None:
        self.audit.pull(reg, repo, self.identity(request), self.source(request))

    def push_events(
        self,
        request: web.Request | None,
        reg: str,
        repo: str,
        rec: ManifestRecord,
        tags: list[str],
    ) -> PushEvents:
        """The push's webhook events: in its transaction when they fit (the
        record, its push counter, placement and tags take ``3 + tags``
        operations of ``TXN_BATCH``), else written right after it."""
        ops = self.emitter.push_ops(reg, repo, rec, tags, request)
        if PUSH_OPS + len(tags) + len(ops) <= TXN_BATCH:
            return PushEvents(in_txn=ops)
        return PushEvents(later=ops)

    async def pushed(
        self,
        request: web.Request | None,
        reg: str,
        repo: str,
        rec: ManifestRecord,
        tags: list[str],
        events: PushEvents,
    ) -> None:
        """After the push committed, before its answer: the events that did
        not fit its transaction, and the audit record."""
        if events.later:
            await self.emitter.write(events.later)
        if request is None:  # an import: the management call is audited
            return
        target = {"digest": rec.digest}
        if tags:
            target["tag"] = ",".join(tags)
        self.audit.record(
            reg,
            "push",
            self.identity(request),
            source=self.source(request),
            repository=repo,
            target=target,
        )

    def before_delete(self, reg: str, repo: str, ref: str) -> DeleteInfo:
        """What a manifest or tag delete is about to remove (for its events)."""
        info = DeleteInfo(reg, repo, ref)
        rs = self.ns.repo(reg, repo)
        if ":" in ref:
            info.digest = ref
            if rs is not None:
                info.tags = sorted(t for t, d in rs.tags.items() if d == ref)
                rec = rs.manifests.get(ref)
                info.media_type = rec.media_type if rec is not None else ""
        else:
            info.tags = [ref]
            if rs is not None:
                info.digest = rs.tags.get(ref, "")
                rec = rs.manifests.get(info.digest)
                info.media_type = rec.media_type if rec is not None else ""
        return info

    def _delete_ops(self, request: web.Request | None, info: DeleteInfo) -> list[Put]:
        return self.emitter.delete_ops(
            info.registry,
            info.repository,
            digest=info.digest,
            tags=info.tags,
            media_type=info.media_type,
            request=request,
        )

    def delete_events(self, request: web.Request, info: DeleteInfo, tags: list[str]) -> list[Put]:
        """The delete's events, given the tags it removes (the namespace
        calls this inside ``delete_manifest``): committed with the delete
        when they fit its transaction, else written right after it."""
        info.tags = sorted(tags)
        info.evented = True
        ops = self._delete_ops(request, info)
        if len(ops) + len(tags) + 1 < TXN_BATCH - 1:
            return ops
        info.later = ops
        return []

    async def deleted(self, request: web.Request, info: DeleteInfo) -> None:
        """After the delete committed, before its answer: the events not in
        its transaction (all of them when the caller did not ask
        ``delete_events``: written now), and the audit record."""
        later = info.later
        if not info.evented:
            later = self._delete_ops(request, info)
        if later:
            await self.emitter.write(later)
        self._delete_record(request, info, "success", "")

    def repository_delete_events(self, request: web.Request, reg: str, repo: str) -> list[Put]:
        """A whole repository's delete: one ``delete`` event naming only the
        repository (as ACR's) for each webhook whose scope takes it (as a
        delete by digest: ``repo:*`` or empty); the caller commits them
        with the delete (``Namespace.delete_repository``'s ``extra``)."""
        return self.emitter.delete_ops(reg, repo, request=request)

    def delete_failed(self, request: web.Request, info: DeleteInfo, why: str) -> None:
        self._delete_record(request, info, "failure", why)

    def _delete_record(self, request: web.Request, info: DeleteInfo, outcome: str, why: str):
        target = {"digest": info.digest} if info.digest else {}
        if info.tags:
            target["tag"] = ",".join(info.tags)
        self.audit.record(
            info.registry,
            "delete",
            self.identity(request),
            source=self.source(request),
            repository=info.repository,
            target=target,
            outcome=outcome,
            detail=why,
        )

    # -- logins, management ---------------------------------------------------------------

    def login(self, request: web.Request, reg: str, username: str, principal: Any) -> None:
        """A login at the token endpoint or the management API (never a
        password: the user name tried, and who it turned out to be)."""
        if principal is not None:
            who = "owner" if principal.kind == "owner" else f"{principal.kind}:{principal.name}"
        else:
            who = username[:128]
        self.audit.record(
            reg,
            "login",
            who,
            source=self.source(request),
            outcome="success" if principal is not None else "failure",
            detail="" if principal is not None else "invalid credentials",
        )

    def managed(self, reg: str | None, who: str, what: str, source: str) -> None:
        who = "owner" if who == "owner:owner" else who  # as the v2 API names it
        self.audit.record(reg, "manage", who, source=source, detail=what)
