"""The authorization code grant (RFC 6749 section 4.1) with PKCE (RFC 7636).

- ``GET /oauth/authorize`` (section 4.1.1) checks the request and shows the consent page
  to the signed-in user (or sends them to sign in first).
- ``POST /oauth/authorize`` takes the user's decision and redirects back to the client
  with a code or ``error=access_denied`` (section 4.1.2), always with ``state`` and the
  RFC 9207 ``iss`` parameter, so a client talking to several servers can tell who answered.
- The ``authorization_code`` handler of the token endpoint (section 4.1.3) redeems a code
  once. Section 4.1.2: "If an authorization code is used more than once, the
  authorization server MUST deny the request and SHOULD revoke (when possible) all tokens
  previously issued based on that authorization code": a second redemption ends the grant.

Section 4.1.2.1: until the client and its redirect URI are known to match, errors are
shown to the user as a page and never redirected (no open redirector); after that they go
back to the client. The pending request between the consent page and the decision lives
in Redis (``{prefix}as:authz:{digest}``, :data:`PENDING_TTL`), keyed by a random id in
a hidden field: the client, redirect URI and scope are never read back from the form.
"""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web
from multidict import MultiDictProxy, MultiMapping
from yarl import URL

from gateway.authserver import rfc7636
from gateway.authserver.errors import AccessDenied, InvalidGrant, InvalidRequest, OAuthError
from gateway.authserver.hashing import new_token
from gateway.authserver.models import ADMIN_SCOPE, GRANT_CODE, OAuthClient, narrow_scope
from gateway.authserver.pages import (
    current_user,
    forbidden_csrf,
    login_redirect,
    posted_form,
    render,
)
from gateway.authserver.roles import NOT_ADMIN, is_admin
from gateway.authserver.server import AuthorizationServer, server_of

PENDING_TTL = 600     # seconds a consent page stays answerable
CODE_TTL = 60         # section 4.1.2: "A maximum authorization code lifetime of 10 minutes
                      # is RECOMMENDED"; a client redeems at once, so one minute is plenty
CODE_USE_TTL = 600    # how long a redeemed code is remembered to catch its replay
MAX_STATE = 2048

# What each scope lets the client do, in the words a person approving it would use
SCOPE_TEXT = {
    "anaplan:read": "Read your Anaplan data: workspaces, models, lists and exports.",
    "anaplan:write": "Change your Anaplan data: run imports and processes, write and delete.",
}


class UnsupportedResponseType(OAuthError):
    """Section 4.1.2.1: only ``response_type=code`` is offered."""

    error = "unsupported_response_type"


class UntrustedRequest(Exception):
    """An error found before the redirect URI is trusted: shown, never redirected."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


def scope_lines(scope: str) -> list[tuple[str, str]]:
    """Each scope in words, for a consent page: ``(text, scope)`` pairs."""
    return [(SCOPE_TEXT.get(s, f"Use the permission {s}."), s) for s in scope.split()]


def error_page(request: web.Request, title: str, message: str, *, error: str = "",
               status: int = 400) -> web.Response:
    return render(request, "authorize_error.html",
                  {"title": title, "message": message, "error": error}, status=status)


def redirect_to_client(server: AuthorizationServer, redirect_uri: str,
                       params: dict[str, str]) -> web.HTTPSeeOther:
    """Section 4.1.2: add the response to the redirect URI, keeping its own query
    (section 3.1.2), plus ``iss`` (RFC 9207 section 2)."""
    parts = urlsplit(redirect_uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(k, v) for k, v in params.items() if v]
    query.append(("iss", server.issuer_url))
    location = urlunsplit(parts._replace(query=urlencode(query)))
    return web.HTTPSeeOther(location, headers={"Cache-Control": "no-store",
                                               "Referrer-Policy": "no-referrer"})


def error_redirect(server: AuthorizationServer, redirect_uri: str, exc: OAuthError,
                   state: str | None) -> web.HTTPSeeOther:
    return redirect_to_client(server, redirect_uri, {
        "error": exc.error, "error_description": exc.description, "state": state or ""})


def _single(query: MultiMapping[str], name: str) -> str | None:
    """Section 3.1: "Request and response parameters MUST NOT be included more than once"."""
    values = query.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"The parameter {name} is repeated.")
    return values[0] if values else None


async def trusted_client(server: AuthorizationServer, query: MultiMapping[str]
                         ) -> tuple[OAuthClient, str, bool]:
    """The client, its redirect URI and whether the request named it (section 4.1.3
    then requires it again at the token endpoint). Raises :class:`UntrustedRequest`."""
    try:
        client_id, redirect_uri = _single(query, "client_id"), _single(query, "redirect_uri")
    except InvalidRequest as exc:
        raise UntrustedRequest("invalid_request", exc.description) from None
    if not client_id:
        raise UntrustedRequest("invalid_request", "The request names no client (client_id).")
    client = await server.store.get_client(client_id)
    if client is None:
        raise UntrustedRequest("invalid_client", "No application with this client_id exists.")
    if client.disabled:
        # no bounce through an application the administrator turned off
        raise UntrustedRequest("unauthorized_client",
                               f"The application {client.name} is disabled.")
    if client.grant_type != GRANT_CODE:
        flow = "client credentials (machine)" if client.machine else "device"
        raise UntrustedRequest("unauthorized_client", f"The application {client.name} uses "
                               f"the {flow} flow, not the authorization code flow.")
    if redirect_uri is None:
        if len(client.redirect_uris) != 1:
            raise UntrustedRequest("invalid_request", "The request must name a redirect_uri: "
                                   "this application has several.")
        return client, client.redirect_uris[0], False
    if redirect_uri not in client.redirect_uris:  # exact match (section 3.1.2.3)
        raise UntrustedRequest("invalid_request", "The redirect_uri is not registered for "
                               "this application.")
    return client, redirect_uri, True


def check_request(client: OAuthClient, query: MultiMapping[str]) -> tuple[str, str]:
    """Section 4.1.1 and RFC 7636 section 4.3: returns the granted scope and the challenge."""
    for name in ("response_type", "scope", "state", "code_challenge",
                 "code_challenge_method"):
        _single(query, name)
    if query.get("response_type") != "code":
        raise UnsupportedResponseType("Only response_type=code is supported.")
    if len(query.get("state", "")) > MAX_STATE:
        raise InvalidRequest("state is too long.")
    challenge = rfc7636.check_challenge(query.get("code_challenge"),
                                        query.get("code_challenge_method"))
    return narrow_scope(query.get("scope"), client.scopes), challenge


def _pending_key(server: AuthorizationServer, request_id: str) -> str:
    return server.store.keys.as_authz(server.store.digest(request_id))


def _login_redirect(request: web.Request) -> web.HTTPSeeOther:
    # re-encode the query so a hand-typed "redirect_uri=https://..." survives the login
    # page's check on its ``next`` (which refuses a literal "//")
    canonical = URL("/oauth/authorize?" + urlencode(list(request.query.items())),
                    encoded=True)
    return login_redirect(request.clone(rel_url=canonical))


async def authorize_get(request: web.Request) -> web.StreamResponse:
    """Section 4.1.1: validate, then ask the signed-in user to decide."""
    server = server_of(request)
    try:
        client, redirect_uri, named = await trusted_client(server, request.query)
    except UntrustedRequest as exc:
        return error_page(request, "This sign-in request is not valid", exc.message,
                          error=exc.error)
    state = request.query.getone("state", None)
    try:
        scope, challenge = check_request(client, request.query)
    except OAuthError as exc:
        raise error_redirect(server, redirect_uri, exc, state) from None
    user = await current_user(request)
    if user is None:
        raise _login_redirect(request)
    if ADMIN_SCOPE in scope.split() and not await is_admin(server.store, user["username"]):
        return error_page(request, "Administrator access refused", NOT_ADMIN,
                          error="access_denied", status=403)
    request_id = secrets.token_urlsafe(24)
    pending = {"client_id": client.client_id, "redirect_uri": redirect_uri,
               "redirect_uri_named": named, "scope": scope, "state": state,
               "code_challenge": challenge, "username": user["username"]}
    await server.store.redis.set(_pending_key(server, request_id), json.dumps(pending),
                                 ex=PENDING_TTL)
    return consent_page(request, client, scope, redirect_uri, user["username"], request_id)


def consent_page(request: web.Request, client: OAuthClient, scope: str, redirect_uri: str,
                 username: str, request_id: str) -> web.Response:
    """The consent screen: who asks, for what, and where the answer goes."""
    return render(request, "consent.html", {
        "client_name": client.name, "client_id": client.client_id, "username": username,
        "scopes": scope_lines(scope), "host": urlsplit(redirect_uri).netloc,
        "request_id": request_id})


async def authorize_post(request: web.Request) -> web.StreamResponse:
    """The user's decision (section 4.1.2): a code, or ``access_denied``."""
    server = server_of(request)
    form = await posted_form(request)
    if form is None:
        return forbidden_csrf(request)
    user = await current_user(request)
    if user is None:
        return error_page(request, "You are signed out",
                          "Your session ended before you decided.", status=401)
    raw = await server.store.redis.getdel(
        _pending_key(server, str(form.get("request_id", ""))[:100]))
    if raw is None:
        return error_page(request, "This request expired", "The consent page was open too "
                          "long or was already answered.", error="invalid_request")
    pending: dict[str, Any] = json.loads(raw)
    if pending["username"] != user["username"]:
        return error_page(request, "Request refused",
                          "This request was made for another user.", error="access_denied",
                          status=403)
    client = await server.store.get_client(pending["client_id"])
    if client is None or client.disabled:
        return error_page(request, "This sign-in request is not valid",
                          "The application was disabled or deleted.", error="unauthorized_client")
    redirect_uri, state = pending["redirect_uri"], pending["state"]
    if "approve" not in form or "deny" in form:
        await server.store.audit("authorization.denied", client_id=client.client_id,
                                 user=user["username"])
        raise error_redirect(server, redirect_uri,
                             AccessDenied("The user denied the request."), state)
    if ADMIN_SCOPE in str(pending["scope"]).split() and not await is_admin(
            server.store, user["username"]):  # the role may have gone since the page
        return error_page(request, "Administrator access refused", NOT_ADMIN,
                          error="access_denied", status=403)
    try:
        grant = await server.issuer.new_grant(
            client, username=user["username"], sub=user["sub"], scope=pending["scope"],
            grant_type=GRANT_CODE, label=request.headers.get("User-Agent", ""))
    except AccessDenied as exc:  # self-service OAuth is off (tenant settings)
        raise error_redirect(server, redirect_uri, exc, state) from None
    code = new_token("gwac_")
    await server.store.save_code(server.store.digest(code), {
        "client_id": client.client_id, "redirect_uri": redirect_uri,
        "redirect_uri_named": pending["redirect_uri_named"], "scope": pending["scope"],
        "code_challenge": pending["code_challenge"], "grant_id": grant.grant_id,
        "username": user["username"]}, CODE_TTL)
    await server.store.audit("code.issued", client_id=client.client_id,
                             user=user["username"], grant_id=grant.grant_id)
    raise redirect_to_client(server, redirect_uri, {"code": code, "state": state or ""})


async def authorization_code_grant(server: AuthorizationServer, request: web.Request,
                                   client: OAuthClient, form: MultiDictProxy[str]
                                   ) -> dict[str, Any]:
    """Section 4.1.3 with RFC 7636 section 4.5: ``code``, ``redirect_uri``,
    ``code_verifier``. The client is already authenticated (section 3.2.1)."""
    code = form.get("code")
    if not code:
        raise InvalidRequest("code is required.")
    verifier = rfc7636.check_verifier(form.get("code_verifier"))
    digest = server.store.digest(code)
    record = await server.store.take_code(digest)
    if record is None:
        first_grant = await server.store.code_used_by(digest)
        if first_grant:
            await server.issuer.revoke_grant(first_grant, reason="code_replay",
                                             actor=client.client_id)
            await server.store.audit("code.replay_detected", client_id=client.client_id,
                                     grant_id=first_grant)
            raise InvalidGrant("This authorization code was already used; "
                               "the tokens issued for it are revoked.")
        raise InvalidGrant("The authorization code is invalid or expired.")
    grant_id = str(record["grant_id"])
    # remembered before any check, so a replay racing this redemption is caught too
    await server.store.remember_code_use(digest, grant_id, CODE_USE_TTL)
    try:
        if record["client_id"] != client.client_id:
            raise InvalidGrant("The authorization code was not issued to this client.")
        sent = form.get("redirect_uri")
        if (record["redirect_uri_named"] or sent is not None) \
                and sent != record["redirect_uri"]:
            raise InvalidGrant("redirect_uri differs from the authorization request's.")
        rfc7636.verify(verifier, record["code_challenge"])
        grant = await server.store.get_grant(grant_id)
        if grant is None or not grant.alive(client.policy):
            raise InvalidGrant("The authorization behind this code has ended.")
    except InvalidGrant:
        # the code is spent; its grant will never hold a token
        await server.issuer.revoke_grant(grant_id, reason="code_rejected",
                                         actor=client.client_id)
        raise
    body = await server.issuer.issue(client, grant, scope=record["scope"],
                                     grant_type=GRANT_CODE)
    after = await server.store.get_grant(grant_id)
    if after is None or after.revoked:
        # a replay revoked the grant while these tokens were made: revoke them too
        await server.issuer.revoke_grant(grant_id, reason="code_replay",
                                         actor=client.client_id)
        raise InvalidGrant("This authorization code was used twice; its tokens are revoked.")
    await server.store.audit("code.redeemed", client_id=client.client_id, grant_id=grant_id,
                             user=grant.username)
    return body


def add_routes(app: web.Application) -> None:
    """Register this module's endpoints."""
    app.router.add_get("/oauth/authorize", authorize_get)
    app.router.add_post("/oauth/authorize", authorize_post)
