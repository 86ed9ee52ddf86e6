"""Building the authorization server from settings (called by the app factory)."""

from __future__ import annotations

from redis.asyncio import Redis

from gateway.authserver.issuance import TokenIssuer
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.server import AuthorizationServer, cache_pin_ttl, tenant_defaults
from gateway.authserver.storage import AuthStore
from gateway.config.policy import RoutePolicy
from gateway.config.settings import Settings
from gateway.observe.metrics import GatewayMetrics
from gateway.protocol.tokens import TokenDigester


async def build_auth_server(settings: Settings, redis: Redis, digester: TokenDigester,
                            metrics: GatewayMetrics, policy: RoutePolicy
                            ) -> AuthorizationServer:
    """The server, sharing the gateway's Redis, digest key and metrics registry."""
    store = AuthStore(redis, key_prefix=settings.key_prefix, digester=digester,
                      defaults=tenant_defaults(settings))
    as_metrics = metrics.extras.get("authserver")
    if not isinstance(as_metrics, AuthServerMetrics):
        as_metrics = AuthServerMetrics(metrics.registry)
        metrics.extras["authserver"] = as_metrics
    issuer = TokenIssuer(store, issuer=settings.issuer.rstrip("/"), metrics=as_metrics,
                         cache_pin_ttl=cache_pin_ttl(settings))
    server = AuthorizationServer(settings=settings, store=store, issuer=issuer,
                                 metrics=as_metrics)
    server.extras["scopes_supported"] = sorted(
        {scope for route in policy.routes for scope in route.scopes})
    if settings.as_access_token_format == "jwt":
        from gateway.authserver.rfc9068 import enable_jwt_access_tokens

        await enable_jwt_access_tokens(server)
    return server
