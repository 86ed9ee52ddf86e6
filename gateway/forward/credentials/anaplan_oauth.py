"""A client of Anaplan's OAuth service, on behalf of the people who signed in with it.

- ``POST {oauth_url}/oauth/token`` with a JSON body (as Anaplan's token endpoint takes
  it) carrying the gateway's ``client_id`` and ``client_secret``: the
  ``authorization_code`` grant at sign-in, the ``refresh_token`` grant later;
- ``GET {auth_url}/token/validate`` with ``AnaplanAuthToken``: who the token is for
  (``userInfo.userGuid``, and ``userInfo.userId``, the email).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp

_TIMEOUT = aiohttp.ClientTimeout(total=10.0)

__all__ = ["AnaplanOAuth", "AnaplanPerson", "OAuthDown", "OAuthRefused", "OAuthTokens"]


class OAuthRefused(Exception):
    """Anaplan refused the code, the refresh token or the access token (4xx). ``code`` is
    the OAuth error code when there was one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class OAuthDown(Exception):
    """Anaplan could not be reached, or failed (5xx, an answer that is not JSON)."""


@dataclass(frozen=True, slots=True)
class OAuthTokens:
    """What the token endpoint answered; ``expires_at`` in Unix seconds."""

    access_token: str
    refresh_token: str
    expires_at: float

    def __repr__(self) -> str:
        return f"OAuthTokens(expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True)
class AnaplanPerson:
    """Who an Anaplan token speaks for."""

    user_guid: str
    user_id: str  # the login email


class AnaplanOAuth:
    """The gateway's OAuth client at Anaplan (its id and secret)."""

    def __init__(self, session: aiohttp.ClientSession, *, oauth_url: str, auth_url: str,
                 client_id: str, client_secret: str) -> None:
        self.session = session
        self.oauth_url = oauth_url.rstrip("/")
        self.auth_url = auth_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret

    @property
    def authorize_url(self) -> str:
        return self.oauth_url + "/auth/authorize"

    async def redeem_code(self, code: str, redirect_uri: str) -> OAuthTokens:
        return await self._token({"grant_type": "authorization_code", "code": code,
                                  "redirect_uri": redirect_uri})

    async def refresh(self, refresh_token: str) -> OAuthTokens:
        """Raise :class:`OAuthRefused` when Anaplan will not take ``refresh_token``."""
        return await self._token({"grant_type": "refresh_token",
                                  "refresh_token": refresh_token})

    async def _token(self, body: dict[str, str]) -> OAuthTokens:
        body = {**body, "client_id": self.client_id, "client_secret": self.client_secret}
        now = time.time()
        doc = await self._call("POST", self.oauth_url + "/oauth/token", json=body)
        access, refresh = doc.get("access_token"), doc.get("refresh_token")
        if not isinstance(access, str) or not access:
            raise OAuthDown("Anaplan's token endpoint answered no access_token")
        if not isinstance(refresh, str):
            refresh = body.get("refresh_token", "")  # a non-rotatable one is kept
        expires_in = doc.get("expires_in")
        life = float(expires_in) if isinstance(expires_in, int | float) and \
            expires_in > 0 else 2100.0
        return OAuthTokens(access, refresh, now + life)

    async def person(self, access_token: str) -> AnaplanPerson:
        doc = await self._call("GET", self.auth_url + "/token/validate",
                               headers={"Authorization": "AnaplanAuthToken " + access_token})
        info = doc.get("userInfo")
        guid = info.get("userGuid") if isinstance(info, dict) else None
        if not isinstance(guid, str) or not guid or not isinstance(info, dict):
            raise OAuthDown("Anaplan's /token/validate answered no userInfo.userGuid")
        user_id = info.get("userId")
        return AnaplanPerson(guid, user_id if isinstance(user_id, str) else "")

    async def _call(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        try:
            async with self.session.request(method, url, timeout=_TIMEOUT, **kw) as resp:
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    doc = None
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OAuthDown(f"Anaplan could not be reached: {type(exc).__name__}") from None
        if status >= 500 or not isinstance(doc, dict):
            raise OAuthDown(f"Anaplan answered HTTP {status}")
        if status >= 400:
            code = doc.get("error") or doc.get("status") or ""
            raise OAuthRefused(f"Anaplan refused ({code or status})", str(code))
        return doc
