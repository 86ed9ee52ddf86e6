"""Self-service administration: clients, secrets, users, grants. Every change audited.

The one service layer of administration: the CLI (``oauth-gateway clients
create|update|rotate-secret|delete``, ``users add|update|disable|enable``, ``grants
list|revoke``) and the JSON admin API (:mod:`gateway.authserver.adminapi`) both call it,
so both obey the same rules, audits and propagation bounds.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import replace
from typing import Any, cast

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
from gateway.authserver.roles import ADMIN_FIELD
from gateway.authserver.server import cache_pin_ttl, tenant_defaults
from gateway.authserver.storage import AuthStore
from gateway.authserver.tenant import FLOWS, Tenant, TenantError, TenantSettings
from gateway.config.rates import optional_rate
from gateway.config.settings import Settings
from gateway.pipeline.govern import ClientAdmin
from gateway.pipeline.people import UserAdmin
from gateway.protocol.tokens import TokenDigester
from gateway.state.keys import Keys


class AdminError(ValueError):
    """An administrative request cannot be carried out; the message says why."""


class NotFound(AdminError):
    """The client, grant or user named does not exist."""


class Conflict(AdminError):
    """The change clashes with what exists (a user created twice)."""


class AuthAdmin:
    """The operations behind the CLI."""

    def __init__(self, redis: Redis, settings: Settings, digester: TokenDigester,
                 metrics: AuthServerMetrics | None = None, *, remote: str = "") -> None:
        """``remote``: the address of the person acting (console, admin API), written
        into every audit entry of theirs; the CLI names none."""
        if metrics is None:  # counted by no scrape: the CLI's process is short-lived
            metrics = AuthServerMetrics(CollectorRegistry())
        self.settings = settings
        self.store = AuthStore(redis, key_prefix=settings.key_prefix, digester=digester,
                               defaults=tenant_defaults(settings))
        self.issuer = TokenIssuer(self.store, issuer=settings.issuer, metrics=metrics,
                                  cache_pin_ttl=cache_pin_ttl(settings))
        self.governance = ClientAdmin(redis, key_prefix=settings.key_prefix)
        self.people = UserAdmin(redis, key_prefix=settings.key_prefix)
        self.tenant = TenantSettings(redis, settings, self.store.keys)
        if remote:
            for writer in (self.store, self.governance, self.people):
                writer.audit_fields = {"remote": remote}

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
        tenant = await self.tenant.get(fresh=True)
        flow_name = next(n for n in FLOWS if FLOW_NAMES[n] == grant_type)
        if flow_name not in tenant.flows:
            raise AdminError(f"the tenant settings allow new clients only for "
                             f"{', '.join(tenant.flows)}")
        if confidential is None:
            confidential = grant_type in (GRANT_CODE, GRANT_CLIENT_CREDENTIALS)
        secret = secrets.token_urlsafe(32) if confidential else None
        client = OAuthClient(
            client_id=uuid.uuid4().hex, name=name, grant_type=grant_type,
            redirect_uris=tuple(dict.fromkeys(redirect_uris)),
            scopes=tuple(dict.fromkeys(s for scope in scopes for s in scope.split())),
            confidential=confidential, introspect=introspect,
            secret_hash=await asyncio.to_thread(hash_secret, secret) if secret else "",
            policy=self._policy(tenant.policy, policy or {}),
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
            raise NotFound(f"no client {client_id!r} on this authorization server")
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

    async def add_user(self, username: str, password: str, *, actor: str,
                       admin: bool | None = None, create_only: bool = False) -> None:
        """Add a local user, or set an existing one's password; ``admin`` gives (True)
        or takes away (False) the admin role, None leaves it (none for a new user)."""
        if not username or len(username) > 128 or not username.isprintable() or " " in username:
            raise AdminError("a username is 1 to 128 printable characters, no spaces")
        if len(password) < 8:
            raise AdminError("a password needs at least 8 characters")
        existing = await self.store.get_user(username)
        if existing and create_only:
            raise Conflict(f"user {username!r} exists")
        await self.store.save_user(username, {
            "password_hash": await asyncio.to_thread(hash_secret, password),
            "sub": existing.get("sub") or "u_" + uuid.uuid4().hex,
            "created_at": existing.get("created_at") or str(int(time.time()))})
        await self.store.audit("user.added" if not existing else "user.password_set",
                               user=username, actor=actor)
        if admin is not None:
            await self.set_admin(username, admin, actor=actor)

    async def set_admin(self, username: str, admin: bool, *, actor: str) -> dict[str, Any]:
        """Give or take away a user's admin role (effective at their next request)."""
        fields = await self.store.get_user(username)
        if not fields.get("sub"):
            raise NotFound(f"no user {username!r} on this authorization server")
        await self.store.save_user(username, {ADMIN_FIELD: "1" if admin else "0"})
        await self.store.audit("user.role_changed", user=username, actor=actor,
                               admin="1" if admin else "0")
        return await self.user_view(username)

    async def user_view(self, username: str, fields: dict[str, str] | None = None
                        ) -> dict[str, Any]:
        """A user as shown to operators: never a password hash."""
        if fields is None:
            fields = await self.store.get_user(username)
        if not fields.get("sub"):
            raise NotFound(f"no user {username!r} on this authorization server")
        person = await self.people.show(fields["sub"])
        return {"username": username, "subject": fields["sub"],
                "kind": "sso" if fields.get("sso") else "local",
                "admin": fields.get(ADMIN_FIELD) == "1",
                "disabled": person.get("disabled", "0").strip() == "1",
                "created_at": int(fields.get("created_at") or 0)}

    async def list_users(self) -> list[dict[str, Any]]:
        """Every user of this server (local and SSO), by username."""
        keys = self.store.keys
        names = sorted({keys.as_username_of(k) async for k in
                        self.store.redis.scan_iter(match=keys.as_user_pattern, count=500)})
        out = []
        for name in names:
            fields = await self.store.get_user(name)
            if fields.get("sub"):
                out.append(await self.user_view(name, fields))
        return out

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
            raise NotFound(f"no grant {grant_id!r}")

    async def client_view(self, client: OAuthClient) -> dict[str, Any]:
        """A client as the admin API shows it: ``clients show``'s fields, with the
        governance record's ``rate_limit`` and who changed it last, when, why."""
        record = await self.governance.show(client.client_id)
        return {**client.public_view(), "grant_type": client.flow,
                "rate_limit": record.get("rate_limit") or None,
                "updated_at": int(record.get("updated_at") or 0) or None,
                "updated_by": record.get("updated_by") or None,
                "reason": record.get("reason") or None}

    async def has_record(self, client_id: str) -> bool:
        """Whether any client record (the built-in server's or governance only) exists."""
        return bool(await self.governance.show(client_id))

    async def set_rate_limit(self, client_id: str, rate: str | None, *, actor: str
                             ) -> None:
        """Set (``N/PERIOD``) or clear (None, ``""``, ``none``) a client's rate limit."""
        try:
            parsed = optional_rate(rate or "")
        except ValueError as exc:
            raise AdminError(f"rate_limit: {exc}") from None
        await self.governance.set_rate_limit(client_id, parsed, actor=actor)

    async def tenant_settings(self) -> Tenant:
        """The tenant settings in force (read now), with where each value comes from."""
        return await self.tenant.get(fresh=True)

    async def update_settings(self, changes: dict[str, Any], *, actor: str) -> Tenant:
        """Change tenant settings (a value None: back to the environment's); audited,
        in force on every replica within a second."""
        try:
            written = self.tenant.check(changes, await self.tenant.get(fresh=True))
        except TenantError as exc:
            raise AdminError(str(exc)) from None
        if written:
            await self.tenant.write(written)
            await self.store.audit("tenant.updated", actor=actor,
                                   fields=",".join(sorted(written)))
        return await self.tenant.get(fresh=True)

    async def audit_entries(self, *, limit: int, before: str | None = None,
                            match: dict[str, str] | None = None
                            ) -> tuple[list[dict[str, str]], str | None]:
        """The newest audit entries first (older than the entry id ``before``), those whose
        fields equal ``match`` (``actor``, ``client_id``, ``action``; ``subject`` matches
        ``subject`` or ``user``); with the id to continue from when more may remain."""
        match = {k: v for k, v in (match or {}).items() if v}
        key = self.store.keys.audit
        found: list[dict[str, str]] = []
        upper = f"({before}" if before else "+"
        while len(found) <= limit:  # one more than asked: whether more remain
            batch = cast(list[tuple[str, dict[str, str]]], await self.store.redis.xrevrange(
                key, max=upper, min="-", count=max(limit * 2, 100)))
            if not batch:
                break
            for entry_id, fields in batch:
                upper = f"({entry_id}"
                if all(_matches(fields, k, v) for k, v in match.items()):
                    found.append({"id": entry_id, **fields})
                    if len(found) > limit:
                        break
        if len(found) > limit:
            return found[:limit], found[limit - 1]["id"]
        return found, None


def policy_view(fields: dict[str, str], settings: Settings) -> dict[str, Any] | None:
    """The ``policy`` object of a client record (None: no client of this server), as
    ``clients show --json`` and the admin API show it."""
    client = OAuthClient.from_fields("", fields, tenant_defaults(settings))
    return client.public_view()["policy"] if client is not None else None


def _matches(fields: dict[str, str], name: str, value: str) -> bool:
    if name == "subject":
        return value in (fields.get("subject"), fields.get("user"))
    return fields.get(name) == value
