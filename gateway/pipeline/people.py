"""People governance: per-person records in Redis, mirrored in every replica.

A token speaks for a person, its **subject**: the ``sub`` an introspection endpoint or a
JWT names, Anaplan's ``userInfo.userGuid``, or the built-in server's stable user id
(``TokenInfo.sub``, whichever validator made it). ``{prefix}user:{subject}`` is a hash
whose ``disabled`` field (``"1"`` disables) refuses every token of that person with 401
``invalid_token`` (docs/COMPATIBILITY.md). The gateway adds ``updated_at``,
``updated_by``, ``reason`` and, when the person was named by a built-in server's
username, ``username``.

A change travels exactly as a client record's does (:mod:`gateway.pipeline.govern`):
``oauth-gateway users disable|enable`` publishes a :class:`~gateway.state.events.UserChanged`
event (every replica within 100 ms); a plain ``redis-cli HSET`` is caught by keyspace
notifications when the server sends them, and in any case by the poll of every mirrored
record every ``client_refresh_interval`` (under 1 s).

What it costs a request: nothing for a token without a subject; for one with a subject
the replica holds, one dict lookup (most people have no record: the mirror holds that
too). A subject is read from Redis once, when the replica first sees it, and then kept
fresh by the poll, which asks Redis for the records that exist only, so that thousands
of people without one cost the poll almost nothing to parse.
"""

from __future__ import annotations

import time
from typing import Any, cast

from redis.asyncio import Redis

from gateway.observe.metrics import GatewayMetrics
from gateway.pipeline.govern import ClientRegistry
from gateway.state import connection as store
from gateway.state import events
from gateway.state.keys import Keys

# KEYS: people's record hashes. Returns, flattened, for each one that exists: its
# 1-based position in KEYS and its `disabled` field (nil when absent): {i1, d1, i2, ...}.
# People with a record are few, and the reply carries only them.
_READ_PEOPLE = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = i
    out[#out + 1] = redis.call('HGET', key, 'disabled') or ''
  end
end
return out
"""

_NO_RECORD: tuple[bool, str | None, str | None] = (False, None, None)


class UserRegistry(ClientRegistry):
    """The replica's mirror of people's records, by subject (the records are
    :class:`~gateway.pipeline.govern.ClientRecord`, whose ``client_id`` is the subject
    and whose ``scopes`` stay None)."""

    kind = "user"

    def __init__(self, redis: Redis, *, key_prefix: str, metrics: GatewayMetrics,
                 refresh_interval: float = 0.5) -> None:
        super().__init__(redis, key_prefix=key_prefix, metrics=metrics,
                         refresh_interval=refresh_interval)
        self._read_people = redis.register_script(_READ_PEOPLE)

    def key(self, subject: str) -> str:
        return self.keys.user(subject)

    async def _read(self, ids: list[str]) -> list[tuple[bool, str | None, str | None]]:
        """``(exists, disabled, None)`` of each record, in one round trip."""
        if store.is_cluster(self.redis):  # a script's keys must share a hash slot there
            async with self.redis.pipeline(transaction=False) as pipe:
                for subject in ids:
                    pipe.hget(self.key(subject), "disabled")
                    pipe.exists(self.key(subject))
                flat: list[Any] = await pipe.execute()
            return [(bool(flat[i + 1]), flat[i], None) for i in range(0, len(flat), 2)]
        answers = [_NO_RECORD] * len(ids)
        found = await self._read_people(keys=[self.key(subject) for subject in ids])
        for n in range(0, len(found), 2):
            answers[int(found[n]) - 1] = (True, found[n + 1], None)
        return answers


class UserAdmin:
    """Operator-side changes to people's records: each one audited and published."""

    def __init__(self, redis: Redis, *, key_prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)

    async def set_disabled(self, subject: str, disabled: bool, *, actor: str,
                           reason: str = "", username: str | None = None) -> dict[str, str]:
        """Disable or enable every token of ``subject``; the fields written."""
        if not subject:
            raise ValueError("a subject is needed")
        now = str(int(time.time()))
        fields = {"disabled": "1" if disabled else "0", "updated_at": now,
                  "updated_by": actor, "reason": reason}
        if username is not None:
            fields["username"] = username
        async with store.pipeline(self.redis) as pipe:
            pipe.hset(self.keys.user(subject), mapping=cast(dict[Any, Any], fields))
            events.append_audit(pipe, self.keys, events.user_status_entry(
                subject, disabled=disabled, actor=actor, reason=reason, at=now,
                username=username))
            await events.execute_and_publish(self.redis, pipe, self.keys,
                                             [events.UserChanged(subject)])
        return fields

    async def show(self, subject: str) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(self.keys.user(subject)))
