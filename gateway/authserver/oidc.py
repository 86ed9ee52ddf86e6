"""An OpenID Connect provider as the built-in server's login method sees it.

Discovery (OpenID Connect Discovery 1.0 section 4), the JWKS, the token request with
``client_secret_basic`` and PKCE, and ID-token validation (OpenID Connect Core 1.0
section 3.1.3.7). Used by :mod:`.sso`.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from gateway.authn.jwks import KeySet, KeySetUnavailable
from gateway.protocol.clientauth import client_secret_basic


class SSOError(Exception):
    """A refused or failed sign-in: what the user reads, and the metric/audit outcome."""

    def __init__(self, status: int, outcome: str, message: str) -> None:
        super().__init__(message)
        self.status, self.outcome, self.message = status, outcome, message


class ProviderError(Exception):
    """The provider is unreachable or answered something unusable (502 for the user)."""


# OIDC Core 3.1.3.7 items 6 to 8: only the provider's asymmetric keys may sign; never
# ``none``, never HS* (keyed with our own client secret)
ASYMMETRIC_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                             "ES256", "ES384", "ES512", "EdDSA"})
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=5.0, connect=3.0)
METADATA_TTL = 300.0
JWKS_TTL = 3600.0
JWKS_MIN_REFETCH = 30.0  # an unknown ``kid`` refetches the JWKS at most this often
LEEWAY = 60


@dataclass(frozen=True)
class ProviderMetadata:
    """What this client uses of the discovery document (OIDC Discovery section 3)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    iss_parameter_supported: bool


class OpenIDProvider:
    """The company's provider: discovery document and JWKS fetched with aiohttp and cached
    (metadata for ``METADATA_TTL``; keys for ``JWKS_TTL`` or until an unknown ``kid``)."""

    def __init__(self, session: aiohttp.ClientSession, issuer: str) -> None:
        self.session = session
        self.issuer = issuer
        self._meta: ProviderMetadata | None = None
        self._meta_at = 0.0
        self._meta_lock = asyncio.Lock()
        self._keys = KeySet(session, self._jwks_uri, algorithms=sorted(ASYMMETRIC_ALGS),
                            min_refetch=JWKS_MIN_REFETCH, max_age=JWKS_TTL,
                            fetch_timeout=HTTP_TIMEOUT.total or 5.0)

    async def _jwks_uri(self) -> str:
        return (await self.metadata()).jwks_uri

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self.session.get(url, timeout=HTTP_TIMEOUT,
                                        headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise ProviderError(f"Your company's identity provider answered "
                                        f"{resp.status} for its {what}.")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ProviderError(f"Your company's identity provider could not be reached "
                                f"({what}: {type(exc).__name__}). Try again later.") from None
        if not isinstance(body, dict):
            raise ProviderError(f"Your company's identity provider sent an unusable {what}.")
        return body

    async def metadata(self) -> ProviderMetadata:
        """OIDC Discovery 4: ``{issuer}/.well-known/openid-configuration``, whose ``issuer``
        must be exactly the configured one (section 4.3)."""
        async with self._meta_lock:
            if self._meta is None or time.monotonic() - self._meta_at > METADATA_TTL:
                doc = await self._get_json(self.issuer.rstrip("/") +
                                           "/.well-known/openid-configuration",
                                           "discovery document")
                self._meta, self._meta_at = self._parse(doc), time.monotonic()
            return self._meta

    def _parse(self, doc: dict[str, Any]) -> ProviderMetadata:
        if doc.get("issuer") != self.issuer:
            raise ProviderError("The identity provider's discovery document names another "
                                "issuer than GATEWAY_SSO_ISSUER.")
        urls = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = doc.get(name)
            if not isinstance(value, str) or not value.startswith(("https://", "http://")):
                raise ProviderError(f"The identity provider's discovery document has no "
                                    f"usable {name}.")
            urls[name] = value
        offered = doc.get("id_token_signing_alg_values_supported", ["RS256"])
        algs = tuple(a for a in offered if a in ASYMMETRIC_ALGS) if isinstance(
            offered, list) else ()
        if not algs:
            raise ProviderError("The identity provider signs ID tokens with no algorithm this "
                                "server accepts.")
        return ProviderMetadata(
            issuer=self.issuer, algorithms=algs, iss_parameter_supported=doc.get(
                "authorization_response_iss_parameter_supported") is True, **urls)

    async def signing_key(self, kid: str, alg: str) -> jwt.PyJWK:
        """The provider's key ``kid`` for ``alg``; refetches the JWKS when ``kid`` is new
        (key rotation), at most every ``JWKS_MIN_REFETCH`` seconds."""
        try:
            key = await self._keys.key(kid or None, alg)
        except KeySetUnavailable as exc:
            raise ProviderError(f"Your company's identity provider could not be reached "
                                f"(keys: {exc}). Try again later.") from None
        if key is not None:
            return key
        if self._keys.knows(kid or None):
            raise jwt.InvalidAlgorithmError("The ID token's algorithm does not match its key.")
        raise jwt.InvalidKeyError("The ID token is signed with a key the identity "
                                  "provider does not publish.")

    async def redeem_code(self, code: str, *, client_id: str, client_secret: str,
                          redirect_uri: str, code_verifier: str) -> dict[str, Any]:
        """RFC 6749 4.1.3 with RFC 7636 ``code_verifier``; ``client_secret_basic`` with id
        and secret form-encoded first (section 2.3.1)."""
        meta = await self.metadata()
        data = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": redirect_uri, "code_verifier": code_verifier}
        basic = client_secret_basic(client_id, client_secret)
        try:
            async with self.session.post(meta.token_endpoint, data=data, timeout=HTTP_TIMEOUT,
                                         headers={"Accept": "application/json",
                                                  "Authorization": basic}) as resp:
                status = resp.status
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(f"Your company's identity provider could not be reached "
                                f"(token endpoint: {type(exc).__name__}).") from None
        except ValueError:
            raise ProviderError("Your company's identity provider answered the token "
                                "request with something that is not JSON.") from None
        if status == 200 and isinstance(body, dict):
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if 400 <= status < 500 and isinstance(error, str) and error != "invalid_client":
            raise SSOError(400, "refused", "Your company's identity provider refused the "
                           f"sign-in code ({safe_code(error)}). Start again.")
        raise ProviderError(f"Your company's identity provider answered {status} to the "
                            f"token request ({safe_code(error or 'no error code')}).")


def safe_code(code: str) -> str:
    return code if re.fullmatch(r"[a-z_ ]{1,64}", code) else "error"


_ID_TOKEN_MESSAGES: dict[type[Exception], str] = {
    jwt.ExpiredSignatureError: "The ID token has expired.",
    jwt.ImmatureSignatureError: "The ID token is dated in the future.",
    jwt.InvalidIssuerError: "The ID token was issued by another provider (iss).",
    jwt.InvalidAudienceError: "The ID token was issued for another application (aud).",
    jwt.InvalidSignatureError: "The ID token's signature does not verify.",
    jwt.DecodeError: "The ID token is malformed.",
}


async def validate_id_token(provider: OpenIDProvider, token: object, *, client_id: str,
                            nonce: str) -> dict[str, Any]:
    """OIDC Core 3.1.3.7: signature with the provider's key and an allowed algorithm,
    ``iss`` exactly the issuer, ``aud`` containing us (``azp`` when several), ``exp`` and
    ``iat`` within ``LEEWAY``, ``nonce`` the one this sign-in sent. Raises ``PyJWTError``."""
    if not isinstance(token, str) or not token:
        raise ProviderError("Your company's identity provider returned no ID token.")
    meta = await provider.metadata()
    header = jwt.get_unverified_header(token)
    alg = header.get("alg")
    if alg not in meta.algorithms:
        raise jwt.InvalidAlgorithmError(f"The ID token is signed with {str(alg)[:16]!r}, "
                                        "which this server does not accept.")
    key = await provider.signing_key(str(header.get("kid", "")), alg)
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=list(meta.algorithms), audience=client_id,
        issuer=provider.issuer, leeway=LEEWAY,
        options={"require": ["iss", "sub", "aud", "exp", "iat"]})
    audiences = [claims["aud"]] if isinstance(claims["aud"], str) else list(claims["aud"])
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise jwt.InvalidTokenError("The ID token was issued to another authorized party "
                                    "(azp).")
    sent = claims.get("nonce")
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), nonce.encode()):
        raise jwt.InvalidTokenError("The ID token's nonce does not match this sign-in.")
    sub = claims["sub"]
    if not isinstance(sub, str) or not 0 < len(sub) <= 255:
        raise jwt.InvalidTokenError("The ID token's subject (sub) is not valid.")
    return claims


def explain_jwt_error(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"The ID token lacks the {exc.claim!r} claim."
    return _ID_TOKEN_MESSAGES.get(type(exc), str(exc))
