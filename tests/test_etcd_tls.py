"""A locked-down etcd (issue 11), with real processes: etcd serving TLS
only and wanting client certificates (``--cert-file``, ``--key-file``,
``--trusted-ca-file``, ``--client-cert-auth``; certificates from
``cluster.pki``), and etcd with authentication on (a root user and a
``meridian`` user allowed ``/meridian/`` only, made through etcd's Auth
RPCs). ``meridian node``, ``meridian regions`` and ``meridian replication
list`` work with the right ``--etcd-*`` options and otherwise stop with one
line naming the option to fix (exit code 2), never a traceback; a password
never shows in their output or logs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from cluster import pki
from cluster.embedded import prefix_end
from cluster.etcd import EtcdKV
from cluster.etcd_options import EtcdOptions
from cluster.kv import KVRefused, Put
from cluster.runtime import free_port
from localcluster import supervisor
from tests.etcd_server import EtcdServer, find_etcd
from tests.procs import ROOT, NodeProcess

pytestmark = pytest.mark.timeout(180)

PASSWORD = "etcd-Pa55-" + os.urandom(6).hex()
ROOT_PASSWORD = "root-" + os.urandom(6).hex()


def env_with(**extra: str) -> dict[str, str]:
    env = supervisor.python_env()
    env.pop("MERIDIAN_ETCD_PASSWORD", None)
    env.pop("MERIDIAN_ETCD_USER", None)
    env.update(extra)
    return env


def run_cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        supervisor.meridian_argv(*args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env_with(**extra),
    )


def one_line_failure(res: subprocess.CompletedProcess, prog: str, *expect: str) -> str:
    """The process failed with exit code 2, its last stderr line says why."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"meridian {prog}: "), res.stderr[-3000:]
    for e in expect:
        assert e in last, last
    return last


# -- etcd with TLS and client certificates ---------------------------------------


class TLSEtcd:
    def __init__(self, base: Path) -> None:
        self.pki = base / "pki"
        self.ca, _ = pki.ensure_ca(self.pki, "etcd test CA")
        self.cert, self.key = pki.issue(self.pki, "etcd", ["127.0.0.1", "localhost"])
        self.client_cert, self.client_key = pki.issue(self.pki, "meridian", ["meridian"])
        other = base / "other-pki"
        pki.ensure_ca(other, "Another CA")
        self.alien_cert, self.alien_key = pki.issue(other, "alien", ["alien"])
        self.port = free_port()
        peer, metrics = free_port({self.port}), free_port({self.port})
        self.url = f"https://127.0.0.1:{self.port}"
        argv = [
            *supervisor.etcd_argv(
                find_etcd(), "tls", str(base / "data"), self.url, f"http://127.0.0.1:{peer}"
            ),
            "--listen-metrics-urls", f"http://127.0.0.1:{metrics}",
            "--cert-file", str(self.cert),
            "--key-file", str(self.key),
            "--trusted-ca-file", str(self.ca),
            "--client-cert-auth",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        self.child = supervisor.spawn("etcd-tls", argv, base / "etcd.log")
        try:
            self.child.wait_ready(
                url=f"http://127.0.0.1:{metrics}/health", ok=supervisor.etcd_healthy, timeout=30
            )
        except BaseException:
            self.child.kill()
            raise

    def flags(self, *, ca: bool = True, cert: str = "ours") -> list[str]:
        out = ["--etcd", self.url]
        if ca:
            out += ["--etcd-ca", str(self.ca)]
        if cert == "ours":
            out += ["--etcd-cert", str(self.client_cert), "--etcd-key", str(self.client_key)]
        elif cert == "alien":
            out += ["--etcd-cert", str(self.alien_cert), "--etcd-key", str(self.alien_key)]
        return out


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[TLSEtcd]:
    e = TLSEtcd(tmp_path / "etcd-tls")
    try:
        yield e
    finally:
        e.child.kill()


def test_node_and_cli_on_an_etcd_that_wants_tls_and_client_certificates(
    tls_etcd: TLSEtcd, tmp_path: Path
) -> None:
    node = NodeProcess(tmp_path / "east", region="eastus", extra=[*tls_etcd.flags(), "--no-auth"])
    node.etcd = ""  # --etcd is among the flags
    node.start()
    try:
        res = run_cli("regions", *tls_etcd.flags(), "--json")
        assert res.returncode == 0, res.stderr
        assert '"region": "eastus"' in res.stdout and '"alive": true' in res.stdout, res.stdout
        res = run_cli("replication", "status", *tls_etcd.flags())
        assert res.returncode == 0 and "eastus" in res.stdout, res.stderr

        # No CA: etcd's certificate is not trusted.
        for prog in ("regions", "replication"):
            argv = [prog, *(["status"] if prog == "replication" else []), *tls_etcd.flags(ca=False)]
            one_line_failure(run_cli(*argv), prog, "TLS handshake", "--etcd-ca")
        # The CA, but no client certificate, or one another CA signed.
        one_line_failure(
            run_cli("regions", *tls_etcd.flags(cert="none")),
            "regions",
            "wants a client certificate",
            "--etcd-cert",
        )
        one_line_failure(
            run_cli("regions", *tls_etcd.flags(cert="alien")),
            "regions",
            f"refused the TLS session with --etcd-cert {tls_etcd.alien_cert}",
        )
        # An http:// endpoint with TLS options is a usage mistake, said as such.
        plain = tls_etcd.url.replace("https://", "http://")
        one_line_failure(
            run_cli("regions", "--etcd", plain, "--etcd-ca", str(tls_etcd.ca)),
            "regions",
            "write it https://",
        )

        # A node without the CA does not start: one line, exit code 2.
        res = run_cli(
            "node", "--region", "westeurope", "--data", str(tmp_path / "west"),
            "--listen", f"127.0.0.1:{free_port()}", "--no-auth",
            *tls_etcd.flags(ca=False),
        )  # fmt: skip
        one_line_failure(res, "node", f"etcd {tls_etcd.url}: TLS handshake", "--etcd-ca")
        res = run_cli(
            "node", "--region", "westeurope", "--data", str(tmp_path / "west"),
            "--listen", f"127.0.0.1:{free_port()}", "--no-auth",
            *tls_etcd.flags(cert="none"),
        )  # fmt: skip
        one_line_failure(res, "node", "client certificate")
    finally:
        node.stop()


def test_etcd_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    one_line_failure(
        run_cli("regions", "--etcd", "https://127.0.0.1:1", "--etcd-cert", "/nonexistent.crt"),
        "regions",
        "--etcd-cert and --etcd-key go together",
    )
    one_line_failure(
        run_cli("regions", "--etcd", "https://127.0.0.1:1", "--etcd-ca", "/nonexistent.crt"),
        "regions",
        "--etcd-ca: cannot read /nonexistent.crt",
    )
    one_line_failure(
        run_cli("regions", "--etcd", "http://127.0.0.1:1", "--etcd-user", "meridian"),
        "regions",
        "MERIDIAN_ETCD_PASSWORD",
    )
    res = run_cli(
        "node", "--etcd", "http://127.0.0.1:1", "--data", str(tmp_path), "--etcd-user", "x"
    )
    one_line_failure(res, "node", "--etcd-user needs a password")
    # The password is a secret: never in a config's repr.
    opts = EtcdOptions(etcd_user="u", etcd_password=PASSWORD)
    assert PASSWORD not in repr(opts.etcd_options())


# -- etcd with authentication ----------------------------------------------------


async def enable_auth(endpoint: str) -> None:
    """root (needed to turn auth on) and a ``meridian`` user allowed
    read and write on /meridian/ only; then auth on."""
    channel = grpc.aio.insecure_channel(endpoint.removeprefix("http://"))
    auth = rpc.AuthStub(channel)
    try:
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name="meridian", password=PASSWORD))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="meridian"))
        perm = rpc.Permission(
            permType=rpc.Permission.READWRITE,
            key=b"/meridian/",
            range_end=prefix_end(b"/meridian/"),
        )
        await auth.RoleGrantPermission(
            rpc.AuthRoleGrantPermissionRequest(name="meridian", perm=perm)
        )
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="meridian", role="meridian"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name="stranger", password=PASSWORD))
        await auth.AuthEnable(rpc.AuthEnableRequest())
    finally:
        await channel.close()


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    # Simple tokens that lapse after 1 s without use: the clients must
    # authenticate again (their lease keep-alives come every 2 s).
    server = EtcdServer(
        str(tmp_path / "etcd-auth"), extra_args=["--auth-token", "simple", "--auth-token-ttl", "1"]
    )
    try:
        server.start()
        asyncio.run(enable_auth(server.client_url))
        yield server
    finally:
        server.cleanup()


def test_node_and_cli_with_etcd_authentication(
    auth_etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = auth_etcd.client_url
    monkeypatch.setenv("MERIDIAN_ETCD_PASSWORD", PASSWORD)  # the node inherits it
    monkeypatch.delenv("MERIDIAN_ETCD_USER", raising=False)
    node = NodeProcess(
        tmp_path / "east", region="eastus", etcd=url, extra=["--etcd-user", "meridian", "--no-auth"]
    )
    node.start()
    try:
        res = run_cli(
            "regions", "--etcd", url, "--etcd-user", "meridian", "--json",
            MERIDIAN_ETCD_PASSWORD=PASSWORD,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert '"region": "eastus"' in res.stdout and '"alive": true' in res.stdout, res.stdout

        # The node keeps working past its token's lapse: it authenticates
        # again (etcd answers 'invalid auth token' to the old one), and its
        # writes land (a blob upload links it in the namespace).
        time.sleep(4)
        data = b"written through an authenticated etcd client"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = urllib.request.Request(
            f"{node.url}/v2/team/app/blobs/uploads/?digest={digest}", data=data, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 201

        async def linked() -> bool:
            kv = EtcdKV([url], options=EtcdOptions(etcd_user="meridian", etcd_password=PASSWORD))
            await kv.start()
            try:
                return await kv.get(f"/meridian/reg/default/repo/team/app/_b/{digest}") is not None
            finally:
                await kv.close()

        assert asyncio.run(linked())
        logs = node.logs()
        assert logs.count("authenticated to etcd as meridian") >= 2, logs[-3000:]
        assert PASSWORD not in logs

        # Wrong password, no user, a user without permission: one line each.
        wrong = "not-" + PASSWORD
        for extra, password, expect in (
            (["--etcd-user", "meridian"], wrong, "wrong user name or password"),
            ([], "", "etcd requires authentication"),
            (["--etcd-user", "stranger"], PASSWORD, "permission denied"),
        ):
            env = {"MERIDIAN_ETCD_PASSWORD": password} if password else {}
            res = run_cli("regions", "--etcd", url, *extra, **env)
            one_line_failure(res, "regions", expect)
            assert PASSWORD not in res.stdout + res.stderr
        res = run_cli(
            "node", "--region", "westeurope", "--data", str(tmp_path / "west"),
            "--listen", f"127.0.0.1:{free_port()}", "--no-auth",
            "--etcd", url, "--etcd-user", "meridian",
            MERIDIAN_ETCD_PASSWORD="not-" + PASSWORD,
        )  # fmt: skip
        one_line_failure(res, "node", f"etcd {url}:", "wrong user name or password")
        assert PASSWORD not in res.stderr + res.stdout
    finally:
        node.stop()


async def test_client_refusals_are_kvrefused_at_once(auth_etcd: EtcdServer) -> None:
    """In process: a wrong password is ``KVRefused`` (not retried as an
    unavailable etcd would be), and the message holds no secret; the right
    one keeps working after its token lapsed; a key outside the user's
    permission is refused as such."""
    kv = EtcdKV(
        auth_etcd.endpoints,
        timeout=30.0,
        options=EtcdOptions(etcd_user="meridian", etcd_password="not-" + PASSWORD),
    )
    await kv.start()
    try:
        with pytest.raises(KVRefused) as e:
            await kv.get("/meridian/x")
        assert PASSWORD not in str(e.value) and "wrong user name or password" in str(e.value)
    finally:
        await kv.close()
    good = EtcdKV(
        auth_etcd.endpoints, options=EtcdOptions(etcd_user="meridian", etcd_password=PASSWORD)
    )
    await good.start()
    try:
        await good.txn([], [Put("/meridian/x", b"1")])
        assert (await good.get("/meridian/x")).value == b"1"  # type: ignore[union-attr]
        await asyncio.sleep(2.5)  # the token lapses (etcd --auth-token-ttl 1)
        assert (await good.get("/meridian/x")).value == b"1"  # type: ignore[union-attr]
        with pytest.raises(KVRefused, match="permission denied"):
            await good.txn([], [Put("/elsewhere", b"1")])
    finally:
        await good.close()
