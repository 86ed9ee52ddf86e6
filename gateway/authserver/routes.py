"""Every endpoint of the built-in server, registered on the proxy app (``/oauth/*``,
the RFC 8414 well-known path, the admin API under ``/admin/api/v1/``, the console under
``/console/``), before the
gateway's catch-all route."""

from __future__ import annotations

from aiohttp import web

from gateway.authserver import (
    account,
    adminapi,
    anaplan_signin,
    anaplan_token,
    authorize,
    console,
    console_clients,
    console_more,
    pages,
    rfc8628,
    rfc9068,
    sso,
)
from gateway.authserver.rfc6749 import token_endpoint
from gateway.authserver.rfc7009 import revocation_endpoint
from gateway.authserver.rfc7662 import introspection_endpoint
from gateway.authserver.rfc8414 import metadata_endpoint


def add_routes(app: web.Application) -> None:
    app.router.add_get("/.well-known/oauth-authorization-server", metadata_endpoint)
    app.router.add_post("/oauth/token", token_endpoint)
    app.router.add_post("/oauth/introspect", introspection_endpoint)
    app.router.add_post("/oauth/revoke", revocation_endpoint)
    pages.setup_templates(app)
    pages.add_routes(app)
    account.add_routes(app)
    authorize.add_routes(app)
    rfc8628.add_routes(app)
    rfc9068.add_routes(app)
    sso.add_routes(app)
    anaplan_signin.add_routes(app)
    anaplan_token.add_routes(app)
    adminapi.add_routes(app)
    console.add_routes(app)
    console_clients.add_routes(app)
    console_more.add_routes(app)
