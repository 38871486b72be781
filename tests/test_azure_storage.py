"""What only the Azure driver has, on Azurite (tests/azurite.py); the driver
contract itself runs in tests/test_blob_driver_contract.py.

- a staged writer resumed by another store object (another node of the
  region sharing the container) continues, and its digest is rebuilt from
  the staged bytes;
- two writers racing on one name: the loser gets ``StagingConflict`` with
  its state reloaded, and only one writer's bytes are ever staged;
- redirect URLs: read-only SAS of the one blob; none when redirects are off;
- an unreachable service is ``BlobUnavailable`` (503 at the API), wrong
  credentials end ``connect`` at once;
- the node's storage settings: the connection string never shows in the
  config's repr, ``--storage azure`` needs one, container names.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from cluster import settings
from cluster.runtime import free_port
from node import config
from node.storage.azure import AzureBlobStore, CredentialsRefused, StagingConflict, connect
from node.storage.base import BlobNotFound, BlobUnavailable
from tests.azurite import ACCOUNT, Azurite, azurite  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(120)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def container(azurite: Azurite) -> AsyncIterator[str]:  # noqa: F811
    name = azurite.new_container()
    store = AzureBlobStore.from_connection_string(azurite.connection_string, name)
    await store.start()
    try:
        yield name
    finally:
        await store.container.delete_container()
        await store.close()


@pytest.fixture
async def two_nodes(
    azurite: Azurite,  # noqa: F811
    container: str,
) -> AsyncIterator[tuple[AzureBlobStore, AzureBlobStore]]:
    """Two stores (clients of their own) on one container."""
    a = AzureBlobStore.from_connection_string(azurite.connection_string, container)
    b = AzureBlobStore.from_connection_string(azurite.connection_string, container)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_writer_resumes_on_another_node(
    two_nodes: tuple[AzureBlobStore, AzureBlobStore],
) -> None:
    a, b = two_nodes
    first, second = os.urandom(5 << 20), os.urandom(3 << 20)
    w = await a.writer("uploads/moved/data")
    await w.write([first[: 1 << 20]])
    await w.write([first[1 << 20 :]])
    w2 = await b.writer("uploads/moved/data", resume=True)
    assert w2.size == len(first)
    assert await w2.read_at(len(first) - 5, 10) == first[-5:]
    await w2.write([second])
    d = digest_of(first + second)
    assert await w2.digest() == d  # rebuilt from the staged bytes, then kept running
    assert await b.stat(d) is None
    assert await w2.commit(d) == len(first) + len(second)
    assert await a.read_all(d) == first + second
    assert [i async for i in a.list_staged("uploads/")] == []


async def test_racing_writers_on_one_name(
    two_nodes: tuple[AzureBlobStore, AzureBlobStore],
) -> None:
    a, b = two_nodes
    wa = await a.writer("uploads/race/data")
    await wa.write([b"A" * 1000])
    wb = await b.writer("uploads/race/data", resume=True)
    await wb.write([b"B" * 500])
    with pytest.raises(StagingConflict):
        await wa.write([b"a" * 10])  # its view is stale: nothing appended
    assert wa.size == 1500  # reloaded: the other writer's bytes count
    assert await wa.read_at(0, 2000) == b"A" * 1000 + b"B" * 500
    await wa.write([b"a" * 10])  # from the reloaded state it appends
    with pytest.raises(StagingConflict):
        await wb.write([b"b" * 5])
    data = b"A" * 1000 + b"B" * 500 + b"a" * 10
    assert wb.size == len(data)
    assert await wb.commit(digest_of(data)) == len(data)  # hashed from the staged bytes
    assert await a.read_all(digest_of(data)) == data
    # A writer whose bytes were dropped elsewhere (an aborted session) is gone.
    wc = await a.writer("uploads/gone/data")
    await wc.write([b"x"])
    await (await b.writer("uploads/gone/data", resume=True)).abort()
    with pytest.raises(BlobNotFound):
        await wc.write([b"y"])


async def test_redirect_urls(azurite: Azurite, container: str) -> None:  # noqa: F811
    store = AzureBlobStore.from_connection_string(azurite.connection_string, container)
    off = AzureBlobStore.from_connection_string(
        azurite.connection_string, container, redirect=False
    )
    try:
        data = os.urandom(70_000)
        d = digest_of(data)
        await store.put_bytes(d, data)
        assert await off.redirect_url(d) is None
        url = await store.redirect_url(d)
        assert url is not None
        assert url.startswith(f"{azurite.blob_endpoint}/{container}/blobs/sha256/")
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 200 and await r.read() == data
            async with s.get(url, headers={"Range": "bytes=5-9"}) as r:
                assert r.status == 206 and await r.read() == data[5:10]
            async with s.put(url, data=b"x", headers={"x-ms-blob-type": "BlockBlob"}) as r:
                assert r.status == 403  # read-only
    finally:
        await store.close()
        await off.close()


async def test_unreachable_storage_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    cs = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey=a2V5;"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )
    store = AzureBlobStore.from_connection_string(cs, "meridian-test", retries=0)
    try:
        d = digest_of(b"x")
        with pytest.raises(BlobUnavailable) as e:
            await store.stat(d)
        assert "a2V5" not in str(e.value)  # nothing of the connection string
        with pytest.raises(BlobUnavailable):
            await store.writer("uploads/x/data")
        with pytest.raises(BlobUnavailable):
            async with store.open(d):
                pass
    finally:
        await store.close()


async def test_wrong_credentials_end_connect(azurite: Azurite) -> None:  # noqa: F811
    cs = azurite.connection_string.replace(
        "AccountKey=", "AccountKey=" + "QUJD" * 22 + "==;Unused="
    )
    with pytest.raises(CredentialsRefused) as e:
        await connect(cs, azurite.new_container())
    assert "QUJD" not in str(e.value)


def parse(*argv: str, env: dict[str, str] | None = None) -> config.NodeConfig:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    cfg = settings.from_args(config.NodeConfig, p.parse_args(list(argv)), environ=env or {})
    problem = cfg.check()
    if problem is not None:
        raise ValueError(problem)
    return cfg


def test_storage_settings() -> None:
    cfg = parse()
    assert cfg.storage == "fs" and cfg.storage_redirect is True
    secret = "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=c2VjcmV0"
    cfg = parse(
        "--storage",
        "azure",
        "--region",
        "West_Europe",
        env={
            "MERIDIAN_AZURE_CONNECTION_STRING": secret,
        },
    )
    assert str(cfg.azure_connection_string) == secret
    assert "c2VjcmV0" not in repr(cfg)
    assert cfg.azure_container_name == "meridian-west-europe"
    assert parse("--azure-container", "mine", "--no-storage-redirect").storage_redirect is False
    with pytest.raises(ValueError, match="needs --azure-connection-string"):
        parse("--storage", "azure")
    with pytest.raises(ValueError, match="invalid Azure container name"):
        parse("--storage", "azure", "--azure-connection-string", secret, "--azure-container", "A_b")
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    with pytest.raises(SystemExit):  # the node's own parsing: a usage error
        config.from_args(p.parse_args(["--storage", "azure"]))
