"""Signatures of webhook deliveries, and how a receiver checks them.

Every delivery carries ``X-Meridian-Signature: t=<unix seconds>,v1=<hex>``
where ``<hex>`` is HMAC-SHA256, keyed with the webhook's secret, of
``<t>.`` followed by the request body's bytes, and ``X-Meridian-Delivery``
names the event (the payload's ``id``; the same on every retry of it).
A receiver recomputes the HMAC, compares in constant time, refuses a
timestamp outside its replay window (default 5 minutes) and remembers the
ids it accepted within that window: a delivery captured and sent again is
then either too old or an id seen before. ``verify`` is that recipe (the
README shows it standalone).
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Meridian-Signature"
DELIVERY_HEADER = "X-Meridian-Delivery"
EVENT_HEADER = "X-Meridian-Event"
REPLAY_WINDOW = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return mac.hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The value of ``X-Meridian-Signature`` for ``body``, signed now."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={signature(secret, ts, body)}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    *,
    seen: set[str] | None = None,
    delivery: str = "",
    window: int = REPLAY_WINDOW,
    now: float | None = None,
) -> str | None:
    """None when the delivery is genuine and fresh, else why not: a bad
    header or signature, a timestamp outside ``window``, or (with ``seen``,
    the ids accepted within the window) a replay. Adds ``delivery`` to
    ``seen`` when accepted."""
    parts = dict(p.strip().partition("=")[::2] for p in header.split(","))
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return "malformed signature header"
    expected = signature(secret, ts, body)
    if not hmac.compare_digest(expected, parts.get("v1", "")):
        return "signature mismatch"
    if abs((time.time() if now is None else now) - ts) > window:
        return "timestamp outside the replay window"
    if seen is not None:
        if delivery in seen:
            return "replayed delivery"
        seen.add(delivery)
    return None
