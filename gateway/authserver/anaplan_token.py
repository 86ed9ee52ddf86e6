"""Anaplan's token-service endpoints, for the tokens this server issues.

Clients written for Anaplan (``apapi``'s OAuth classes among them) keep their access token
alive and check it with Anaplan's own token service rather than with RFC 6749: with the
issuer URL as their "auth" base URL they reach these endpoints instead.

- ``GET /token/validate``: ``status``, ``statusMessage``, ``tokenInfo`` (``expiresAt`` in
  epoch milliseconds, ``tokenId``) and ``userInfo`` (``userGuid``: the person's stable
  subject; ``userId``: their user name).
- ``POST /token/refresh``: extends the token it is given, within its grant's limits (the
  client's access-token lifetime from now, never past the grant's end), and answers
  ``tokenInfo`` with the same ``tokenValue``. A JWT access token (RFC 9068) carries its
  ``exp`` inside its signature, so for those the value is a new token of the same grant.
  Either way it counts as a use of the grant (its idle timeout starts again).
- ``POST /token/logout``: ends that access token, not its grant; 204.

Each takes ``Authorization: AnaplanAuthToken <token>`` only. As at Anaplan, a missing or
malformed header is 400 on validate and refresh and 401 on logout; a token that is not an
active access token of this server is 401. Refresh tokens are not accepted here.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from aiohttp import web

from gateway.authserver.server import AuthorizationServer, server_of
from gateway.state.keys import Keys

SCHEME = "anaplanauthtoken"


def _answer(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"status": code, "statusMessage": message, **extra}
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


def _presented(request: web.Request) -> str | None:
    """The token of an ``AnaplanAuthToken`` header; None when there is no such header."""
    headers = request.headers.getall("Authorization", [])
    if len(headers) != 1:
        return None
    scheme, _, token = headers[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != SCHEME or not token or " " in token or len(token) > 4096:
        return None
    return token


async def _active(server: AuthorizationServer, token: str) -> dict[str, Any] | None:
    """The access token's record when it is active (its grant alive, its client enabled),
    by the same rule as introspection; else None."""
    answer = await server.issuer.introspect(token, hint="access_token")
    if not answer.get("active") or answer.get("token_type") != "Bearer":
        return None
    return await server.store.get_token("at", server.store.digest(token))


def _token_id(server: AuthorizationServer, token: str) -> str:
    # 32 hex characters, like Anaplan's ids: a keyed digest, so it reveals nothing
    return server.store.digest(token)[:32]


def _customer_guid(server: AuthorizationServer) -> str:
    return hashlib.sha256(server.issuer_url.encode()).hexdigest()[:32]


def _refused() -> web.Response:
    return _answer(401, "FAILURE_BAD_CREDENTIAL", "The token is invalid, expired or revoked.")


def _bad_header() -> web.Response:
    return _answer(400, "FAILURE_BAD_HEADER",
                   "Send the token as Authorization: AnaplanAuthToken <token>.")


async def validate_endpoint(request: web.Request) -> web.Response:
    server = server_of(request)
    token = _presented(request)
    if token is None:
        return _bad_header()
    record = await _active(server, token)
    if record is None:
        return _refused()
    return _answer(200, "SUCCESS", "Token validated", tokenInfo={
        "expiresAt": int(record["exp"]) * 1000, "tokenId": _token_id(server, token),
    }, userInfo={
        "userGuid": record.get("sub"), "userId": record.get("username"),
        "customerGuid": _customer_guid(server),
    })


async def refresh_endpoint(request: web.Request) -> web.Response:
    server = server_of(request)
    token = _presented(request)
    if token is None:
        return _bad_header()
    record = await _active(server, token)
    if record is None:
        return _refused()
    client = await server.store.get_client(record["client_id"])
    grant = await server.store.get_grant(record["grant_id"])
    if client is None or grant is None:
        return _refused()
    now = int(time.time())
    if server.signing_keys is not None:  # a JWT's exp is signed: a new token of the grant
        body = await server.issuer.issue(client, grant, scope=record["scope"],
                                         grant_type="anaplan_token_refresh", refresh=False)
        token, exp = body["access_token"], now + int(body["expires_in"])
    else:
        wanted = now + client.policy.access_token_ttl
        if grant.expires_at:
            wanted = min(wanted, grant.expires_at)
        exp = max(int(record["exp"]), wanted)
        if exp > int(record["exp"]):
            await server.store.save_token("at", server.store.digest(token),
                                          {**record, "exp": exp}, exp - now)
    await server.store.touch_grant(grant.grant_id)
    return _answer(200, "SUCCESS", "Token refreshed", tokenInfo={
        "tokenId": _token_id(server, token), "tokenValue": token, "expiresAt": exp * 1000,
        "refreshTokenId": None,
    })


async def logout_endpoint(request: web.Request) -> web.Response:
    server = server_of(request)
    token = _presented(request)
    if token is None:
        return _answer(401, "FAILURE_BAD_HEADER",
                       "Send the token as Authorization: AnaplanAuthToken <token>.")
    record = await _active(server, token)
    if record is None:
        return _refused()
    digest = server.store.digest(token)
    await server.store.delete_tokens([Keys.grant_token_member("at", digest)])
    await server.issuer.purge_gateway_cache([digest])
    await server.store.audit("token.logout", grant_id=record["grant_id"],
                             client_id=record["client_id"], user=record.get("username") or "")
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    """Register ``/token/validate``, ``/token/refresh`` and ``/token/logout``."""
    app.router.add_get("/token/validate", validate_endpoint)
    app.router.add_post("/token/refresh", refresh_endpoint)
    app.router.add_post("/token/logout", logout_endpoint)
