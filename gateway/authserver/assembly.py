"""Building the authorization server, once, when the gateway starts."""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis

from gateway.authserver import authorize, rfc6749, rfc8628
from gateway.authserver.issuance import TokenIssuer
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.models import (
    GRANT_CLIENT_CREDENTIALS,
    GRANT_CODE,
    GRANT_DEVICE,
    GRANT_REFRESH,
)
from gateway.authserver.rfc9068 import jwt_signer, load_signing_keys
from gateway.authserver.server import (
    AuthorizationServer,
    DeviceFlowTiming,
    GrantTypes,
    cache_pin_ttl,
    tenant_defaults,
)
from gateway.authserver.storage import AuthStore
from gateway.authserver.tenant import TenantSettings
from gateway.config.settings import Settings
from gateway.protocol.tokens import TokenDigester


def grant_types() -> GrantTypes:
    """The token endpoint's grants: RFC 6749 4.1 (with PKCE), RFC 8628, RFC 6749 6 and
    4.4."""
    grants = GrantTypes()
    grants.register(GRANT_CODE, authorize.authorization_code_grant)
    grants.register(GRANT_DEVICE, rfc8628.device_code_grant)
    grants.register(GRANT_REFRESH, rfc6749.refresh_grant)
    grants.register(GRANT_CLIENT_CREDENTIALS, rfc6749.client_credentials_grant)
    return grants


async def build_auth_server(settings: Settings, redis: Redis, digester: TokenDigester,
                            metrics: AuthServerMetrics, *, scopes_supported: Iterable[str],
                            device: DeviceFlowTiming | None = None
                            ) -> AuthorizationServer:
    """The server, sharing the gateway's Redis and digest key."""
    store = AuthStore(redis, key_prefix=settings.key_prefix, digester=digester,
                      defaults=tenant_defaults(settings))
    issuer_url = settings.issuer.rstrip("/")
    keys = None
    if settings.as_access_token_format == "jwt":
        keys = await load_signing_keys(store)
    issuer = TokenIssuer(store, issuer=issuer_url, metrics=metrics,
                         cache_pin_ttl=cache_pin_ttl(settings),
                         jwt_signer=jwt_signer(keys, issuer_url) if keys is not None else None,
                         tenant=TenantSettings(redis, settings, store.keys))
    return AuthorizationServer(
        settings=settings, store=store, issuer=issuer, metrics=metrics, grants=grant_types(),
        scopes_supported=tuple(sorted(set(scopes_supported))), device=device or DeviceFlowTiming(),
        signing_keys=keys)
