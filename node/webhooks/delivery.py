"""Delivery of queued webhook events: one node per region at a time, in
order per webhook, retried with back-off, never following a redirect.

The region's deliverer is the node holding ``/meridian/leaders/<region>/
webhooks`` (``node.replication.claims.Leader``: a put-if-absent under a
lease of its own; taken over within the lease's TTL when that node dies, at
once by the same node restarted). It reads the region's queue (``/meridian/reg/<r>/events/
<region>/<hook>/<id>``, ordered by the revision that wrote each event) and
runs one worker per webhook with pending events (at most ``concurrency``
at once): each sends its webhook's events one after the other, so a
receiver sees them in the order the changes were committed.

An answer of 2xx delivers. A connection failure, a timeout, 408, 429 or
5xx is retried with exponential back-off and jitter (1 s doubling up to
``retry_cap``) for as long as the event is younger than ``max_age``
(hours), then given up. Any other answer (a 3xx: redirects are never
followed; a 4xx) is the receiver refusing: tried ``REJECT_ATTEMPTS``
times, then recorded and dropped, so one bad event never blocks the rest
forever. A finished event leaves the queue in the same transaction that
records its delivery (``deliveries/``, the last ``history`` per webhook:
the request sent, the status, the latency, the attempts). A node that
dies mid-delivery leaves the event queued: the next deliverer sends it
again (at least once; receivers deduplicate on the payload's ``id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
from prometheus_client import Counter, Histogram

from cluster.backoff import Backoff
from cluster.kv import Compare, Delete, Entry, Op, Put
from cluster.namespace import Namespace
from cluster.runtime import cancel_and_wait
from node.replication.claims import Claims, Leader
from node.webhooks.events import Hooks, until_done
from node.webhooks.records import (
    Webhook,
    deliveries_prefix,
    events_prefix,
    parse_event_key,
)
from node.webhooks.signing import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign

log = logging.getLogger("meridian.webhooks")

LEADER_POLL = 3.0
REJECT_ATTEMPTS = 3
MAX_RESPONSE = 64 << 10
USER_AGENT = "Meridian-Webhook/1"
TRIM_SLACK = 10

DELIVERIES = Counter(
    "meridian_webhook_deliveries_total",
    "Webhook events finished, by outcome (delivered, rejected, gave_up, dropped)",
    ["outcome"],
)
ATTEMPTS = Counter(
    "meridian_webhook_attempts_total", "Webhook requests sent, by result class", ["result"]
)
LATENCY = Histogram(
    "meridian_webhook_request_seconds",
    "Webhook request latency (to the answer or the failure)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def _classify(status: int | None) -> str:
    if status is not None and 200 <= status < 300:
        return "ok"
    if status is None or status >= 500 or status in (408, 429):
        return "retry"
    return "refused"


def request_headers(hook: Webhook, body: bytes, doc: dict[str, Any]) -> dict[str, str]:
    return {
        **hook.headers,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: str(doc.get("action", "")),
        DELIVERY_HEADER: str(doc.get("id", "")),
        SIGNATURE_HEADER: sign(hook.secret, body),
    }


async def send(
    session: aiohttp.ClientSession, hook: Webhook, doc: dict[str, Any], within: float
) -> dict[str, Any]:
    """POST ``doc`` to the webhook's URI, signed; never follows a redirect.
    What happened, as a delivery record's ``request``/``response``/
    ``latency_ms`` (custom header values and the signature left out: a
    record is shown to anyone who may manage the registry)."""
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = request_headers(hook, body, doc)
    status: int | None = None
    error = ""
    t0 = time.monotonic()
    try:
        async with session.post(
            hook.uri,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=within),
        ) as resp:
            status = resp.status
            await resp.content.read(MAX_RESPONSE)
    except TimeoutError:
        error = f"no answer within {within:g}s"
    except aiohttp.ClientConnectorError:
        error = "cannot connect"
    except (aiohttp.ClientError, OSError) as e:
        # Only the class: a message could quote the URI (and credentials in it).
        error = type(e).__name__
    latency = time.monotonic() - t0
    LATENCY.observe(latency)
    result = _classify(status)
    ATTEMPTS.labels(result).inc()
    shown = {k: ("***" if k in hook.headers else v) for k, v in headers.items()}
    shown[SIGNATURE_HEADER] = headers[SIGNATURE_HEADER].split(",v1=")[0] + ",v1=..."
    return {
        "request": {"method": "POST", "uri": hook.uri, "headers": shown, "body": doc},
        "response": {"status": status, "error": error},
        "latency_ms": round(latency * 1000, 1),
        "result": result,
    }


def history_key(reg: str, region: str, name: str, event_id: str) -> str:
    return deliveries_prefix(reg, region, name) + f"{time.time_ns():020d}-{event_id}"


def delivery_record(
    doc: dict[str, Any], sent: dict[str, Any], outcome: str, attempts: int
) -> bytes:
    rec = {
        "id": doc.get("id"),
        "action": doc.get("action"),
        "time": round(time.time(), 3),
        "outcome": outcome,
        "attempts": attempts,
        "request": sent["request"],
        "response": sent["response"],
        "latency_ms": sent["latency_ms"],
    }
    return json.dumps(rec, separators=(",", ":")).encode()


def _order(e: Entry) -> tuple[int, int, str]:
    try:
        seq = int(json.loads(e.value).get("seq", 0))
    except (ValueError, TypeError, AttributeError):
        seq = 0
    return (e.mod_revision, seq, e.key)


class Deliverer:
    def __init__(
        self,
        ns: Namespace,
        hooks: Hooks,
        node: str,
        *,
        timeout: float = 10.0,
        max_age: float = 12 * 3600.0,
        retry_cap: float = 600.0,
        concurrency: int = 8,
        history: int = 50,
    ) -> None:
        self.ns = ns
        self.hooks = hooks
        self.region = ns.region
        self.claims = Claims(ns.kv, node)
        self.leader = Leader(self.claims, ns.region, "webhooks")
        self.timeout = timeout
        self.max_age = max_age
        self.retry_cap = retry_cap
        self.history = history
        self._sem = asyncio.Semaphore(max(concurrency, 1))
        self._workers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._kept: dict[tuple[str, str], int] = {}  # history records written since a trim
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self.ns.cache.listeners.append(self._on_change)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), auto_decompress=False
        )
        self._task = asyncio.create_task(self._run(), name="webhook-deliverer")

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.ns.cache.listeners.remove(self._on_change)
        tasks = [t for t in (self._task, *self._workers.values()) if t is not None]
        await cancel_and_wait(tasks)
        self._workers.clear()
        await self.claims.close()
        if self.session is not None:
            await self.session.close()

    def _on_change(self, key: str, value: bytes | None) -> None:
        if value is None:
            return
        parsed = parse_event_key(key)
        if parsed is not None and parsed[1] == self.region:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                leading = await self.leader.acquire()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("webhook leader check failed: %s", e)
                leading = False
            if leading:
                try:
                    await self._scan()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("reading the webhook queue failed: %s", e)
            elif self._workers:
                await cancel_and_wait(list(self._workers.values()))
                self._workers.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), LEADER_POLL)

    async def _scan(self) -> None:
        for reg in self.ns.registries():
            entries = await self.ns.refresh(events_prefix(reg, self.region))
            names = {parse_event_key(e.key)[2] for e in entries if parse_event_key(e.key)}
            for name in names:
                key = (reg, name)
                if key not in self._workers:
                    task = asyncio.create_task(self._worker(reg, name), name=f"webhook-{name}")
                    self._workers[key] = task
                    task.add_done_callback(lambda _t, key=key: self._workers.pop(key, None))

    async def _worker(self, reg: str, name: str) -> None:
        async with self._sem:
            while True:
                try:
                    entries = await self.ns.refresh(events_prefix(reg, self.region, name))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("reading webhook %s's queue failed: %s", name, e)
                    return
                if not entries:
                    return
                for e in sorted(entries, key=_order):
                    await self._deliver(reg, name, e)

    async def _deliver(self, reg: str, name: str, entry: Entry) -> None:
        try:
            rec = json.loads(entry.value)
            doc = rec["payload"]
            created = float(rec.get("created", time.time()))
        except (ValueError, KeyError, TypeError):
            log.warning("dropping a malformed webhook event %s", entry.key)
            await self._finish(reg, name, entry, None)
            return
        backoff = Backoff(base=1.0, cap=self.retry_cap, jitter=0.2)
        attempts = 0
        while True:
            hook = self.hooks.get(reg, name)
            if hook is None:  # the webhook was deleted: its queue goes with it
                DELIVERIES.labels("dropped").inc()
                await self._finish(reg, name, entry, None)
                return
            assert self.session is not None
            sent = await send(self.session, hook, doc, self.timeout)
            attempts += 1
            result = sent["result"]
            outcome = None
            if result == "ok":
                outcome = "delivered"
            elif result == "refused" and attempts >= REJECT_ATTEMPTS:
                outcome = "rejected"
            elif result == "retry" and time.time() - created > self.max_age:
                outcome = "gave_up"
            if outcome is not None:
                DELIVERIES.labels(outcome).inc()
                if outcome != "delivered":
                    log.warning(
                        "webhook %s/%s: event %s %s after %d attempts (last: %s)",
                        reg,
                        name,
                        doc.get("id"),
                        outcome,
                        attempts,
                        sent["response"]["status"] or sent["response"]["error"],
                    )
                await self._finish(reg, name, entry, delivery_record(doc, sent, outcome, attempts))
                return
            await asyncio.sleep(backoff.failed())

    async def _finish(self, reg: str, name: str, entry: Entry, record: bytes | None) -> None:
        """Take the event off the queue and record its delivery, in one
        transaction (retried while the namespace is away: the event stays
        queued until this succeeds)."""
        ops: list[Op] = [Delete(entry.key)]
        if record is not None:
            event_id = entry.key.rpartition("/")[2]
            ops.append(Put(history_key(reg, self.region, name, event_id), record))
        await until_done(
            lambda: self.ns.kv.txn([Compare(entry.key, entry.mod_revision)], ops),
            "recording a webhook delivery",
            cap=10.0,
        )
        if record is not None:
            await self._trim(reg, name)

    async def _trim(self, reg: str, name: str) -> None:
        key = (reg, name)
        self._kept[key] = self._kept.get(key, self.history + TRIM_SLACK) + 1
        if self._kept[key] <= self.history + TRIM_SLACK:
            return
        with contextlib.suppress(Exception):
            entries = await self.ns.refresh(deliveries_prefix(reg, self.region, name))
            old = entries[: max(len(entries) - self.history, 0)]
            for i in range(0, len(old), 100):
                await self.ns.kv.txn([], [Delete(e.key) for e in old[i : i + 100]])
            self._kept[key] = self.history
