"""Azurite, Microsoft's Azure Storage emulator, as a child process.

``meridian up --storage azurite`` and the tests (``tests/azurite.py``) run
its blob service alone (``azurite-blob``) on a loopback port with its own
data directory and log, and stop it by its PID (SIGTERM, then SIGKILL).

The binary comes from npm (``install.sh --test`` installs azurite 3.34 into
``.azurite/``, which runs on Debian's Node 20); ``MERIDIAN_AZURITE_BLOB``
names another one. The SDK sends a newer API version than Azurite 3.34
knows, hence ``--skipApiVersionCheck``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from cluster.runtime import free_port
from localcluster.supervisor import REPO_ROOT, Child, MissingProgram, StartError, spawn

VERSION = "3.34.0"
INSTALL = f"bash install.sh --test (or: npm install --prefix .azurite azurite@{VERSION})"
LOCAL_BIN = REPO_ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
# The emulator's well-known development account (public, documented by Microsoft).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def find_azurite() -> str:
    """The ``azurite-blob`` to run; ``MissingProgram`` names the install step."""
    named = os.environ.get("MERIDIAN_AZURITE_BLOB", "")
    for candidate in (named, str(LOCAL_BIN), shutil.which("azurite-blob") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MissingProgram(f"azurite-blob not found: {INSTALL}")


class Azurite:
    """The blob service on ``127.0.0.1:<port>`` (a free one by default),
    data in ``base/data``, log in ``base/azurite.log``."""

    def __init__(self, base: Path, port: int = 0) -> None:
        self.base = Path(base)
        self.location = self.base / "data"
        self.log = self.base / "azurite.log"
        self.port = port or free_port()
        self.child: Child | None = None

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    @staticmethod
    def new_container() -> str:
        return "t" + uuid.uuid4().hex[:24]

    def start(self, *, die_with_parent: bool = True) -> Azurite:
        exe = find_azurite()
        self.location.mkdir(parents=True, exist_ok=True)
        argv = [
            exe,
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--location", str(self.location),
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]  # fmt: skip
        self.child = spawn("azurite", argv, self.log, die_with_parent=die_with_parent)
        try:
            # Any HTTP answer (an unauthenticated listing is 403) means it serves.
            self.child.wait_ready(url=f"{self.blob_endpoint}?comp=list", ok=lambda *_: True)
        except StartError:
            self.child.stop()
            raise
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(grace=5)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
