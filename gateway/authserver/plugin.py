"""The built-in authorization server as the gateway runs it.

The gateway's runtime knows this one class of the package: it installs the server's
routes on the proxy app, starts it once Redis answers (sharing the gateway's Redis and
token digester), hands its validator to the token cache like any other validator's,
and stops it. The server's endpoints find it through :data:`gateway.appkeys.AUTH_SERVER`.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.appkeys import AUTH_SERVER
from gateway.authn.validators.base import TokenValidator
from gateway.authserver import routes
from gateway.authserver.assembly import build_auth_server
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.models import ADMIN_SCOPE
from gateway.authserver.roles import ensure_cli_client
from gateway.authserver.server import AuthorizationServer, DeviceFlowTiming
from gateway.authserver.validator import BuiltinValidator
from gateway.config.settings import Settings
from gateway.protocol.tokens import TokenDigester


class BuiltinServer:
    """The built-in server's routes, lifetime and validator (``GATEWAY_ISSUER`` set)."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry,
                 scopes_supported: Iterable[str],
                 device: DeviceFlowTiming | None = None) -> None:
        self.settings = settings
        self.metrics = AuthServerMetrics(registry)
        # the admin API's scope is one this server always knows (RFC 8414 metadata)
        self._scopes = tuple(dict.fromkeys([*scopes_supported, ADMIN_SCOPE]))
        self._device = device or DeviceFlowTiming()
        self._server: AuthorizationServer | None = None

    def install(self, app: web.Application) -> None:
        """Register every endpoint on ``app`` (before the gateway's catch-all route)."""
        app[AUTH_SERVER] = self
        routes.add_routes(app)

    async def start(self, redis: Redis, digester: TokenDigester) -> AuthorizationServer:
        """Build the server on the gateway's Redis and digest key; make sure the
        command line's client ``oauth-gateway-cli`` exists."""
        self._server = await build_auth_server(
            self.settings, redis, digester, self.metrics, scopes_supported=self._scopes,
            device=self._device)
        await ensure_cli_client(self._server.store,
                                (s for s in self._server.scopes_supported if s != ADMIN_SCOPE))
        return self._server

    @property
    def server(self) -> AuthorizationServer | None:
        """The running server; None before :meth:`start` and after :meth:`stop`."""
        return self._server

    def validator(self) -> TokenValidator:
        """The gateway's validator of this server's tokens: in-process, no HTTP hop."""
        if self._server is None:
            raise RuntimeError("the built-in authorization server is not started")
        return BuiltinValidator(self._server.store)

    async def end_grants_of(self, username: str, *, reason: str) -> int:
        """End every live grant of the person ``username``; how many ended."""
        server = self._server
        if server is None or not username:
            return 0
        ended = 0
        for grant in await server.store.list_grants(username=username):
            if not grant.revoked and await server.issuer.revoke_grant(
                    grant.grant_id, reason=reason, actor="gateway"):
                ended += 1
        return ended

    async def stop(self) -> None:
        """Forget the server; its Redis client belongs to the gateway."""
        self._server = None
