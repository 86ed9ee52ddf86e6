"""Revoking one token everywhere: at the authorization server, in Redis, in every replica.

RFC 7009 section 2.1: POST ``token=...`` to the revocation endpoint, authenticated as
at introspection. Then the token's digest is pinned as inactive in Redis (so no
replica re-validates it, which matters for locally validated JWTs that no server can
revoke) and ``{"type": "token_revoked"}`` is published so every replica drops it from
its in-process layer at once.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from urllib.parse import quote_plus

import aiohttp
from redis.asyncio import Redis

from gateway.config.settings import Settings
from gateway.protocol.tokens import TokenDigester
from gateway.state import connection as store
from gateway.state import events
from gateway.state.keys import Keys

DEFAULT_PIN = 24 * 3600


def _jwt_exp(token: str) -> float | None:
    """``exp`` of a JWT-shaped token, read without verification (only to size the pin)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RevocationResult:
    digest: str
    authorization_server: str  # "revoked", "not configured", or the failure
    pinned_seconds: int


async def _revoke_at_builtin_server(redis: Redis, settings: Settings, digester: TokenDigester,
                                    digest: str) -> str:
    """The built-in server shares this Redis: end the token there directly. A refresh
    token ends its grant (RFC 7009 section 2.1), and so the grant's access tokens."""
    from prometheus_client import CollectorRegistry

    from gateway.authserver.admin import AuthAdmin
    from gateway.authserver.metrics import AuthServerMetrics

    admin = AuthAdmin(redis, settings, digester, AuthServerMetrics(CollectorRegistry()))
    auth_store, issuer = admin.store, admin.issuer
    refresh = await auth_store.get_token("rt", digest)
    if refresh is not None:
        await issuer.revoke_grant(refresh["grant_id"], reason="revoked_by_admin",
                                  actor="oauth-gateway tokens revoke")
        return "revoked (built-in server: the refresh token's grant ended)"
    if await auth_store.get_token("at", digest) is not None:
        await auth_store.delete_tokens([Keys.grant_token_member("at", digest)])
        return "revoked (built-in server)"
    return "unknown to the built-in server"


async def revoke_token(redis: Redis, settings: Settings, token: str) -> RevocationResult:
    """Revoke ``token`` at the authorization server (if configured) and purge every cache."""
    at_server = "not configured"
    if settings.revocation_url:
        headers = {}
        if settings.introspection_client_id:
            pair = (f"{quote_plus(settings.introspection_client_id)}:"
                    f"{quote_plus(settings.introspection_client_secret)}").encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        try:
            async with aiohttp.ClientSession(trust_env=False) as session, session.post(
                    settings.revocation_url, data={"token": token}, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=settings.introspection_timeout * 3),
                    allow_redirects=False) as resp:
                # RFC 7009 2.2: 200 whether or not the token was valid
                at_server = "revoked" if resp.status == 200 else f"failed ({resp.status})"
        except (aiohttp.ClientError, TimeoutError) as exc:
            at_server = f"unreachable ({type(exc).__name__})"
    key = await store.digest_key(redis, settings.key_prefix, settings.token_digest_key)
    digester = TokenDigester(key)
    digest = digester.digest(token)
    if settings.issuer and not settings.revocation_url:
        at_server = await _revoke_at_builtin_server(redis, settings, digester, digest)
    exp = _jwt_exp(token)
    pin = max(settings.cache_max_ttl,
              int(exp - time.time()) + 60 if exp is not None else DEFAULT_PIN)
    keys = Keys(settings.key_prefix)
    async with store.pipeline(redis) as pipe:
        events.pin_revoked(pipe, keys, digest, max(1, pin))
        events.append_audit(pipe, keys, events.token_revoked_entry(
            digest, authorization_server=at_server))
        await events.execute_and_publish(redis, pipe, keys, [events.TokenRevoked(digest)])
    return RevocationResult(digest, at_server, pin)
