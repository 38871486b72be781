"""What a ``meridian`` command checks before it starts anything, and how it
answers a mistake: one line on stderr (what is wrong, what to do) and one of
these exit codes, never a traceback:

- 0: done (or stopped cleanly by Ctrl-C / SIGTERM);
- 1: something failed while starting or running (the line names its log);
- 2: usage: a flag, an environment value or a file's content is wrong;
- 3: this machine refuses: an address in use, a data dir in use by another
  ``meridian up``, not a directory or not writable, a program that is missing;
- 4: no cluster to talk to: none found (no ``--etcd``, no running
  ``meridian up``), or etcd / the node does not answer;
- 5: not logged in, credentials refused, or not allowed (the identity verbs);
- 6: what the command names does not exist;
- 7: it exists already, or is in use, or changed concurrently.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from cluster import procfs

OK, FAILED, USAGE, UNAVAILABLE, NO_CLUSTER = 0, 1, 2, 3, 4
DENIED, NOT_FOUND, CONFLICT = 5, 6, 7


class CliError(Exception):
    """A mistake the command answers with one line and ``code``."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what is wrong, and where
    the rest is said), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def answer(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; a :class:`CliError` becomes ``prog: message`` on stderr
    and its exit code."""
    import sys

    try:
        return fn()
    except CliError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code


def listen_address(value: str) -> str:
    """``HOST:PORT`` as a flag takes it (a ValueError says what is wrong)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:5000, got {value!r}")
    return value


def holder(port: int) -> str:
    """`` (PID n: its command)`` of the process listening on ``port``, or ""."""
    pid = procfs.listening_pid(port)
    if pid is None:
        return ""
    cmd = " ".join(procfs.cmdline(pid))
    return f" by PID {pid}" + (f" ({cmd[:80]})" if cmd else "")


def check_port(listen: str, flag: str) -> None:
    """That ``HOST:PORT`` can be listened on now (it may still be taken a
    moment later; the server's own bind error is answered the same way)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:
            raise address_error(e, listen, flag) from None


def address_error(e: OSError, listen: str, flag: str) -> CliError:
    """The one-line answer to a failed bind of ``listen``."""
    port = int(listen.rpartition(":")[2])
    if e.errno == errno.EADDRINUSE:
        return CliError(
            f"{listen} is in use{holder(port)}; choose another with {flag}", UNAVAILABLE
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return CliError(
            f"{listen}: no such address on this machine; use one of its own with {flag}",
            UNAVAILABLE,
        )
    if e.errno == errno.EACCES:
        return CliError(
            f"{listen}: not allowed to listen there (ports below 1024 need privileges); "
            f"choose another with {flag}",
            UNAVAILABLE,
        )
    return CliError(f"cannot listen on {listen} ({e.strerror}); check {flag}", UNAVAILABLE)


def check_listen_flags(p: argparse.ArgumentParser, listens: dict[str, str]) -> None:
    """A usage error (argparse's, exit 2) for a ``HOST:PORT`` flag that is not
    one; ``listens``: flag -> value ("" when unset)."""
    for flag, value in listens.items():
        if value:
            try:
                listen_address(value)
            except ValueError as e:
                p.error(f"argument {flag}: {e}")


def serve(data: str | Path, listens: dict[str, str], run: Callable[[], None]) -> int:
    """Check the data dir and every address of a server, then ``run`` it; a
    bind that fails anyway (taken in between) is answered as the check
    would have."""
    check_data_dir(data)
    for flag, value in listens.items():
        if value:
            check_port(value, flag)
    try:
        run()
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) and "bind" in str(e):
            flag = next(iter(listens))
            raise address_error(e, listens[flag], flag) from None
        raise
    return OK


def check_data_dir(path: str | Path, flag: str = "--data") -> Path:
    """That ``path`` is a directory this process can write (created if
    missing): the one-line answer otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CliError(
            f"{flag} {p} is not a directory; choose a directory (it is created if missing)",
            UNAVAILABLE,
        )
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(
            f"{flag} {p}: cannot create it ({e.strerror}); choose a directory this user can write",
            UNAVAILABLE,
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CliError(
            f"{flag} {p} is not writable ({e.strerror}); choose a directory this user can write",
            UNAVAILABLE,
        ) from None
    return p
