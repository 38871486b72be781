"""A private containerd for tests.

``Containerd(base).start()`` runs ``containerd`` with its own root, state and
opt directories under ``base`` and its own sockets (in a short directory under
/tmp, because a unix socket path must stay under 108 bytes), and a config that
disables what a test does not need or cannot have: the CRI plugin, and the
snapshotters that need a kernel module or a special filesystem (aufs, btrfs,
zfs, devmapper). Pulls use the ``native`` snapshotter, which needs no mount
privilege (overlayfs does). ``stop()`` ends it by its PID (SIGTERM, then
SIGKILL) and unmounts anything left under its root.

``ctr(...)`` runs the ``ctr`` client against it in a private namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from localcluster.supervisor import Child, StartError, spawn
from tests.procs import redact, require_tool

NAMESPACE = "meridian-tests"
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _toml_str(s: str | Path) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Containerd:
    def __init__(self, base: Path, *, snapshotter: str = "native") -> None:
        self.base = Path(base)
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.opt = self.base / "opt"
        self.config = self.base / "config.toml"
        self.log = self.base / "containerd.log"
        self.snapshotter = snapshotter
        self.sockdir = Path(tempfile.mkdtemp(prefix="mctrd-", dir="/tmp"))
        self.address = str(self.sockdir / "containerd.sock")
        self.child: Child | None = None
        self.ctr_exe = ""

    def write_config(self) -> None:
        disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
        self.config.write_text(
            "\n".join(
                [
                    "version = 2",
                    f"root = {_toml_str(self.root)}",
                    f"state = {_toml_str(self.state)}",
                    f"disabled_plugins = [{disabled}]",
                    "",
                    "[grpc]",
                    f"  address = {_toml_str(self.address)}",
                    "",
                    "[ttrpc]",
                    f"  address = {_toml_str(self.address + '.ttrpc')}",
                    "",
                    "[debug]",
                    '  level = "info"',
                    "",
                    "[metrics]",
                    '  address = ""',
                    "",
                    '[plugins."io.containerd.internal.v1.opt"]',
                    f"  path = {_toml_str(self.opt)}",
                    "",
                ]
            )
        )

    def start(self, timeout: float = 30.0) -> Containerd:
        exe = require_tool("containerd")
        self.ctr_exe = require_tool("ctr")
        for d in (self.root, self.state, self.opt):
            d.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.child = spawn("containerd", [exe, "--config", str(self.config)], self.log)

        def answers() -> bool:
            if not os.path.exists(self.address):
                return False
            r = subprocess.run(
                [self.ctr_exe, "--address", self.address, "version"],
                capture_output=True,
                timeout=10,
            )
            return r.returncode == 0

        try:
            self.child.wait_ready(check=answers, timeout=timeout, interval=0.1)
        except StartError as e:
            self.stop()
            raise RuntimeError(str(e)) from None
        return self

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [self.ctr_exe, "--address", self.address, "--namespace", NAMESPACE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                redact(
                    f"ctr {' '.join(args)} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\n"
                    f"stderr:\n{r.stderr[-3000:]}\ncontainerd log tail:\n{self.logs()[-3000:]}"
                )
            )
        return r

    def pull(self, ref: str, *extra: str) -> subprocess.CompletedProcess:
        """``ctr images pull --plain-http`` (fetch and unpack) of ``ref``."""
        return self.ctr(
            "images", "pull", "--plain-http", "--snapshotter", self.snapshotter, *extra, ref
        )

    def images(self) -> dict[str, tuple[str, str]]:
        """ref -> (media type, digest), from ``ctr images ls``."""
        out: dict[str, tuple[str, str]] = {}
        lines = self.ctr("images", "ls").stdout.splitlines()
        for line in lines[1:]:
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = (parts[1], parts[2])
        return out

    def content(self) -> set[str]:
        """Digests in the content store."""
        return set(self.ctr("content", "ls", "-q").stdout.split())

    def content_bytes(self, digest: str) -> bytes:
        r = subprocess.run(
            [
                self.ctr_exe,
                "--address",
                self.address,
                "--namespace",
                NAMESPACE,
                "content",
                "get",
                digest,
            ],
            capture_output=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise AssertionError(f"ctr content get {digest}: {r.stderr.decode(errors='replace')}")
        return r.stdout

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(15)
        self._unmount_leftovers()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def _unmount_leftovers(self) -> None:
        try:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1] for line in f]
        except OSError:
            return
        root = str(self.base)
        for mp in sorted((m for m in mounts if m.startswith(root)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
