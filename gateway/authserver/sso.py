"""Single sign-on through the company's OpenID Connect provider.

OpenID Connect Core 1.0 section 3.1 (authorization code flow), with PKCE (RFC 7636,
``S256``) and the provider found by OpenID Connect Discovery 1.0 section 4.

- ``GET /oauth/sso/start?next=...`` makes ``state``, ``nonce`` and a PKCE verifier, keeps
  them in Redis (``as:sso_state:{digest(state)}``, 10 minutes, taken with GETDEL) and sends
  the browser to the provider's ``authorization_endpoint``.
- ``GET /oauth/sso/callback`` checks the state (single use, and bound to the browser that
  started by the ``gw_sso_browser`` cookie against login CSRF, RFC 6749 section 10.12),
  redeems the code with ``client_secret_basic``, validates the ID token (section 3.1.3.7)
  against the provider's JWKS, maps the user by subject and starts a session.

A user is found by ``(issuer, sub)``; the first login names the account after the
``GATEWAY_SSO_USERNAME_CLAIM`` claim (or ``sub``), and never takes over an existing
account that is not linked to that subject.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from yarl import URL

from gateway.appkeys import AUTH_SERVER, SSO_PROVIDER
from gateway.authserver import signin_flow as flow
from gateway.authserver.oidc import (
    OpenIDProvider,
    ProviderError,
    SSOError,
    explain_jwt_error,
    safe_code,
    validate_id_token,
)
from gateway.authserver.roles import admin_groups, record_sso_role, sso_admin
from gateway.authserver.server import server_of

CALLBACK_PATH = "/oauth/sso/callback"
METHOD = "sso"
FLOW = ""  # the state prefix of this flow (company SSO, the first one: none)
_USERNAME_BAD = re.compile(r"[^a-z0-9._@+-]+")
# OAuth 2.0 error codes (RFC 6749 section 4.1.2.1, OIDC Core 3.1.2.6) users may see
_PROVIDER_ERRORS = {
    "access_denied": "The sign-in was cancelled or refused at your company's identity "
                     "provider.",
    "login_required": "Your company's identity provider asked you to sign in again.",
    "consent_required": "Your company's identity provider needs your consent first.",
    "temporarily_unavailable": "Your company's identity provider is busy. Try again soon.",
}




async def _provider_ctx(app: web.Application) -> AsyncIterator[None]:
    """The HTTP client and the provider's cached metadata and keys, owned by the app."""
    server = app[AUTH_SERVER].server
    if server is None or not server.settings.sso_issuer:
        yield
        return
    session = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
    app[SSO_PROVIDER] = OpenIDProvider(session, server.settings.sso_issuer)
    try:
        yield
    finally:
        await session.close()


def _provider(request: web.Request) -> OpenIDProvider:
    provider = request.app.get(SSO_PROVIDER)
    settings = server_of(request).settings
    if provider is None or not settings.sso_client_id:
        raise SSOError(404, "not_configured", "Single sign-on is not configured here.")
    return provider


async def sso_start(request: web.Request) -> web.StreamResponse:
    """OIDC Core 3.1.2.1: the authentication request, sent through the browser."""
    server = server_of(request)
    try:
        provider = _provider(request)
        if await server.store.hit(f"sso-start:{server.source(request)}", 60) > 60:
            raise SSOError(429, "rate_limited", "Too many sign-in attempts. Wait a minute.")
        meta = await provider.metadata()
    except ProviderError as exc:
        return await flow.refuse(request, SSOError(502, "provider_unavailable", str(exc)),
                                 method=METHOD)
    except SSOError as exc:
        return await flow.refuse(request, exc, method=METHOD)
    nonce = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)  # RFC 7636 4.1: 43 to 128 characters
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state, browser = await flow.new_state(request, {"nonce": nonce, "verifier": verifier},
                                          flow=FLOW)
    location = URL(meta.authorization_endpoint).update_query({
        "response_type": "code", "client_id": server.settings.sso_client_id,
        "redirect_uri": server.url(CALLBACK_PATH), "scope": _scopes(server.settings.sso_scopes),
        "state": state, "nonce": nonce, "code_challenge": challenge,
        "code_challenge_method": "S256"})
    raise flow.to_provider(request, str(location), browser)


def _scopes(configured: str) -> str:
    scopes = configured.split()
    return " ".join(scopes if "openid" in scopes else ["openid", *scopes])


async def sso_callback(request: web.Request) -> web.StreamResponse:
    """OIDC Core 3.1.2.5 to 3.1.3.7: the authentication response, the code redeemed and
    the ID token validated; then the local session."""
    try:
        provider = _provider(request)
        record = await flow.take_state(request, flow=FLOW)
        username, sub = await _complete(request, provider, record)
    except ProviderError as exc:
        return await flow.refuse(request, SSOError(502, "provider_unavailable", str(exc)),
                                 method=METHOD)
    except SSOError as exc:
        return await flow.refuse(request, exc, method=METHOD)
    raise await flow.signed_in(request, record, username=username, sub=sub, method=METHOD)


async def _complete(request: web.Request, provider: OpenIDProvider,
                    record: dict[str, str]) -> tuple[str, str]:
    server = server_of(request)
    settings = server.settings
    query = request.query
    meta = await provider.metadata()
    # RFC 9207 section 2.4: the response must come from the provider we asked (mix-up)
    if ("iss" in query or meta.iss_parameter_supported) and query.get("iss") != meta.issuer:
        raise SSOError(400, "invalid_response", "The sign-in response names another "
                       "identity provider (iss).")
    if "error" in query:
        code = query["error"]
        message = _PROVIDER_ERRORS.get(code, "Your company's identity provider refused the "
                                       "sign-in.")
        raise SSOError(400, "denied", f"{message} ({safe_code(code)})")
    code = query.get("code", "")
    if not code:
        raise SSOError(400, "invalid_response", "The sign-in response carries no code.")
    tokens = await provider.redeem_code(
        code, client_id=settings.sso_client_id, client_secret=settings.sso_client_secret,
        redirect_uri=server.url(CALLBACK_PATH), code_verifier=record["verifier"])
    try:
        claims = await validate_id_token(
            provider, tokens.get("id_token"), client_id=settings.sso_client_id,
            nonce=record["nonce"])
    except jwt.PyJWTError as exc:
        raise SSOError(400, "invalid_id_token", explain_jwt_error(exc)) from None
    return await _local_user(request, meta.issuer, claims)


def username_from(claims: dict[str, Any], claim: str) -> str:
    """The account name a first login gets: the claim, made a safe username, else ``sub``."""
    for value in (claims.get(claim), claims["sub"]):
        if isinstance(value, str):
            name = _USERNAME_BAD.sub("-", value.lower()).strip("-.")[:128]
            if name:
                return name
    return "sso-" + hashlib.sha256(str(claims["sub"]).encode()).hexdigest()[:16]


async def _local_user(request: web.Request, issuer: str, claims: dict[str, Any]
                      ) -> tuple[str, str]:
    """Find the user linked to ``(issuer, sub)``, or link a new account on first login."""
    server = server_of(request)
    store = server.store
    sso_sub = str(claims["sub"])
    username = await store.sso_username(issuer, sso_sub)
    if username is None:
        username = username_from(claims, server.settings.sso_username_claim)
    user_key = store.keys.as_user(username)
    # HSETNX on ``sub``: only one login can create the record, and never over an
    # existing (local or other) account, which would be an account takeover
    if await store.redis.hsetnx(user_key, "sub", "u_" + uuid.uuid4().hex):
        await store.save_user(username, {"sso": issuer, "sso_sub": sso_sub,
                                         "created_at": str(int(time.time()))})
        await store.audit("user.added", user=username, actor="sso", method="sso")
    user = await store.get_user(username)
    if user.get("sso") != issuer or user.get("sso_sub") != sso_sub:
        raise SSOError(409, "conflict", f"The account name {username!r} already belongs to "
                       "another user. Ask an administrator to link your company account.")
    await store.map_sso(issuer, sso_sub, username)
    # the admin role, as the provider's groups say today (GATEWAY_ADMIN_GROUPS)
    tenant = server.issuer.tenant
    groups = (await tenant.get()).groups if tenant is not None else \
        admin_groups(server.settings.admin_groups)
    await record_sso_role(store, username, sso_admin(claims, groups))
    return username, user["sub"]


def add_routes(app: web.Application) -> None:
    """Register this module's endpoints and the provider client's lifetime."""
    app.cleanup_ctx.append(_provider_ctx)
    app.router.add_get("/oauth/sso/start", sso_start)
    app.router.add_get(CALLBACK_PATH, sso_callback)
