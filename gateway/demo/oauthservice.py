"""A stand-in for Anaplan's OAuth service (``us1a.app.anaplan.com``), its
``/token/validate`` and an API that takes only the access tokens it issued.

- ``GET /auth/authorize?response_type=code&client_id&redirect_uri&scope&state``: the
  person is signed in already (``user``) and approves at once: a redirect to
  ``redirect_uri`` (one of ``redirect_uris``) with ``code`` and ``state``;
- ``POST /oauth/token``, JSON or form body: ``authorization_code`` (``code``,
  ``redirect_uri``, the client's id and secret) and ``refresh_token``. Refresh tokens are
  rotatable by default: each is used once, and a second use ends its whole family
  (reuse detection); ``rotatable=False`` keeps one refresh token;
- ``GET /token/validate`` with ``AnaplanAuthToken``: ``userInfo.userGuid`` and
  ``userInfo.userId`` (the email);
- every other path: the API, which answers 401 to any token it did not issue, that
  expired or whose family ended.

``calls`` counts the calls per endpoint (``refresh`` for refresh-token grants);
``refuse_refresh`` refuses every refresh; :meth:`stale` expires every access token.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL


@dataclass
class _Family:
    """One sign-in's tokens: revoked together."""

    user: str
    scope: str
    dead: bool = False


@dataclass
class OAuthStandIn:
    """Anaplan's OAuth service, token validation and API, in memory."""

    client_id: str
    client_secret: str
    redirect_uris: list[str] = field(default_factory=list)
    user: str = "alice@example.com"
    lifetime: float = 2100.0
    rotatable: bool = True
    #: seconds a refresh-token grant takes to answer (to make races visible)
    refresh_delay: float = 0.0
    refuse_refresh: bool = False
    calls: Counter[str] = field(default_factory=Counter)
    #: the Authorization headers the API received, in order
    api_authorizations: list[str] = field(default_factory=list)
    _codes: dict[str, tuple[str, _Family]] = field(default_factory=dict)
    _access: dict[str, tuple[float, _Family]] = field(default_factory=dict)
    _refresh: dict[str, tuple[bool, _Family]] = field(default_factory=dict)  # used?

    # -- helpers for tests ---------------------------------------------------------

    @staticmethod
    def guid(user: str) -> str:
        """The ``userGuid`` of ``user``: 32 hex digits, as Anaplan's."""
        return uuid.uuid5(uuid.NAMESPACE_OID, user).hex

    def stale(self) -> None:
        """Every access token issued so far is expired from now on."""
        for token, (_, family) in list(self._access.items()):
            self._access[token] = (0.0, family)

    def live(self, token: str) -> _Family | None:
        found = self._access.get(token)
        if found is None or found[0] <= time.time() or found[1].dead:
            return None
        return found[1]

    # -- the OAuth service -----------------------------------------------------------

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        self.calls["authorize"] += 1
        q = request.query
        if q.get("client_id") != self.client_id or q.get("redirect_uri") not in \
                self.redirect_uris:
            return web.json_response({"error": "invalid_request",
                                      "error_description": "unknown client or redirect"},
                                     status=400)
        target = URL(q["redirect_uri"])
        if q.get("response_type") != "code":
            raise web.HTTPFound(str(target.update_query(
                error="unsupported_response_type", state=q.get("state", ""))))
        code = secrets.token_urlsafe(24)
        self._codes[code] = (q["redirect_uri"], _Family(self.user, q.get("scope", "")))
        raise web.HTTPFound(str(target.update_query(code=code, state=q.get("state", ""))))

    @staticmethod
    def _error(code: str, description: str, status: int = 400) -> web.Response:
        return web.json_response({"error": code, "error_description": description},
                                 status=status)

    async def token(self, request: web.Request) -> web.Response:
        body: dict[str, Any]
        if request.content_type == "application/json":
            body = await request.json()
        else:
            body = dict(await request.post())
        grant = body.get("grant_type")
        self.calls["refresh" if grant == "refresh_token" else "token"] += 1
        if body.get("client_id") != self.client_id or not secrets.compare_digest(
                str(body.get("client_secret", "")), self.client_secret):
            return self._error("invalid_client", "Client authentication failed", 401)
        if grant == "authorization_code":
            found = self._codes.pop(str(body.get("code", "")), None)
            if found is None or found[0] != body.get("redirect_uri"):
                return self._error("invalid_grant", "Invalid authorization code")
            return self._issue(found[1], None)
        if grant == "refresh_token":
            if self.refresh_delay:
                await asyncio.sleep(self.refresh_delay)
            value = str(body.get("refresh_token", ""))
            known = self._refresh.get(value)
            if known is None or known[1].dead or self.refuse_refresh:
                return self._error("invalid_grant", "Invalid refresh token")
            used, family = known
            if used:  # a rotated-away refresh token used again: the family ends
                family.dead = True
                self.calls["reuse_detected"] += 1
                return self._error("invalid_grant", "Refresh token reuse")
            if self.rotatable:
                self._refresh[value] = (True, family)
            return self._issue(family, None if self.rotatable else value)
        return self._error("unsupported_grant_type", "Unsupported grant type")

    def _issue(self, family: _Family, keep_refresh: str | None) -> web.Response:
        access = secrets.token_urlsafe(32)
        self._access[access] = (time.time() + self.lifetime, family)
        refresh = keep_refresh or secrets.token_urlsafe(32)
        self._refresh.setdefault(refresh, (False, family))
        granted = " ".join(s for s in family.scope.split() if s != "profile")
        return web.json_response({
            "access_token": access, "refresh_token": refresh, "token_type": "Bearer",
            "expires_in": int(self.lifetime), "scope": granted,
            "id_token": "stand-in." + secrets.token_urlsafe(8)})

    # -- the token service's validation, and the API ------------------------------------

    def _presented(self, request: web.Request) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return value.strip() if scheme == "AnaplanAuthToken" and value.strip() else None

    async def validate(self, request: web.Request) -> web.Response:
        self.calls["validate"] += 1
        value = self._presented(request)
        if value is None:
            return web.json_response({"status": "FAILURE_BAD_HEADER",
                                      "statusMessage": "Bad header"}, status=400)
        family = self.live(value)
        if family is None:
            return web.json_response({"status": "FAILURE_BAD_CREDENTIAL",
                                      "statusMessage": "Token is not valid"}, status=401)
        expires = self._access[value][0]
        return web.json_response({
            "status": "SUCCESS", "statusMessage": "Token validated",
            "tokenInfo": {"expiresAt": int(expires * 1000), "tokenId": uuid.uuid4().hex},
            "userInfo": {"userGuid": self.guid(family.user), "userId": family.user,
                         "customerGuid": "8a81b09d5e8c6f27015e8d3d4f2b0001"}})

    async def api(self, request: web.Request) -> web.Response:
        self.calls["api"] += 1
        self.api_authorizations.append(request.headers.get("Authorization", ""))
        value = self._presented(request)
        family = self.live(value) if value else None
        if family is None:
            return web.json_response({"status": {"code": 401, "message": "Unauthorized"},
                                      "path": request.path}, status=401)
        await request.read()
        return web.json_response({"status": {"code": 200, "message": "Success"},
                                  "path": request.path, "user": family.user})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/auth/authorize", self.authorize)
        app.router.add_post("/oauth/token", self.token)
        app.router.add_get("/token/validate", self.validate)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app
