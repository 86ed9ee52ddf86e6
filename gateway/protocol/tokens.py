"""Token sources: find the bearer token in a request, refuse ambiguous or oversized ones.

RFC 6750 section 2.1 (``Authorization: Bearer``) plus Anaplan's own
``AnaplanAuthToken`` scheme. Tokens in the query string (RFC 6750 section 2.3) are
refused, under any of the names servers read them from and in any letter case: they
end up in logs and browser history. So are several Authorization
headers, which different servers would resolve differently.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import NamedTuple

from multidict import CIMultiDictProxy, MultiDictProxy

from gateway.protocol.errors import InvalidRequest, MissingToken

SCHEMES = {"bearer": "Bearer", "anaplanauthtoken": "AnaplanAuthToken"}
# RFC 6750 section 2.1 b64token
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_QUERY_TOKEN_PARAMS = frozenset({"access_token", "anaplanauthtoken", "auth_token", "token"})


class PresentedToken(NamedTuple):
    """The token as the client presented it. ``value`` must never be logged or stored.

    Immutable; a named tuple rather than a frozen dataclass, which costs a microsecond
    more to build and is built on every request."""

    scheme: str
    value: str

    def __repr__(self) -> str:  # keep the secret out of tracebacks and debug logs
        return f"PresentedToken(scheme={self.scheme!r}, value=<redacted>)"


def extract_token(headers: CIMultiDictProxy[str], query: MultiDictProxy[str] | Mapping[str, str],
                  *, max_header: int) -> PresentedToken:
    """Return the presented token or raise :class:`MissingToken` / :class:`InvalidRequest`."""
    # in any letter case: servers that bind parameters case-insensitively read
    # `?ACCESS_TOKEN=` as `access_token`, and it would reach the upstream's logs
    for name in query:
        if name.lower() in _QUERY_TOKEN_PARAMS:
            raise InvalidRequest(
                "Tokens in the query string are refused; send them in the Authorization header.")
    values = headers.getall("Authorization", [])
    if len(values) > 1:
        raise InvalidRequest("Several Authorization headers were sent; send exactly one.")
    if not values:
        raise MissingToken("The request carries no access token.")
    value = values[0]
    if len(value) > max_header:
        raise InvalidRequest(f"The Authorization header exceeds {max_header} bytes.")
    scheme, _, credentials = value.strip().partition(" ")
    canonical = SCHEMES.get(scheme.lower())
    if canonical is None:
        # RFC 6750 3.1: an unsupported scheme is as if no bearer token were sent
        raise MissingToken("The Authorization header does not use the Bearer or "
                           "AnaplanAuthToken scheme.")
    credentials = credentials.strip()
    if not credentials or _B64TOKEN.fullmatch(credentials) is None:
        raise InvalidRequest("The Authorization header carries a malformed token.")
    return PresentedToken(canonical, credentials)


class TokenDigester:
    """Keyed BLAKE2b digest of a token: the only form a token takes at rest or in memory keys.

    A keyed digest, not a plain hash, so that a copy of Redis does not let anyone
    confirm a guessed token without the key as well.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the token digest key must be at least 16 bytes")
        self._key = hashlib.blake2b(key, digest_size=32).digest()
        # keyed once: copying the keyed state is cheaper than keying it per token
        self._keyed = hashlib.blake2b(key=self._key, digest_size=20)

    def digest(self, token: str) -> str:
        hasher = self._keyed.copy()
        hasher.update(token.encode())
        return hasher.hexdigest()

    def matches(self, token: str, digest: str) -> bool:
        return hmac.compare_digest(self.digest(token), digest)
