"""The token endpoint (RFC 6749 section 3.2) and the refresh grant (section 6).

Each grant type is handled by the module of its RFC: ``authorization_code`` in
``authorize``, the device code in ``rfc8628``, and ``refresh_token`` below; the assembly
registers them on the server instance (:class:`~gateway.authserver.server.GrantTypes`).
A client may use only the flow it was created for (and refresh).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from gateway.authserver.errors import (
    OAuthError,
    ServerError,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from gateway.authserver.models import GRANT_REFRESH, OAuthClient
from gateway.authserver.server import AuthorizationServer, server_of

log = logging.getLogger(__name__)

async def refresh_grant(server: AuthorizationServer, request: web.Request,
                        client: OAuthClient, form: MultiDictProxy[str]) -> dict[str, Any]:
    """Section 6: ``refresh_token`` and an optional narrower ``scope``."""
    from gateway.authserver.errors import InvalidRequest

    token = form.get("refresh_token")
    if not token:
        raise InvalidRequest("refresh_token is required.")
    return await server.issuer.refresh(client, token, form.get("scope"))


def token_response(body: dict[str, Any]) -> web.Response:
    """Section 5.1: JSON, never cached."""
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def token_endpoint(request: web.Request) -> web.Response:
    server = server_of(request)
    try:
        form = await server.read_form(request, json_body=True)
        grant_type = form.get("grant_type", "")
        handler = server.grants.get(grant_type)
        if handler is None:
            raise UnsupportedGrantType(f"Unsupported grant_type {grant_type[:60]!r}.")
        client = await server.authenticate_client(request, form)
        if grant_type != GRANT_REFRESH and grant_type != client.grant_type:
            raise UnauthorizedClient(
                f"This client may use the {client.flow} flow only.")
        return token_response(await handler(server, request, client, form))
    except OAuthError as exc:
        return exc.response()
    except Exception:
        log.exception("token endpoint failed")
        return ServerError("The authorization server failed.").response()
