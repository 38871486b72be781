"""Who may call a region's replication port (issue 11), with real processes:
one etcd, two ``meridian node`` regions.

- Replication works with the region credential every node sends by
  default; the nodes run their HTTP API in the open mode (``--no-auth``) and
  the gRPC port is closed all the same.
- An anonymous caller (no metadata), a garbage, forged or expired token, a
  token of another type or audience, and a token for a region the cluster
  does not know are refused (UNAUTHENTICATED) by Ping, Stat and FetchBlob.
- Even with a valid credential, a deleted image's blob (manifest deleted,
  links collected) and a blob deleted through the API are NOT_FOUND,
  though their bytes are still on disk; another registry's blob asked for
  under the wrong registry is NOT_FOUND.
- With mutual TLS (certificates from ``cluster.pki``) replication works; a
  client without a certificate, or with one from another CA, cannot
  connect; a good certificate without the credential is still refused.

The test process holds etcd access, so it can mint credentials as a region
does (``RegionCredential``) and sign with the cluster's keys."""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cluster import pki
from cluster.auth import tokens
from cluster.etcd import EtcdKV
from cluster.namespace import Namespace
from node.grpc_service import (
    REGION_AUDIENCE,
    REGION_SUBJECT,
    REGION_TOKEN_TYPE,
    GrpcTLS,
    RegionCredential,
    open_channel,
)
from proto import replication_pb2 as pb
from proto import replication_pb2_grpc as pb_grpc
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.images import build_image
from tests.oci import create_registry
from tests.test_replication import (
    REG,
    REPO,
    RegionNode,
    content_digests,
    dump_logs,
    start_regions,
    wait_peers,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

DOMAIN = "reg.test"
OPEN = ["--no-auth", "--domain", DOMAIN]  # the HTTP API open: the gRPC port must not be
REGIONS = ["eastus", "westeurope"]

etcd = etcd_fixture()


# -- helpers -------------------------------------------------------------------


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def push_blob(node: RegionNode, data: bytes, registry: str = REG, repo: str = REPO) -> str:
    """A monolithic upload into ``registry`` (selected by Host)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, body = http(
        "POST",
        f"{node.url}/v2/{repo}/blobs/uploads/?digest={digest}",
        data,
        {"Host": f"{registry}.{DOMAIN}", "Content-Type": "application/octet-stream"},
    )
    assert status == 201, body
    return digest


def run(fn: Callable[[Namespace], Awaitable[Any]], etcd: EtcdServer) -> Any:
    """``fn(ns)`` on a namespace of the cluster's etcd (as a region reads it)."""

    async def main() -> Any:
        ns = Namespace(EtcdKV(etcd.endpoints, timeout=5.0), "tester")
        await ns.start()
        try:
            return await fn(ns)
        finally:
            await ns.close()

    return asyncio.run(main())


def region_token(ns: Namespace, region: str, **kw: Any) -> str:
    key = tokens.KeyRing(ns).signing_key()
    assert key is not None, "the nodes created a signing key"
    args: dict[str, Any] = {
        "subject": REGION_SUBJECT + region,
        "kind": "region",
        "registry": "",
        "service": REGION_AUDIENCE,
        "access": [],
        "ttl": 120,
        "token_type": REGION_TOKEN_TYPE,
    }
    args.update(kw)
    return tokens.issue(key, **args)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def call_all(
    stub: pb_grpc.ReplicationStub, metadata: tuple[tuple[str, str], ...] | None, digest: str
) -> dict[str, grpc.StatusCode]:
    """Ping, Stat and FetchBlob with ``metadata``: each one's status code."""
    codes: dict[str, grpc.StatusCode] = {}

    async def fetch() -> None:
        req = pb.FetchRequest(registry=REG, digest=digest)
        async for _ in stub.FetchBlob(req, metadata=metadata, timeout=10):
            pass

    calls = {
        "Ping": lambda: stub.Ping(pb.PingRequest(from_region="x"), metadata=metadata, timeout=10),
        "Stat": lambda: stub.Stat(
            pb.StatRequest(registry=REG, digests=[digest]), metadata=metadata, timeout=10
        ),
        "FetchBlob": fetch,
    }
    for name, call in calls.items():
        try:
            await call()
            codes[name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            codes[name] = e.code()
    return codes


async def fetch_code(
    stub: pb_grpc.ReplicationStub, metadata: Any, registry: str, digest: str
) -> tuple[grpc.StatusCode, bytes]:
    try:
        chunks = [
            c
            async for c in stub.FetchBlob(
                pb.FetchRequest(registry=registry, digest=digest), metadata=metadata, timeout=10
            )
        ]
    except grpc.aio.AioRpcError as e:
        return e.code(), b""
    return grpc.StatusCode.OK, b"".join(c.data for c in chunks)


# -- the region credential -------------------------------------------------------


def test_outsiders_can_neither_fetch_nor_probe(etcd: EtcdServer, tmp_path: Path) -> None:
    """Replication works with the default credential; every call without a
    valid one for a registered region is UNAUTHENTICATED."""
    nodes = start_regions(tmp_path, etcd, REGIONS, dict.fromkeys(REGIONS, OPEN))
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([300_000, 5000], seed="grpc-auth-1")
        east.registry().push(REPO, "v1", image)
        wait_until(lambda: west.has_all(content_digests(image)), "westeurope replicated", 60)
        layer = image.layers[0].digest

        async def checks(ns: Namespace) -> None:
            channel = open_channel(east.grpc)
            stub = pb_grpc.ReplicationStub(channel)
            ok = await RegionCredential(ns, "westeurope").metadata()
            try:
                # The control: a registered region's credential gets everything.
                assert await call_all(stub, ok, layer) == dict.fromkeys(
                    ("Ping", "Stat", "FetchBlob"), grpc.StatusCode.OK
                )
                assert await fetch_code(stub, ok, REG, layer) == (
                    grpc.StatusCode.OK,
                    image.layers[0].data,
                )
                stat = await stub.Stat(pb.StatRequest(registry=REG, digests=[layer]), metadata=ok)
                assert stat.blobs[0].present and stat.blobs[0].size == image.layers[0].size

                key = tokens.KeyRing(ns).signing_key()
                assert key is not None
                forger = Ed25519PrivateKey.generate()
                forged = jwt.encode(
                    jwt.decode(region_token(ns, "westeurope"), options={"verify_signature": False}),
                    forger,
                    algorithm="EdDSA",
                    headers={"kid": key.kid},  # claims to be the cluster's key
                )
                unsigned = jwt.encode(
                    jwt.decode(region_token(ns, "westeurope"), options={"verify_signature": False}),
                    None,
                    algorithm="none",
                )
                refused = {
                    "anonymous": None,
                    "garbage": bearer("not-a-token"),
                    "basic": (("authorization", "Basic b3duZXI6c2VjcmV0"),),
                    "forged": bearer(forged),
                    "alg none": bearer(unsigned),
                    "expired": bearer(region_token(ns, "westeurope", now=time.time() - 600)),
                    "unknown region": bearer(region_token(ns, "mars")),
                    "access token": bearer(region_token(ns, "westeurope", token_type="access")),
                    "other audience": bearer(
                        region_token(ns, "westeurope", service=f"{REG}.{DOMAIN}")
                    ),
                    "not a region": bearer(
                        region_token(ns, "westeurope", subject="owner", kind="owner")
                    ),
                }
                for what, md in refused.items():
                    codes = await call_all(stub, md, layer)
                    assert codes == dict.fromkeys(
                        ("Ping", "Stat", "FetchBlob"), grpc.StatusCode.UNAUTHENTICATED
                    ), what
            finally:
                await channel.close()

        run(checks, etcd)
        m = east.metrics()
        for method in ("Ping", "Stat", "FetchBlob"):
            assert m[f'meridian_replication_refused_calls_total{{method="{method}"}}'] >= 10
        # The nodes' own calls were never refused.
        assert west.metrics().get("meridian_replication_refused_calls_total", 0) == 0
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_only_content_the_registry_references_is_served(etcd: EtcdServer, tmp_path: Path) -> None:
    """With a valid credential: a deleted image's blobs (manifest deleted,
    links collected), a blob deleted through the API, and another
    registry's blob asked for under this one are NOT_FOUND, though their
    bytes are still in eastus's store."""
    nodes = start_regions(tmp_path, etcd, REGIONS, dict.fromkeys(REGIONS, OPEN))
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([200_000, 3000], seed="grpc-auth-deleted")
        east.registry().push(REPO, "v1", image)
        kept = build_image([100_000], seed="grpc-auth-kept")
        east.registry().push(REPO, "kept", kept)
        loose = push_blob(east, b"a blob pushed, then deleted" * 1000)
        create_registry(east.url, "other", location="eastus")
        theirs = push_blob(east, b"another registry's blob" * 1000, registry="other")
        wait_until(
            lambda: west.has_all(content_digests(image) + content_digests(kept)),
            "westeurope replicated",
            60,
        )
        layer = image.layers[0].digest

        async def checks(ns: Namespace) -> None:
            channel = open_channel(east.grpc)
            stub = pb_grpc.ReplicationStub(channel)
            ok = await RegionCredential(ns, "westeurope").metadata()
            try:
                for reg, d in ((REG, layer), (REG, loose), ("other", theirs)):
                    assert (await fetch_code(stub, ok, reg, d))[0] == grpc.StatusCode.OK, d
                # Another registry's blob, under the wrong registry.
                assert (await fetch_code(stub, ok, REG, theirs))[0] == grpc.StatusCode.NOT_FOUND
                stat = await stub.Stat(pb.StatRequest(registry=REG, digests=[theirs]), metadata=ok)
                assert not stat.blobs[0].present

                # A blob deleted through the API.
                host = {"Host": f"{REG}.{DOMAIN}"}
                status, body = http("DELETE", f"{east.url}/v2/{REPO}/blobs/{loose}", headers=host)
                assert status == 202, body
                assert (await fetch_code(stub, ok, REG, loose))[0] == grpc.StatusCode.NOT_FOUND

                # A deleted image: manifest deleted, then its links collected.
                status, body = http(
                    "DELETE",
                    f"{east.url}/v2/{REPO}/manifests/{image.digest}",
                    headers={"Host": f"{REG}.{DOMAIN}"},
                )
                assert status == 202, body
                assert await ns.collect_links(grace=0) >= len(image.all_blobs())
                for d in content_digests(image):
                    assert (await fetch_code(stub, ok, REG, d))[0] == grpc.StatusCode.NOT_FOUND, d
                stat = await stub.Stat(
                    pb.StatRequest(registry=REG, digests=content_digests(image)), metadata=ok
                )
                assert not any(b.present for b in stat.blobs)
                # What is still referenced is still served.
                for b in kept.all_blobs():
                    assert await fetch_code(stub, ok, REG, b.digest) == (
                        grpc.StatusCode.OK,
                        b.data,
                    )
            finally:
                await channel.close()

        run(checks, etcd)
        # Refused by reference, not by absence: the bytes are still there.
        assert east.has_all([layer, loose, theirs])
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


# -- mutual TLS --------------------------------------------------------------------


def test_mutual_tls_between_regions(etcd: EtcdServer, tmp_path: Path) -> None:
    ca_dir, other_dir = tmp_path / "pki", tmp_path / "other-pki"
    ca, _ = pki.ensure_ca(ca_dir)
    extra: dict[str, list[str]] = {}
    for region in ("eastus", "westeurope"):
        crt, key = pki.issue(ca_dir, region, ["127.0.0.1"])
        extra[region] = [
            *OPEN,
            "--grpc-tls-ca", str(ca),
            "--grpc-tls-cert", str(crt),
            "--grpc-tls-key", str(key),
        ]  # fmt: skip
    tester = GrpcTLS(str(ca), *map(str, pki.issue(ca_dir, "tester", ["127.0.0.1"])))
    other_ca, _ = pki.ensure_ca(other_dir, "Another CA")
    intruder = GrpcTLS(str(ca), *map(str, pki.issue(other_dir, "intruder", ["127.0.0.1"])))
    # Trusts the right CA, presents no certificate.
    no_cert = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())

    nodes = start_regions(tmp_path / "regions", etcd, ["eastus", "westeurope"], extra)
    east, west = nodes
    try:
        wait_peers(nodes)
        image = build_image([250_000, 4000], seed="grpc-mtls")
        east.registry().push(REPO, "v1", image)
        wait_until(lambda: west.has_all(content_digests(image)), "westeurope replicated", 60)
        assert "mutual TLS" in east.logs()
        layer = image.layers[0].digest

        async def checks(ns: Namespace) -> None:
            ok = await RegionCredential(ns, "westeurope").metadata()
            channels = {
                "plain": grpc.aio.insecure_channel(east.grpc),
                "no client certificate": grpc.aio.secure_channel(east.grpc, no_cert),
                "another CA's certificate": open_channel(east.grpc, intruder),
                "tester": open_channel(east.grpc, tester),
            }
            try:
                for what, channel in channels.items():
                    stub = pb_grpc.ReplicationStub(channel)
                    codes = await call_all(stub, ok, layer)
                    if what == "tester":
                        # The control: a certificate from the cluster CA and
                        # the credential; without the credential, refused.
                        assert codes == dict.fromkeys(codes, grpc.StatusCode.OK), codes
                        anon = await call_all(stub, None, layer)
                        assert anon == dict.fromkeys(anon, grpc.StatusCode.UNAUTHENTICATED)
                    else:
                        # The TLS handshake fails: the call never reaches a servicer.
                        assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAVAILABLE), (
                            what,
                            codes,
                        )
            finally:
                for channel in channels.values():
                    await channel.close()

        run(checks, etcd)
        assert east.metrics().get("meridian_replication_refused_calls_total", 0) == 3
    except BaseException:
        print(dump_logs(nodes))
        raise
    finally:
        for n in nodes:
            n.stop()


def test_grpc_tls_settings_go_together(tmp_path: Path) -> None:
    from node.config import NodeConfig

    ca, ca_key = (str(p) for p in pki.ensure_ca(tmp_path))
    assert "go together" in (NodeConfig(grpc_tls_ca=ca).check() or "")
    missing = str(tmp_path / "missing.key")
    cfg = NodeConfig(grpc_tls_ca=ca, grpc_tls_cert=ca, grpc_tls_key=missing)
    assert f"--grpc-tls-key: cannot read {missing}" == cfg.check()
    assert NodeConfig(grpc_tls_ca=ca, grpc_tls_cert=ca, grpc_tls_key=ca_key).check() is None
