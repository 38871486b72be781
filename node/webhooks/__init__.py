"""Webhooks and audit events of a node (issue 13).

- ``records``: webhook records, validation, keys, ACR's scope rules;
- ``signing``: the HMAC-SHA256 signature of a delivery and the receiver's
  check (timestamp window, replay);
- ``events``: the webhooks an action fires, ACR-shaped payloads, the
  namespace writes that queue them (``Hooks``, ``Emitter``);
- ``delivery``: the region's deliverer (one node at a time, a leader lease),
  in order per webhook, retries with back-off and jitter;
- ``service``: the node's wiring: what the v2 API, the token endpoint, the
  management API and the replicator tell it (``Activity``).
"""
