"""The server-side limits of ``cluster/httpserver.py`` (router, and nodes
later) against real sockets: a client trickling its headers is cut, an idle
keep-alive connection is closed, a stalled upload is closed while a server
that is merely not reading is left alone, and beyond the connection cap idle
connections make room -- a normal client is still served.

Waits are bounded polls for the event (a close, an answer); no assertion is
about elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from cluster.httpserver import ServerLimits, start_server

WAIT = 30  # seconds: bound of every wait for an event

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class App:
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    holding: int = 0
    body_errors: list[str] = field(default_factory=list)
    bodies: list[int] = field(default_factory=list)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_get("/", self.hello)
        app.router.add_get("/hold", self.held)
        app.router.add_post("/upload", self.upload)
        app.router.add_post("/upload-later", self.upload_later)
        return app

    async def hello(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def held(self, _: web.Request) -> web.Response:
        self.holding += 1
        await self.hold.wait()
        return web.Response(text="held")

    async def upload(self, request: web.Request) -> web.Response:
        n = 0
        try:
            async for chunk in request.content.iter_any():
                n += len(chunk)
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.CancelledError) as e:
            self.body_errors.append(type(e).__name__)
            raise
        self.bodies.append(n)
        return web.Response(text=str(n))

    async def upload_later(self, request: web.Request) -> web.Response:
        await self.hold.wait()  # busy elsewhere: the body waits in flow control
        return await self.upload(request)


@contextlib.asynccontextmanager
async def serve(limits: ServerLimits) -> AsyncIterator[tuple[App, str]]:
    app = App()
    runner = await start_server(app.build(), "127.0.0.1", 0, limits)
    try:
        yield app, f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        app.hold.set()
        await runner.cleanup()


def limits(**kw: float) -> ServerLimits:
    base = dict(
        client_header_timeout=60.0,
        keepalive_timeout=60.0,
        client_body_timeout=60.0,
        max_connections=0,
    )
    base.update(kw)
    return ServerLimits(**base)  # type: ignore[arg-type]


async def connect(addr: str) -> Conn:
    host, port = addr.rsplit(":", 1)
    conn = await asyncio.open_connection(host, int(port))
    await asyncio.sleep(0.01)  # let the server's side of it start
    return conn


async def closed_by_server(conn: Conn, within: float = WAIT) -> bytes:
    """Everything the server sent until it closed the connection."""
    reader, _ = conn
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        return b""


async def still_open(conn: Conn) -> bool:
    reader, _ = conn
    try:
        await asyncio.wait_for(reader.read(1), 0.2)
    except TimeoutError:
        return True
    except ConnectionError:
        return False
    return False


async def get(addr: str, path: str = "/") -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
        async with s.get(f"http://{addr}{path}") as r:
            return r.status, await r.text()


def close_all(conns: list[Conn]) -> None:
    for _, w in conns:
        w.close()


# -- the connection cap --------------------------------------------------------------


async def test_beyond_the_cap_idle_then_trickling_connections_make_room() -> None:
    async with serve(limits(max_connections=8)) as (_, addr):
        idle = [await connect(addr) for _ in range(8)]
        slow: list[Conn] = []
        for _ in range(8):
            conn = await connect(addr)
            conn[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the end
            await conn[1].drain()
            slow.append(conn)
        try:
            assert await get(addr) == (200, "ok")
            # Each trickler took an idle connection's place, the normal client
            # the oldest trickler's.
            for conn in idle:
                assert await closed_by_server(conn) == b""
            assert await closed_by_server(slow[0]) == b""
            for conn in slow[1:]:
                assert await still_open(conn)
        finally:
            close_all(idle + slow)


async def test_requests_in_progress_are_never_cut_a_new_connection_gets_503() -> None:
    async with serve(limits(max_connections=2)) as (app, addr):
        held = [asyncio.create_task(get(addr, "/hold")) for _ in range(2)]
        for _ in range(WAIT * 100):  # until both are being handled
            await asyncio.sleep(0.01)
            if app.holding == 2:
                break
        extra = await connect(addr)
        try:
            answer = await closed_by_server(extra)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b"Retry-After: 1" in answer and b'"UNAVAILABLE"' in answer
        finally:
            close_all([extra])
        app.hold.set()
        assert [await t for t in held] == [(200, "held"), (200, "held")]


# -- timeouts ----------------------------------------------------------------------------


async def test_a_client_trickling_headers_is_cut_an_idle_one_is_not() -> None:
    async with serve(limits(client_header_timeout=0.3)) as (_, addr):
        idle = await connect(addr)
        slow = await connect(addr)
        try:
            for part in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n"):
                slow[1].write(part)
                await slow[1].drain()
            answer = await closed_by_server(slow)
            assert answer.startswith(b"HTTP/1.1 408 ")
            # The idle connection sent nothing: the keep-alive timeout's, and
            # it serves a request now.
            idle[1].write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await idle[1].drain()
            assert (await closed_by_server(idle)).startswith(b"HTTP/1.1 200 ")
        finally:
            close_all([idle, slow])


async def test_an_idle_keepalive_connection_is_closed() -> None:
    async with serve(limits(keepalive_timeout=0.3)) as (_, addr):
        conn = await connect(addr)
        try:
            conn[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await conn[1].drain()
            answer = await closed_by_server(conn)  # the answer, then the close
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
        finally:
            close_all([conn])


async def test_a_stalled_upload_is_closed() -> None:
    async with serve(limits(client_body_timeout=0.3)) as (app, addr):
        conn = await connect(addr)
        try:
            conn[1].write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            conn[1].write(b"x" * 10)  # and nothing more
            await conn[1].drain()
            assert await closed_by_server(conn) == b""
            for _ in range(WAIT * 100):
                if app.body_errors:
                    break
                await asyncio.sleep(0.01)
            assert app.body_errors and app.bodies == []
        finally:
            close_all([conn])


async def test_a_body_the_server_is_not_reading_yet_is_not_a_stall() -> None:
    """The handler reads the body only later: flow control stops the client,
    whose silence is then the server's doing, not the client's."""
    size = 16 << 20
    async with serve(limits(client_body_timeout=0.3)) as (app, addr):
        conn = await connect(addr)
        try:
            conn[1].write(
                b"POST /upload-later HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + f"Content-Length: {size}\r\n\r\n".encode()
            )
            sender = asyncio.create_task(_send(conn[1], size))
            await asyncio.sleep(1.5)  # well past the body timeout, not reading
            app.hold.set()
            await asyncio.wait_for(sender, WAIT)
            answer = await closed_by_server(conn)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(str(size).encode())
            assert app.body_errors == []
        finally:
            close_all([conn])


async def _send(writer: asyncio.StreamWriter, size: int) -> None:
    block = b"y" * (1 << 20)
    for _ in range(size // len(block)):
        writer.write(block)
        await writer.drain()
