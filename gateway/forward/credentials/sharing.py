"""The fleet's copy of a service identity's token: in Redis, sealed, behind one lock.

The token is stored AES-256-GCM encrypted under the first of ``GATEWAY_SECRET_KEYS``
(every listed key is tried to open it, so a new key can go first while the old one is
still listed), bound to its Redis key as associated data. A replica that must sign in
first takes the lock (``SET NX PX``) with a fencing token from a counter; a write
carrying an older fencing token than the one stored is refused, so a replica that lost
the lock while it was slow cannot overwrite a newer token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis.asyncio import Redis

from gateway.forward.credentials.anaplan import AnaplanToken
from gateway.state.keys import Keys
from gateway.state.sealing import Sealer, parse_secret_keys

__all__ = ["Shared", "SharedToken", "parse_secret_keys"]

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
        self.keys = keys
        self.key = keys.upstream_credential(identity)
        self.lock_key = keys.upstream_credential_lock(identity)
        self.fence_key = keys.upstream_credential_fence(identity)
        self._sealer = Sealer(secret_keys)
        self._aad = self.key.encode()

    def seal(self, shared: Shared) -> str:
        plain = json.dumps({"value": shared.token.value, "expires_at": shared.token.expires_at,
                            "obtained_at": shared.obtained_at}).encode()
        return self._sealer.seal(plain, self._aad)

    def open(self, sealed: str) -> Shared | None:
        """The token in ``sealed``, or None when no listed key opens it."""
        plain = self._sealer.open(sealed, self._aad)
        if plain is None:
            return None
        try:
            doc = json.loads(plain)
        except ValueError:
            return None
        return Shared(AnaplanToken(doc["value"], doc["expires_at"]), doc["obtained_at"])

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
