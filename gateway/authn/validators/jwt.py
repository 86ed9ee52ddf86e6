"""Local validation of JWT access tokens against the issuer's JWKS.

RFC 9068 (JWT profile for OAuth 2.0 access tokens) section 4: the resource server
checks the signature with a key of the issuer, ``iss`` exactly, ``aud`` against
its own identifier, and ``exp``; it must reject a token whose ``alg`` is
``none``. RFC 8725 (JWT best current practices) section 3.1: the algorithm comes
from a fixed allow-list, and each key is used with one family of algorithms
only, which is what defeats the HS256-with-the-RSA-public-key confusion.

Keys come only from the configured JWKS URL (RFC 7517 section 5). The header
parameters ``jku``, ``x5u``, ``jwk`` and ``x5c`` (RFC 7515 sections 4.1.2 to
4.1.6) let a token name its own key; they are never read, let alone fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK

from gateway.authn.validators.base import TokenInfo, ValidatorUnavailable, parse_scopes

log = logging.getLogger(__name__)

# algorithm -> (JWK ``kty``, JWK ``crv`` or None when any curve of the type fits)
_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
_EDDSA_CURVES = frozenset({"Ed25519", "Ed448"})
# RFC 9068 section 2.1 asks for "at+jwt"; RFC 7515 section 4.1.9 lets the
# "application/" prefix go, and many issuers still send the generic "JWT".
_ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt", "jwt"})
_MAX_JWKS_BYTES = 512 * 1024

DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "PS256", "EdDSA")


@dataclass(frozen=True, slots=True)
class _SigningKey:
    """One JWK of the set, prepared once for each allowed algorithm it fits."""

    kid: str | None
    by_alg: dict[str, PyJWK]


def _fits(alg: str, jwk: dict[str, Any]) -> bool:
    """Whether ``jwk`` may verify ``alg``: same key type, same curve, same ``alg`` if set."""
    kty, crv = _KEY_TYPES[alg]
    if jwk.get("kty") != kty:
        return False
    if crv is not None and jwk.get("crv") != crv:
        return False
    if kty == "OKP" and jwk.get("crv") not in _EDDSA_CURVES:
        return False
    jwk_alg = jwk.get("alg")
    return jwk_alg is None or jwk_alg == alg


class JWTValidator:
    """Validates JWT access tokens locally with the keys published at ``jwks_url``.

    The JWKS is fetched lazily on the first ``validate``. A token whose ``kid`` is
    unknown triggers a refetch (key rotation), at most once per
    ``jwks_min_refetch_interval`` seconds; concurrent misses share one fetch.
    Keys older than ``jwks_max_age`` are refreshed too, so a key the issuer
    withdraws stops being trusted; while that refresh fails the old keys stay in use.
    """

    name = "jwt"

    def __init__(self, session: aiohttp.ClientSession, jwks_url: str, *, issuer: str,
                 audience: str = "", algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
                 leeway: int = 30, jwks_min_refetch_interval: float = 30.0,
                 fetch_timeout: float = 2.0, jwks_max_age: float = 300.0) -> None:
        refused = [a for a in algorithms if a.lower() == "none" or a.upper().startswith("HS")]
        if refused:
            raise ValueError(
                f"JWT algorithms {refused} are refused: `none` is unsigned and HS* would let "
                "anyone holding the issuer's public key forge tokens (RFC 8725 section 2.1)")
        unknown = [a for a in algorithms if a not in _KEY_TYPES]
        if unknown:
            raise ValueError(f"unsupported JWT algorithms {unknown}; "
                             f"expected some of {sorted(_KEY_TYPES)}")
        if not algorithms:
            raise ValueError("the JWT algorithm allow-list is empty")
        if not issuer:
            raise ValueError("a JWT validator needs the issuer it trusts")
        self._session = session
        self._jwks_url = jwks_url
        self._issuer = issuer
        self._audience = audience
        self._algorithms = tuple(dict.fromkeys(algorithms))
        self._leeway = leeway
        self._min_interval = jwks_min_refetch_interval
        self._max_age = jwks_max_age
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout,
                                              connect=min(fetch_timeout, 1.0))
        self._keys: list[_SigningKey] | None = None
        self._loaded_at = -math.inf
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[None] | None = None

    async def validate(self, token: str) -> TokenInfo:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return TokenInfo.inactive()
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            return TokenInfo.inactive()
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
            return TokenInfo.inactive()
        if "crit" in header or "b64" in header:
            # RFC 7515 section 4.1.11: we understand no extension, so none may be critical
            return TokenInfo.inactive()
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return TokenInfo.inactive()

        await self._ensure_keys()
        key = self._find(kid, alg)
        if key is None and kid is not None and not self._kid_known(kid):
            await self._refresh(rate_limited=True)  # the issuer may have rotated its keys
            key = self._find(kid, alg)
        if key is None:
            return TokenInfo.inactive()
        return self._decode(token, key, alg)

    def _decode(self, token: str, key: PyJWK, alg: str) -> TokenInfo:
        required = ["exp", "iss"] + (["aud"] if self._audience else [])
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], issuer=self._issuer,
                audience=self._audience or None, leeway=self._leeway,
                options={"require": required, "verify_aud": bool(self._audience)},
            )
        except jwt.PyJWTError:
            return TokenInfo.inactive()
        client_id = next((claims[c] for c in ("client_id", "azp", "cid")
                          if isinstance(claims.get(c), str)), None)
        username = next((claims[c] for c in ("username", "preferred_username")
                         if isinstance(claims.get(c), str)), None)
        sub = claims.get("sub")
        return TokenInfo(
            active=True,
            client_id=client_id,
            scopes=parse_scopes(claims),
            exp=float(claims["exp"]),
            sub=sub if isinstance(sub, str) else None,
            username=username,
        )

    def _find(self, kid: str | None, alg: str) -> PyJWK | None:
        keys = self._keys or []
        if kid is not None:
            return next((k.by_alg.get(alg) for k in keys if k.kid == kid), None)
        # RFC 7515 section 4.1.4: without a kid, only an unambiguous key will do
        fitting = [k.by_alg[alg] for k in keys if alg in k.by_alg]
        return fitting[0] if len(fitting) == 1 else None

    def _kid_known(self, kid: str) -> bool:
        return any(k.kid == kid for k in self._keys or [])

    async def _ensure_keys(self) -> None:
        if self._keys is None:
            await self._refresh(rate_limited=False)
        elif time.monotonic() - self._loaded_at > self._max_age:
            try:
                await self._refresh(rate_limited=True)
            except ValidatorUnavailable as exc:
                log.warning("JWKS refresh failed, keeping the keys fetched before: %s", exc)

    async def _refresh(self, *, rate_limited: bool) -> None:
        """Fetch the JWKS, or join the fetch already in flight.

        With ``rate_limited``, skip the fetch when the last one started less than
        ``jwks_min_refetch_interval`` ago: tokens with made-up ``kid`` values must
        not turn the gateway into a load generator against the issuer.
        """
        if self._inflight is None:
            if rate_limited and time.monotonic() - self._last_attempt < self._min_interval:
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
        try:
            async with self._session.get(
                self._jwks_url,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise ValidatorUnavailable(f"JWKS endpoint answered {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > _MAX_JWKS_BYTES:
                        raise ValidatorUnavailable("JWKS document is implausibly large")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ValidatorUnavailable(
                f"JWKS endpoint unreachable ({type(exc).__name__})") from None
        self._keys = self._parse_jwks(bytes(body))
        self._loaded_at = time.monotonic()

    def _parse_jwks(self, body: bytes) -> list[_SigningKey]:
        """RFC 7517 section 5: a JSON object whose ``keys`` member is an array of JWKs.

        Keys of other types, private or symmetric keys, keys not meant for
        signatures (section 4.2 ``use``) and keys that fit no allowed algorithm are
        left out. A set with no usable key at all is an outage, not "inactive".
        """
        try:
            data: Any = json.loads(body)
        except ValueError:
            raise ValidatorUnavailable("JWKS endpoint answered with invalid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValidatorUnavailable("JWKS document lacks a `keys` array")
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
            for alg in self._algorithms:
                if not _fits(alg, jwk_data):
                    continue
                try:
                    by_alg[alg] = PyJWK(jwk_data, algorithm=alg)
                except jwt.PyJWTError:
                    continue
            if by_alg:
                keys.append(_SigningKey(kid=kid if isinstance(kid, str) else None,
                                        by_alg=by_alg))
        if not keys:
            raise ValidatorUnavailable(
                f"JWKS holds no key usable with the algorithms {list(self._algorithms)}")
        return keys

    async def close(self) -> None:
        """Stop a JWKS fetch still in flight; the session belongs to the app."""
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ValidatorUnavailable):
                await task
