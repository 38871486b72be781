"""Azurite, Microsoft's Azure Storage emulator, for tests.

``Azurite(base).start()`` (``localcluster.azurite``, which ``meridian up
--storage azurite`` uses too) runs the blob service alone on a free
loopback port with its own data directory under ``base`` and its log in
``base/azurite.log``; ``stop()`` ends it by its PID. The ``azurite``
fixture (module scope) yields a running one; a test module that wants it
imports it (``from tests.azurite import azurite``). Each test should use a
container of its own (``new_container()``).

A missing binary fails the test with the install command (``install.sh
--test``), never skips it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localcluster.azurite import ACCOUNT, INSTALL, KEY, VERSION, Azurite, find_azurite

__all__ = ["ACCOUNT", "INSTALL", "KEY", "VERSION", "Azurite", "azurite", "find_azurite"]


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        yield az
