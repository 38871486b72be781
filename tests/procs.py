"""Real processes for tests: free loopback ports, Meridian nodes, tool checks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster.runtime import free_port

ROOT = Path(__file__).resolve().parent.parent

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


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class NodeProcess:
    """A real ``meridian node`` subprocess on a free loopback port."""

    def __init__(self, data: Path, *, region: str = "local", etcd: str = "", extra=()) -> None:
        self.data = Path(data)
        self.region = region
        self.etcd = etcd
        self.extra = list(extra)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.data.parent / f"node-{region}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> NodeProcess:
        cmd = [
            sys.executable,
            "-m",
            "cluster.cli",
            "node",
            "--listen",
            self.hostport,
            "--data",
            str(self.data),
            "--region",
            self.region,
            *self.extra,
        ]
        if self.etcd:
            cmd += ["--etcd", self.etcd]
        self.data.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        wait_http(self.url + "/v2/", proc=self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

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
