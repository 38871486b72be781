"""The physical anchor for small requests: a bare aiohttp handler on uvloop,
the floor a node's request path is measured against.

It answers every ``/v2/...`` request with the same fixed JSON body (the
size of a small image manifest) and nothing else: no routing beyond one
pattern, no middleware, no auth, no logging. What a Meridian node does per
request above this is Meridian's own work; what this costs is aiohttp's and
the kernel's.

    python -m loadtest.anchor --port 8099 [--body-bytes 559]
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web


def build(body_bytes: int) -> web.Application:
    body = b"{" + b'"x":"' + b"x" * max(0, body_bytes - 8) + b'"}'

    async def answer(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/v2/{path:.*}", answer)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.anchor", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body-bytes", type=int, default=559)
    args = p.parse_args(argv)
    web.run_app(
        build(args.body_bytes),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
