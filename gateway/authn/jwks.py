"""A JSON Web Key Set fetched from a URL and cached: the keys a token may be checked with.

Used wherever the gateway checks a signature with someone else's public keys: the JWT
validator (the issuer's JWKS) and single sign-on (the OpenID provider's ID-token keys).

- RFC 7517 section 5: the set is a JSON object whose ``keys`` member is an array. Keys of
  other types, private or symmetric keys, keys not meant for signatures (section 4.2
  ``use``, 4.3 ``key_ops``) and keys that fit no allowed algorithm are left out.
- RFC 8725 section 3.1: each key is used with the algorithms of its own type and curve
  only (and its ``alg`` when it names one), which defeats algorithm confusion.
- Fetched lazily, single-flight (concurrent callers share one fetch). A ``kid`` not in
  the set refetches it (key rotation) at most once per ``min_refetch`` seconds, so tokens
  with made-up ``kid`` values cannot turn the gateway into a load generator against the
  issuer. A set older than ``max_age`` is refreshed; while that fails, the keys fetched
  before stay in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK

log = logging.getLogger(__name__)

# algorithm -> (JWK ``kty``, JWK ``crv`` or None when any curve of the type fits)
KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
_EDDSA_CURVES = frozenset({"Ed25519", "Ed448"})
MAX_JWKS_BYTES = 512 * 1024


class KeySetUnavailable(Exception):
    """The set could not be fetched, or holds no usable key; the message says which."""


def fits(alg: str, jwk: dict[str, Any]) -> bool:
    """Whether ``jwk`` may verify ``alg``: same key type, same curve, same ``alg`` if set."""
    kty, crv = KEY_TYPES[alg]
    if jwk.get("kty") != kty:
        return False
    if crv is not None and jwk.get("crv") != crv:
        return False
    if kty == "OKP" and jwk.get("crv") not in _EDDSA_CURVES:
        return False
    jwk_alg = jwk.get("alg")
    return jwk_alg is None or jwk_alg == alg


@dataclass(frozen=True, slots=True)
class _SigningKey:
    """One JWK of the set, prepared once for each allowed algorithm it fits."""

    kid: str | None
    by_alg: dict[str, PyJWK]


class KeySet:
    """The keys published at a JWKS URL (given, or found later, e.g. by discovery)."""

    def __init__(self, session: aiohttp.ClientSession,
                 url: str | Callable[[], Awaitable[str]], *, algorithms: Iterable[str],
                 min_refetch: float = 30.0, max_age: float = 300.0,
                 fetch_timeout: float = 2.0) -> None:
        self._session = session
        self._url = url
        self.algorithms = tuple(dict.fromkeys(algorithms))
        self._min_refetch = min_refetch
        self._max_age = max_age
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout,
                                              connect=min(fetch_timeout, 1.0))
        self._keys: list[_SigningKey] | None = None
        self._loaded_at = -math.inf
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[None] | None = None

    async def key(self, kid: str | None, alg: str) -> PyJWK | None:
        """The key ``kid`` prepared for ``alg``, or None when the set has no such key.

        Without a ``kid`` only an unambiguous key will do (RFC 7515 section 4.1.4).
        Raises :class:`KeySetUnavailable` when the set was never fetched and cannot be.
        """
        await self._ensure_keys()
        found = self._find(kid, alg)
        if found is None and not self.knows(kid):
            await self._refresh(rate_limited=True)  # the issuer may have rotated its keys
            found = self._find(kid, alg)
        return found

    def _find(self, kid: str | None, alg: str) -> PyJWK | None:
        keys = self._keys or []
        if kid is not None:
            return next((k.by_alg.get(alg) for k in keys if k.kid == kid), None)
        fitting = [k.by_alg[alg] for k in keys if alg in k.by_alg]
        return fitting[0] if len(fitting) == 1 else None

    def _kid_known(self, kid: str) -> bool:
        return any(k.kid == kid for k in self._keys or [])

    def knows(self, kid: str | None) -> bool:
        """Whether the set, as last fetched, holds a key ``kid`` (for any algorithm)."""
        return kid is not None and self._kid_known(kid)

    async def _ensure_keys(self) -> None:
        if self._keys is None:
            await self._refresh(rate_limited=False)
        elif time.monotonic() - self._loaded_at > self._max_age:
            try:
                await self._refresh(rate_limited=True)
            except KeySetUnavailable as exc:
                log.warning("JWKS refresh failed, keeping the keys fetched before: %s", exc)

    async def _refresh(self, *, rate_limited: bool) -> None:
        """Fetch the set, or join the fetch already in flight (skipped, when
        ``rate_limited``, if the last one started less than ``min_refetch`` ago)."""
        if self._inflight is None:
            if rate_limited and time.monotonic() - self._last_attempt < self._min_refetch:
                return
            self._last_attempt = time.monotonic()
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
            self._inflight.add_done_callback(self._fetch_done)
        # shield: one caller giving up must not cancel the fetch the others wait for
        await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here; the waiters re-raise it

    async def _fetch(self) -> None:
        url = self._url if isinstance(self._url, str) else await self._url()
        try:
            async with self._session.get(url, headers={"Accept": "application/json"},
                                         timeout=self._timeout, allow_redirects=False
                                         ) as resp:
                if resp.status != 200:
                    raise KeySetUnavailable(f"JWKS endpoint answered {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise KeySetUnavailable("JWKS document is implausibly large")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KeySetUnavailable(
                f"JWKS endpoint unreachable ({type(exc).__name__})") from None
        self._keys = self._parse(bytes(body))
        self._loaded_at = time.monotonic()

    def _parse(self, body: bytes) -> list[_SigningKey]:
        """The set's usable keys; a set with none at all is an outage, not "no such key"."""
        try:
            data: Any = json.loads(body)
        except ValueError:
            raise KeySetUnavailable("JWKS endpoint answered with invalid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise KeySetUnavailable("JWKS document lacks a `keys` array")
        keys: list[_SigningKey] = []
        for jwk_data in data["keys"]:
            if not isinstance(jwk_data, dict) or "d" in jwk_data:
                continue
            if jwk_data.get("use", "sig") != "sig":
                continue
            ops = jwk_data.get("key_ops")
            if isinstance(ops, list) and "verify" not in ops:
                continue
            kid = jwk_data.get("kid")
            by_alg: dict[str, PyJWK] = {}
            for alg in self.algorithms:
                if not fits(alg, jwk_data):
                    continue
                try:
                    by_alg[alg] = PyJWK(jwk_data, algorithm=alg)
                except jwt.PyJWTError:
                    continue
            if by_alg:
                keys.append(_SigningKey(kid=kid if isinstance(kid, str) else None,
                                        by_alg=by_alg))
        if not keys:
            raise KeySetUnavailable(
                f"JWKS holds no key usable with the algorithms {list(self.algorithms)}")
        return keys

    async def close(self) -> None:
        """Stop a fetch still in flight; the session belongs to the caller."""
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KeySetUnavailable):
                await task
