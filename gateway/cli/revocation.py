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

import aiohttp
from redis.asyncio import Redis

from gateway.authserver import AuthAdmin
from gateway.config.settings import Settings
from gateway.protocol.clientauth import client_secret_basic
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


async def revoke_token(redis: Redis, settings: Settings, token: str) -> RevocationResult:
    """Revoke ``token`` at the authorization server (if configured) and purge every cache."""
    at_server = "not configured"
    if settings.revocation_url:
        headers = {}
        if settings.introspection_client_id:
            headers["Authorization"] = client_secret_basic(
                settings.introspection_client_id, settings.introspection_client_secret)
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
        at_server = await AuthAdmin(redis, settings, digester).revoke_token_digest(
            digest, actor="oauth-gateway tokens revoke")
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
