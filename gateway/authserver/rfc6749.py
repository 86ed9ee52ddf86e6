"""The token endpoint (RFC 6749 section 3.2), the refresh grant (section 6) and the
client credentials grant (section 4.4).

Each grant type is handled by the module of its RFC: ``authorization_code`` in
``authorize``, the device code in ``rfc8628``, ``refresh_token`` and
``client_credentials`` below; the assembly registers them on the server instance
(:class:`~gateway.authserver.server.GrantTypes`). A client may use only the flow it was
created for (and refresh, which a machine client has no token for).

A machine client's tokens belong to one standing grant per client (no user, no device),
so revoking it (``grants revoke``), disabling the client and the grant's idle timeout and
maximum lifetime mean for them what they mean for any other token; a token request after
the grant ended starts a new one.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy
from redis.exceptions import RedisError

from gateway.authserver.errors import (
    OAuthError,
    ServerError,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from gateway.authserver.models import (
    GRANT_CLIENT_CREDENTIALS,
    GRANT_REFRESH,
    Grant,
    OAuthClient,
    narrow_scope,
)
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


async def client_credentials_grant(server: AuthorizationServer, request: web.Request,
                                   client: OAuthClient, form: MultiDictProxy[str]
                                   ) -> dict[str, Any]:
    """Section 4.4: a confidential client asks for a token for itself, with an optional
    ``scope`` within its own (``invalid_scope`` otherwise). Section 4.4.3: an access
    token and no refresh token; the client authenticates again for the next one."""
    if not client.confidential:  # section 4.4: "MUST only be used by confidential clients"
        raise UnauthorizedClient("Only a confidential client may use client_credentials.")
    scope = narrow_scope(form.get("scope"), client.scopes)
    grant = await machine_grant(server, client, request.headers.get("User-Agent", ""))
    return await server.issuer.issue(client, grant, scope=scope,
                                     grant_type=GRANT_CLIENT_CREDENTIALS, refresh=False)


async def machine_grant(server: AuthorizationServer, client: OAuthClient, label: str
                        ) -> Grant:
    """The client's standing grant, its last use now; a new one when none is alive."""
    alive = [g for g in await server.store.list_grants(client_id=client.client_id)
             if g.alive(client.policy)]
    if alive:  # the newest: two first requests at once may each have made one
        grant = alive[-1]
        await server.store.touch_grant(grant.grant_id)  # a token exchange is a use
        return grant
    return await server.issuer.new_grant(client, username="", sub="",
                                         scope=" ".join(client.scopes),
                                         grant_type=GRANT_CLIENT_CREDENTIALS, label=label)


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
    except RedisError:  # the gateway answers 503 with Retry-After (runtime.health)
        raise
    except Exception:
        log.exception("token endpoint failed")
        return ServerError("The authorization server failed.").response()
