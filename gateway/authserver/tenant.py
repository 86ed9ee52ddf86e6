"""Tenant settings: what an administrator changes at run time, over the environment's.

Stored in one Redis hash (``{prefix}as:tenant``); a value there wins over the
environment's (``GATEWAY_AS_*``, ``GATEWAY_ADMIN_GROUPS``), which wins over the built-in
default. Each replica reads the hash at use, through an in-process cache of at most
:data:`CACHE_SECONDS`, so a change holds fleet-wide within a second.

- ``self_service``: on (default) or off. Off, the built-in server makes no new grant for
  any client but ``oauth-gateway-cli`` (the administrators' own way in): sign-ins,
  device approvals and first machine tokens are refused with ``access_denied``; grants
  that exist live on under their policies (revoke them to end them).
- ``flows``: the flows a new client may be created for (console, CLI, admin API).
- the default token policy of new clients (``access_token_ttl`` ...): applied when a
  client is created; existing clients keep theirs.
- ``admin_groups``: the ID token's groups whose members get the admin role at SSO sign-in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from redis.asyncio import Redis

from gateway.authserver.models import CLI_CLIENT_ID, ModelError, TokenPolicy
from gateway.authserver.roles import admin_groups
from gateway.config.settings import Settings, described
from gateway.state.keys import Keys

CACHE_SECONDS = 1.0
FLOWS = ("authorization_code", "device_code", "client_credentials")
POLICY_FIELDS = tuple(f.name for f in fields(TokenPolicy))
NAMES = ("self_service", "flows", *POLICY_FIELDS, "admin_groups")
#: where a value comes from, as the console and the admin API say it
CONSOLE, ENVIRONMENT, DEFAULT = "console", "environment", "default"
_ENV_FIELD = {**{n: "as_" + n for n in POLICY_FIELDS}, "admin_groups": "admin_groups"}


class TenantError(ValueError):
    """A tenant setting's value is not acceptable; the message says why."""


@dataclass(frozen=True)
class Tenant:
    """The tenant settings in force, and where each value comes from."""

    self_service: bool
    flows: tuple[str, ...]
    policy: TokenPolicy
    admin_groups: str
    sources: dict[str, str] = field(default_factory=dict)

    def allows_new_grant(self, client_id: str) -> bool:
        return self.self_service or client_id == CLI_CLIENT_ID

    @property
    def groups(self) -> frozenset[str]:
        return admin_groups(self.admin_groups)

    def view(self) -> dict[str, Any]:
        """The settings as the admin API shows them (``sources`` says where from)."""
        return {"self_service": self.self_service, "flows": list(self.flows),
                "default_policy": {n: getattr(self.policy, n) for n in POLICY_FIELDS},
                "admin_groups": self.admin_groups, "sources": dict(self.sources)}


def _declared_defaults() -> dict[str, Any]:
    return {d.name: d.default for d in described()}


def resolve(stored: dict[str, str], settings: Settings) -> Tenant:
    """The settings in force given the hash ``stored`` and the environment's."""
    declared = _declared_defaults()
    sources: dict[str, str] = {}
    env: dict[str, Any] = {}
    for name in NAMES:
        attr = _ENV_FIELD.get(name)
        value = getattr(settings, attr) if attr else None
        env[name] = value
        sources[name] = CONSOLE if stored.get(name, "") != "" else (
            ENVIRONMENT if attr and value != declared.get(attr) else DEFAULT)
    values: dict[str, Any] = {}
    for name in POLICY_FIELDS:
        raw = stored.get(name, "")
        try:
            values[name] = (raw if name == "refresh_mode" else int(raw)) if raw else env[name]
        except ValueError:  # a hand-edited hash: fall back, and say so
            values[name], sources[name] = env[name], sources[name] + " (invalid value ignored)"
    try:
        policy = TokenPolicy(**values).validate()
    except ModelError:
        policy = TokenPolicy(**{n: env[n] for n in POLICY_FIELDS})
        for name in POLICY_FIELDS:
            sources[name] = ENVIRONMENT if sources[name] == CONSOLE else sources[name]
    flows = tuple(f for f in stored.get("flows", "").split(",") if f in FLOWS) or FLOWS
    return Tenant(self_service=stored.get("self_service", "1") != "0", flows=flows,
                  policy=policy,
                  admin_groups=stored.get("admin_groups", env["admin_groups"]).strip(),
                  sources=sources)


class TenantSettings:
    """Reads (cached ≤ :data:`CACHE_SECONDS`) and writes the tenant settings."""

    def __init__(self, redis: Redis, settings: Settings, keys: Keys) -> None:
        self.redis = redis
        self.settings = settings
        self.key = keys.as_tenant
        self._cached: tuple[float, Tenant] | None = None

    async def get(self, *, fresh: bool = False) -> Tenant:
        now = time.monotonic()
        if not fresh and self._cached and now - self._cached[0] < CACHE_SECONDS:
            return self._cached[1]
        stored: dict[str, str] = await self.redis.hgetall(self.key)  # type: ignore[assignment]
        tenant = resolve(stored, self.settings)
        self._cached = (now, tenant)
        return tenant

    @staticmethod
    def check(changes: dict[str, Any], current: Tenant) -> dict[str, str]:
        """The hash fields to write for ``changes`` (``None`` for a name: back to the
        environment's value), or :class:`TenantError`."""
        out: dict[str, str] = {}
        for name, value in changes.items():
            if name not in NAMES:
                raise TenantError(f"unknown setting {name!r}; known: {', '.join(NAMES)}")
            if value is None:
                out[name] = ""
            elif name == "self_service":
                out[name] = "1" if value else "0"
            elif name == "flows":
                chosen = [f for f in FLOWS if f in value]
                if not chosen or len(chosen) != len(set(value)):
                    raise TenantError(f"flows: choose one or more of {', '.join(FLOWS)}")
                out[name] = ",".join(chosen)
            elif name == "admin_groups":
                out[name] = ",".join(sorted(admin_groups(str(value)))) or " "
            else:
                out[name] = str(value)
        policy = {n: out[n] for n in POLICY_FIELDS if out.get(n)}
        if policy:
            try:
                values: dict[str, Any] = {n: v if n == "refresh_mode" else int(v)
                                          for n, v in policy.items()}
                replace(current.policy, **values).validate()
            except (ModelError, ValueError) as exc:
                raise TenantError(f"default token policy: {exc}") from None
        return out

    async def write(self, fields_: dict[str, str]) -> None:
        clear = [n for n, v in fields_.items() if v == ""]
        keep = {n: v for n, v in fields_.items() if v != ""}
        async with self.redis.pipeline(transaction=True) as pipe:
            if keep:
                pipe.hset(self.key, mapping=dict(keep))  # type: ignore[arg-type]
            if clear:
                pipe.hdel(self.key, *clear)
            await pipe.execute()
        self._cached = None
