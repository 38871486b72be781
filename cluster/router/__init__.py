"""``meridian router``: the latency-aware endpoint clients pull from.

- ``config``: ``RouterConfig``, every flag with its ``MERIDIAN_*`` twin;
- ``table``: the regions as the router sees them -- health, latency, probes,
  what each node says about itself (``cluster.status``) -- and the ranking
  of regions for a request;
- ``proxy``: what happens to one request -- proxying, retries, hedging, blob
  redirects, upload pinning;
- ``app``: the aiohttp application, the router's own endpoints, the
  namespace watch, ``serve``/``run``/``router_main``.

The router talks to nodes over HTTP only; it imports nothing of ``node``.
"""
