"""The admin role: who holds it, how single sign-on sets it, and the CLI's own client.

A user of the built-in server holds the admin role when their record
(``{prefix}as:user:{username}``) has ``admin`` = ``1``. ``oauth-gateway users add
--admin`` / ``users update --admin|--no-admin`` (and the admin API) set it for any user;
with ``GATEWAY_ADMIN_GROUPS`` set, each SSO sign-in sets it from the ID token's
``groups`` claim, so the identity provider decides for the people it signs in.

The role is read again at each use (consent, each admin API request), never copied into
a token or a session: taking it away cuts access at the next request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from gateway.authserver.models import ADMIN_SCOPE, CLI_CLIENT_ID, GRANT_DEVICE, OAuthClient
from gateway.authserver.storage import AuthStore
from gateway.state import connection as gwstore
from gateway.state import events

ADMIN_FIELD = "admin"
#: what a consent page says to a person without the role who is asked for ADMIN_SCOPE
NOT_ADMIN = ("This application asks for administrator access (gateway:admin), and your "
             "account is not an administrator. Ask an administrator to grant you the admin "
             "role, or sign in without asking for gateway:admin.")

# KEYS[1]: the client's hash; ARGV: field, value, field, value... Creates the record
# only when no server created it yet (``managed`` absent): one step, so replicas
# starting together write it once, and never over what an operator changed since.
_CREATE_IF_ABSENT = """
if redis.call('HEXISTS', KEYS[1], 'managed') == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


async def is_admin(store: AuthStore, username: str | None) -> bool:
    """Whether the user ``username`` holds the admin role now (a machine: never)."""
    if not username:
        return False
    return await store.redis.hget(store.keys.as_user(username), ADMIN_FIELD) == "1"


def admin_groups(setting: str) -> frozenset[str]:
    """``GATEWAY_ADMIN_GROUPS``: group names, comma-separated, blanks ignored."""
    return frozenset(g.strip() for g in setting.split(",") if g.strip())


def sso_admin(claims: dict[str, Any], groups: frozenset[str]) -> bool | None:
    """The role the ID token's ``groups`` claim gives; None when no admin group is set
    (single sign-on then leaves the role alone). A claim that is not a list of strings
    (or one string) names no group."""
    if not groups:
        return None
    raw = claims.get("groups")
    names = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return any(isinstance(n, str) and n in groups for n in names)


async def record_sso_role(store: AuthStore, username: str, admin: bool | None) -> None:
    """Write the role single sign-on gives; audited when it changes."""
    if admin is None:
        return
    key = store.keys.as_user(username)
    before = await store.redis.hget(key, ADMIN_FIELD) == "1"
    await store.redis.hset(key, ADMIN_FIELD, "1" if admin else "0")
    if before != admin:
        await store.audit("user.role_changed", user=username, actor="sso",
                          admin="1" if admin else "0")


async def ensure_cli_client(store: AuthStore, scopes: Iterable[str]) -> bool:
    """Create the public device-flow client ``oauth-gateway-cli`` when missing; whether
    this call created it. It may ask for ``scopes`` (the policies' and
    :data:`ADMIN_SCOPE`); an existing one is left as the operator left it."""
    now = int(time.time())
    client = OAuthClient(
        client_id=CLI_CLIENT_ID, name="oauth-gateway command line", grant_type=GRANT_DEVICE,
        scopes=tuple(dict.fromkeys([*scopes, ADMIN_SCOPE])), policy=store.defaults,
        created_at=now, created_by="gateway").validate()
    fields = {**client.to_fields(), "updated_at": str(now), "updated_by": "gateway"}
    flat = [item for pair in fields.items() for item in pair]
    created = bool(await store.redis.eval(_CREATE_IF_ABSENT, 1, store.client_key(CLI_CLIENT_ID),
                                          *flat))
    # the listing set and the event: idempotent, so done by every replica
    async with gwstore.pipeline(store.redis) as pipe:
        pipe.sadd(store.keys.as_clients, CLI_CLIENT_ID)
        await events.execute_and_publish(store.redis, pipe, store.keys,
                                         [events.ClientChanged(CLI_CLIENT_ID)])
    if created:
        await store.audit("client.created", client_id=CLI_CLIENT_ID, actor="gateway",
                          name=client.name, flow=client.flow)
    return created
