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
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis

from gateway.state.keys import Keys

__all__ = ["Resealed", "Sealer", "parse_secret_keys", "reseal"]


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
        opened = self.open_index(sealed, aad)
        return opened[0] if opened is not None else None

    def open_index(self, sealed: str, aad: bytes) -> tuple[bytes, int] | None:
        """The plain bytes and the position of the key that opened them, or None."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except binascii.Error:
            return None
        if len(raw) < 28:
            return None
        for index, cipher in enumerate(self._ciphers):
            try:
                return cipher.decrypt(raw[:12], raw[12:], aad), index
            except InvalidTag:
                continue
        return None


# -- key rotation: seal again under the first key ------------------------------

# replace the value only if it is still the one read, keeping its time to live: a
# replica that wrote a newer token meanwhile wins
_RESEAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""


@dataclass
class Resealed:
    """What :func:`reseal` found: values sealed again under the first key, values
    already under it, and values no listed key opens (left as they are)."""

    resealed: int = 0
    current: int = 0
    unreadable: int = 0


async def reseal(redis: Redis, keys: Keys, sealer: Sealer) -> Resealed:
    """Seal every sealed value in Redis again under the first key, so that the keys
    after it can be retired. A value is replaced only if unchanged since it was read."""
    found = Resealed()
    for pattern in keys.sealed_patterns:
        async for key in redis.scan_iter(match=pattern, count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            stored = await redis.get(name)
            if stored is None:
                continue
            text = stored.decode() if isinstance(stored, bytes) else str(stored)
            # a shared service token carries its fencing token first ("7:<sealed>")
            head, sep, sealed = text.rpartition(":")
            opened = sealer.open_index(sealed, name.encode())
            if opened is None:
                found.unreadable += 1
            elif opened[1] == 0:
                found.current += 1
            elif await redis.eval(_RESEAL, 1, name, text,
                                  head + sep + sealer.seal(opened[0], name.encode())):
                found.resealed += 1
            else:
                found.current += 1  # a replica replaced it meanwhile, under the first key
    return found
