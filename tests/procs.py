"""Real processes for tests: free loopback ports, Meridian nodes, tool checks.

Processes are started and stopped by :mod:`localcluster.supervisor`, as
``meridian up`` and the load tests start theirs.

Authentication is on in every node the tests start (but those about the
open mode, ``--no-auth``). The cluster owner's password is chosen once per
test session (random, or ``$MERIDIAN_OWNER_PASSWORD`` if already set) and
put in this process's environment, so every node, router and harness the
tests start gets it; clients log in with ``OWNER_CREDS``."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cluster.auth.identities import OWNER, OWNER_PASSWORD_ENV
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

__all__ = [
    "OWNER_CREDS",
    "OWNER_LOGIN",
    "OWNER_PASSWORD",
    "ROOT",
    "NodeProcess",
    "creds_args",
    "free_port",
    "redact",
    "require_tool",
    "skopeo",
    "with_creds",
]

OWNER_PASSWORD = os.environ.setdefault(OWNER_PASSWORD_ENV, secrets.token_urlsafe(18))
OWNER_LOGIN = (OWNER, OWNER_PASSWORD)
OWNER_CREDS = f"{OWNER}:{OWNER_PASSWORD}"  # user:password, as skopeo, podman and ctr take them

INSTALL_HINTS = {
    "skopeo": "apt-get install -y skopeo",
    "etcd": "apt-get install -y etcd-server",
    "ctr": "apt-get install -y containerd",
    "containerd": "apt-get install -y containerd",
    "docker-registry": "apt-get install -y docker-registry",
    "podman": "apt-get install -y podman",
    "valgrind": "apt-get install -y valgrind",
    "ab": "apt-get install -y apache2-utils",
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


def redact(text: str, *secrets_: str) -> str:
    """``text`` without the owner's password (nor ``secrets_``), for
    assertion messages that quote a command line or a client's output."""
    for secret in (OWNER_PASSWORD, *secrets_):
        if secret:
            text = text.replace(secret, "***")
    return text


def creds_args(command: str, creds: str = OWNER_CREDS) -> list[str]:
    """skopeo's credential options for ``command``: a copy or sync logs in
    on both sides, anything else (inspect, list-tags, delete) once."""
    if command in ("copy", "sync"):
        return ["--src-creds", creds, "--dest-creds", creds]
    return ["--creds", creds]


def with_creds(args: Sequence[str], creds: str = OWNER_CREDS) -> list[str]:
    """skopeo ``args`` with ``creds_args`` after the command (the first
    argument that is not a global option)."""
    i = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if i is None:
        return list(args)
    return [*args[: i + 1], *creds_args(args[i], creds), *args[i + 1 :]]


def skopeo(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``skopeo ARGS`` logged in as the owner (on both sides of a copy)."""
    exe = require_tool("skopeo")
    return subprocess.run(
        [exe, *with_creds(args)], capture_output=True, text=True, check=check, timeout=timeout
    )
