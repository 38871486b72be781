"""Who holds a TCP socket on this machine, read from ``/proc`` (Linux).

- :func:`listening_pid`: the process listening on a port (to say who holds a
  port a command wanted, and to measure a registry named by its URL);
- :func:`socket_owner`: the process that owns one end of a connection (the
  WAN emulator tells connecting regions apart by it).

Each answers None when it cannot tell: another network namespace, a
process that is not ours to see, no ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import socket

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"


def proc_addr(field: str) -> tuple[str, int]:
    """``"0100007F:1F90"`` (a /proc/net/tcp address) -> ``("127.0.0.1", 8080)``."""
    host, _, port = field.partition(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc/net/tcp6: four little-endian 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        ip = socket.inet_ntop(socket.AF_INET6, words)
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
    return ip, int(port, 16)


def _rows() -> list[list[str]]:
    rows = []
    for table in _TABLES:
        with contextlib.suppress(OSError):
            with open(table) as f:
                next(f, None)
                rows.extend(parts for line in f if len(parts := line.split()) >= 10)
    return rows


def socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of this namespace's TCP socket ``local`` <-> ``remote``."""
    for parts in _rows():
        with contextlib.suppress(ValueError):
            if proc_addr(parts[1]) == local and proc_addr(parts[2]) == remote:
                return int(parts[9])
    return None


def owns_socket(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has socket ``inode`` open."""
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
    return False


def _pids() -> list[int]:
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me]


def socket_owner(
    local: tuple[str, int], remote: tuple[str, int], candidates: list[int] | None = None
) -> int | None:
    """The process (among ``candidates`` first, then any) owning the socket
    whose local end is ``local`` and remote end ``remote``."""
    inode = socket_inode(local, remote)
    if inode is None:
        return None
    for pid in [*(candidates or []), *_pids()]:
        if owns_socket(pid, inode):
            return pid
    return None


def listening_inodes(port: int) -> set[int]:
    """The listening TCP sockets on ``port`` (any local address), by inode:
    one per process of a server whose processes share it (``SO_REUSEPORT``)."""
    inodes = set()
    for parts in _rows():
        with contextlib.suppress(ValueError):
            if parts[3] == _LISTEN and proc_addr(parts[1])[1] == port:
                inodes.add(int(parts[9]))
    return inodes


def listening_pid(port: int) -> int | None:
    """The process with a listening TCP socket on ``port`` (any local address)."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    for pid in _pids():
        if any(owns_socket(pid, inode) for inode in inodes):
            return pid
    return None


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` ([] if it is gone or not ours to see)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
