"""Identity core (cluster/auth): secrets, scopes, identities and tokens, over
the real namespace (embedded store and real etcd, two nodes: a token issued
by one region verifies in another)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable

import jwt
import pytest

from cluster.auth import identities, secrets, tokens
from cluster.auth import scopes as sc
from cluster.auth.identities import (
    OWNER_KEY,
    SP_PREFIX,
    Identities,
    admin_key,
    scope_map_key,
    token_key,
)
from cluster.namespace import Namespace, config_key
from tests.test_namespace import make_kv  # noqa: F401 - the two-store fixture

pytestmark = pytest.mark.timeout(120)
REG = "contoso"
SERVICE = "contoso.meridian.test"


@pytest.fixture
async def nodes(make_kv) -> AsyncIterator[Callable[..., Namespace]]:  # noqa: F811
    made: list[Namespace] = []

    async def new(region: str = "eastus") -> Namespace:
        ns = Namespace(make_kv(), region)
        await ns.start()
        made.append(ns)
        return ns

    yield new
    for ns in made:
        await ns.close()


def _pw(*hashes: str) -> bytes:
    return json.dumps({"passwords": list(hashes)}).encode()


# -- secrets -------------------------------------------------------------------


def test_secret_hashes_are_salted_and_checked() -> None:
    h1, h2 = secrets.hash_secret("s3cret"), secrets.hash_secret("s3cret")
    assert h1 != h2 and "s3cret" not in h1
    assert secrets.verify_secret("s3cret", h1) and secrets.verify_secret("s3cret", h2)
    assert not secrets.verify_secret("s3cret!", h1)
    assert not secrets.verify_secret("s3cret", h1[:-2] + "AA")
    assert not secrets.verify_secret("s3cret", "plain:s3cret")


def test_scope_parsing() -> None:
    assert sc.parse_scope("repository:team/app:pull,push") == sc.Scope(
        "repository", "team/app", ("pull", "push")
    )
    assert sc.parse_scope("repository:host:5000/app:pull") == sc.Scope(
        "repository", "host:5000/app", ("pull",)
    )
    assert sc.parse_scope("registry:catalog:*") == sc.Scope("registry", "catalog", ("*",))
    for bad in ("", "repository", "repository:app", "repository:app:", ":app:pull"):
        assert sc.parse_scope(bad) is None, bad
    assert len(sc.parse_scopes(["repository:a:pull repository:b:push", "junk"])) == 2
    assert sc.pattern_matches("team-a/*", "team-a/app")
    assert sc.pattern_matches("team-a/*", "team-a/x/y")
    assert not sc.pattern_matches("team-a/*", "team-ab/app")
    assert not sc.pattern_matches("team-a/*", "team-a")
    assert sc.pattern_matches("app", "app") and not sc.pattern_matches("app", "app2")


# -- identities ------------------------------------------------------------------


async def test_each_identity_authenticates_and_gets_its_rights(nodes) -> None:
    ns = await nodes()
    ids = Identities(ns)
    await ns.put_record(OWNER_KEY, _pw(secrets.hash_secret("owner-pw")))
    await ns.put_record(
        admin_key(REG),
        json.dumps(
            {"enabled": True, "passwords": [secrets.hash_secret("a1"), secrets.hash_secret("a2")]}
        ).encode(),
    )
    await ns.put_record(
        SP_PREFIX + "ci-bot",
        json.dumps(
            {"secrets": [secrets.hash_secret("sp-pw")], "roles": {REG: ["AcrPull"]}}
        ).encode(),
    )
    await ns.put_record(
        scope_map_key(REG, "team-a"),
        json.dumps({"actions": {"team-a/*": ["content/read", "content/write"]}}).encode(),
    )
    await ns.put_record(
        token_key(REG, "teama"),
        json.dumps({"scope_map": "team-a", "passwords": [secrets.hash_secret("t1")]}).encode(),
    )
    want = [sc.Scope("repository", "team-a/app", ("delete", "pull", "push"))]

    owner = await ids.authenticate(REG, "owner", "owner-pw")
    assert owner is not None and owner.manage
    assert owner.grant(want) == want

    for pw in ("a1", "a2"):  # both admin passwords work
        admin = await ids.authenticate(REG, REG, pw)
        assert admin is not None and admin.grant(want) == want

    sp = await ids.authenticate(REG, "ci-bot", "sp-pw")
    assert sp is not None
    assert sp.grant(want) == [sc.Scope("repository", "team-a/app", ("pull",))]
    # the same principal has no rights in a registry it holds no role in
    other = await ids.authenticate("fabrikam", "ci-bot", "sp-pw")
    assert other is not None and other.grant(want) == []

    tok = await ids.authenticate(REG, "teama", "t1")
    assert tok is not None
    assert tok.grant(want) == [sc.Scope("repository", "team-a/app", ("pull", "push"))]
    assert tok.grant([sc.Scope("repository", "team-b/app", ("pull",))]) == []

    for user, pw in (
        ("owner", "nope"),
        (REG, "nope"),
        ("ci-bot", "nope"),
        ("teama", "nope"),
        ("nobody", "pw"),
        ("", ""),
        ("../../auth/owner", "owner-pw"),
    ):
        assert await ids.authenticate(REG, user, pw) is None, user


async def test_a_verified_password_is_not_hashed_again_until_it_changes(
    nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A success is remembered (no second slow hash for the same credentials:
    every containerd of a cluster logs in with one pull secret); a wrong
    password always pays the hash; a changed password misses at once."""
    ns = await nodes()
    ids = Identities(ns)
    hashed: list[str] = []
    real = identities.verify_secret

    def counting(secret: str, stored: str) -> bool:
        hashed.append(stored)
        return real(secret, stored)

    monkeypatch.setattr(identities, "verify_secret", counting)
    await ns.put_record(OWNER_KEY, _pw(secrets.hash_secret("owner-pw")))
    assert await ids.authenticate(REG, "owner", "owner-pw") is not None
    assert len(hashed) == 1
    for _ in range(3):
        assert await ids.authenticate(REG, "owner", "owner-pw") is not None
    assert len(hashed) == 1, "a verified password was hashed again"
    for n in (2, 3):
        assert await ids.authenticate(REG, "owner", "not-the-password") is None
        assert len(hashed) == n, "a wrong password must always pay the slow hash"
    await ns.replace_record(OWNER_KEY, _pw(secrets.hash_secret("new-pw")), ns.record(OWNER_KEY))
    assert await ids.authenticate(REG, "owner", "owner-pw") is None
    assert await ids.authenticate(REG, "owner", "new-pw") is not None


async def test_disabled_expired_and_deleted_identities_lose_access(nodes) -> None:
    ns = await nodes()
    ids = Identities(ns)
    rec = {"scope_map": "_repositories_pull", "passwords": [secrets.hash_secret("pw")]}
    await ns.put_record(token_key(REG, "t"), json.dumps(rec).encode())
    assert await ids.authenticate(REG, "t", "pw") is not None
    assert await ids.still_valid("token", "t", REG)
    await ns.put_record(token_key(REG, "t"), json.dumps({**rec, "status": "disabled"}).encode())
    assert await ids.authenticate(REG, "t", "pw") is None
    assert not await ids.still_valid("token", "t", REG)
    await ns.put_record(
        token_key(REG, "t"), json.dumps({**rec, "expiry": time.time() - 1}).encode()
    )
    assert await ids.authenticate(REG, "t", "pw") is None
    # admin user off by default, on only when enabled
    await ns.put_record(
        admin_key(REG), json.dumps({"passwords": [secrets.hash_secret("a")]}).encode()
    )
    assert await ids.authenticate(REG, REG, "a") is None
    # a deleted service principal
    sp = {"secrets": [secrets.hash_secret("s")], "roles": {REG: ["AcrPush"]}}
    await ns.put_record(SP_PREFIX + "bot", json.dumps(sp).encode())
    assert await ids.still_valid("sp", "bot", REG)
    assert await ns.delete_record(SP_PREFIX + "bot")
    assert await ids.authenticate(REG, "bot", "s") is None
    assert not await ids.still_valid("sp", "bot", REG)


async def test_anonymous_pull_is_a_registry_setting(nodes) -> None:
    ns = await nodes()
    ids = Identities(ns)
    assert ids.anonymous(REG) is None
    await ns.set_registry_config(REG, {"anonymous_pull": True})
    anon = ids.anonymous(REG)
    assert anon is not None
    pulled = [sc.Scope("repository", "x", ("pull", "push"))]
    assert anon.grant(pulled) == [sc.Scope("repository", "x", ("pull",))]
    assert anon.grant([sc.Scope("registry", "catalog", ("*",))]) == []
    assert config_key(REG) in ns.cache.revs


# -- tokens ------------------------------------------------------------------------


def _access(name: str = "app", actions: tuple[str, ...] = ("pull",)) -> list[dict]:
    return [sc.Scope("repository", name, actions).as_claim()]


async def test_token_from_one_region_verifies_in_another(nodes) -> None:
    a, b = await nodes("eastus"), await nodes("westeurope")
    key = await tokens.KeyRing(a).ensure()
    tok = tokens.issue(
        key, subject="owner", kind="owner", registry=REG, service=SERVICE, access=_access()
    )
    claims = await tokens.Verifier(tokens.KeyRing(b)).verify(tok, SERVICE)
    assert claims["sub"] == "owner" and claims["access"] == _access()
    assert jwt.get_unverified_header(tok)["kid"] == key.kid


async def test_bad_tokens_are_refused(nodes) -> None:
    ns = await nodes()
    ring = tokens.KeyRing(ns)
    key = await ring.ensure()
    verifier = tokens.Verifier(ring)

    def make(**kw) -> str:  # noqa: ANN003
        args = {
            "subject": "owner",
            "kind": "owner",
            "registry": REG,
            "service": SERVICE,
            "access": _access(),
        }
        return tokens.issue(key, **{**args, **kw})

    good = make()
    assert (await verifier.verify(good, SERVICE))["reg"] == REG
    header, payload, sig = good.split(".")
    forged_payload = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged_payload["access"] = _access(actions=("pull", "push", "delete"))
    forged = ".".join(
        [
            header,
            base64.urlsafe_b64encode(json.dumps(forged_payload).encode()).decode().rstrip("="),
            sig,
        ]
    )
    none_alg = jwt.encode(forged_payload, None, algorithm="none", headers={"kid": key.kid})
    stranger = tokens.issue(
        tokens.SigningKey.new(),
        subject="owner",
        kind="owner",
        registry=REG,
        service=SERVICE,
        access=_access(),
    )
    cases = {
        "tampered payload": forged,
        "tampered signature": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "alg none": none_alg,
        "expired": make(ttl=-60),
        "other service": make(service="fabrikam.meridian.test"),
        "unknown key": stranger,
        "refresh token used as access": make(token_type="refresh"),
        "garbage": "not.a.jwt",
        "too long": "a" * (tokens.MAX_TOKEN_BYTES + 1),
    }
    for what, tok in cases.items():
        with pytest.raises(tokens.InvalidToken):
            await verifier.verify(tok, SERVICE)
            pytest.fail(what)
    # a cached good token is still refused for another service
    with pytest.raises(tokens.InvalidToken):
        await verifier.verify(good, "fabrikam.meridian.test")


async def test_key_rotation_breaks_no_client(nodes) -> None:
    ns = await nodes()
    ring = tokens.KeyRing(ns, rotate_after=60)
    now = time.time()
    old = await ring.ensure(now - 120)
    tok = tokens.issue(
        old, subject="owner", kind="owner", registry=REG, service=SERVICE, access=_access()
    )
    new = await ring.ensure(now)  # the old key is past its rotation period
    signing = ring.signing_key()
    assert new.kid != old.kid and signing is not None and signing.kid == new.kid
    # tokens signed by the old key still verify (on a fresh verifier: no cache)
    assert (await tokens.Verifier(ring).verify(tok, SERVICE))["sub"] == "owner"
    # once nothing it signed can be alive, the old key goes
    await ring.ensure(now + tokens.REFRESH_TTL + 2 * tokens.LEEWAY)
    assert old.kid not in {k.kid for k in ring.keys()}
