"""People's Anaplan sign-ins, kept sealed in Redis for ``credentials: user`` upstreams.

"Sign in with Anaplan" on the built-in server stores what Anaplan's OAuth service
answered: the person's access token, their refresh token and when the access token
expires, under their subject (Anaplan's ``userGuid``), sealed with
:class:`~gateway.state.sealing.Sealer`. A refresh replaces the record only if it is still
the one the refresh started from (compare-and-set in Lua), under a lock (``SET NX PX``)
that lets one replica of the fleet refresh at a time: with rotatable refresh tokens a
second use of the same refresh token would make Anaplan end the whole family.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass

from redis.asyncio import Redis

from gateway.state.keys import Keys
from gateway.state.sealing import Sealer

__all__ = ["AnaplanSignIn", "SignInStore", "StoredSignIn"]

# KEYS[1] the sign-in; ARGV: the sealed value read before, the new sealed value
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
# KEYS[1] the sign-in; ARGV[1]: the sealed value read before
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] the lock; ARGV[1] our owner value
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class AnaplanSignIn:
    """A person's Anaplan tokens. Times are Unix seconds."""

    username: str
    access_token: str
    refresh_token: str
    expires_at: float
    obtained_at: float

    def __repr__(self) -> str:  # keep the tokens out of tracebacks and logs
        return f"AnaplanSignIn(username={self.username!r}, expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True)
class StoredSignIn:
    """A sign-in as read, with its sealed form (what a compare-and-set compares)."""

    signin: AnaplanSignIn
    sealed: str


class SignInStore:
    """People's sealed Anaplan sign-ins and their refresh locks."""

    def __init__(self, redis: Redis, keys: Keys, secret_keys: list[bytes]) -> None:
        self.redis = redis
        self.keys = keys
        self._sealer = Sealer(secret_keys)

    def _seal(self, subject: str, signin: AnaplanSignIn) -> str:
        return self._sealer.seal(json.dumps(asdict(signin)).encode(),
                                 self.keys.anaplan_signin(subject).encode())

    def open(self, subject: str, sealed: str) -> AnaplanSignIn | None:
        """The sign-in in ``sealed``, or None when no listed key opens it."""
        plain = self._sealer.open(sealed, self.keys.anaplan_signin(subject).encode())
        if plain is None:
            return None
        try:
            return AnaplanSignIn(**json.loads(plain))
        except (ValueError, TypeError):
            return None

    async def save(self, subject: str, signin: AnaplanSignIn) -> None:
        """Store a new sign-in (a person signed in again: it replaces the old one)."""
        await self.redis.set(self.keys.anaplan_signin(subject), self._seal(subject, signin))

    async def load(self, subject: str) -> StoredSignIn | None:
        raw = await self.redis.get(self.keys.anaplan_signin(subject))
        if raw is None:
            return None
        sealed = raw.decode() if isinstance(raw, bytes) else str(raw)
        signin = self.open(subject, sealed)
        return None if signin is None else StoredSignIn(signin, sealed)

    async def swap(self, subject: str, before: StoredSignIn, after: AnaplanSignIn) -> bool:
        """Replace ``before`` with ``after``; False when the record changed meanwhile."""
        done = await self.redis.eval(_SWAP, 1, self.keys.anaplan_signin(subject),
                                     before.sealed, self._seal(subject, after))
        return bool(done)

    async def remove(self, subject: str, before: StoredSignIn | None = None) -> bool:
        """Delete the sign-in (only if it is still ``before``, when given)."""
        key = self.keys.anaplan_signin(subject)
        if before is None:
            return bool(await self.redis.delete(key))
        return bool(await self.redis.eval(_DELETE_IF, 1, key, before.sealed))

    async def lock(self, subject: str, ttl: float) -> str | None:
        """Take the refresh lock for ``ttl`` seconds: its owner value, or None if held."""
        owner = secrets.token_hex(16)
        taken = await self.redis.set(self.keys.anaplan_signin_lock(subject), owner, nx=True,
                                     px=int(ttl * 1000))
        return owner if taken else None

    async def unlock(self, subject: str, owner: str) -> None:
        await self.redis.eval(_RELEASE, 1, self.keys.anaplan_signin_lock(subject), owner)
