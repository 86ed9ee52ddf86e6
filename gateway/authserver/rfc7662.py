"""Token introspection endpoint (RFC 7662).

Section 2.1: the caller must be authorized; here any confidential client
authenticating with ``client_secret_basic`` may introspect (as resource servers do);
public clients and anonymous callers get 401. Section 2.2: an unknown, expired,
revoked or disabled-client token is ``{"active": false}`` and nothing more.
"""

from __future__ import annotations

from aiohttp import web

from gateway.authserver.errors import InvalidClient, InvalidRequest, OAuthError
from gateway.authserver.server import server_of


async def introspection_endpoint(request: web.Request) -> web.Response:
    server = server_of(request)
    try:
        if not request.headers.get("Authorization", "").lower().startswith("basic "):
            raise InvalidClient("Authenticate with client_secret_basic to introspect.")
        form = await server.read_form(request)
        await server.authenticate_client(request, form, require_secret=True)
        token = form.get("token")
        if not token:
            raise InvalidRequest("token is required.")
        answer = await server.issuer.introspect(token, hint=form.get("token_type_hint"))
    except OAuthError as exc:
        return exc.response()
    return web.json_response(answer, headers={"Cache-Control": "no-store"})
