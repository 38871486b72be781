"""Real processes for tests: free loopback ports, Meridian nodes, tool checks.

Processes are started and stopped by :mod:`localcluster.supervisor`, as
``meridian up`` and the load tests start theirs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cluster.runtime import free_port
from localcluster.supervisor import (
    REPO_ROOT,
    Child,
    StartError,
    meridian_argv,
    registry_answers,
    spawn,
)

ROOT = REPO_ROOT

__all__ = ["ROOT", "NodeProcess", "free_port", "require_tool", "skopeo"]

INSTALL_HINTS = {
    "skopeo": "apt-get install -y skopeo",
    "etcd": "apt-get install -y etcd-server",
    "ctr": "apt-get install -y containerd",
    "containerd": "apt-get install -y containerd",
    "docker-registry": "apt-get install -y docker-registry",
    "podman": "apt-get install -y podman",
}


def require_tool(name: str) -> str:
    """Path of ``name``; fail (never skip) with the install command if absent."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: {INSTALL_HINTS.get(name, 'install ' + name)}")
    return path


class NodeProcess:
    """A real ``meridian node`` subprocess on a free loopback port."""

    def __init__(self, data: Path, *, region: str = "local", etcd: str = "", extra=()) -> None:
        self.data = Path(data)
        self.region = region
        self.etcd = etcd
        self.extra = list(extra)
        self.port = free_port()
        self.child: Child | None = None
        self.log = self.data.parent / f"node-{region}-{self.port}.log"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.child is None else self.child.proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> NodeProcess:
        cmd = meridian_argv(
            "node",
            "--listen", self.hostport,
            "--data", str(self.data),
            "--region", self.region,
            *self.extra,
        )  # fmt: skip
        if self.etcd:
            cmd += ["--etcd", self.etcd]
        self.data.mkdir(parents=True, exist_ok=True)
        # In pytest's own process group: Ctrl-C reaches the nodes too.
        self.child = spawn(f"node {self.region}", cmd, self.log, cwd=ROOT, new_session=False)
        try:
            self.child.wait_ready(url=self.url + "/v2/", ok=registry_answers, timeout=20)
        except StartError as e:
            self.child.kill()  # never leave a node that did not come up running
            raise RuntimeError(str(e)) from None
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        if self.child is not None and self.child.running():
            self.child.kill()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def restart(self) -> NodeProcess:
        self.kill()
        return self.start()

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def skopeo(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = require_tool("skopeo")
    env = dict(os.environ)
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, check=check, timeout=timeout, env=env
    )
