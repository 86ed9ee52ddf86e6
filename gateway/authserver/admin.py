"""Self-service administration: clients, secrets, users, grants. Every change audited.

Used by the CLI (``oauth-gateway clients create|update|rotate-secret|delete``,
``users add|disable|enable``, ``grants list|revoke``); no endpoint exposes it over HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.authserver.hashing import hash_secret
from gateway.authserver.issuance import TokenIssuer
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.models import (
    FLOW_NAMES,
    GRANT_CLIENT_CREDENTIALS,
    GRANT_CODE,
    Grant,
    ModelError,
    OAuthClient,
    TokenPolicy,
)
from gateway.authserver.server import cache_pin_ttl, tenant_defaults
from gateway.authserver.storage import AuthStore
from gateway.config.settings import Settings
from gateway.pipeline.govern import ClientAdmin
from gateway.pipeline.people import UserAdmin
from gateway.protocol.tokens import TokenDigester
from gateway.state.keys import Keys


class AdminError(ValueError):
    """An administrative request cannot be carried out; the message says why."""


class AuthAdmin:
    """The operations behind the CLI."""

    def __init__(self, redis: Redis, settings: Settings, digester: TokenDigester,
                 metrics: AuthServerMetrics | None = None) -> None:
        if metrics is None:  # counted by no scrape: the CLI's process is short-lived
            metrics = AuthServerMetrics(CollectorRegistry())
        self.settings = settings
        self.store = AuthStore(redis, key_prefix=settings.key_prefix, digester=digester,
                               defaults=tenant_defaults(settings))
        self.issuer = TokenIssuer(self.store, issuer=settings.issuer, metrics=metrics,
                                  cache_pin_ttl=cache_pin_ttl(settings))
        self.governance = ClientAdmin(redis, key_prefix=settings.key_prefix)
        self.people = UserAdmin(redis, key_prefix=settings.key_prefix)

    async def create_client(self, *, name: str, grant: str, redirect_uris: list[str],
                            scopes: list[str], actor: str, confidential: bool | None = None,
                            policy: dict[str, Any] | None = None, introspect: bool = False
                            ) -> tuple[OAuthClient, str | None]:
        """Create a client; returns it and its secret (shown once; None for public ones).

        Code-flow and machine (``client_credentials``) clients are confidential unless
        told otherwise (a machine client must be); device-flow clients are public."""
        grant_type = FLOW_NAMES.get(grant)
        if grant_type is None:
            raise AdminError("grant must be authorization_code, device_code or "
                             "client_credentials")
        if confidential is None:
            confidential = grant_type in (GRANT_CODE, GRANT_CLIENT_CREDENTIALS)
        secret = secrets.token_urlsafe(32) if confidential else None
        client = OAuthClient(
            client_id=uuid.uuid4().hex, name=name, grant_type=grant_type,
            redirect_uris=tuple(dict.fromkeys(redirect_uris)),
            scopes=tuple(dict.fromkeys(s for scope in scopes for s in scope.split())),
            confidential=confidential, introspect=introspect,
            secret_hash=await asyncio.to_thread(hash_secret, secret) if secret else "",
            policy=self._policy(self.store.defaults, policy or {}),
            created_at=int(time.time()), created_by=actor)
        try:
            client.validate()
        except ModelError as exc:
            raise AdminError(str(exc)) from None
        await self.store.save_client(client, extra={"updated_at": str(client.created_at),
                                                    "updated_by": actor})
        await self.store.audit("client.created", client_id=client.client_id, actor=actor,
                               name=name, flow=client.flow)
        return client, secret

    @staticmethod
    def _policy(base: TokenPolicy, changes: dict[str, Any]) -> TokenPolicy:
        try:
            return replace(base, **{k: v for k, v in changes.items() if v is not None}
                           ).validate()
        except (ModelError, TypeError) as exc:
            raise AdminError(str(exc)) from None

    async def get(self, client_id: str) -> OAuthClient:
        client = await self.store.get_client(client_id)
        if client is None:
            raise AdminError(f"no client {client_id!r} on this authorization server")
        return client

    async def update_client(self, client_id: str, *, actor: str, name: str | None = None,
                            redirect_uris: list[str] | None = None,
                            scopes: list[str] | None = None,
                            policy: dict[str, Any] | None = None,
                            introspect: bool | None = None) -> OAuthClient:
        client = await self.get(client_id)
        changes: dict[str, Any] = {}
        if name is not None:
            changes["name"] = name
        if redirect_uris is not None:
            changes["redirect_uris"] = tuple(dict.fromkeys(redirect_uris))
        if scopes is not None:
            changes["scopes"] = tuple(dict.fromkeys(s for sc in scopes for s in sc.split()))
        if policy:
            changes["policy"] = self._policy(client.policy, policy)
        if introspect is not None:
            changes["introspect"] = introspect
        updated = replace(client, **changes)
        try:
            updated.validate()
        except ModelError as exc:
            raise AdminError(str(exc)) from None
        await self.store.save_client(updated, extra={"updated_at": str(int(time.time())),
                                                     "updated_by": actor})
        await self.store.audit("client.updated", client_id=client_id, actor=actor,
                               fields=",".join(sorted(changes)))
        return updated

    async def rotate_secret(self, client_id: str, *, actor: str, grace: int = 0) -> str:
        """New secret; the old one keeps working for ``grace`` seconds (0: not at all)."""
        client = await self.get(client_id)
        if not client.confidential:
            raise AdminError("a public client has no secret to rotate")
        secret = secrets.token_urlsafe(32)
        updated = replace(
            client, secret_hash=await asyncio.to_thread(hash_secret, secret),
            old_secret_hash=client.secret_hash if grace > 0 else "",
            old_secret_expires_at=int(time.time()) + grace if grace > 0 else 0)
        await self.store.save_client(updated, extra={"updated_at": str(int(time.time())),
                                                     "updated_by": actor})
        await self.store.audit("client.secret_rotated", client_id=client_id, actor=actor,
                               grace_seconds=str(grace))
        return secret

    async def set_disabled(self, client_id: str, disabled: bool, *, actor: str,
                           reason: str = "") -> None:
        await self.governance.set_disabled(client_id, disabled, actor=actor, reason=reason)

    async def delete_client(self, client_id: str, *, actor: str, reason: str = "") -> int:
        """Delete a client and end every grant it holds; returns how many grants ended."""
        await self.get(client_id)
        grants = await self.store.list_grants(client_id=client_id)
        for grant in grants:
            if not grant.revoked:
                await self.issuer.revoke_grant(grant.grant_id, reason="client_deleted",
                                               actor=actor)
        await self.store.delete_client(client_id)
        await self.store.audit("client.deleted", client_id=client_id, actor=actor,
                               reason=reason)
        return len(grants)

    async def list_clients(self) -> list[OAuthClient]:
        return await self.store.list_clients()

    async def add_user(self, username: str, password: str, *, actor: str) -> None:
        if not username or len(username) > 128 or not username.isprintable() or " " in username:
            raise AdminError("a username is 1 to 128 printable characters, no spaces")
        if len(password) < 8:
            raise AdminError("a password needs at least 8 characters")
        existing = await self.store.get_user(username)
        await self.store.save_user(username, {
            "password_hash": await asyncio.to_thread(hash_secret, password),
            "sub": existing.get("sub") or "u_" + uuid.uuid4().hex,
            "created_at": existing.get("created_at") or str(int(time.time()))})
        await self.store.audit("user.added" if not existing else "user.password_set",
                               user=username, actor=actor)

    async def resolve_subject(self, name: str) -> tuple[str, str | None]:
        """``(subject, username)`` of a person named by a local or SSO user's username
        on this server (their stable user id), else ``(name, None)``: the name is the
        subject itself (an external server's ``sub``, Anaplan's ``userGuid``)."""
        if not name:
            raise AdminError("name a person: a subject or a built-in server's username")
        sub = (await self.store.get_user(name)).get("sub")
        return (sub, name) if sub else (name, None)

    async def set_user_disabled(self, name: str, disabled: bool, *, actor: str,
                                reason: str = "") -> tuple[str, str | None, dict[str, str]]:
        """Refuse (or accept again) every token of a person; ``(subject, username,
        fields written)``."""
        subject, username = await self.resolve_subject(name)
        fields = await self.people.set_disabled(subject, disabled, actor=actor, reason=reason,
                                                username=username)
        return subject, username, fields

    async def list_grants(self, *, client_id: str | None = None, username: str | None = None
                          ) -> list[Grant]:
        return await self.store.list_grants(client_id=client_id, username=username)

    async def revoke_token_digest(self, digest: str, *, actor: str) -> str:
        """End the token with this digest, if this server issued it; what happened.

        A refresh token ends its grant (RFC 7009 section 2.1), and so every access
        token of the grant; an access token ends alone.
        """
        refresh = await self.store.get_token("rt", digest)
        if refresh is not None:
            await self.issuer.revoke_grant(refresh["grant_id"], reason="revoked_by_admin",
                                           actor=actor)
            return "revoked (built-in server: the refresh token's grant ended)"
        if await self.store.get_token("at", digest) is not None:
            await self.store.delete_tokens([Keys.grant_token_member("at", digest)])
            return "revoked (built-in server)"
        return "unknown to the built-in server"

    async def revoke_grant(self, grant_id: str, *, actor: str, reason: str = "") -> None:
        if not await self.issuer.revoke_grant(grant_id, reason=reason or "revoked_by_admin",
                                              actor=actor):
            raise AdminError(f"no grant {grant_id!r}")
