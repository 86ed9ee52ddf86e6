"""The gateway's validator for the built-in server's tokens: in-process, no HTTP hop.

Its answer is the introspection endpoint's (:meth:`~.issuance.TokenIssuer.introspect`):
an access token is active while its record lives (revoking deletes it), before its
``exp``, and while its grant is alive: not revoked, not idle past the client's
``idle_timeout``, not past its maximum lifetime. The grant is read on every validation,
so a grant that ends ends every token of it, even one whose record a revocation racing
a refresh missed. The client's disable flag is the gateway's own governance, checked on
every request.

The gateway caches an active answer until its ``exp``; that ``exp`` is the token's or
the moment its grant would end (idle deadline, maximum lifetime), whichever comes first,
so no cached answer outlives the grant. A refresh moves the idle deadline later: past
the earlier one, the gateway asks again and learns the new one.

A token of a machine client's grant (``client_credentials``) is marked
``TokenInfo.machine`` and has no ``sub``: the gateway lets it reach only upstreams where
it presents its own credentials, and people governance has no person to check.
"""

from __future__ import annotations

import time

from gateway.authn.validators.base import TokenInfo
from gateway.authserver.models import GRANT_CLIENT_CREDENTIALS
from gateway.authserver.storage import AuthStore


class BuiltinValidator:
    """``GATEWAY_VALIDATOR=builtin`` (``auto`` when ``GATEWAY_ISSUER`` is set)."""

    name = "builtin"

    def __init__(self, store: AuthStore) -> None:
        self.store = store

    async def validate(self, token: str) -> TokenInfo:
        record = await self.store.get_token("at", self.store.digest(token))
        if record is None or float(record.get("exp", 0)) <= time.time():
            return TokenInfo.inactive()
        grant, client = await self.store.grant_and_client(
            str(record.get("grant_id", "")), str(record.get("client_id", "")))
        now = time.time()
        if grant is None or client is None or not grant.alive(client.policy, now):
            return TokenInfo.inactive()
        return TokenInfo(
            active=True, client_id=record.get("client_id"),
            scopes=frozenset(str(record.get("scope", "")).split()),
            exp=min(float(record["exp"]), grant.ends_at(client.policy)),
            sub=record.get("sub") or None, username=record.get("username") or None,
            machine=grant.grant_type == GRANT_CLIENT_CREDENTIALS)

    async def close(self) -> None:
        """Nothing of its own to release."""
