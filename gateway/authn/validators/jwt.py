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

import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK

from gateway.authn.jwks import KEY_TYPES, KeySet, KeySetUnavailable
from gateway.authn.validators.base import TokenInfo, ValidatorUnavailable, parse_scopes

log = logging.getLogger(__name__)

# RFC 9068 section 2.1 asks for "at+jwt"; RFC 7515 section 4.1.9 lets the
# "application/" prefix go, and many issuers still send the generic "JWT".
_ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt", "jwt"})

DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "PS256", "EdDSA")


class JWTValidator:
    """Validates JWT access tokens locally with the keys published at ``jwks_url``
    (:class:`~gateway.authn.jwks.KeySet`: fetched lazily, refetched for an unknown
    ``kid`` at most once per ``jwks_min_refetch_interval`` seconds, refreshed after
    ``jwks_max_age`` so that a key the issuer withdraws stops being trusted)."""

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
        unknown = [a for a in algorithms if a not in KEY_TYPES]
        if unknown:
            raise ValueError(f"unsupported JWT algorithms {unknown}; "
                             f"expected some of {sorted(KEY_TYPES)}")
        if not algorithms:
            raise ValueError("the JWT algorithm allow-list is empty")
        if not issuer:
            raise ValueError("a JWT validator needs the issuer it trusts")
        self._issuer = issuer
        self._audience = audience
        self._algorithms = tuple(dict.fromkeys(algorithms))
        self._leeway = leeway
        self._keys = KeySet(session, jwks_url, algorithms=self._algorithms,
                            min_refetch=jwks_min_refetch_interval, max_age=jwks_max_age,
                            fetch_timeout=fetch_timeout)

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

        try:
            key = await self._keys.key(kid, alg)
        except KeySetUnavailable as exc:
            raise ValidatorUnavailable(str(exc)) from None
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

    async def close(self) -> None:
        """Stop a JWKS fetch still in flight; the session belongs to the app."""
        await self._keys.close()
