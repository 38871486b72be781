"""Salted slow hashes for passwords and client secrets.

scrypt (RFC 7914, from the standard library's OpenSSL binding) with a
16-byte random salt; the stored form carries its parameters so they can be
raised later without invalidating existing hashes. Comparison is constant
time. A hash costs ~16 MiB and tens of milliseconds on purpose: it runs at
login only, never on the request path (access tokens are verified instead).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _random

N, R, P = 1 << 14, 8, 1
_PREFIX = "scrypt"


def generate(nbytes: int = 32) -> str:
    """A new random secret, URL-safe, for passwords and client secrets."""
    return _random.token_urlsafe(nbytes)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hash_secret(secret: str) -> str:
    salt = _random.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"{_PREFIX}${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        prefix, n, r, p, salt, digest = stored.split("$")
        if prefix != _PREFIX:
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# A hash of a secret nobody knows: checked when an identity does not exist,
# so a failed login costs the same whether or not the identity exists.
DECOY = hash_secret(generate())
