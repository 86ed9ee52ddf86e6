"""Anaplan's own token check: ``GET https://auth.anaplan.com/token/validate``.

The token travels as ``Authorization: AnaplanAuthToken <token>``. A good token is
answered with 200 and ``{"status": "SUCCESS", "tokenInfo": {...}, "userInfo": {...}}``,
whose ``tokenInfo`` carries ``expiresAt`` (milliseconds since the epoch), ``tokenId``
and, for tokens issued to OAuth clients, the client's id, and whose ``userInfo``
carries ``userGuid``: the person's stable id, the token's subject (``TokenInfo.sub``,
what people governance keys on). A bad or expired token is answered with 401 (or a
``"status"`` of ``FAILURE``, ``FAILURE_BAD_CREDENTIAL``...).

Retries follow :mod:`.introspection`: connection errors and 5xx answers are retried
a bounded number of times with jittered backoff; 400 (a malformed token:
``FAILURE_BAD_HEADER``), 401 and 403 mean the token is no good, as does a
``FAILURE...`` status; any other answer, or one we cannot read, is
:class:`ValidatorUnavailable`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import aiohttp

from gateway.authn.validators.base import TokenInfo, ValidatorUnavailable
from gateway.authn.validators.retry import RetryPolicy

DEFAULT_URL = "https://auth.anaplan.com/token/validate"
DEFAULT_SCOPES = frozenset({"anaplan:read", "anaplan:write"})
# RFC 6750 section 2.1 b64token, widened to any visible ASCII: nothing that could
# end the header line or smuggle a second one.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
_CLIENT_ID_FIELDS = ("clientId", "client_id", "oauthClientId")


class AnaplanValidator:
    """Asks Anaplan's authentication service whether a token is good.

    Anaplan tokens carry no OAuth scopes: what a user may do is decided by
    Anaplan itself, from the user's workspace and model roles, on every API call.
    So that route policies written in scopes still apply, every good token is
    given ``default_scopes``. Operators who want less narrow a client's scopes
    with its client record (``gw:client:{client_id}`` ``scopes``), which works for
    tokens Anaplan reports a client id for, or set ``default_scopes`` to a
    read-only set for the whole gateway.
    """

    name = "anaplan"

    def __init__(self, session: aiohttp.ClientSession, url: str = DEFAULT_URL, *,
                 timeout: float = 2.0, retries: int = 2, backoff: float = 0.1,
                 default_scopes: frozenset[str] = DEFAULT_SCOPES) -> None:
        self._session = session
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 1.0))
        self._retry = RetryPolicy(retries, backoff)
        self._scopes = frozenset(default_scopes)

    async def validate(self, token: str) -> TokenInfo:
        if not _TOKEN_CHARS.fullmatch(token):
            return TokenInfo.inactive()
        status, body = await self._retry.fetch(lambda: self._session.get(
            self._url,
            headers={"Authorization": f"AnaplanAuthToken {token}", "Accept": "application/json"},
            timeout=self._timeout, allow_redirects=False,
        ), what="Anaplan token validation")
        if status in (400, 401, 403):
            # 400: the header the gateway built around the token was refused (Anaplan's
            # FAILURE_BAD_HEADER), which only the token can have caused
            return TokenInfo.inactive()
        if status != 200:
            raise ValidatorUnavailable(f"Anaplan token validation answered {status}")
        return self._parse(body)

    def _parse(self, body: bytes) -> TokenInfo:
        try:
            data: Any = json.loads(body)
        except ValueError:
            raise ValidatorUnavailable("Anaplan token validation answered invalid JSON") \
                from None
        if not isinstance(data, dict):
            raise ValidatorUnavailable("Anaplan token validation answered no JSON object")
        status = data.get("status")
        if isinstance(status, str) and status.startswith("FAILURE"):
            return TokenInfo.inactive()  # FAILURE, FAILURE_BAD_CREDENTIAL, ...
        info = data.get("tokenInfo")
        if status != "SUCCESS" or not isinstance(info, dict):
            raise ValidatorUnavailable(
                "Anaplan token validation answer lacks `status: SUCCESS` and `tokenInfo`")
        expires_at = info.get("expiresAt")
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise ValidatorUnavailable("Anaplan token validation answer lacks `expiresAt`")
        exp = expires_at / 1000.0
        if exp <= time.time():
            return TokenInfo.inactive()
        client_id = next((info[f] for f in _CLIENT_ID_FIELDS if isinstance(info.get(f), str)),
                         None)
        user = data.get("userInfo")
        user_guid = user.get("userGuid") if isinstance(user, dict) else None
        username = info.get("userName") if isinstance(info.get("userName"), str) else None
        return TokenInfo(
            active=True,
            client_id=client_id,
            scopes=self._scopes,
            exp=exp,
            sub=user_guid if isinstance(user_guid, str) and user_guid else None,
            username=username,
        )

    async def close(self) -> None:
        """The session belongs to the app; nothing to release here."""
