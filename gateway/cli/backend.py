"""Where the administrative commands act: Redis directly, or a server's admin API.

The commands (``clients``, ``grants``, ``users``, ``audit``) parse their arguments and
print their results once; what they read and change goes through a :class:`Backend`:

* :class:`RedisBackend`: the operator's own connection to ``GATEWAY_REDIS_URL`` (the
  service layer :class:`~gateway.authserver.AuthAdmin`, as the server uses it);
* :class:`gateway.cli.remote.ApiBackend`: ``{server}/admin/api/v1/`` with the login saved
  by ``oauth-gateway login --admin --issuer URL``, chosen by ``--server URL`` or
  ``GATEWAY_SERVER``. No Redis access is needed on the admin's machine then.

Both return the same shapes, so human and ``--json`` output do not depend on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.authserver import AdminError, AuthAdmin
from gateway.cli.terminal import EXIT_FAIL, EXIT_USAGE, err, redis_failed
from gateway.config.rates import optional_rate
from gateway.config.settings import Settings
from gateway.pipeline.govern import ClientAdmin
from gateway.protocol.tokens import TokenDigester
from gateway.state import connection as store
from gateway.state.keys import Keys

#: a client record's fields never shown (secret hashes) or shown otherwise (booleans)
HIDDEN_FIELDS = {"disabled", "secret_hash", "old_secret_hash", "managed"}
SERVER_ENV = "GATEWAY_SERVER"


class Backend(Protocol):
    """What the administrative commands read and change (one implementation per path)."""

    async def clients(self) -> list[dict[str, Any]]: ...
    async def client(self, client_id: str) -> dict[str, Any] | None: ...
    async def set_client_disabled(self, client_id: str, disabled: bool, *, actor: str,
                                  reason: str) -> dict[str, Any]: ...
    async def create_client(self, *, name: str, grant: str, redirect_uris: list[str],
                            scopes: list[str], confidential: bool | None,
                            policy: dict[str, Any], introspect: bool, actor: str
                            ) -> tuple[dict[str, Any], str | None]: ...
    async def update_client(self, client_id: str, *, changes: dict[str, Any] | None,
                            rate_limit: str | None, actor: str) -> dict[str, Any]: ...
    async def rotate_secret(self, client_id: str, *, grace: int, actor: str) -> str: ...
    async def delete_client(self, client_id: str, *, reason: str, actor: str) -> int: ...
    async def grants(self, *, client_id: str | None, username: str | None
                     ) -> list[dict[str, Any]]: ...
    async def revoke_grant(self, grant_id: str, *, reason: str, actor: str) -> None: ...
    async def users(self) -> list[dict[str, Any]]: ...
    async def add_user(self, username: str, password: str, *, admin: bool | None,
                       actor: str) -> None: ...
    async def set_admin(self, username: str, admin: bool, *, actor: str
                        ) -> dict[str, Any]: ...
    async def set_person_disabled(self, person: str, disabled: bool, *, reason: str,
                                  actor: str) -> dict[str, Any]: ...
    async def audit(self, count: int) -> list[dict[str, str]]: ...


def record_view(client_id: str, fields: dict[str, str], settings: Settings | None = None
                ) -> dict[str, Any]:
    """A client record as shown to operators: never a secret hash."""
    from gateway.authserver import policy_view

    view: dict[str, Any] = {
        "client_id": client_id, "disabled": fields.get("disabled", "0") == "1",
        **{k: v for k, v in fields.items() if k not in HIDDEN_FIELDS}}
    if fields.get("managed") == "1":  # a built-in server's client: may it introspect all?
        view["introspect"] = fields.get("introspect") == "1"
        if settings is not None:  # its token policy, as the admin API shows it
            view["policy"] = policy_view(fields, settings)
    return view


def grant_row(grant: Any) -> dict[str, Any]:
    """One grant as ``grants list`` shows it."""
    return {"grant_id": grant.grant_id, "client_id": grant.client_id, "user": grant.username,
            "label": grant.label, "scope": grant.scope, "created_at": grant.created_at,
            "last_used_at": grant.last_used_at, "expires_at": grant.expires_at,
            "revoked": grant.revoked, "revoked_reason": grant.revoked_reason}


class RedisBackend:
    """The commands on the operator's own Redis connection (``GATEWAY_REDIS_URL``)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis, self.settings = redis, settings
        self.governance = ClientAdmin(redis, key_prefix=settings.key_prefix)
        self._auth: AuthAdmin | None = None

    async def auth(self) -> AuthAdmin:
        """The built-in server's service layer (its digest key read, or made, once)."""
        if self._auth is None:
            key = await store.digest_key(self.redis, self.settings.key_prefix,
                                         self.settings.token_digest_key)
            self._auth = AuthAdmin(self.redis, self.settings, TokenDigester(key))
        return self._auth

    async def clients(self) -> list[dict[str, Any]]:
        return [record_view(cid, f, self.settings) for cid, f in await self.governance.list()]

    async def client(self, client_id: str) -> dict[str, Any] | None:
        fields = await self.governance.show(client_id)
        return record_view(client_id, fields, self.settings) if fields else None

    async def set_client_disabled(self, client_id: str, disabled: bool, *, actor: str,
                                  reason: str) -> dict[str, Any]:
        fields = await self.governance.set_disabled(client_id, disabled, actor=actor,
                                                    reason=reason)
        return record_view(client_id, fields)

    async def create_client(self, *, name: str, grant: str, redirect_uris: list[str],
                            scopes: list[str], confidential: bool | None,
                            policy: dict[str, Any], introspect: bool, actor: str
                            ) -> tuple[dict[str, Any], str | None]:
        client, secret = await (await self.auth()).create_client(
            name=name, grant=grant, redirect_uris=redirect_uris, scopes=scopes, actor=actor,
            confidential=confidential, policy=policy, introspect=introspect)
        return client.public_view(), secret

    async def update_client(self, client_id: str, *, changes: dict[str, Any] | None,
                            rate_limit: str | None, actor: str) -> dict[str, Any]:
        auth = await self.auth()
        view: dict[str, Any] = {}
        if changes is not None:
            view = (await auth.update_client(client_id, actor=actor, **changes)).public_view()
        if rate_limit is not None:
            fields = await auth.governance.set_rate_limit(
                client_id, optional_rate(rate_limit), actor=actor)
            view = {**view, "client_id": client_id, "rate_limit": fields.get("rate_limit", "")}
        return view

    async def rotate_secret(self, client_id: str, *, grace: int, actor: str) -> str:
        return await (await self.auth()).rotate_secret(client_id, actor=actor, grace=grace)

    async def delete_client(self, client_id: str, *, reason: str, actor: str) -> int:
        return await (await self.auth()).delete_client(client_id, actor=actor, reason=reason)

    async def grants(self, *, client_id: str | None, username: str | None
                     ) -> list[dict[str, Any]]:
        found = await (await self.auth()).list_grants(client_id=client_id, username=username)
        return [grant_row(g) for g in found]

    async def revoke_grant(self, grant_id: str, *, reason: str, actor: str) -> None:
        await (await self.auth()).revoke_grant(grant_id, actor=actor, reason=reason)

    async def users(self) -> list[dict[str, Any]]:
        return await (await self.auth()).list_users()

    async def add_user(self, username: str, password: str, *, admin: bool | None,
                       actor: str) -> None:
        await (await self.auth()).add_user(username, password, actor=actor, admin=admin)

    async def set_admin(self, username: str, admin: bool, *, actor: str) -> dict[str, Any]:
        return await (await self.auth()).set_admin(username, admin, actor=actor)

    async def set_person_disabled(self, person: str, disabled: bool, *, reason: str,
                                  actor: str) -> dict[str, Any]:
        subject, username, fields = await (await self.auth()).set_user_disabled(
            person, disabled, actor=actor, reason=reason)
        return {"subject": subject, "username": username, "disabled": disabled,
                "reason": fields["reason"], "updated_at": fields["updated_at"],
                "updated_by": fields["updated_by"]}

    async def audit(self, count: int) -> list[dict[str, str]]:
        entries = cast(list[tuple[str, dict[str, str]]], await self.redis.xrevrange(
            Keys(self.settings.key_prefix).audit, count=count))
        return [{"id": eid, **fields} for eid, fields in reversed(entries)]


def server_of(args: argparse.Namespace) -> str | None:
    """The server whose admin API the command talks to (``--server``, else
    ``GATEWAY_SERVER``), or None: Redis directly."""
    server = getattr(args, "server", None) or os.environ.get(SERVER_ENV, "")
    return server.strip().rstrip("/") or None


def needs_redis(args: argparse.Namespace, what: str) -> int | None:
    """For a command the admin API cannot do: the refusal when a server is selected."""
    server = server_of(args)
    if server is None:
        return None
    err(f"{what} needs direct access to Redis (GATEWAY_REDIS_URL); the admin API of "
        f"{server} cannot do it: run it without --server and with GATEWAY_SERVER unset")
    return EXIT_USAGE


def with_backend(args: argparse.Namespace, settings: Settings,
                 action: Callable[[Backend], Awaitable[int]], *, writes: bool = False) -> int:
    """Run ``action`` on the selected backend; its exit code (a refusal: one line on
    standard error, :data:`EXIT_FAIL`)."""
    server = server_of(args)
    if server is not None:
        from gateway.cli.remote import run_remote

        return run_remote(server, action)

    async def main() -> int:
        redis = store.connect(settings.redis_url)
        try:
            await redis.ping()
            if writes:
                await store.claim_schema(redis, Keys(settings.key_prefix))
            return await action(RedisBackend(redis, settings))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except AdminError as exc:
        err(str(exc))
        return EXIT_FAIL
    except RedisError as exc:
        return redis_failed(settings, exc)
