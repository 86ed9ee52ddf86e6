"""Token introspection endpoint (RFC 7662).

Section 2.1: the caller must be authorized. A confidential client created with
``--introspect`` (a resource server) may introspect any token; any other confidential
client authenticating with ``client_secret_basic`` learns only about its own tokens
(another client's is ``{"active": false}``), unless ``GATEWAY_AS_OPEN_INTROSPECTION``
restores the older rule (any confidential client, any token). Public clients and
anonymous callers get 401. Section 2.2: an unknown, expired, revoked or disabled-client
token is ``{"active": false}`` and nothing more.
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
        client = await server.authenticate_client(request, form, require_secret=True)
        token = form.get("token")
        if not token:
            raise InvalidRequest("token is required.")
        open_to_all = client.introspect or server.settings.as_open_introspection
        answer = await server.issuer.introspect(
            token, hint=form.get("token_type_hint"),
            only_client=None if open_to_all else client.client_id)
    except OAuthError as exc:
        return exc.response()
    return web.json_response(answer, headers={"Cache-Control": "no-store"})
