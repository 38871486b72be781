"""Authentication and authorization refused, against a real node (issue 11).

Every refusal answers ``401 UNAUTHORIZED`` with a ``WWW-Authenticate: Bearer``
challenge (realm, service and the scope the request needed; ``error=`` when
a token was sent and refused), or ``403 DENIED`` (network rules), or ``429
TOOMANYREQUESTS`` (failed logins) -- and changes nothing: every write a
client can attempt (re-tag, new tag, blob upload, cross-repository mount,
manifest and blob delete) is tried, and the repository's tags, manifests
and blobs are the same afterwards.

The node runs on etcd with ``--domain``: each test has a registry of its own
(``Host: <registry>.auth.test``), so one test's identities and settings
(anonymous pull, network rules) never touch another's. Identities and
settings are made with ``cluster.auth.admin`` over a namespace on the same
etcd (as the management API does) and reach the node through its watch.
Clients connect from distinct loopback addresses where the node's per-address
state (failed-login limits, network rules) matters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from cluster.auth import tokens
from cluster.auth.admin import Admin
from loadtest.ocipush import Challenge, TokenAuth
from node.auth import FAILURES_ALLOWED
from tests import oci
from tests.etcd_server import EtcdServer, etcd_fixture
from tests.oci import Client, Resp, assert_error, blob_path, digest, manifest_path
from tests.procs import OWNER_PASSWORD, NodeProcess

DOMAIN = "auth.test"
ALL = ("pull", "push", "delete")

pytestmark = pytest.mark.timeout(180)
etcd = etcd_fixture(scope="module")


# -- the node, registries, clients ------------------------------------------------------


@pytest.fixture(scope="module")
def reg_node(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("auth") / "data"
    n = NodeProcess(data, etcd=etcd.client_url, extra=["--domain", DOMAIN]).start()
    try:
        yield n
    finally:
        n.stop()


@dataclass
class Reg:
    """One registry of the node, selected by Host."""

    node: NodeProcess
    name: str

    @property
    def host(self) -> str:
        return f"{self.name}.{DOMAIN}"

    @property
    def service(self) -> str:
        return self.host  # <registry>.<domain>: the registry's login server

    @property
    def realm(self) -> str:
        return f"http://{self.host}/oauth2/token"

    def client(
        self, auth: TokenAuth | None | str = "owner", source: str | None = None
    ) -> AbstractAsyncContextManager[Client]:
        return Client.connect(self.node.url, auth, host=self.host, source=source)  # type: ignore[arg-type]


def new_reg(node: NodeProcess, prefix: str = "r") -> Reg:
    """A registry of its own, created (Premium: network rules allowed)."""
    reg = Reg(node, prefix + uuid.uuid4().hex[:10])
    oci.create_registry(node.url, reg.name)
    return reg


@pytest.fixture
def reg(reg_node: NodeProcess) -> Reg:
    return new_reg(reg_node)


@pytest.fixture
async def owner(reg: Reg) -> AsyncIterator[Client]:
    async with reg.client() as c:
        yield c


@pytest.fixture
async def raw(reg: Reg) -> AsyncIterator[Client]:
    """No credentials and no challenge handling: every request as written."""
    async with reg.client(None) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def login(c: Client, user: str | None, password: str | None, *scopes: str) -> Resp:
    """Docker's token request: GET the realm with Basic credentials."""
    params = [("service", c.host or ""), *(("scope", s) for s in scopes)]
    headers = basic(user, password or "") if user is not None else {}
    return await c.get("/oauth2/token", headers=headers, params=params)


async def oauth(c: Client, **form: str) -> Resp:
    """OAuth2's token request: POST a form (``grant_type`` password or refresh_token)."""
    body = urlencode({"service": c.host or "", **form})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return await c.post("/oauth2/token", data=body.encode(), headers=headers)


async def offline_login(c: Client, user: str, password: str, scope: str) -> Resp:
    """OAuth2's password grant asking for a refresh token too (offline access)."""
    return await oauth(
        c,
        grant_type="password",
        username=user,
        password=password,
        access_type="offline",
        scope=scope,
    )


async def token_for(c: Client, user: str, password: str, *scopes: str) -> str:
    r = await login(c, user, password, *scopes)
    assert r.status == 200, r
    return r.json()["token"]


def repo_scopes(*repos: str, actions: tuple[str, ...] = ALL) -> list[str]:
    return [f"repository:{r}:{','.join(actions)}" for r in repos]


async def eventually(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (bounded) for a change made in the namespace to reach the node."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not await probe():
        assert loop.time() < deadline, f"the node never saw it: {what}"
        await asyncio.sleep(0.05)


async def status_is(c: Client, status: int, path: str, **kw: Any) -> bool:
    return (await c.get(path, **kw)).status == status


def assert_challenge(r: Resp, reg: Reg, scope: str, error: str = "") -> None:
    """401 UNAUTHORIZED, with the challenge a client needs to log in."""
    assert_error(r, 401, "UNAUTHORIZED")
    ch = Challenge.parse(r.headers.get("WWW-Authenticate"))
    assert ch is not None, r
    assert (ch.realm, ch.service, ch.scope, ch.error) == (reg.realm, reg.service, scope, error), r


# -- content, the writes a client can attempt, and "nothing changed" -------------------------


@dataclass
class Seeded:
    repo: str
    image: oci.Manifest  # tagged v1
    other: oci.Manifest  # pushed by digest only
    new_blob: bytes  # never pushed

    @property
    def copy(self) -> str:
        return self.repo + "-copy"  # where a mount would land

    @property
    def layer(self) -> str:
        return digest(self.image.blobs[1])

    def scopes(self, actions: tuple[str, ...] = ALL) -> list[str]:
        return repo_scopes(self.repo, self.copy, actions=actions)


async def seed(owner: Client) -> Seeded:
    s = Seeded(oci.repo_name(), oci.image(2), oci.image(1), oci.blob_bytes(777))
    await owner.push(s.repo, s.image, "v1")
    await owner.push(s.repo, s.other)
    return s


async def snapshot(owner: Client, s: Seeded) -> dict[str, Any]:
    r = await owner.get(f"/v2/{s.repo}/tags/list")
    assert r.status == 200, r
    tags = sorted(r.json().get("tags") or [])
    out: dict[str, Any] = {"tags": tags}
    for t in tags:
        out[f"tag {t}"] = (await owner.head(manifest_path(s.repo, t))).headers.get(
            "Docker-Content-Digest"
        )
    for m in (s.image, s.other):
        out[m.digest] = (await owner.head(manifest_path(s.repo, m.digest))).status
    for b in [*s.image.blobs, *s.other.blobs, s.new_blob]:
        out[digest(b)] = (await owner.head(blob_path(s.repo, digest(b)))).status
    out["mounted"] = (await owner.head(blob_path(s.copy, s.layer))).status
    return out


async def attempt_writes(c: Client, s: Seeded, headers: dict[str, str]) -> list[tuple[Resp, str]]:
    """Every kind of write, each sent with ``headers``: (answer, scope it needs)."""
    push, delete = f"repository:{s.repo}:pull,push", f"repository:{s.repo}:delete"
    put = {**headers, "Content-Type": oci.OCI_MANIFEST}
    return [
        (await c.put(manifest_path(s.repo, "v1"), data=s.other.body, headers=put), push),
        (await c.put(manifest_path(s.repo, "evil"), data=s.image.body, headers=put), push),
        (
            await c.post(
                f"/v2/{s.repo}/blobs/uploads/",
                params={"digest": digest(s.new_blob)},
                data=s.new_blob,
                headers=headers,
            ),
            push,
        ),
        (await c.post(f"/v2/{s.repo}/blobs/uploads/", headers=headers), push),
        (
            await c.post(
                f"/v2/{s.copy}/blobs/uploads/",
                params={"mount": s.layer, "from": s.repo},
                headers=headers,
            ),
            f"repository:{s.copy}:pull,push",
        ),
        (await c.delete(manifest_path(s.repo, s.other.digest), headers=headers), delete),
        (await c.delete(blob_path(s.repo, s.layer), headers=headers), delete),
    ]


async def assert_refused(
    owner: Client,
    c: Client,
    s: Seeded,
    headers: dict[str, str],
    check: Callable[[Resp, str], None],
    *,
    may_pull: bool = False,
) -> None:
    """Every write (and a read, unless the caller ``may_pull``) with
    ``headers`` is refused as ``check`` says, and the repository is exactly
    as before."""
    before = await snapshot(owner, s)
    # What each write would have changed is there to be changed.
    assert before["tag v1"] == s.image.digest and before[s.other.digest] == 200, before
    assert before[s.layer] == 200 and before[digest(s.new_blob)] == 404, before
    assert before["mounted"] == 404, before
    for r, scope in await attempt_writes(c, s, headers):
        check(r, scope)
    r = await c.get(manifest_path(s.repo, "v1"), headers=headers)
    if may_pull:
        assert r.status == 200 and r.body == s.image.body, r
    else:
        check(r, f"repository:{s.repo}:pull")
    assert await snapshot(owner, s) == before


def challenged(reg: Reg, error: str = "") -> Callable[[Resp, str], None]:
    return lambda r, scope: assert_challenge(r, reg, scope, error)


async def signing_key(admin: Admin) -> tokens.SigningKey:
    """The node's current signing key, read from the namespace."""
    ring = tokens.KeyRing(admin.ns)
    await eventually(lambda: _true(ring.signing_key() is not None), "a signing key")
    key = ring.signing_key()
    assert key is not None
    return key


async def _true(v: bool) -> bool:
    return v


def mint(
    key: tokens.SigningKey, reg: Reg, access: list[str], *, registry: str = "", **kw: Any
) -> str:
    """An access token as the node would issue it for the owner."""
    claims = [
        {"type": "repository", "name": n, "actions": a.split(",")} for n, a in map(_split, access)
    ]
    return tokens.issue(
        key,
        subject="owner:owner",
        kind="owner",
        registry=registry or reg.name,
        service=kw.pop("service", reg.service),
        access=claims,
        **kw,
    )


def _split(scope: str) -> tuple[str, str]:
    _, name, actions = scope.split(":")
    return name, actions


# -- no token, bad tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["none", "basic", "empty-bearer", "garbage"])
async def test_without_a_usable_token_nothing_changes(
    reg: Reg, owner: Client, raw: Client, scheme: str
) -> None:
    s = await seed(owner)
    headers = {
        "none": {},
        # The owner's right password, but as Basic: the API takes tokens only.
        "basic": basic("owner", OWNER_PASSWORD),
        "empty-bearer": {"Authorization": "Bearer "},
        "garbage": bearer("not.a.token"),
    }[scheme]
    await assert_refused(
        owner, raw, s, headers, challenged(reg, "invalid_token" if scheme == "garbage" else "")
    )


async def test_expired_token(reg: Reg, owner: Client, raw: Client, admin: Admin) -> None:
    s = await seed(owner)
    key = await signing_key(admin)
    fresh = mint(key, reg, s.scopes())
    r = await raw.get(manifest_path(s.repo, "v1"), headers=bearer(fresh))
    assert r.status == 200, r  # minted right: only the expiry differs below
    expired = mint(key, reg, s.scopes(), now=time.time() - 3600, ttl=60)
    await assert_refused(owner, raw, s, bearer(expired), challenged(reg, "invalid_token"))


async def test_token_for_another_registry_or_service(
    reg: Reg, owner: Client, raw: Client, admin: Admin
) -> None:
    s = await seed(owner)
    other = new_reg(reg.node, "o")
    async with other.client(None) as other_raw:
        # A real token of the other registry, for repositories of the same names.
        foreign = await token_for(other_raw, "owner", OWNER_PASSWORD, *s.scopes())
        r = await other_raw.get(f"/v2/{s.repo}/tags/list", headers=bearer(foreign))
        assert_error(r, 404, "NAME_UNKNOWN")  # it works there
        # The token endpoint issues tokens for its own service only.
        r = await other_raw.get(
            "/oauth2/token", params={"service": reg.service}, headers=basic("owner", OWNER_PASSWORD)
        )
        assert r.status == 400 and "access_token" not in r.body.decode(), r
    await assert_refused(owner, raw, s, bearer(foreign), challenged(reg, "invalid_token"))
    key = await signing_key(admin)
    # Signed by the cluster, but for another audience, or naming another registry.
    for token in (
        mint(key, reg, s.scopes(), service="elsewhere.example"),
        mint(key, reg, s.scopes(), registry=other.name),
    ):
        await assert_refused(owner, raw, s, bearer(token), challenged(reg, "invalid_token"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


async def test_tampered_signature_and_claims(reg: Reg, owner: Client, raw: Client) -> None:
    s = await seed(owner)
    good = await token_for(raw, "owner", OWNER_PASSWORD, *s.scopes())
    header, payload, sig = good.split(".")
    i = len(sig) // 2
    flipped = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]
    await assert_refused(
        owner, raw, s, bearer(f"{header}.{payload}.{flipped}"), challenged(reg, "invalid_token")
    )
    # A pull-only token whose claims are widened to push and delete, signature kept.
    pull_only = await token_for(raw, "owner", OWNER_PASSWORD, *s.scopes(("pull",)))
    header, payload, sig = pull_only.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert {a["name"]: a["actions"] for a in claims["access"]} == {
        s.repo: ["pull"],
        s.copy: ["pull"],
    }
    for a in claims["access"]:
        a["actions"] = list(ALL)
    widened = f"{header}.{_b64(json.dumps(claims).encode())}.{sig}"
    await assert_refused(owner, raw, s, bearer(widened), challenged(reg, "invalid_token"))


async def test_alg_none_and_hmac_with_the_public_key(
    reg: Reg, owner: Client, raw: Client, admin: Admin
) -> None:
    s = await seed(owner)
    good = await token_for(raw, "owner", OWNER_PASSWORD, *s.scopes())
    claims = jwt.decode(good, options={"verify_signature": False})
    kid = jwt.get_unverified_header(good)["kid"]
    none_header = {"alg": "none", "typ": "JWT", "kid": kid}
    unsigned = f"{_b64(json.dumps(none_header).encode())}.{_b64(json.dumps(claims).encode())}."
    await assert_refused(owner, raw, s, bearer(unsigned), challenged(reg, "invalid_token"))
    key = await signing_key(admin)
    public = key.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    hmac_token = jwt.encode(claims, public, algorithm="HS256", headers={"kid": key.kid})
    await assert_refused(owner, raw, s, bearer(hmac_token), challenged(reg, "invalid_token"))


async def test_overlong_authorization_header(reg: Reg, owner: Client, raw: Client) -> None:
    """Longer than any token may be: refused unread, as a challenge."""
    s = await seed(owner)
    long = bearer("A" * (tokens.MAX_TOKEN_BYTES + 500))
    await assert_refused(owner, raw, s, long, challenged(reg))
    # At the token endpoint, over-long Basic credentials are no credentials.
    r = await raw.get("/oauth2/token", headers={"Authorization": "Basic " + "QUFB" * 2200})
    assert_challenge(r, reg, "")
    assert "token" not in r.json()


# -- identities without the right, or no longer there -----------------------------------------


async def test_pull_only_identity_cannot_push(reg: Reg, owner: Client, admin: Admin) -> None:
    s = await seed(owner)
    sp = await admin.create_sp(None, {reg.name: ["AcrPull"]})
    async with reg.client(TokenAuth(sp["id"], sp["secret"])) as c:
        r = await c.get(manifest_path(s.repo, "v1"))
        assert r.status == 200 and r.body == s.image.body, r  # it may pull
        r = await login(c, sp["id"], sp["secret"], *s.scopes())
        assert r.json()["scope"] == " ".join(s.scopes(("pull",))), r  # granted: pull only
        assert c.auth is not None
        fetched = c.auth.fetched
        # Each write: the client fetches a fresh token for the scope the
        # challenge names and retries once; the retry is refused too.
        await assert_refused(owner, c, s, {}, challenged(reg, "insufficient_scope"), may_pull=True)
        assert c.auth.fetched == fetched + 7


async def test_disabled_token(reg: Reg, owner: Client, raw: Client, admin: Admin) -> None:
    s = await seed(owner)
    rw = ["content/read", "content/write", "content/delete"]
    await admin.create_scope_map(reg.name, "rw", {s.repo: rw, s.copy: rw})
    made = await admin.create_token(reg.name, "ci", "rw")
    password = made["passwords"][0]["value"]
    async with reg.client(TokenAuth("ci", password)) as c:
        r = await c.put_manifest(s.repo, "by-token", s.image.body)
        assert r.status == 201, r  # it may push while enabled
    held = await token_for(raw, "ci", password, *s.scopes())
    await admin.update_token(reg.name, "ci", {"status": "disabled"})
    path = manifest_path(s.repo, "v1")
    await eventually(lambda: status_is(raw, 401, path, headers=bearer(held)), "token disabled")
    await assert_refused(owner, raw, s, bearer(held), challenged(reg, "invalid_token"))
    assert_challenge(await login(raw, "ci", password, *s.scopes()), reg, "")


async def test_expired_repository_token(reg: Reg, owner: Client, raw: Client, admin: Admin) -> None:
    s = await seed(owner)
    made = await admin.create_token(reg.name, "soon", "_repositories_push", expiry=time.time() + 3)
    password = made["passwords"][1]["value"]
    held = await token_for(raw, "soon", password, *s.scopes())
    path = manifest_path(s.repo, "v1")
    assert await status_is(raw, 200, path, headers=bearer(held))
    await eventually(lambda: status_is(raw, 401, path, headers=bearer(held)), "token expired")
    await assert_refused(owner, raw, s, bearer(held), challenged(reg, "invalid_token"))
    assert_challenge(await login(raw, "soon", password, *s.scopes()), reg, "")


async def test_deleted_service_principal(
    reg: Reg, owner: Client, raw: Client, admin: Admin
) -> None:
    s = await seed(owner)
    sp = await admin.create_sp(None, {reg.name: ["AcrPush", "AcrDelete"]})
    async with reg.client(TokenAuth(sp["id"], sp["secret"])) as c:
        r = await c.put_manifest(s.repo, "by-sp", s.image.body)
        assert r.status == 201, r
    held = await token_for(raw, sp["id"], sp["secret"], *s.scopes())
    await admin.delete_sp(sp["id"])
    path = manifest_path(s.repo, "v1")
    await eventually(lambda: status_is(raw, 401, path, headers=bearer(held)), "SP deleted")
    await assert_refused(owner, raw, s, bearer(held), challenged(reg, "invalid_token"))
    assert_challenge(await login(raw, sp["id"], sp["secret"], *s.scopes()), reg, "")


async def test_cross_repository_mount_needs_pull_on_the_source(
    reg: Reg, owner: Client, raw: Client, admin: Admin
) -> None:
    """An identity with push on B and nothing on A cannot reach A's blob by
    mounting it: no mount happens, an upload session is answered instead."""
    s = await seed(owner)  # A = s.repo
    b = oci.repo_name("b")
    await admin.create_scope_map(reg.name, "b-only", {b: ["content/read", "content/write"]})
    made = await admin.create_token(reg.name, "mounter", "b-only")
    password = made["passwords"][0]["value"]
    # It asks for pull on A as well; the token names only what was granted.
    r = await login(
        raw, "mounter", password, f"repository:{b}:pull,push", f"repository:{s.repo}:pull"
    )
    assert r.status == 200 and r.json()["scope"] == f"repository:{b}:pull,push", r
    held = r.json()["token"]
    before = await snapshot(owner, s)
    for params in ({"mount": s.layer, "from": s.repo}, {"mount": s.layer}):
        r = await raw.post(f"/v2/{b}/blobs/uploads/", params=params, headers=bearer(held))
        assert r.status == 202 and f"/v2/{b}/blobs/uploads/" in r.location, r
        r = await owner.head(blob_path(b, s.layer))
        assert r.status == 404, r  # A's blob was not linked into B
    r = await raw.get(blob_path(s.repo, s.layer), headers=bearer(held))
    assert_challenge(r, reg, f"repository:{s.repo}:pull", "insufficient_scope")
    assert await snapshot(owner, s) == before
    # The owner, who may read A, mounts it.
    r = await owner.post(f"/v2/{b}/blobs/uploads/", params={"mount": s.layer, "from": s.repo})
    assert r.status == 201, r


def denied(r: Resp, _scope: str) -> None:
    assert_error(r, 403, "DENIED")


# -- network rules, failed logins ---------------------------------------------------------------


async def test_source_outside_the_network_rules(reg: Reg, owner: Client, admin: Admin) -> None:
    s = await seed(owner)
    async with reg.client(None) as raw:
        held = await token_for(raw, "owner", OWNER_PASSWORD, *s.scopes())
    await admin.update_settings(reg.name, public_access=False, allowed_cidrs=["127.0.0.1/32"])
    async with reg.client(source="127.0.0.66") as outsider:
        await eventually(lambda: status_is(outsider, 403, "/v2/"), "network rules")
        # Even the owner, with a valid token, from outside the allowed networks.
        await assert_refused(owner, outsider, s, bearer(held), denied)
        denied(await login(outsider, "owner", OWNER_PASSWORD, *s.scopes()), "")
    # From an allowed address, the same token works.
    r = await owner.get(manifest_path(s.repo, "v1"), headers=bearer(held))
    assert r.status == 200 and r.body == s.image.body, r
    await admin.update_settings(reg.name, public_access=True)
    async with reg.client(source="127.0.0.66") as outsider:
        await eventually(lambda: status_is(outsider, 200, "/v2/"), "public access again")


async def test_wrong_password_and_unknown_user_answer_alike(reg: Reg, admin: Admin) -> None:
    await admin.create_token(reg.name, "known", "_repositories_pull")
    scope = "repository:x/y:pull"
    async with reg.client(None, source="127.0.0.7") as c:
        answers = [
            await login(c, "owner", "not-the-password", scope),
            await login(c, "known", "not-the-password", scope),
            await login(c, "nobody-at-all", "not-the-password", scope),
            await login(c, "owner", "", scope),
        ]
        for user in ("owner", "known", "nobody-at-all"):
            answers.append(
                await oauth(c, grant_type="password", username=user, password="nope", scope=scope)
            )
    seen = {
        (r.status, r.headers.get("WWW-Authenticate"), r.headers.get("Content-Type"), r.body)
        for r in answers
    }
    assert len(seen) == 1, seen
    (r, *_) = answers
    assert_challenge(r, reg, "")
    assert "nobody" not in r.body.decode() and "known" not in r.body.decode()


async def test_failed_logins_are_rate_limited(reg: Reg, reg_node: NodeProcess) -> None:
    async with reg.client(None, source="127.0.0.8") as c:
        for i in range(FAILURES_ALLOWED):
            assert_challenge(await login(c, "owner", f"wrong-{i}"), reg, "")
        limited = await login(c, "owner", "wrong-again")
        assert_error(limited, 429, "TOOMANYREQUESTS")
        assert int(limited.headers["Retry-After"]) >= 1, limited
        # Now even the right password waits: the answer tells nothing.
        assert_error(await login(c, "owner", OWNER_PASSWORD), 429, "TOOMANYREQUESTS")
        # The address is limited, whatever the user name.
        assert_error(await login(c, "somebody", "x"), 429, "TOOMANYREQUESTS")
    async with reg.client(None, source="127.0.0.9") as c:
        # So is the user name (in this registry), from any address.
        assert_error(await login(c, "owner", OWNER_PASSWORD), 429, "TOOMANYREQUESTS")
    other = new_reg(reg_node, "o")
    async with other.client(None, source="127.0.0.9") as c:
        r = await login(c, "owner", OWNER_PASSWORD)
        assert r.status == 200 and r.json()["token"], r


# -- what a caller may see, anonymous pull, refresh tokens --------------------------------------


async def test_catalog_lists_only_what_the_caller_may_see(
    reg: Reg, owner: Client, admin: Admin
) -> None:
    repos = ["team-a/app", "team-a/lib", "team-b/app"]
    for repo in repos:
        await owner.push(repo, oci.image(1), "v1")
    await admin.create_scope_map(
        reg.name, "team-a", {"team-a/*": ["content/read", "metadata/read"]}
    )
    made = await admin.create_token(reg.name, "reader", "team-a")
    sp = await admin.create_sp(None, {reg.name: ["AcrPull"]})
    r = await owner.get("/v2/_catalog")
    assert r.status == 200 and r.json()["repositories"] == repos, r
    async with reg.client(TokenAuth("reader", made["passwords"][0]["value"])) as c:
        r = await c.get("/v2/_catalog")
        assert r.status == 200 and r.json()["repositories"] == ["team-a/app", "team-a/lib"], r
        r = await c.get(manifest_path("team-b/app", "v1"))
        assert_challenge(r, reg, "repository:team-b/app:pull", "insufficient_scope")
    async with reg.client(TokenAuth(sp["id"], sp["secret"])) as c:
        r = await c.get("/v2/_catalog")
        assert r.status == 200 and r.json()["repositories"] == repos, r


async def test_anonymous_pull_only_when_enabled(
    reg: Reg, owner: Client, raw: Client, admin: Admin
) -> None:
    s = await seed(owner)
    path = manifest_path(s.repo, "v1")
    async with reg.client(TokenAuth()) as anon:  # the token flow without credentials
        assert_challenge(await anon.get(path), reg, f"repository:{s.repo}:pull")
        assert anon.auth is not None and anon.auth.fetched == 0  # no anonymous token
        assert_challenge(await login(raw, None, None, f"repository:{s.repo}:pull"), reg, "")

        await admin.update_settings(reg.name, anonymous_pull=True)
        await eventually(lambda: status_is(anon, 200, path), "anonymous pull on")
        r = await anon.get(path)
        assert r.body == s.image.body, r
        r = await anon.get(blob_path(s.repo, s.layer))
        assert r.status == 200 and r.body == s.image.blobs[1], r
        # Pull only: every write is refused, and so is the catalog.
        await assert_refused(
            owner, anon, s, {}, challenged(reg, "insufficient_scope"), may_pull=True
        )
        r = await anon.get("/v2/_catalog")
        assert_challenge(r, reg, "registry:catalog:*", "insufficient_scope")

        await admin.update_settings(reg.name, anonymous_pull=False)
        await eventually(lambda: status_is(anon, 401, path), "anonymous pull off")
        assert_challenge(await anon.get(path), reg, f"repository:{s.repo}:pull", "invalid_token")


async def test_refresh_tokens(reg: Reg, owner: Client, raw: Client, admin: Admin) -> None:
    s = await seed(owner)
    push = f"repository:{s.repo}:pull,push"
    r = await offline_login(raw, "owner", OWNER_PASSWORD, push)
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store", r
    first = r.json()
    assert first["scope"] == push and first["access_token"] and first["refresh_token"], r
    r = await oauth(
        raw, grant_type="refresh_token", refresh_token=first["refresh_token"], scope=push
    )
    assert r.status == 200, r
    renewed = r.json()
    assert renewed["scope"] == push and renewed["access_token"] != first["access_token"], r
    r = await raw.put(
        manifest_path(s.repo, "refreshed"),
        data=s.image.body,
        headers={**bearer(renewed["access_token"]), "Content-Type": oci.OCI_MANIFEST},
    )
    assert r.status == 201, r
    # Without offline access, no refresh token.
    r = await oauth(raw, grant_type="password", username="owner", password=OWNER_PASSWORD)
    assert r.status == 200 and "refresh_token" not in r.json(), r
    # A refresh token is no access token, and an access token no refresh token.
    await assert_refused(
        owner, raw, s, bearer(first["refresh_token"]), challenged(reg, "invalid_token")
    )
    for wrong in (first["access_token"], first["refresh_token"][:-4] + "AAAA", "garbage"):
        r = await oauth(raw, grant_type="refresh_token", refresh_token=wrong, scope=push)
        assert_challenge(r, reg, "")
    # A service principal's refresh token dies with it.
    sp = await admin.create_sp(None, {reg.name: ["AcrPull"]})
    r = await offline_login(raw, sp["id"], sp["secret"], push)
    assert r.status == 200 and r.json()["scope"] == f"repository:{s.repo}:pull", r
    refresh = r.json()["refresh_token"]
    await admin.delete_sp(sp["id"])

    async def refused() -> bool:
        r = await oauth(raw, grant_type="refresh_token", refresh_token=refresh, scope=push)
        return r.status == 401

    await eventually(refused, "SP deleted")


# -- blob grants --------------------------------------------------------------------------------


async def test_blob_grants_are_one_per_identity_and_blob_and_still_checked(
    reg: Reg, owner: Client, raw: Client, admin: Admin
) -> None:
    """A HEAD asking for a grant (as the router's does) gets the grant this
    identity already has for that blob: two tokens of one identity share it
    (one signature, one verification at the node); another identity or
    another blob gets its own. Every use is still checked: the blob it names
    only, and its subject still valid."""
    s = await seed(owner)
    path = blob_path(s.repo, s.layer)
    want = {"X-Meridian-Grant": "want"}

    async def grant(token: str, at: str = path) -> str:
        r = await raw.head(at, headers={**bearer(token), **want})
        assert r.status == 200 and r.headers.get("X-Meridian-Grant"), r
        return r.headers["X-Meridian-Grant"]

    first = await token_for(raw, "owner", OWNER_PASSWORD, *s.scopes())
    second = await token_for(raw, "owner", OWNER_PASSWORD, f"repository:{s.repo}:pull")
    assert first != second  # other scopes: another token
    g = await grant(first)
    assert await grant(second) == g  # one identity, one blob: the same grant
    config = blob_path(s.repo, digest(s.image.blobs[0]))
    assert await grant(first, config) != g  # another blob: its own
    sp = await admin.create_sp(None, {reg.name: ["AcrPull"]})
    sp_token = await token_for(raw, sp["id"], sp["secret"], *s.scopes())
    sp_grant = await grant(sp_token)
    assert sp_grant != g  # another identity: its own
    # Each grant opens its blob alone, without other credentials.
    for token in (g, sp_grant):
        r = await raw.get(path, params={"meridian_grant": token})
        assert r.status == 200 and r.body == s.image.blobs[1], r
        r = await raw.get(config, params={"meridian_grant": token})
        assert r.status == 401, r
    # A grant handed out again is checked again: its subject deleted, it opens nothing.
    await admin.delete_sp(sp["id"])
    await eventually(
        lambda: status_is(raw, 401, path, params={"meridian_grant": sp_grant}), "SP deleted"
    )
    r = await raw.get(path, params={"meridian_grant": g})
    assert r.status == 200 and r.body == s.image.blobs[1], r


async def test_logins_of_one_identity_share_a_token_for_a_while(
    reg: Reg, owner: Client, raw: Client, admin: Admin
) -> None:
    """Logins of one identity for the same scopes within node.auth.TOKEN_REUSE
    get one token (a rollout's nodes share one pull secret: one signature to
    verify, not one per node), saying how long it has left; other scopes,
    another identity or a refresh get their own; the shared token stops
    working with its identity."""
    s = await seed(owner)
    scopes = s.scopes(("pull",))
    logins = [(await login(raw, "owner", OWNER_PASSWORD, *scopes)).json() for _ in range(3)]
    assert len({d["token"] for d in logins}) == 1, logins
    assert all(0 < d["expires_in"] <= tokens.TOKEN_TTL for d in logins), logins
    assert len({d["issued_at"] for d in logins}) == 1, logins
    pushing = await token_for(raw, "owner", OWNER_PASSWORD, *s.scopes())
    assert pushing != logins[0]["token"]
    sp = await admin.create_sp(None, {reg.name: ["AcrPull"]})
    sp_tokens = {await token_for(raw, sp["id"], sp["secret"], scopes[0]) for _ in range(2)}
    assert len(sp_tokens) == 1 and logins[0]["token"] not in sp_tokens
    (held,) = sp_tokens
    r = await offline_login(raw, sp["id"], sp["secret"], scopes[0])
    assert r.status == 200 and r.json()["access_token"] == held, r
    r = await oauth(raw, grant_type="refresh_token", refresh_token=r.json()["refresh_token"])
    assert r.status == 200 and r.json()["access_token"] != held, r  # a refresh: a new one
    path = manifest_path(s.repo, "v1")
    r = await raw.get(path, headers=bearer(held))
    assert r.status == 200 and r.body == s.image.body, r
    await admin.delete_sp(sp["id"])
    await eventually(lambda: status_is(raw, 401, path, headers=bearer(held)), "SP deleted")
    assert_challenge(await login(raw, sp["id"], sp["secret"], *scopes), reg, "")
    # A rotated signing key: the next logins get a token it signed, at once.
    key = await tokens.KeyRing(admin.ns).ensure(now=time.time() + tokens.ROTATE_AFTER + 60)

    async def signed_by_the_new_key() -> bool:
        token = await token_for(raw, "owner", OWNER_PASSWORD, *scopes)
        return jwt.get_unverified_header(token)["kid"] == key.kid

    await eventually(signed_by_the_new_key, "a token signed by the rotated key")
