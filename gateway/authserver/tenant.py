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
- ``display_name`` and ``logo_url``: the name (and logo) every page shows, so a person
  knows whose service they are signing in to.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from gateway.authserver.models import CLI_CLIENT_ID, ModelError, TokenPolicy
from gateway.authserver.roles import admin_groups
from gateway.config.settings import Settings, described
from gateway.state.keys import Keys

CACHE_SECONDS = 1.0
FLOWS = ("authorization_code", "device_code", "client_credentials")
POLICY_FIELDS = tuple(f.name for f in fields(TokenPolicy))
NAMES = ("self_service", "flows", *POLICY_FIELDS, "admin_groups", "display_name", "logo_url")
MAX_NAME = 80
#: where a value comes from, as the console and the admin API say it
CONSOLE, ENVIRONMENT, DEFAULT = "console", "environment", "default"
_ENV_FIELD = {**{n: "as_" + n for n in POLICY_FIELDS}, "admin_groups": "admin_groups",
              "display_name": "display_name", "logo_url": "logo_url"}


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
    display_name: str = "oauth-gateway"
    logo_url: str = ""

    def allows_new_grant(self, client_id: str) -> bool:
        return self.self_service or client_id == CLI_CLIENT_ID

    @property
    def groups(self) -> frozenset[str]:
        return admin_groups(self.admin_groups)

    def view(self) -> dict[str, Any]:
        """The settings as the admin API shows them (``sources`` says where from)."""
        return {"self_service": self.self_service, "flows": list(self.flows),
                "default_policy": {n: getattr(self.policy, n) for n in POLICY_FIELDS},
                "admin_groups": self.admin_groups, "display_name": self.display_name,
                "logo_url": self.logo_url, "sources": dict(self.sources)}


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
                  sources=sources,
                  display_name=stored.get("display_name", "").strip() or env["display_name"]
                  or "oauth-gateway",
                  logo_url=stored.get("logo_url", env["logo_url"]).strip())


def logo_url(value: str) -> str:
    """``value`` if it is an https URL a page may show as an image (empty: none), or
    :class:`TenantError`."""
    value = value.strip()
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.username or \
            len(value) > 500 or any(c in value for c in " \"'<>\\;,") or \
            not value.isprintable():
        raise TenantError("logo URL: an https:// URL (or empty for none)")
    return value


def origin(url: str) -> str:
    """The origin of an https URL (``https://host[:port]``), for the pages' CSP."""
    netloc = urlsplit(url).netloc
    ok = url.startswith("https://") and re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", netloc)
    return f"https://{netloc}" if ok else ""


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
            elif name == "display_name":
                text = " ".join(str(value).split())
                if not text or len(text) > MAX_NAME or not text.isprintable():
                    raise TenantError(f"display name: 1 to {MAX_NAME} printable characters")
                out[name] = text
            elif name == "logo_url":
                out[name] = logo_url(str(value)) or " "  # " ": none, over the environment's
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
