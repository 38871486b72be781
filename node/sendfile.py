"""Sending a byte range of a blob file with the kernel's sendfile, on any loop.

``send_file_range`` writes the (already prepared) response's body from an
open file. On the standard asyncio loop it uses ``loop.sendfile``. uvloop
does not implement ``loop.sendfile`` (aiohttp's ``FileResponse`` then silently
copies the file through Python: about half the throughput, measured here),
but uvloop pays off on the small-request paths (manifests, HEADs); on it
this module drives ``os.sendfile`` itself on a duplicate of the connection's
socket descriptor, waiting for writability through the loop, like asyncio's
own native sendfile does.

Status, Range and validators are the caller's (``node.ranges``): aiohttp's
``FileResponse`` would apply its own Range rules and overwrite the ETag with
a stat-based one.
"""

from __future__ import annotations

import asyncio
import os
from typing import IO, Any

from aiohttp import web

FALLBACK_CHUNK = 1 << 20


async def send_file_range(
    request: web.BaseRequest, resp: web.StreamResponse, fobj: IO[Any], offset: int, count: int
) -> None:
    """Write ``count`` bytes of ``fobj`` from ``offset`` as the body of the
    prepared ``resp``."""
    if count <= 0:
        return
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    loop = asyncio.get_running_loop()
    if resp.compression:
        await _copy(resp, fobj, offset, count)
        return
    if isinstance(loop, asyncio.BaseEventLoop):
        try:
            await loop.sendfile(transport, fobj, offset, count)
            return
        except NotImplementedError:
            await _copy(resp, fobj, offset, count)
            return
    if transport.get_extra_info("sslcontext") is not None:
        # HTTPS: the bytes must go through the transport's encryption.
        await _copy(resp, fobj, offset, count)
        return
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise ConnectionResetError("connection lost")
    # The headers (sent by prepare) must be on the wire before the file's bytes.
    while transport.get_write_buffer_size():  # noqa: ASYNC110
        await asyncio.sleep(0.0005)
    await _sendfile_loop(loop, sock.fileno(), fobj.fileno(), offset, count)


async def _copy(resp: web.StreamResponse, fobj: IO[Any], offset: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    fd = fobj.fileno()
    while count > 0:
        data = await loop.run_in_executor(None, os.pread, fd, min(FALLBACK_CHUNK, count), offset)
        if not data:
            raise OSError("file shorter than the range sent")
        await resp.write(data)
        offset += len(data)
        count -= len(data)


async def _sendfile_loop(
    loop: asyncio.AbstractEventLoop, sock_fd: int, file_fd: int, offset: int, count: int
) -> None:
    fd = os.dup(sock_fd)  # a descriptor of our own: the transport owns sock_fd
    writable = asyncio.Event()
    loop.add_writer(fd, writable.set)
    try:
        while count > 0:
            try:
                sent = os.sendfile(fd, file_fd, offset, min(count, 1 << 30))
            except BlockingIOError:
                writable.clear()
                await writable.wait()
                continue
            if sent == 0:
                raise ConnectionResetError("peer closed the connection")
            offset += sent
            count -= sent
    finally:
        loop.remove_writer(fd)
        os.close(fd)
