"""Authorization server metadata (RFC 8414 section 2), at
``/.well-known/oauth-authorization-server``: every endpoint this server offers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.authserver.models import (
    GRANT_CLIENT_CREDENTIALS,
    GRANT_CODE,
    GRANT_DEVICE,
    GRANT_REFRESH,
)
from gateway.authserver.server import AuthorizationServer, server_of

PATHS = {
    "authorization_endpoint": "/oauth/authorize",
    "token_endpoint": "/oauth/token",
    "device_authorization_endpoint": "/oauth/device_authorization",
    "introspection_endpoint": "/oauth/introspect",
    "revocation_endpoint": "/oauth/revoke",
    "jwks_uri": "/oauth/jwks",
}


def metadata(server: AuthorizationServer) -> dict[str, Any]:
    return {
        "issuer": server.issuer_url,
        **{name: server.url(path) for name, path in PATHS.items()},
        "grant_types_supported": [GRANT_CODE, GRANT_DEVICE, GRANT_REFRESH,
                                  GRANT_CLIENT_CREDENTIALS],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "revocation_endpoint_auth_methods_supported": [
            "client_secret_basic", "client_secret_post", "none"],
        "authorization_response_iss_parameter_supported": True,
        "scopes_supported": list(server.scopes_supported),
    }


async def metadata_endpoint(request: web.Request) -> web.Response:
    return web.json_response(metadata(server_of(request)),
                             headers={"Cache-Control": "public, max-age=300"})
