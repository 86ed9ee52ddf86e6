"""The gateway's validator for the built-in server's tokens: in-process, no HTTP hop.

Reads the access-token record by digest; revocation deletes the record, and the
client's disable flag is the gateway's own governance, so the answer is the same as
at the introspection endpoint.
"""

from __future__ import annotations

import time

from gateway.authn.validators.base import TokenInfo
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
        return TokenInfo(
            active=True, client_id=record.get("client_id"),
            scopes=frozenset(str(record.get("scope", "")).split()),
            exp=float(record["exp"]), sub=record.get("sub"), username=record.get("username"))

    async def close(self) -> None:
        """Nothing of its own to release."""
