"""RFC 7662 token introspection against any authorization server.

Section 2.1: POST ``token=...`` (form-encoded), authenticated here with
``client_secret_basic`` (RFC 6749 section 2.3.1). Section 2.2: the answer is a JSON
object whose ``active`` member alone decides; anything else is optional. Connection
errors and 5xx answers are retried a bounded number of times with exponential
backoff; 4xx answers are not retried. A 400 is about the token (``invalid_request``,
``invalid_token``, ``unsupported_token_type``...) and means "inactive", like any
token the server does not vouch for; a 400 ``invalid_client`` or
``unauthorized_client``, a 401 or 403 (the gateway's own credentials refused), any
other answer and every failure end in :class:`ValidatorUnavailable`, never in
"inactive".
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway.authn.validators.base import TokenInfo, ValidatorUnavailable, parse_scopes
from gateway.authn.validators.retry import RetryPolicy
from gateway.protocol.clientauth import client_secret_basic

#: the RFC 6749 section 5.2 errors about the caller's credentials: an outage, since
#: every token would be refused alike (RFC 6749 allows them at 400 as well as 401)
_CREDENTIAL_ERRORS = frozenset({"invalid_client", "unauthorized_client"})


def _error_of(body: bytes) -> str | None:
    """The ``error`` member of a JSON error answer, if there is one."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None


class IntrospectionClient:
    """Calls one RFC 7662 endpoint. The ``ClientSession`` is owned by the app, not by us."""

    name = "introspection"

    def __init__(self, session: aiohttp.ClientSession, url: str, *, client_id: str = "",
                 client_secret: str = "", timeout: float = 2.0, retries: int = 2,
                 backoff: float = 0.1) -> None:
        self._session = session
        self._url = url
        self._headers = {"Accept": "application/json"}
        if client_id:
            self._headers["Authorization"] = client_secret_basic(client_id, client_secret)
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 1.0))
        self._retry = RetryPolicy(retries, backoff)

    async def validate(self, token: str) -> TokenInfo:
        status, body = await self._retry.fetch(lambda: self._session.post(
            self._url, data={"token": token, "token_type_hint": "access_token"},
            headers=self._headers, timeout=self._timeout, allow_redirects=False,
        ), what="introspection endpoint")
        if status == 400 and _error_of(body) not in _CREDENTIAL_ERRORS:
            # about the token, not the gateway: oidc-provider, for one, answers 400
            # unsupported_token_type for a JWT it does not introspect
            return TokenInfo.inactive()
        if status != 200:
            raise ValidatorUnavailable(
                f"introspection endpoint answered {status}; check the gateway's introspection "
                "credentials")
        return self._parse(body)

    @staticmethod
    def _parse(body: bytes) -> TokenInfo:
        try:
            data: Any = json.loads(body)
        except ValueError:
            raise ValidatorUnavailable("introspection endpoint answered with invalid JSON") \
                from None
        if not isinstance(data, dict) or not isinstance(data.get("active"), bool):
            raise ValidatorUnavailable("introspection answer lacks a boolean `active` member")
        if not data["active"]:
            return TokenInfo.inactive()
        token_type = data.get("token_type")
        if isinstance(token_type, str) and token_type.lower() == "refresh_token":
            return TokenInfo.inactive()  # a refresh token is no access token
        exp = data.get("exp")
        client_id = data.get("client_id")
        return TokenInfo(
            active=True,
            client_id=str(client_id) if client_id is not None else None,
            scopes=parse_scopes(data),
            exp=float(exp) if isinstance(exp, int | float) else None,
            sub=str(data["sub"]) if data.get("sub") is not None else None,
            username=str(data["username"]) if data.get("username") is not None else None,
        )

    async def close(self) -> None:
        """The session belongs to the app; nothing to release here."""
