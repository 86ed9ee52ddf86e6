"""What the gateway keeps secret in Redis, sealed with AES-256-GCM under
``GATEWAY_SECRET_KEYS``.

The first key seals; every listed key is tried to open, so a new key can go first while
the old one is still listed. Each sealed value is bound to its Redis key as associated
data: a value copied under another key does not open.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["Sealer", "parse_secret_keys"]


def parse_secret_keys(text: str) -> list[bytes]:
    """``GATEWAY_SECRET_KEYS``: comma-separated base64 of 32 bytes each; raise ValueError."""
    keys = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            key = base64.b64decode(part, validate=True)
        except binascii.Error:
            raise ValueError(f"GATEWAY_SECRET_KEYS: key #{i + 1} is not base64") from None
        if len(key) != 32:
            raise ValueError(f"GATEWAY_SECRET_KEYS: key #{i + 1} is {len(key)} bytes, not 32")
        keys.append(key)
    if not keys:
        raise ValueError("GATEWAY_SECRET_KEYS: no key")
    return keys


class Sealer:
    """Seals and opens values under a keyring (the first key seals, all open)."""

    def __init__(self, secret_keys: list[bytes]) -> None:
        if not secret_keys:
            raise ValueError("a sealer needs at least one key")
        self._ciphers = [AESGCM(k) for k in secret_keys]

    def seal(self, plain: bytes, aad: bytes) -> str:
        """Base64 of a random 12-byte nonce and the ciphertext with its tag."""
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._ciphers[0].encrypt(nonce, plain, aad)).decode()

    def open(self, sealed: str, aad: bytes) -> bytes | None:
        """The plain bytes, or None when no listed key opens ``sealed`` (or it is garbled)."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except binascii.Error:
            return None
        if len(raw) < 28:
            return None
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(raw[:12], raw[12:], aad)
            except InvalidTag:
                continue
        return None
