"""Sign in with Anaplan: the built-in server's people sign in at Anaplan's OAuth service.

Set ``GATEWAY_ANAPLAN_CLIENT_ID`` and ``GATEWAY_ANAPLAN_CLIENT_SECRET`` (a client
registered at Anaplan with ``{GATEWAY_ISSUER}/oauth/sso/anaplan/callback`` as its
redirect URI) and the login page offers it.

- ``GET /oauth/sso/anaplan/start?next=...`` keeps a single-use ``state`` in Redis (bound
  to the browser by the ``gw_sso_browser`` cookie, as company SSO does, against login
  CSRF) and sends the browser to ``{GATEWAY_ANAPLAN_OAUTH_URL}/auth/authorize`` with
  scope ``openid email offline_access``.
- ``GET /oauth/sso/anaplan/callback`` checks the state, redeems the code at
  ``/oauth/token`` (the client's id and secret in the JSON body), asks
  ``{GATEWAY_ANAPLAN_AUTH_URL}/token/validate`` who the token is for, and starts a
  session for that person: their subject is Anaplan's ``userGuid``, their account is
  named after ``userId`` (the email) on first sign-in. With ``GATEWAY_SECRET_KEYS`` set,
  the person's Anaplan tokens are kept, sealed, for ``credentials: user`` upstreams.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.appkeys import ANAPLAN_OAUTH, AUTH_SERVER
from gateway.authserver import signin_flow as flow
from gateway.authserver.oidc import SSOError, safe_code
from gateway.authserver.server import server_of
from gateway.authserver.sso import username_from
from gateway.config.settings import Settings
from gateway.forward.credentials.anaplan_oauth import AnaplanOAuth, OAuthDown, OAuthRefused
from gateway.state.keys import Keys
from gateway.state.sealing import parse_secret_keys
from gateway.state.signins import AnaplanSignIn, SignInStore

log = logging.getLogger(__name__)

START_PATH = "/oauth/sso/anaplan/start"
CALLBACK_PATH = "/oauth/sso/anaplan/callback"
SCOPE = "openid email offline_access"
METHOD = "anaplan"
FLOW = "anaplan:"  # the state prefix of this flow: never completes company SSO's


def configured(settings: Settings) -> bool:
    """True when the settings offer Sign in with Anaplan."""
    return bool(settings.anaplan_client_id and settings.anaplan_client_secret)


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    """The HTTP client to Anaplan, owned by the app."""
    settings = app[AUTH_SERVER].settings
    if not configured(settings):
        yield
        return
    session = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
    app[ANAPLAN_OAUTH] = AnaplanOAuth(
        session, oauth_url=settings.anaplan_oauth_url, auth_url=settings.anaplan_auth_url,
        client_id=settings.anaplan_client_id, client_secret=settings.anaplan_client_secret)
    try:
        yield
    finally:
        await session.close()


def _client(request: web.Request) -> AnaplanOAuth:
    client = request.app.get(ANAPLAN_OAUTH)
    if client is None:
        raise SSOError(404, "not_configured", "Sign in with Anaplan is not configured here.")
    return client


async def start(request: web.Request) -> web.StreamResponse:
    """RFC 6749 4.1.1: the authorization request, sent through the browser."""
    server = server_of(request)
    try:
        client = _client(request)
        if await server.store.hit(f"anaplan-start:{server.source(request)}", 60) > 60:
            raise SSOError(429, "rate_limited", "Too many sign-in attempts. Wait a minute.")
    except SSOError as exc:
        return await flow.refuse(request, exc, method=METHOD)
    state, browser = await flow.new_state(request, {}, flow=FLOW)
    location = URL(client.authorize_url).update_query({
        "response_type": "code", "client_id": client.client_id,
        "redirect_uri": server.url(CALLBACK_PATH), "scope": SCOPE, "state": state})
    raise flow.to_provider(request, str(location), browser)


async def callback(request: web.Request) -> web.StreamResponse:
    """RFC 6749 4.1.2 and 4.1.3: the answer, the code redeemed; then the local session."""
    try:
        client = _client(request)
        record = await flow.take_state(request, flow=FLOW)
        username, sub = await _complete(request, client)
    except OAuthDown as exc:
        return await flow.refuse(request, SSOError(502, "provider_unavailable",
                                                   f"Anaplan could not be reached. ({exc})"),
                                 method=METHOD)
    except SSOError as exc:
        return await flow.refuse(request, exc, method=METHOD)
    raise await flow.signed_in(request, record, username=username, sub=sub, method=METHOD)


async def _complete(request: web.Request, client: AnaplanOAuth) -> tuple[str, str]:
    server = server_of(request)
    query = request.query
    if "error" in query:
        raise SSOError(400, "denied", "Anaplan refused the sign-in "
                       f"({safe_code(query['error'])}).")
    code = query.get("code", "")
    if not code:
        raise SSOError(400, "invalid_response", "The sign-in response carries no code.")
    try:
        tokens = await client.redeem_code(code, server.url(CALLBACK_PATH))
        person = await client.person(tokens.access_token)
    except OAuthRefused as exc:
        raise SSOError(400, "refused", "Anaplan refused the sign-in code "
                       f"({safe_code(exc.code) if exc.code else 'refused'}).") from None
    username, sub = await _local_user(request, client.oauth_url, person.user_guid,
                                      person.user_id)
    if server.settings.secret_keys.strip():  # kept for ``credentials: user`` upstreams
        signins = SignInStore(server.store.redis, Keys(server.settings.key_prefix),
                              parse_secret_keys(server.settings.secret_keys))
        await signins.save(sub, AnaplanSignIn(username, tokens.access_token,
                                              tokens.refresh_token, tokens.expires_at,
                                              time.time()))
    return username, sub


async def _local_user(request: web.Request, issuer: str, guid: str, email: str
                      ) -> tuple[str, str]:
    """The account linked to Anaplan's ``userGuid``, made on first sign-in: its subject is
    the ``userGuid`` itself, so grants and people governance speak of the same person."""
    store = server_of(request).store
    username = await store.sso_username(issuer, guid)
    if username is None:
        username = username_from({"sub": guid, "email": email}, "email")
    # HSETNX on ``sub``: never over an existing (local or other) account: a takeover
    if await store.redis.hsetnx(store.keys.as_user(username), "sub", guid):
        await store.save_user(username, {"sso": issuer, "sso_sub": guid,
                                         "created_at": str(int(time.time()))})
        await store.audit("user.added", user=username, actor=METHOD, method=METHOD)
    user = await store.get_user(username)
    if user.get("sso") != issuer or user.get("sso_sub") != guid:
        raise SSOError(409, "conflict", f"The account name {username!r} already belongs to "
                       "another user. Ask an administrator to link your Anaplan account.")
    await store.map_sso(issuer, guid, username)
    return username, user["sub"]


def add_routes(app: web.Application) -> None:
    """Register this module's endpoints and the Anaplan client's lifetime."""
    app.cleanup_ctx.append(_client_ctx)
    app.router.add_get(START_PATH, start)
    app.router.add_get(CALLBACK_PATH, callback)
