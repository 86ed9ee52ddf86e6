"""The authorization server's state in Redis (all keys under ``GATEWAY_KEY_PREFIX``).

Its keys are under ``as:``, but for the client records, which it shares with the gateway's
governance (``client:{id}``), and the audit stream; :class:`gateway.state.keys.Keys`
names and describes every one of them.

Tokens, codes and device codes appear only as keyed digests. Writes that span keys are
MULTI/EXEC transactions on one server and plain pipelines on Redis Cluster, where keys of
different hash slots cannot share a transaction (:func:`gateway.state.connection.pipeline`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, cast

from redis.asyncio import Redis

from gateway.authserver.models import Grant, OAuthClient, TokenPolicy
from gateway.protocol.tokens import TokenDigester
from gateway.state import connection as gwstore
from gateway.state import events
from gateway.state.keys import Keys


class AuthStore:
    """Typed access to the authorization server's keys."""

    def __init__(self, redis: Redis, *, key_prefix: str, digester: TokenDigester,
                 defaults: TokenPolicy) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        self.digester = digester
        self.defaults = defaults
        #: fields every audit entry written through this store carries (``remote``)
        self.audit_fields: dict[str, str] = {}

    def digest(self, token: str) -> str:
        return self.digester.digest(token)

    # -- audit ---------------------------------------------------------------

    async def audit(self, action: str, **fields: str) -> None:
        """Append to the audit stream (who, when, what; never a secret)."""
        await events.append_audit(self.redis, self.keys, events.audit_entry(
            action, **{**self.audit_fields, **fields}))

    # -- clients -------------------------------------------------------------

    def client_key(self, client_id: str) -> str:
        return self.keys.client(client_id)

    async def get_client(self, client_id: str) -> OAuthClient | None:
        data = cast(dict[str, str], await self.redis.hgetall(self.client_key(client_id)))
        return OAuthClient.from_fields(client_id, data, self.defaults)

    async def save_client(self, client: OAuthClient, *, extra: dict[str, str] | None = None
                          ) -> None:
        mapping: dict[Any, Any] = {**client.to_fields(), **(extra or {})}
        async with gwstore.pipeline(self.redis) as pipe:
            pipe.hset(self.client_key(client.client_id), mapping=mapping)
            pipe.sadd(self.keys.as_clients, client.client_id)
            await events.execute_and_publish(self.redis, pipe, self.keys,
                                             [events.ClientChanged(client.client_id)])

    async def delete_client(self, client_id: str) -> None:
        async with gwstore.pipeline(self.redis) as pipe:
            pipe.delete(self.client_key(client_id))
            pipe.srem(self.keys.as_clients, client_id)
            await events.execute_and_publish(self.redis, pipe, self.keys,
                                             [events.ClientChanged(client_id)])

    async def list_clients(self) -> list[OAuthClient]:
        ids = sorted(cast(set[str], await self.redis.smembers(self.keys.as_clients)))
        clients = [await self.get_client(cid) for cid in ids]
        return [c for c in clients if c is not None]

    # -- users ---------------------------------------------------------------

    async def save_user(self, username: str, fields: dict[str, str]) -> None:
        await self.redis.hset(self.keys.as_user(username),
                              mapping=cast(dict[Any, Any], fields))

    async def get_user(self, username: str) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(self.keys.as_user(username)))

    async def person_disabled(self, sub: str | None) -> bool:
        """True when people governance (``users disable``) refuses the person ``sub``."""
        return bool(sub) and await self.redis.hget(self.keys.user(str(sub)), "disabled") == "1"

    async def sso_username(self, issuer: str, sub: str) -> str | None:
        value = await self.redis.get(self.keys.as_sso(issuer, sub))
        return str(value) if value is not None else None

    async def map_sso(self, issuer: str, sub: str, username: str) -> None:
        await self.redis.set(self.keys.as_sso(issuer, sub), username)

    # -- grants --------------------------------------------------------------

    async def save_grant(self, grant: Grant) -> None:
        async with gwstore.pipeline(self.redis) as pipe:
            pipe.hset(self.keys.as_grant(grant.grant_id),
                      mapping=cast(dict[Any, Any], grant.to_fields()))
            pipe.sadd(self.keys.as_grants, grant.grant_id)
            pipe.sadd(self.keys.as_client_grants(grant.client_id), grant.grant_id)
            if grant.username:  # a machine client's grant has no user
                pipe.sadd(self.keys.as_user_grants(grant.username), grant.grant_id)
            await pipe.execute()

    async def get_grant(self, grant_id: str) -> Grant | None:
        data = cast(dict[str, str], await self.redis.hgetall(self.keys.as_grant(grant_id)))
        return Grant.from_fields(data)

    async def grant_and_client(self, grant_id: str, client_id: str
                               ) -> tuple[Grant | None, OAuthClient | None]:
        """A grant and its client (whose policy times the grant), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.as_grant(grant_id))
            pipe.hgetall(self.client_key(client_id))
            grant, client = await pipe.execute()
        return (Grant.from_fields(cast(dict[str, str], grant)),
                OAuthClient.from_fields(client_id, cast(dict[str, str], client), self.defaults))

    async def touch_grant(self, grant_id: str) -> None:
        await self.redis.hset(self.keys.as_grant(grant_id), "last_used_at",
                              str(int(time.time())))

    async def list_grants(self, *, client_id: str | None = None, username: str | None = None
                          ) -> list[Grant]:
        if client_id:
            ids = cast(set[str], await self.redis.smembers(
                self.keys.as_client_grants(client_id)))
        elif username:
            ids = cast(set[str], await self.redis.smembers(
                self.keys.as_user_grants(username)))
        else:
            ids = cast(set[str], await self.redis.smembers(self.keys.as_grants))
        grants = [await self.get_grant(gid) for gid in sorted(ids)]
        out = [g for g in grants if g is not None]
        if username:
            out = [g for g in out if g.username == username]
        return sorted(out, key=lambda g: g.created_at)

    async def mark_grant_revoked(self, grant_id: str, reason: str) -> None:
        await self.redis.hset(self.keys.as_grant(grant_id),
                              mapping={"revoked": "1", "revoked_reason": reason})

    async def grant_tokens(self, grant_id: str) -> set[str]:
        return cast(set[str], await self.redis.smembers(self.keys.as_grant_tokens(grant_id)))

    # -- tokens --------------------------------------------------------------

    async def save_token(self, kind: str, digest: str, record: dict[str, Any], ttl: int
                         ) -> None:
        """``kind`` is ``at`` or ``rt``; the record is JSON with a TTL of the token's life.

        Raises when either write fails, so a token whose record is not indexed under its
        grant (and so would survive the grant's revocation) is never handed out."""
        async with gwstore.pipeline(self.redis) as pipe:
            pipe.set(self.keys.as_token(kind, digest), json.dumps(record), ex=max(1, ttl))
            pipe.sadd(self.keys.as_grant_tokens(record["grant_id"]),
                      Keys.grant_token_member(kind, digest))
            await pipe.execute()

    async def get_token(self, kind: str, digest: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.keys.as_token(kind, digest))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    async def delete_tokens(self, members: Iterable[str]) -> None:
        keys = [self.keys.as_token_of_member(m) for m in members]
        if keys:  # a multi-key DEL: in a cluster, redis-py sends one per hash slot
            await self.redis.delete(*keys)

    async def spend_refresh(self, digest: str, ttl: int) -> bool:
        """Mark a rotatable refresh token used; False if it was already (a replay)."""
        return bool(await self.redis.set(self.keys.as_rt_spent(digest), "1", nx=True,
                                         ex=max(1, ttl)))

    async def refresh_spent(self, digest: str) -> bool:
        """Whether a rotatable refresh token was used already (:meth:`spend_refresh`)."""
        return bool(await self.redis.exists(self.keys.as_rt_spent(digest)))

    # -- authorization codes ---------------------------------------------------

    async def save_code(self, digest: str, record: dict[str, Any], ttl: int) -> None:
        await self.redis.set(self.keys.as_code(digest), json.dumps(record), ex=ttl)

    async def take_code(self, digest: str) -> dict[str, Any] | None:
        """Single use: GETDEL, so two concurrent redemptions cannot both succeed."""
        raw = await self.redis.getdel(self.keys.as_code(digest))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    async def remember_code_use(self, digest: str, grant_id: str, ttl: int) -> None:
        await self.redis.set(self.keys.as_code_used(digest), grant_id, ex=ttl)

    async def code_used_by(self, digest: str) -> str | None:
        value = await self.redis.get(self.keys.as_code_used(digest))
        return str(value) if value is not None else None

    # -- device authorizations -------------------------------------------------

    async def save_device(self, digest: str, record: dict[str, Any], ttl: int,
                          user_code: str | None = None) -> None:
        async with gwstore.pipeline(self.redis) as pipe:
            pipe.set(self.keys.as_device(digest), json.dumps(record), ex=max(1, ttl))
            if user_code:
                pipe.set(self.keys.as_user_code(user_code), digest, ex=max(1, ttl))
            await pipe.execute()

    async def get_device(self, digest: str) -> tuple[dict[str, Any] | None, int]:
        """The device record and its remaining seconds."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.as_device(digest))
            pipe.ttl(self.keys.as_device(digest))
            raw, ttl = await pipe.execute()
        return (json.loads(raw) if raw else None), int(ttl)

    async def device_for_user_code(self, user_code: str) -> str | None:
        value = await self.redis.get(self.keys.as_user_code(user_code))
        return str(value) if value is not None else None

    async def delete_device(self, digest: str, user_code: str | None) -> None:
        keys = [self.keys.as_device(digest)]
        if user_code:
            keys.append(self.keys.as_user_code(user_code))
        await self.redis.delete(*keys)

    async def hit(self, key: str, window: int) -> int:
        """Count an event in a fixed window (rate limits); returns the count so far."""
        full = self.keys.as_rate(key, int(time.time()) // window)
        async with self.redis.pipeline(transaction=True) as pipe:  # one key: fine in a cluster
            pipe.incr(full)
            pipe.expire(full, window * 2)
            count, _ = await pipe.execute()
        return int(count)
