"""What the project tells the fleet: change notices, audit entries and revocation pins.

**Events** are JSON messages on :attr:`Keys.events <gateway.state.keys.Keys.events>`;
every replica's subscriber (:mod:`gateway.runtime.fleet`) applies them:

- ``{"type": "client", "client_id": ...}`` (:class:`ClientChanged`): a client record
  changed; re-read it.
- ``{"type": "user", "subject": ...}`` (:class:`UserChanged`): a person's record
  changed; re-read it.
- ``{"type": "token_revoked", "digest": ...}`` (:class:`TokenRevoked`): drop that token
  from the in-process cache layer.

:func:`parse` returns None for a message of a type it does not know, or of a known type
without its field, and the subscriber ignores it: a newer release may publish new types
(or add fields) while older replicas still listen.

**Audit entries** are flat string maps appended to
:attr:`Keys.audit <gateway.state.keys.Keys.audit>` (:func:`append_audit`), always with
``action`` and ``at`` (Unix seconds), never a secret:

- :func:`client_status_entry`: ``client.disabled``, ``client.enabled`` with
  ``client_id``, ``actor``, ``reason``;
- :func:`client_rate_limit_entry`: ``client.rate_limit_set`` with ``client_id``,
  ``rate_limit`` (``N/PERIOD``, or empty: cleared), ``actor``;
- :func:`user_status_entry`: ``user.disabled``, ``user.enabled`` with ``subject``,
  ``user`` (when named by a built-in server's username), ``actor``, ``reason``;
- :func:`token_revoked_entry`: ``token.revoked`` with ``token_digest`` (its first 12
  characters) and ``authorization_server`` (what the server answered);
- :func:`audit_entry`, the built-in authorization server's: ``client.created``,
  ``client.updated``, ``client.secret_rotated``, ``client.deleted``, ``user.added``,
  ``user.password_set``, ``login``, ``login.failed``, ``grant.created``,
  ``grant.revoked``, ``refresh.reuse_detected``, ``authorization.denied``,
  ``code.issued``, ``code.redeemed``, ``code.replay_detected``, ``device.approved``,
  ``device.denied``, ``device.code_entry_limited``, with the fields each one names;
  ``backup.exported`` (``actor``, ``file``, ``keys``, ``digest_key``) and
  ``backup.imported`` (``actor``, ``file``, ``keys``, ``expired``, ``replaced``).

**The revocation pin** (:func:`pin_revoked`) writes :data:`REVOKED_MARKER` at a token's
cache key, so no replica re-validates a revoked token while it would still be cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from gateway.state import connection
from gateway.state.keys import Keys

AUDIT_MAXLEN = 100_000  # entries kept (approximately: MAXLEN ~ trims cheaply)

REVOKED_MARKER = '{"active":false,"revoked":true}'
"""The value pinned at :meth:`Keys.token <gateway.state.keys.Keys.token>` of a revoked
token: an inactive validation result, which every replica reads as such."""


# -- events ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ClientChanged:
    """A client record changed (disabled, enabled, created, updated, deleted)."""

    client_id: str

    def encode(self) -> str:
        return json.dumps({"type": "client", "client_id": self.client_id})


@dataclass(frozen=True, slots=True)
class UserChanged:
    """A person's record changed (disabled, enabled); ``subject`` is their tokens'."""

    subject: str

    def encode(self) -> str:
        return json.dumps({"type": "user", "subject": self.subject})


@dataclass(frozen=True, slots=True)
class TokenRevoked:
    """A token was revoked; ``digest`` is its keyed digest."""

    digest: str

    def encode(self) -> str:
        return json.dumps({"type": "token_revoked", "digest": self.digest})


Event = ClientChanged | UserChanged | TokenRevoked


def parse(data: str | bytes | None) -> Event | None:
    """The event a message carries; None when it is not one this release knows."""
    try:
        body = json.loads(data or "")
    except (ValueError, TypeError):
        return None
    if not isinstance(body, dict):
        return None
    kind = body.get("type")
    if kind == "client" and isinstance(body.get("client_id"), str):
        return ClientChanged(body["client_id"])
    if kind == "user" and isinstance(body.get("subject"), str):
        return UserChanged(body["subject"])
    if kind == "token_revoked" and isinstance(body.get("digest"), str):
        return TokenRevoked(body["digest"])
    return None


async def execute_and_publish(redis: Redis, pipe: Pipeline, keys: Keys,
                              events: Sequence[Event]) -> None:
    """Execute ``pipe``, then publish ``events`` on the events channel
    (:func:`gateway.state.connection.execute_and_publish`: never ahead of the writes)."""
    await connection.execute_and_publish(redis, pipe, keys.events,
                                         [event.encode() for event in events])


# -- the audit stream ------------------------------------------------------------

def _now() -> str:
    return str(int(time.time()))


def audit_entry(action: str, **fields: str | None) -> dict[str, str]:
    """``action``, ``at`` (now), then ``fields`` (those that are None left out)."""
    return {"action": action, "at": _now(),
            **{k: v for k, v in fields.items() if v is not None}}


def client_status_entry(client_id: str, *, disabled: bool, actor: str, reason: str,
                        at: str) -> dict[str, str]:
    """A client disabled or enabled by an operator."""
    return {"action": "client.disabled" if disabled else "client.enabled",
            "client_id": client_id, "actor": actor, "reason": reason, "at": at}


def client_rate_limit_entry(client_id: str, *, rate_limit: str, actor: str, at: str
                            ) -> dict[str, str]:
    """A client's rate limit set or cleared (``rate_limit`` empty) by an operator."""
    return {"action": "client.rate_limit_set", "client_id": client_id,
            "rate_limit": rate_limit, "actor": actor, "at": at}


def user_status_entry(subject: str, *, disabled: bool, actor: str, reason: str, at: str,
                      username: str | None = None) -> dict[str, str]:
    """A person disabled or enabled by an operator (``user``: the username they were
    named by, when a built-in server's)."""
    entry = {"action": "user.disabled" if disabled else "user.enabled",
             "subject": subject, "actor": actor, "reason": reason, "at": at}
    if username is not None:
        entry["user"] = username
    return entry


def token_revoked_entry(digest: str, *, authorization_server: str) -> dict[str, str]:
    """A token revoked by ``oauth-gateway tokens revoke`` (only its digest's start)."""
    return {"action": "token.revoked", "token_digest": digest[:12], "at": _now(),
            "authorization_server": authorization_server}


def append_audit(target: Redis, keys: Keys, entry: Mapping[str, str]) -> Any:
    """XADD ``entry`` to the audit stream through ``target`` (a client, whose answer is
    awaited, or a pipeline)."""
    fields: dict[Any, Any] = dict(entry)
    return target.xadd(keys.audit, fields, maxlen=AUDIT_MAXLEN, approximate=True)


# -- the revocation pin --------------------------------------------------------

def pin_revoked(target: Redis, keys: Keys, digest: str, seconds: float) -> Any:
    """SET the token's cache key to :data:`REVOKED_MARKER` for ``seconds`` (at least a
    millisecond) through ``target`` (a client, whose answer is awaited, or a pipeline)."""
    return target.set(keys.token(digest), REVOKED_MARKER, px=max(1, int(seconds * 1000)))
