"""Issuing, refreshing and revoking tokens (RFC 6749 sections 5 and 6, RFC 7009).

Every token belongs to a :class:`~.models.Grant` (user + client + device). Revoking a
grant deletes its tokens and pins their digests as revoked in the gateway's cache,
publishing each so every replica drops it from memory at once.

Refresh tokens follow the client's :class:`~.models.TokenPolicy`:

- *rotatable*: single use; each refresh returns a new one. Presenting a spent one is
  a replay (RFC 6819 section 5.2.2.3, OAuth 2.0 Security BCP section 4.14): the whole
  grant, the token family, is revoked and the event audited.
- *non-rotatable*: the same refresh token is returned until it expires.

Either way a grant ends at ``grant_max_lifetime`` after its creation, or after
``idle_timeout`` without use (a refresh; :meth:`~.models.Grant.ends_at`), and with it
every token of it: the gateway's validator checks the grant as introspection does.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.authserver.errors import AccessDenied, InvalidGrant, InvalidScope
from gateway.authserver.hashing import new_token
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.models import (
    GRANT_REFRESH,
    ROTATABLE,
    Grant,
    OAuthClient,
    requested_scopes,
)
from gateway.authserver.storage import AuthStore
from gateway.authserver.tenant import TenantSettings
from gateway.state import events
from gateway.state.keys import Keys

AccessTokenSigner = Callable[[dict[str, Any]], Awaitable[str]]


class TokenIssuer:
    """The one place tokens are made and unmade."""

    def __init__(self, store: AuthStore, *, issuer: str, metrics: AuthServerMetrics,
                 cache_pin_ttl: int = 300, jwt_signer: AccessTokenSigner | None = None,
                 tenant: TenantSettings | None = None) -> None:
        self.store = store
        #: the tenant settings (self-service on or off); None: no such check (the CLI)
        self.tenant = tenant
        self.issuer = issuer
        self.metrics = metrics
        self.cache_pin_ttl = cache_pin_ttl
        self.jwt_signer = jwt_signer

    async def new_grant(self, client: OAuthClient, *, username: str, sub: str, scope: str,
                        grant_type: str, label: str = "") -> Grant:
        if self.tenant is not None and not (await self.tenant.get()).allows_new_grant(
                client.client_id):
            await self.store.audit("authorization.refused", client_id=client.client_id,
                                   user=username, reason="self_service_off")
            raise AccessDenied("New authorizations are turned off on this server (tenant "
                               "setting: self-service OAuth is off). Ask an administrator.")
        now = int(time.time())
        grant = Grant(
            grant_id="g_" + secrets.token_urlsafe(12), client_id=client.client_id,
            username=username, sub=sub, scope=scope, grant_type=grant_type,
            label=label[:200], created_at=now, last_used_at=now,
            expires_at=now + client.policy.grant_max_lifetime)
        await self.store.save_grant(grant)
        await self.store.audit("grant.created", grant_id=grant.grant_id,
                               client_id=client.client_id, user=username, label=grant.label)
        return grant

    async def issue(self, client: OAuthClient, grant: Grant, *, scope: str,
                    grant_type: str, refresh: bool = True) -> dict[str, Any]:
        """The RFC 6749 section 5.1 token response for a new access (+ refresh) token."""
        if await self.store.person_disabled(grant.sub):
            # people governance: a disabled person gets no new token (code, device, refresh)
            raise InvalidGrant("The person this grant belongs to is disabled.")
        now = int(time.time())
        ttl = min(client.policy.access_token_ttl, max(1, grant.expires_at - now))
        claims = {
            "grant_id": grant.grant_id, "client_id": client.client_id, "scope": scope,
            # a machine client's grant has no person: no subject, no username
            "sub": grant.sub or None, "username": grant.username or None,
            "iat": now, "exp": now + ttl,
            "token_type": "access_token",
        }
        if self.jwt_signer is not None:
            access = await self.jwt_signer({**claims, "jti": secrets.token_urlsafe(16)})
        else:
            access = new_token("gwat_")
        await self.store.save_token("at", self.store.digest(access), claims, ttl)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                                "expires_in": ttl, "scope": scope}
        if refresh:
            body["refresh_token"] = await self._new_refresh(client, grant, scope, now)
        self.metrics.tokens_issued.labels(client.client_id, grant_type).inc()
        return body

    async def _new_refresh(self, client: OAuthClient, grant: Grant, scope: str, now: int
                           ) -> str:
        ttl = min(client.policy.refresh_token_ttl, max(1, grant.expires_at - now))
        token = new_token("gwrt_")
        await self.store.save_token("rt", self.store.digest(token), {
            "grant_id": grant.grant_id, "client_id": client.client_id, "scope": scope,
            "iat": now, "exp": now + ttl, "mode": client.policy.refresh_mode,
            "token_type": "refresh_token"}, ttl)
        return token

    async def refresh(self, client: OAuthClient, refresh_token: str, requested_scope: str | None
                      ) -> dict[str, Any]:
        """RFC 6749 section 6, with rotation and reuse detection."""
        digest = self.store.digest(refresh_token)
        record = await self.store.get_token("rt", digest)
        if record is None:
            raise InvalidGrant("The refresh token is invalid, expired or revoked.")
        if record["client_id"] != client.client_id:
            # bound to its client (section 6): another client's token is no token
            raise InvalidGrant("The refresh token was not issued to this client.")
        grant = await self.store.get_grant(record["grant_id"])
        if grant is None or not grant.alive(client.policy):
            raise InvalidGrant("The grant behind this refresh token has ended.")
        # every refusal comes before the token is spent: a refused refresh leaves the
        # client's refresh token as it was (a later retry is no replay)
        if await self.store.person_disabled(grant.sub):
            raise InvalidGrant("The person this grant belongs to is disabled.")
        scope = record["scope"]
        wanted = requested_scopes(requested_scope)
        if wanted:
            if not set(wanted) <= set(scope.split()):
                raise InvalidScope("A refresh may narrow the scope, never widen it.")
            scope = " ".join(wanted)
        rotatable = record.get("mode", ROTATABLE) == ROTATABLE
        if rotatable and not await self.store.spend_refresh(
                digest, int(record["exp"]) - int(time.time())):
            self.metrics.refresh_reuse.labels(client.client_id).inc()
            await self.revoke_grant(grant.grant_id, reason="refresh_token_reuse",
                                    actor="authorization-server")
            await self.store.audit("refresh.reuse_detected", grant_id=grant.grant_id,
                                   client_id=client.client_id, user=grant.username)
            raise InvalidGrant("This refresh token was already used; the grant is revoked.")
        await self.store.touch_grant(grant.grant_id)
        body = await self.issue(client, grant, scope=scope, grant_type=GRANT_REFRESH,
                                refresh=rotatable)
        after = await self.store.get_grant(grant.grant_id)
        if after is None or not after.alive(client.policy):
            # The grant ended while these tokens were made: a revocation that listed the
            # grant's tokens before they were indexed missed them. Re-read after writing,
            # so one of the two always sees the other (the revocation marks the grant
            # before listing its tokens); end them as the revocation ended the others.
            await self._end_tokens(grant.grant_id)
            raise InvalidGrant("The grant behind this refresh token has ended.")
        if not rotatable:
            body["refresh_token"] = refresh_token
        return body

    async def revoke_grant(self, grant_id: str, *, reason: str, actor: str) -> bool:
        """End one grant: delete its tokens and purge them from every gateway cache."""
        grant = await self.store.get_grant(grant_id)
        if grant is None:
            return False
        await self.store.mark_grant_revoked(grant_id, reason)
        await self._end_tokens(grant_id)
        self.metrics.grants_revoked.labels(reason).inc()
        await self.store.audit("grant.revoked", grant_id=grant_id, client_id=grant.client_id,
                               user=grant.username, reason=reason, actor=actor)
        return True

    async def _end_tokens(self, grant_id: str) -> None:
        """Delete every token indexed under a grant and purge its access tokens from
        every gateway cache. Called after the grant is marked revoked: a token indexed
        later is the refresh's to end (:meth:`refresh`)."""
        members = await self.store.grant_tokens(grant_id)
        await self.store.delete_tokens(members)
        await self.purge_gateway_cache([
            digest for kind, digest in map(Keys.parse_grant_token_member, members)
            if kind == "at"])

    async def purge_gateway_cache(self, digests: list[str]) -> None:
        """Pin these access tokens inactive in the gateway's cache, and tell every replica."""
        if not digests:
            return
        keys = self.store.keys
        redis = self.store.redis
        async with redis.pipeline(transaction=False) as pipe:
            for digest in digests:
                events.pin_revoked(pipe, keys, digest, self.cache_pin_ttl)
            await events.execute_and_publish(redis, pipe, keys,
                                             [events.TokenRevoked(d) for d in digests])

    async def _find(self, token: str, hint: str | None
                    ) -> tuple[str, str, dict[str, Any]] | None:
        """``(kind, digest, record)`` of a token this server issued, or None. The kind the
        ``token_type_hint`` names is looked up first (RFC 7009 2.1, RFC 7662 2.1)."""
        digest = self.store.digest(token)
        for kind in ("rt", "at") if hint == "refresh_token" else ("at", "rt"):
            record = await self.store.get_token(kind, digest)
            if record is not None:
                return kind, digest, record
        return None

    async def revoke_token(self, client: OAuthClient, token: str, hint: str | None) -> None:
        """RFC 7009 section 2.1. A refresh token ends its grant (and so the grant's access
        tokens); an access token ends alone. Unknown tokens are no error (section 2.2)."""
        found = await self._find(token, hint)
        if found is None:
            return
        kind, digest, record = found
        if record["client_id"] != client.client_id:
            return  # section 2.1: not this client's token; say nothing
        if kind == "rt":
            await self.revoke_grant(record["grant_id"], reason="revoked_by_client",
                                    actor=client.client_id)
        else:
            await self.store.delete_tokens([Keys.grant_token_member("at", digest)])
            await self.purge_gateway_cache([digest])

    async def introspect(self, token: str, *, hint: str | None = None,
                         only_client: str | None = None) -> dict[str, Any]:
        """RFC 7662 section 2.2; ``{"active": false}`` and nothing more when not active.
        With ``only_client``, a token of any other client is ``{"active": false}`` too."""
        found = await self._find(token, hint)
        if found is None:
            return {"active": False}
        kind, digest, record = found
        if only_client is not None and record.get("client_id") != only_client:
            return {"active": False}
        if int(record.get("exp", 0)) <= time.time():
            return {"active": False}
        if kind == "rt" and record.get("mode", ROTATABLE) == ROTATABLE \
                and await self.store.refresh_spent(digest):
            # used once already: kept only to detect its replay, no longer a token
            return {"active": False}
        client = await self.store.get_client(record["client_id"])
        if client is None or client.disabled:
            return {"active": False}
        grant = await self.store.get_grant(record["grant_id"])
        if grant is None or not grant.alive(client.policy):
            return {"active": False}
        if await self.store.person_disabled(grant.sub):
            return {"active": False}  # as the gateway answers: the person is refused
        answer = {"active": True, "client_id": record["client_id"],
                  "scope": record["scope"], "exp": record["exp"], "iat": record["iat"],
                  "iss": self.issuer,
                  "token_type": "Bearer" if kind == "at" else "refresh_token"}
        if kind == "at":  # a machine client's token names no person: no sub, no username
            answer.update({k: record[k] for k in ("sub", "username") if record.get(k)})
        return answer
