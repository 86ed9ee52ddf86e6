"""Secrets at rest: slow hashes for client secrets and passwords, digests for tokens.

Client secrets and passwords are hashed with scrypt (RFC 7914; n=2**14, r=8, p=1,
about 50 ms here), so a copy of Redis does not yield them. Tokens, codes and device
codes are high-entropy, so a keyed BLAKE2b digest (the gateway's
:class:`~gateway.tokens.TokenDigester`) is enough and keeps look-ups fast.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1


def hash_secret(secret: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64) of ``secret``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return "$".join(["scrypt", str(_N), str(_R), str(_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_secret(secret: str, stored: str) -> bool:
    """Constant-time check of ``secret`` against a :func:`hash_secret` value."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


_DECOY: list[str] = []


def _decoy_hash() -> str:
    """A hash of nothing anyone knows, made once: what an absent one is checked against."""
    if not _DECOY:
        _DECOY.append(hash_secret(secrets.token_urlsafe(32)))
    return _DECOY[0]


def verify_secret_evenly(secret: str, stored: str | None) -> bool:
    """:func:`verify_secret`, taking as long when there is no hash to check (an unknown
    user or client, a user with no password): the same scrypt work is done against a
    decoy and the answer is False, so the time taken does not tell who exists."""
    if not stored or not stored.startswith("scrypt$"):
        verify_secret(secret, _decoy_hash())
        return False
    return verify_secret(secret, stored)


def new_token(prefix: str, nbytes: int = 32) -> str:
    """A high-entropy opaque token; the prefix lets secret scanners recognise it."""
    return prefix + secrets.token_urlsafe(nbytes)


# RFC 8628 section 6.1: a consonant-only alphabet avoids words and look-alikes
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"


def new_user_code() -> str:
    """``XXXX-XXXX`` from 20 consonants: 20^8 ≈ 2^34.5 codes."""
    chars = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def normalize_user_code(text: str) -> str:
    """Dashes, spaces and case ignored (RFC 8628 section 6.1)."""
    return "".join(c for c in text.upper() if c.isalnum())
