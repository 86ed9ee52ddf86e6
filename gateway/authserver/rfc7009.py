"""Token revocation endpoint (RFC 7009).

Section 2.1: the client authenticates as at the token endpoint (public clients by
``client_id``) and may revoke only its own tokens. Revoking a refresh token ends its
grant and so every access token of it (section 2.1, "SHOULD"). Section 2.2: the answer
is 200 whether or not the token was known.
"""

from __future__ import annotations

from aiohttp import web

from gateway.authserver.errors import InvalidRequest, OAuthError
from gateway.authserver.server import server_of


async def revocation_endpoint(request: web.Request) -> web.Response:
    server = server_of(request)
    try:
        form = await server.read_form(request)
        client = await server.authenticate_client(request, form)
        token = form.get("token")
        if not token:
            raise InvalidRequest("token is required.")
        await server.issuer.revoke_token(client, token, form.get("token_type_hint"))
    except OAuthError as exc:
        return exc.response()
    return web.Response(status=200, headers={"Cache-Control": "no-store"})
