"""People governance: per-person records in Redis, mirrored in every replica.

A token speaks for a person, its **subject**: the ``sub`` an introspection endpoint or a
JWT names, Anaplan's ``userInfo.userGuid``, or the built-in server's stable user id
(``TokenInfo.sub``, whichever validator made it). ``{prefix}user:{subject}`` is a hash
whose ``disabled`` field (``"1"`` disables) refuses every token of that person with 401
``invalid_token`` (docs/COMPATIBILITY.md). The gateway adds ``updated_at``,
``updated_by``, ``reason`` and, when the person was named by a built-in server's
username, ``username``.

A change travels as a client record's does (:mod:`gateway.pipeline.govern`):
``oauth-gateway users disable|enable`` publishes a :class:`~gateway.state.events.UserChanged`
event, which every replica's subscriber applies at once (the bound is 100 ms); a plain
``redis-cli HSET`` is caught by keyspace notifications, or by the poll every
``client_refresh_interval`` (the bound is 1 s).

People are many and records few (the people security staff acted on), so the mirror
works in one of two modes, and in neither does a request wait for Redis once its
subject is known:

- **complete** (keyspace notifications on, the usual case): the replica loads every
  record at start-up and after each reconnection (a SCAN of ``{prefix}user:*``), and
  notifications tell it of any record written afterwards. A subject the mirror lacks has
  no record: a request costs one dict lookup, and the mirror stays the size of the
  records. The poll re-reads the records held, and checks that the server still sends
  notifications (else it falls back to the other mode).
- **per subject** (no notifications: a server that forbids ``CONFIG``, Redis Cluster,
  ``GATEWAY_KEYSPACE_NOTIFICATIONS=false``): as for clients, a subject's record is read
  from Redis the first time the replica meets it (one round trip per person and replica,
  and again every ten minutes), mirrored even when absent, and re-read by the poll.

If Redis cannot be reached, what the mirror holds is enforced; a subject the replica
must read and cannot fails closed with 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway.observe.metrics import GatewayMetrics
from gateway.pipeline.govern import write_status
from gateway.protocol.errors import ServiceUnavailable
from gateway.state import connection as store
from gateway.state import events
from gateway.state.keys import Keys

log = logging.getLogger(__name__)

_FORGET_AFTER = 600.0  # seconds a subject without a record stays mirrored (per-subject mode)
_READ_CHUNK = 1000  # records per script call, so that Redis is never held for long

# KEYS: people's record hashes. Returns, flattened, for each one that exists: its
# 1-based position in KEYS and its `disabled` field ('' when absent): {i1, d1, i2, ...}.
# Most people have no record, and the reply carries only those who have.
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


def _is_disabled(value: str | None) -> bool:
    return (value or "0").strip() == "1"


class UserRegistry:
    """The replica's mirror of people's records: subject -> disabled.

    The hot path reads ``disabled.get(subject, absent)`` and awaits :meth:`fetch` only
    when that is None: a subject the mirror lacks while it is not complete, or one whose
    change was announced but could not be read (:meth:`invalidate`).
    """

    def __init__(self, redis: Redis, *, key_prefix: str, metrics: GatewayMetrics,
                 refresh_interval: float = 0.5) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        self.metrics = metrics
        self.refresh_interval = refresh_interval
        #: subject -> whether the person is disabled (None: read it first); in complete
        #: mode, every record
        self.disabled: dict[str, bool | None] = {}
        #: what a subject the mirror lacks means: False (no record) while the mirror is
        #: complete, None (read it first) while it is not
        self.absent: bool | None = None
        self._exists: set[str] = set()  # subjects whose record exists
        self._fetched_at: dict[str, float] = {}  # per-subject mode: when read
        # reads are numbered as they are sent; a subject only takes an answer newer than
        # the one it holds, so a slow poll cannot undo what an event just re-read
        self._reads = itertools.count(1)
        self._applied: dict[str, int] = {}
        self._fetching: dict[str, asyncio.Future[bool]] = {}
        self._read_people = redis.register_script(_READ_PEOPLE)

    @property
    def complete(self) -> bool:
        """Every record is mirrored, and notifications keep it so."""
        return self.absent is False

    def key(self, subject: str) -> str:
        return self.keys.user(subject)

    async def fetch(self, subject: str) -> bool:
        """Whether the person is disabled, read from Redis (single-flight) and mirrored;
        503 if it cannot be read."""
        future = self._fetching.get(subject)
        if future is None:
            future = asyncio.ensure_future(self._fetch(subject))
            self._fetching[subject] = future
            future.add_done_callback(lambda _f: self._fetching.pop(subject, None))
        return await asyncio.shield(future)

    async def _fetch(self, subject: str) -> bool:
        read = next(self._reads)
        try:
            (found,) = await self._read([subject])
        except RedisError:
            self.metrics.redis_errors.labels("user_get").inc()
            raise ServiceUnavailable(
                "The people registry cannot be read, so the person's status is unknown; "
                "retry later.") from None
        if read > self._applied.get(subject, 0):
            self._apply(subject, read, found)
            self._fetched_at[subject] = time.monotonic()
        return bool(self.disabled.get(subject, False))

    def _apply(self, subject: str, read: int, found: tuple[bool, str | None]) -> None:
        exists, value = found
        self._applied[subject] = read
        if exists:
            self._exists.add(subject)
        else:
            self._exists.discard(subject)
        if exists or not self.complete:
            self.disabled[subject] = _is_disabled(value)
        else:  # complete: a subject the mirror lacks has no record
            self.disabled.pop(subject, None)

    async def refresh(self, subjects: list[str] | None = None) -> None:
        """Re-read the given (default: every mirrored) subjects, in one round trip a
        thousand; the poll also forgets subjects without a record unused for long."""
        if subjects is None:
            now = time.monotonic()
            for subject in [s for s, at in self._fetched_at.items()
                            if now - at > _FORGET_AFTER and s not in self._exists]:
                self._forget(subject)
            subjects = list(self.disabled)
        for start in range(0, len(subjects), _READ_CHUNK):
            chunk = subjects[start:start + _READ_CHUNK]
            read = next(self._reads)
            answers = await self._read(chunk)
            for subject, found in zip(chunk, answers, strict=True):
                if read > self._applied.get(subject, 0):
                    self._apply(subject, read, found)

    def _forget(self, subject: str) -> None:
        self.disabled.pop(subject, None)
        self._fetched_at.pop(subject, None)
        self._applied.pop(subject, None)

    async def load_all(self) -> None:
        """Mirror every record (SCAN), then answer for absent subjects without Redis:
        called once notifications are subscribed, so none written meanwhile is missed."""
        subjects = [self.keys.user_subject_of(key) async for key in
                    self.redis.scan_iter(match=self.keys.user_pattern, count=1000)]
        read = next(self._reads)
        found: dict[str, tuple[bool, str | None]] = {}
        for start in range(0, len(subjects), _READ_CHUNK):
            chunk = subjects[start:start + _READ_CHUNK]
            found.update(zip(chunk, await self._read(chunk), strict=True))
        self.absent = False
        for subject in [s for s in self.disabled if s not in found]:
            if read > self._applied.get(subject, 0):
                self._apply(subject, read, (False, None))
        for subject, answer in found.items():
            if read > self._applied.get(subject, 0):
                self._apply(subject, read, answer)
        self._fetched_at.clear()

    def partial(self) -> None:
        """Notifications stopped (or never started): ask Redis for unknown subjects."""
        self.absent = None

    def invalidate(self, subject: str) -> None:
        """A change to this person was announced but could not be read: the next
        request reads it (503 while Redis cannot answer), and so does the next poll."""
        self.disabled[subject] = None
        self._applied[subject] = next(self._reads)  # answers to reads sent before: stale

    async def _read(self, subjects: list[str]) -> list[tuple[bool, str | None]]:
        """``(exists, disabled)`` of each subject's record, in one round trip."""
        if store.is_cluster(self.redis):  # a script's keys must share a hash slot there
            async with self.redis.pipeline(transaction=False) as pipe:
                for subject in subjects:
                    pipe.exists(self.key(subject))
                    pipe.hget(self.key(subject), "disabled")
                flat: list[Any] = await pipe.execute()
            return [(bool(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        answers: list[tuple[bool, str | None]] = [(False, None)] * len(subjects)
        found = await self._read_people(keys=[self.key(subject) for subject in subjects])
        for n in range(0, len(found), 2):
            answers[int(found[n]) - 1] = (True, found[n + 1])
        return answers

    async def _notifications_still_on(self) -> bool:
        try:
            flags = (await self.redis.config_get("notify-keyspace-events")).get(
                "notify-keyspace-events", "") or ""
        except ResponseError:  # CONFIG forbidden now: assume the worst
            return False
        return "K" in flags and ("h" in flags or "A" in flags)

    async def run_refresher(self) -> None:
        """Background task: poll every ``refresh_interval``; survives Redis outages."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                if self.complete and not await self._notifications_still_on():
                    log.warning("keyspace notifications were turned off; people's records "
                                "are now read per subject")
                    self.partial()
                await self.refresh()
            except RedisError:
                self.metrics.redis_errors.labels("user_refresh").inc()
            except Exception:  # never let the safety net die
                log.exception("people refresh failed")


class UserAdmin:
    """Operator-side changes to people's records: each one audited and published."""

    def __init__(self, redis: Redis, *, key_prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        #: fields every audit entry written here carries (the admin's ``remote``)
        self.audit_fields: dict[str, str] = {}

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
        await write_status(self.redis, self.keys, self.keys.user(subject), fields,
                           {**self.audit_fields, **events.user_status_entry(
                               subject, disabled=disabled, actor=actor, reason=reason,
                               at=now, username=username)},
                           events.UserChanged(subject))
        return fields

    async def show(self, subject: str) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(self.keys.user(subject)))
