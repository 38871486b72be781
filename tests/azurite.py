"""Azurite, Microsoft's Azure Storage emulator, for tests.

``Azurite(base).start()`` runs the blob service alone (``azurite-blob``) on
a free loopback port with its own data directory under ``base`` and its log
in ``base/azurite.log``; ``stop()`` ends it by its PID (SIGTERM, then
SIGKILL). The ``azurite`` fixture (module scope) yields a running one; a
test module that wants it imports it (``from tests.azurite import
azurite``). Each test should use a container of its own
(``new_container()``).

The binary comes from npm (``install.sh --test`` installs azurite 3.34 into
``.azurite/``, which runs on Debian's Node 20); ``MERIDIAN_AZURITE_BLOB``
names another one. A missing binary fails the test with the install command,
never skips it. The SDK sends a newer API version than Azurite 3.34 knows,
hence ``--skipApiVersionCheck``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.runtime import free_port
from localcluster.supervisor import REPO_ROOT, Child, StartError, spawn

VERSION = "3.34.0"
INSTALL = f"bash install.sh --test (or: npm install --prefix .azurite azurite@{VERSION})"
LOCAL_BIN = REPO_ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
# The emulator's well-known development account (public, documented by Microsoft).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def find_azurite() -> str:
    """The ``azurite-blob`` to run; fails (never skips) with the install step."""
    named = os.environ.get("MERIDIAN_AZURITE_BLOB", "")
    for candidate in (named, str(LOCAL_BIN), shutil.which("azurite-blob") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"azurite-blob not found: {INSTALL}")


class Azurite:
    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.location = self.base / "data"
        self.log = self.base / "azurite.log"
        self.port = free_port()
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

    def start(self) -> Azurite:
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
        self.child = spawn("azurite", argv, self.log, die_with_parent=True)
        try:
            # Any HTTP answer (an unauthenticated listing is 403) means it serves.
            self.child.wait_ready(url=f"{self.blob_endpoint}?comp=list", ok=lambda *_: True)
        except StartError as e:
            self.child.stop()
            raise RuntimeError(str(e)) from None
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(grace=5)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        yield az
