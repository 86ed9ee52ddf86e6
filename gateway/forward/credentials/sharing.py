"""The fleet's copy of a service identity's token: in Redis, sealed, behind one lock.

The token is stored AES-256-GCM encrypted under the first of ``GATEWAY_SECRET_KEYS``
(every listed key is tried to open it, so a new key can go first while the old one is
still listed), bound to its Redis key as associated data. A replica that must sign in
first takes the lock (``SET NX PX``) with a fencing token from a counter; a write
carrying an older fencing token than the one stored is refused, so a replica that lost
the lock while it was slow cannot overwrite a newer token.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis

from gateway.forward.credentials.anaplan import AnaplanToken
from gateway.state.keys import Keys

# KEYS[1] the token; ARGV: fencing token, sealed value, TTL ms
_FENCED_SET = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local fence = tonumber(string.match(cur, '^(%d+):'))
  if fence and fence > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1
"""
# KEYS[1] the lock; ARGV[1] our fencing token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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


@dataclass(frozen=True, slots=True)
class Shared:
    """The fleet's token as read from Redis."""

    token: AnaplanToken
    obtained_at: float  # Unix seconds, when it was signed in or refreshed


class SharedToken:
    """One identity's sealed token and sign-in lock in Redis."""

    def __init__(self, redis: Redis, keys: Keys, identity: str, secret_keys: list[bytes]
                 ) -> None:
        self.redis = redis
        self.key = keys.upstream_credential(identity)
        self.lock_key = keys.upstream_credential_lock(identity)
        self.fence_key = keys.upstream_credential_fence(identity)
        self._ciphers = [AESGCM(k) for k in secret_keys]
        self._aad = self.key.encode()

    def seal(self, shared: Shared) -> str:
        plain = json.dumps({"value": shared.token.value, "expires_at": shared.token.expires_at,
                            "obtained_at": shared.obtained_at}).encode()
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._ciphers[0].encrypt(nonce, plain, self._aad)
                                ).decode()

    def open(self, sealed: str) -> Shared | None:
        """The token in ``sealed``, or None when no listed key opens it."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except binascii.Error:
            return None
        for cipher in self._ciphers:
            try:
                doc = json.loads(cipher.decrypt(raw[:12], raw[12:], self._aad))
            except (InvalidTag, ValueError):
                continue
            return Shared(AnaplanToken(doc["value"], doc["expires_at"]), doc["obtained_at"])
        return None

    async def read(self) -> Shared | None:
        stored = await self.redis.get(self.key)
        if stored is None:
            return None
        text = stored.decode() if isinstance(stored, bytes) else str(stored)
        return self.open(text.partition(":")[2])

    async def write(self, shared: Shared, fence: int, now: float) -> bool:
        """Store ``shared`` unless a newer sign-in's is there; False when refused."""
        ttl = max(1, int((shared.token.expires_at - now) * 1000))
        done = await self.redis.eval(
            _FENCED_SET, 1, self.key, str(fence), self.seal(shared), str(ttl))
        return bool(done)

    async def lock(self, ttl: float) -> int | None:
        """Take the sign-in lock for ``ttl`` seconds: its fencing token, or None if held."""
        fence = int(await self.redis.incr(self.fence_key))
        taken = await self.redis.set(self.lock_key, str(fence), nx=True, px=int(ttl * 1000))
        return fence if taken else None

    async def unlock(self, fence: int) -> None:
        await self.redis.eval(_RELEASE, 1, self.lock_key, str(fence))
