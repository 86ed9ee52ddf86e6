"""Every key of the aiohttp applications' typed state, in one place.

The types are named for the type checker only: this module imports nothing of the
gateway at run time, so any layer may use a key without importing the layers above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.authserver.oidc import OpenIDProvider
    from gateway.authserver.plugin import BuiltinServer
    from gateway.forward.credentials.anaplan_oauth import AnaplanOAuth
    from gateway.runtime.app import Gateway

#: the gateway process's components, on the proxy app and the admin app
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
#: the built-in authorization server, on the proxy app when ``GATEWAY_ISSUER`` is set
AUTH_SERVER: web.AppKey[BuiltinServer] = web.AppKey("auth_server")
#: the upstream OpenID provider of single sign-on, when ``GATEWAY_SSO_ISSUER`` is set
SSO_PROVIDER: web.AppKey[OpenIDProvider] = web.AppKey("sso_provider")
#: the client of Anaplan's OAuth service ("Sign in with Anaplan"), when configured
ANAPLAN_OAUTH: web.AppKey[AnaplanOAuth] = web.AppKey("anaplan_oauth")
