"""What every validator returns, and the interface it implements."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class ValidatorUnavailable(Exception):
    """The authority that validates tokens cannot be reached or answered nonsense.

    The gateway fails closed on this (503 with ``Retry-After``), never with 401:
    the token may well be good.
    """


def parse_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (RFC 6749 space-separated string) or ``scp`` (a list)."""
    scopes: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        scopes.update(scope.split())
    elif isinstance(scope, list):
        scopes.update(s for s in scope if isinstance(s, str))
    scp = claims.get("scp")
    if isinstance(scp, list):
        scopes.update(s for s in scp if isinstance(s, str))
    elif isinstance(scp, str):
        scopes.update(scp.split())
    return frozenset(scopes)


_SCOPE_SETS: dict[str, frozenset[str]] = {}


def _scope_set(scope: str) -> frozenset[str]:
    """The set of a ``scope`` string, shared by every token with that string: tokens of
    a client mostly carry the same one, so cached tokens share it rather than each
    holding a copy (less memory, and no split per Redis hit). Bounded."""
    found = _SCOPE_SETS.get(scope)
    if found is None:
        if len(_SCOPE_SETS) >= 4096:
            _SCOPE_SETS.clear()
        found = _SCOPE_SETS[scope] = frozenset(scope.split())
    return found


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """The validated facts about one token; what the caches hold (never the token)."""

    active: bool
    client_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    exp: float | None = None
    sub: str | None = None
    username: str | None = None
    #: issued to a machine client (RFC 6749 section 4.4): no person behind it, so it
    #: reaches only upstreams where the gateway presents its own credentials
    machine: bool = False

    @classmethod
    def inactive(cls) -> TokenInfo:
        return _INACTIVE

    def expired(self, now: float | None = None) -> bool:
        return self.exp is not None and self.exp <= (now if now is not None else time.time())

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "active": self.active, "client_id": self.client_id,
            "scope": " ".join(sorted(self.scopes)), "exp": self.exp, "sub": self.sub,
            "username": self.username,
        }
        if self.machine:  # only then: every other entry keeps the form it always had
            data["machine"] = True
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> TokenInfo:
        data = json.loads(text)
        if not data.get("active"):
            return _INACTIVE
        exp = data.get("exp")
        return cls(
            active=True, client_id=data.get("client_id"),
            scopes=_scope_set(data.get("scope") or ""),
            exp=float(exp) if exp is not None else None,
            sub=data.get("sub"), username=data.get("username"),
            machine=data.get("machine") is True,  # absent from older entries: a person's
        )


_INACTIVE = TokenInfo(active=False)


class TokenValidator(Protocol):
    """Validate one token. Return ``TokenInfo`` (active or not), or raise
    :class:`ValidatorUnavailable` when the answer cannot be known right now."""

    name: str

    async def validate(self, token: str) -> TokenInfo: ...

    async def close(self) -> None: ...
