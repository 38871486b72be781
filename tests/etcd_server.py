"""A real etcd process for tests.

``EtcdServer`` runs ``/usr/bin/etcd`` (or ``$MERIDIAN_TEST_ETCD``) as a
single-member cluster on ephemeral loopback ports (never 2379/2380) with a
temporary data dir. ``stop()`` ends it by PID, ``kill()`` SIGKILLs it, and
``restart()`` brings it back on the same data dir and ports, which is what
the etcd-down / etcd-back tests need. Every blocking method has an ``a*``
twin that runs it in a thread so the event loop (and the clients under test)
keep running meanwhile.

A missing etcd binary is a failure, not a skip::

    etcd not found: apt-get install -y etcd-server

Wiring into tests (the lead puts this in tests/conftest.py)::

    from tests.etcd_server import etcd_fixture
    etcd = etcd_fixture()                      # function scope, fresh server
    etcd_session = etcd_fixture(scope="session")
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cluster.runtime import free_port
from localcluster import supervisor
from localcluster.supervisor import Child, StartError

__all__ = ["EtcdServer", "etcd_fixture", "find_etcd", "free_port", "running_etcd"]

ETCD_INSTALL_HINT = f"etcd not found: {supervisor.ETCD_INSTALL}"


def find_etcd() -> str:
    """The etcd binary to run (``$MERIDIAN_TEST_ETCD``, else etcd on PATH or
    /usr/bin/etcd); fails the test (never skips) when absent."""
    try:
        return supervisor.find_etcd("MERIDIAN_TEST_ETCD")
    except StartError as e:
        pytest.fail(str(e), pytrace=False)


class _PortTaken(RuntimeError):
    pass


class EtcdServer:
    """One etcd member on loopback; see the module docstring."""

    def __init__(
        self,
        data_dir: str | None = None,
        *,
        name: str = "meridian-test",
        startup_timeout: float = 30.0,
        extra_args: list[str] | None = None,
    ) -> None:
        self.binary = find_etcd()
        self._own_dir = data_dir is None
        self.base_dir = data_dir or tempfile.mkdtemp(prefix="meridian-etcd-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.log_path = os.path.join(self.base_dir, "etcd.log")
        self.name = name
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.client_port = free_port()
        self.peer_port = free_port({self.client_port})
        self._child: Child | None = None
        self._started_once = False

    # -- addresses ---------------------------------------------------------

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url]

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> EtcdServer:
        """Start and wait until healthy. The first start picks new ports if
        another process grabbed ours meanwhile; restarts keep the ports."""
        if self.running:
            return self
        for attempt in range(3):
            try:
                return self._start_once()
            except _PortTaken:
                if self._started_once or attempt == 2:
                    raise
                self.client_port = free_port()
                self.peer_port = free_port({self.client_port})
        raise AssertionError("unreachable")

    def _start_once(self) -> EtcdServer:
        os.makedirs(self.base_dir, exist_ok=True)
        try:
            self._child = supervisor.start_etcd(
                self.data_dir,
                self.log_path,
                binary=self.binary,
                name=self.name,
                client_port=self.client_port,
                peer_port=self.peer_port,
                extra=[
                    "--initial-cluster-token", f"meridian-test-{self.client_port}",
                    # Fast elections: a restarted single member leads within
                    # ~0.2 s, and the minimum lease TTL drops to 1 s.
                    "--heartbeat-interval", "20",
                    "--election-timeout", "200",
                    "--log-level", "warn",
                    *self.extra_args,
                ],
                timeout=self.startup_timeout,
            )  # fmt: skip
        except StartError as e:
            self._child = None
            if "address already in use" in self.log_tail():
                raise _PortTaken(self.log_tail()) from None
            raise RuntimeError(str(e)) from None
        self._started_once = True
        return self

    def _signal(self, graceful: bool) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if graceful:
            child.stop()
        else:
            child.kill()

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after 10 s), by PID."""
        self._signal(graceful=True)

    def kill(self) -> None:
        """SIGKILL, by PID: etcd gets no chance to flush or say goodbye."""
        self._signal(graceful=False)

    def restart(self, *, hard: bool = True) -> EtcdServer:
        """Kill (SIGKILL unless ``hard=False``) and start again on the same
        data dir and ports."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop and remove the temporary directory (if this object made it)."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- async twins (run in a thread: the loop keeps serving meanwhile) ----

    async def astart(self) -> EtcdServer:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self, *, hard: bool = True) -> EtcdServer:
        return await asyncio.to_thread(self.restart, hard=hard)

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no etcd log)"
        return "\n".join(lines[-n:])

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"EtcdServer({self.client_url}, pid={self.pid}, dir={self.base_dir})"


@contextlib.contextmanager
def running_etcd(data_dir: str | None = None, **kwargs: Any) -> Iterator[EtcdServer]:
    """``with running_etcd() as etcd: ... etcd.endpoints ...``"""
    server = EtcdServer(data_dir, **kwargs)
    try:
        yield server.start()
    finally:
        server.cleanup()


def etcd_fixture(scope: str = "function", **kwargs: Any) -> Callable[..., Any]:
    """A pytest fixture yielding a started ``EtcdServer`` (stopped and
    removed afterwards). Assign it to a name in a test module or conftest::

        etcd = etcd_fixture()
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
        base = str(tmp_path_factory.mktemp("etcd"))
        server = EtcdServer(base, **kwargs)
        try:
            yield server.start()
        finally:
            server.cleanup()

    return _etcd
