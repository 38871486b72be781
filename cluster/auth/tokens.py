"""Access tokens: signed JWTs, rotating signing keys, a caching verifier.

Tokens follow the Docker token specification's claim set (``iss``, ``sub``,
``aud`` = the registry's service name, ``exp``, ``nbf``, ``iat``, ``jti``,
``access``) plus ``reg`` (the registry) and ``kind`` (what ``sub`` names).
They are signed with Ed25519 (JWS ``EdDSA``) by PyJWT over ``cryptography``;
the header names the key (``kid``), and only ``EdDSA`` is ever accepted, so
``alg: none`` or an HMAC token made with a public key fail.

Signing keys live in the namespace (``/meridian/auth/keys/<kid>``), so a
token issued in one region verifies in every other. The newest key signs;
every key still present verifies. ``KeyRing.ensure`` (run by every node from
time to time) adds a new key when the newest is older than the rotation
period and drops keys too old to have signed a live token; so rotation
breaks no client. A key a node has not seen yet (created an instant ago in
another region) is read from the store once.

``Verifier.verify`` caches verified tokens until they expire, so the request
path does no signature check for a token it has seen.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cluster.namespace import AUTH, Conflict, Namespace

KEYS = AUTH + "keys/"
ALGORITHM = "EdDSA"
ISSUER = "meridian"
TOKEN_TTL = 300  # seconds an access token lives (short: revocation takes effect soon)
REFRESH_TTL = 14 * 24 * 3600  # refresh tokens (OAuth2 offline access)
ROTATE_AFTER = 24 * 3600  # a signing key signs for this long
MAX_TOKEN_BYTES = 8192  # longer Authorization headers are refused unread
CACHE_ENTRIES = 65536
LEEWAY = 5  # seconds of clock skew between regions tolerated


class InvalidToken(Exception):
    """The token is malformed, forged, expired or not for this service."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    created: float

    @classmethod
    def new(cls, now: float | None = None) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        return cls(uuid.uuid4().hex, private, private.public_key(), now or time.time())

    def to_json(self) -> bytes:
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return json.dumps({"kid": self.kid, "created": self.created, "pem": pem.decode()}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SigningKey:
        d = json.loads(raw)
        private = serialization.load_pem_private_key(d["pem"].encode(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError("signing key is not Ed25519")
        return cls(d["kid"], private, private.public_key(), float(d["created"]))


class KeyRing:
    """The signing keys, as the namespace holds them."""

    def __init__(self, ns: Namespace, rotate_after: float = ROTATE_AFTER) -> None:
        self.ns = ns
        self.rotate_after = rotate_after
        self._parsed: dict[bytes, SigningKey] = {}

    def _load(self, raw: bytes) -> SigningKey | None:
        key = self._parsed.get(raw)
        if key is None:
            try:
                key = SigningKey.from_json(raw)
            except (ValueError, KeyError, TypeError):
                return None
            self._parsed[raw] = key
        return key

    def keys(self) -> list[SigningKey]:
        """Present keys, newest first."""
        loaded = (self._load(raw) for raw in self.ns.records(KEYS).values())
        return sorted((k for k in loaded if k is not None), key=lambda k: -k.created)

    def signing_key(self) -> SigningKey | None:
        keys = self.keys()
        return keys[0] if keys else None

    async def public_key(self, kid: str) -> Ed25519PublicKey | None:
        raw = await self.ns.fresh_record(KEYS + kid) if _safe_kid(kid) else None
        key = self._load(raw) if raw is not None else None
        return key.public if key is not None else None

    async def ensure(self, now: float | None = None) -> SigningKey:
        """A current signing key, creating one when there is none or the
        newest is past the rotation period; drops keys that can no longer
        have signed a live token."""
        now = time.time() if now is None else now
        keys = self.keys()
        newest = keys[0] if keys else None
        if newest is None or now - newest.created >= self.rotate_after:
            fresh = SigningKey.new(now)
            try:
                await self.ns.put_record(KEYS + fresh.kid, fresh.to_json(), create=True)
            except Conflict:
                pass
            newest = fresh
        # A key stops signing at its successor's creation; tokens it signed
        # live TOKEN_TTL (refresh tokens REFRESH_TTL) longer.
        for older, newer in zip(keys[1:], keys, strict=False):
            if now - newer.created > REFRESH_TTL + LEEWAY:
                await self.ns.delete_record(KEYS + older.kid)
        return newest


def _safe_kid(kid: str) -> bool:
    return 0 < len(kid) <= 64 and kid.isalnum()


def issue(
    key: SigningKey,
    *,
    subject: str,
    kind: str,
    registry: str,
    service: str,
    access: list[dict[str, Any]],
    ttl: int = TOKEN_TTL,
    now: float | None = None,
    token_type: str = "access",
) -> str:
    now = time.time() if now is None else now
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": service,
        "exp": int(now + ttl),
        "nbf": int(now) - LEEWAY,
        "iat": int(now),
        "jti": uuid.uuid4().hex,
        "access": access,
        "reg": registry,
        "kind": kind,
        "typ": token_type,
    }
    return jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})


class Verifier:
    """Verifies access tokens for a service; remembers verified ones."""

    def __init__(self, keys: KeyRing, entries: int = CACHE_ENTRIES) -> None:
        self.keys = keys
        self.entries = entries
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def cached(self, token: str, now: float) -> dict[str, Any] | None:
        claims = self._cache.get(token)
        if claims is None:
            return None
        if claims["exp"] <= now:
            del self._cache[token]
            return None
        return claims

    async def verify(
        self, token: str, service: str, *, token_type: str = "access"
    ) -> dict[str, Any]:
        now = time.time()
        claims = self.cached(token, now)
        if claims is not None:
            if claims["aud"] != service or claims.get("typ") != token_type:
                raise InvalidToken("token is not for this service")
            return claims
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise InvalidToken("malformed token") from e
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("token algorithm not accepted")
        public = await self.keys.public_key(str(header.get("kid", "")))
        if public is None:
            raise InvalidToken("token signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=[ALGORITHM],
                audience=service,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "nbf", "aud", "iss", "sub"]},
            )
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from e
        if claims.get("typ") != token_type or not isinstance(claims.get("access"), list):
            raise InvalidToken("not an access token" if token_type == "access" else "wrong type")
        self._cache[token] = claims
        if len(self._cache) > self.entries:
            self._cache.popitem(last=False)
        return claims
