"""Client governance: per-client records in Redis, mirrored in every replica.

``{prefix}client:{client_id}`` is a hash. ``disabled`` (``"1"`` disables) and ``scopes``
(space-separated; narrows the token's scopes) are stable (docs/COMPATIBILITY.md). The gateway
adds who/when/why of each change: ``updated_at``, ``updated_by``, ``reason``.

How a change reaches every replica (measured in tests/test_governance.py):

- ``oauth-gateway clients disable`` writes the hash, then PUBLISHes on
  ``{prefix}events``; every replica's subscriber re-reads that record at once
  (a few milliseconds on loopback; the contract bound is 100 ms).
- A plain ``redis-cli HSET`` publishes nothing. Keyspace notifications catch it when
  the server has them on (the gateway asks for them with ``CONFIG SET``, best
  effort, since managed Redis often forbids CONFIG; not on Redis Cluster, whose
  nodes notify only of their own keys); and whatever the server allows,
  every replica re-reads all the records it knows every ``client_refresh_interval``
  (0.5 s) in one pipelined round trip, which bounds the delay under 1 s.

If Redis cannot be reached, the last record read is enforced; a client never seen
before cannot be checked, and its requests fail closed with 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config.rates import Rate, optional_rate
from gateway.observe.metrics import GatewayMetrics
from gateway.protocol.errors import ServiceUnavailable
from gateway.state import connection as store
from gateway.state import events
from gateway.state.keys import Keys

log = logging.getLogger(__name__)

_FORGET_AFTER = 600.0  # seconds a client record stays mirrored after its last use
_READ_CHUNK = 1000  # records per script call, so that Redis is never held for long

# KEYS: client record hashes. Returns, flattened, for each one in KEYS order: whether
# it exists (1 or 0), its `disabled`, `scopes` and `rate_limit` fields (nil when absent):
# {exists1, disabled1, scopes1, rate_limit1, exists2, ...}. One command with just the
# fields the gateway enforces, rather than one HGETALL per record: redis-py's CPU cost is
# per command and per value parsed, and the poll runs twice a second for every client.
_READ_RECORDS = """
local out = {}
for i, key in ipairs(KEYS) do
  out[4 * i - 3] = redis.call('EXISTS', key)
  out[4 * i - 2] = redis.call('HGET', key, 'disabled')
  out[4 * i - 1] = redis.call('HGET', key, 'scopes')
  out[4 * i] = redis.call('HGET', key, 'rate_limit')
end
return out
"""
#: the limit of a client whose ``rate_limit`` field cannot be read: none admitted (fail
#: closed: a typo written with ``redis-cli`` must not lift a limit), logged
INVALID_RATE = Rate(0, 60)
Fields = tuple[bool, str | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """What the gateway enforces for one client."""

    client_id: str
    exists: bool
    disabled: bool = False
    scopes: frozenset[str] | None = None
    rate_limit: Rate | None = None  # none: GATEWAY_DEFAULT_RATE_LIMIT applies

    @classmethod
    def from_hash(cls, client_id: str, fields: dict[str, str]) -> ClientRecord:
        return cls.from_fields(client_id, bool(fields), fields.get("disabled"),
                               fields.get("scopes"), fields.get("rate_limit"))

    @classmethod
    def from_fields(cls, client_id: str, exists: bool, disabled: str | None,
                    scopes: str | None, rate_limit: str | None = None) -> ClientRecord:
        if not exists:
            return cls(client_id, exists=False)
        return cls(
            client_id, exists=True,
            disabled=(disabled or "0").strip() == "1",
            scopes=frozenset(scopes.split()) if scopes is not None else None,
            rate_limit=_rate_of(client_id, rate_limit),
        )


def _rate_of(client_id: str, text: str | None) -> Rate | None:
    """A record's ``rate_limit``: empty or absent is none; unreadable admits nothing."""
    if text is None:
        return None
    try:
        return optional_rate(text)
    except ValueError:
        log.warning("client %s: its rate_limit %r is not N/PERIOD (e.g. 600/60s): its "
                    "requests are refused until it is fixed", client_id, text[:40])
        return INVALID_RATE


class ClientRegistry:
    """The replica's mirror of client records, kept fresh by events and a short poll."""

    def __init__(self, redis: Redis, *, key_prefix: str, metrics: GatewayMetrics,
                 refresh_interval: float = 0.5) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        self.metrics = metrics
        self.refresh_interval = refresh_interval
        self._records: dict[str, ClientRecord] = {}
        self._last_used: dict[str, float] = {}
        self._used: set[str] = set()  # ids used since the last refresh
        # the fields each mirrored record was built from, by the poll
        self._fields: dict[str, Fields] = {}
        # reads are numbered as they are sent; a record only takes an answer newer than
        # the one it holds, so a slow poll cannot undo what an event just re-read
        self._reads = itertools.count(1)
        self._applied: dict[str, int] = {}
        self._fetching: dict[str, asyncio.Future[ClientRecord]] = {}
        self._read_records = redis.register_script(_READ_RECORDS)

    def key(self, client_id: str) -> str:
        return self.keys.client(client_id)

    def cached(self, client_id: str) -> ClientRecord | None:
        """The mirrored record, if this replica holds one (the hot path: no I/O)."""
        record = self._records.get(client_id)
        if record is not None:
            self._used.add(client_id)  # timed at the next refresh: no clock read here
        return record

    async def get(self, client_id: str) -> ClientRecord:
        """The client's record, read from Redis on first use; 503 if it cannot be read."""
        record = self.cached(client_id)
        if record is not None:
            return record
        future = self._fetching.get(client_id)
        if future is None:
            future = asyncio.ensure_future(self._fetch(client_id))
            self._fetching[client_id] = future
            future.add_done_callback(lambda _f: self._fetching.pop(client_id, None))
        return await asyncio.shield(future)

    async def _fetch(self, client_id: str) -> ClientRecord:
        read = next(self._reads)
        try:
            fields = await self.redis.hgetall(self.key(client_id))
        except RedisError:
            self.metrics.redis_errors.labels("client_get").inc()
            raise ServiceUnavailable(
                "The client registry cannot be read, so the client's status is unknown; "
                "retry later.") from None
        record = ClientRecord.from_hash(client_id, cast(dict[str, str], fields))
        if read > self._applied.get(client_id, 0):
            self._applied[client_id] = read
            self._records[client_id] = record
            self._fields.pop(client_id, None)  # not read by the poll: rebuilt by the next
        self._last_used[client_id] = time.monotonic()
        return self._records.get(client_id, record)  # a newer answer, if one came

    async def refresh(self, client_ids: list[str] | None = None) -> None:
        """Re-read the given (default: every mirrored) record in one pipelined round trip."""
        ids = list(self._records) if client_ids is None else client_ids
        now = time.monotonic()
        if client_ids is None:  # forget clients unused for a long time
            for cid in self._used:
                self._last_used[cid] = now
            self._used.clear()
            for cid in [c for c in ids if now - self._last_used.get(c, now) > _FORGET_AFTER]:
                self._records.pop(cid, None)
                self._fields.pop(cid, None)
                self._applied.pop(cid, None)
                self._last_used.pop(cid, None)
            ids = list(self._records)
        for start in range(0, len(ids), _READ_CHUNK):
            chunk = ids[start:start + _READ_CHUNK]
            read = next(self._reads)
            answers = await self._read(chunk)
            for cid, fields in zip(chunk, answers, strict=True):
                if read < self._applied.get(cid, 0):  # a newer answer came meanwhile
                    continue
                if client_ids is not None or cid in self._records:
                    self._applied[cid] = read
                    if self._fields.get(cid) != fields:  # most polls change nothing
                        self._records[cid] = ClientRecord.from_fields(cid, *fields)
                        self._fields[cid] = fields
                    self._last_used.setdefault(cid, now)

    async def _read(self, ids: list[str]) -> list[Fields]:
        """``(exists, disabled, scopes, rate_limit)`` of each record, in one round trip."""
        if store.is_cluster(self.redis):  # a script's keys must share a hash slot there
            async with self.redis.pipeline(transaction=False) as pipe:
                for cid in ids:
                    pipe.hgetall(self.key(cid))
                rows: list[dict[str, str]] = await pipe.execute()
            return [(bool(row), row.get("disabled"), row.get("scopes"), row.get("rate_limit"))
                    for row in rows]
        flat = await self._read_records(keys=[self.key(cid) for cid in ids])
        return [(bool(flat[i]), flat[i + 1], flat[i + 2], flat[i + 3])
                for i in range(0, len(flat), 4)]

    def invalidate(self, client_id: str) -> None:
        """Drop the mirror of one record; the next request re-reads it."""
        self._records.pop(client_id, None)
        self._fields.pop(client_id, None)
        self._applied[client_id] = next(self._reads)  # answers to reads sent before: stale

    async def run_refresher(self) -> None:
        """Background task: poll every ``refresh_interval``; survives Redis outages."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except RedisError:
                self.metrics.redis_errors.labels("client_refresh").inc()
            except Exception:  # never let the safety net die
                log.exception("client refresh failed")


async def write_status(redis: Redis, keys: Keys, key: str, fields: dict[str, str],
                       entry: dict[str, str], event: events.Event) -> None:
    """Write a governance record's fields, its audit entry and the event that makes every
    replica re-read it, together (one transaction on one server)."""
    async with store.pipeline(redis) as pipe:
        pipe.hset(key, mapping=cast(dict[Any, Any], fields))
        events.append_audit(pipe, keys, entry)
        await events.execute_and_publish(redis, pipe, keys, [event])


class ClientAdmin:
    """Operator-side changes to client records: each one audited and published."""

    def __init__(self, redis: Redis, *, key_prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        #: fields every audit entry written here carries (the admin's ``remote``)
        self.audit_fields: dict[str, str] = {}

    def key(self, client_id: str) -> str:
        return self.keys.client(client_id)

    async def set_disabled(self, client_id: str, disabled: bool, *, actor: str,
                           reason: str = "") -> dict[str, str]:
        now = str(int(time.time()))
        fields = {"disabled": "1" if disabled else "0", "updated_at": now,
                  "updated_by": actor, "reason": reason}
        await write_status(self.redis, self.keys, self.key(client_id), fields,
                           {**self.audit_fields, **events.client_status_entry(
                               client_id, disabled=disabled, actor=actor, reason=reason,
                               at=now)},
                           events.ClientChanged(client_id))
        return fields

    async def set_rate_limit(self, client_id: str, rate: Rate | None, *, actor: str
                             ) -> dict[str, str]:
        """Set (or, with None, clear) the client's ``rate_limit``; every replica applies it
        within the bounds of a disable. Returns the record as written."""
        now = str(int(time.time()))
        text = str(rate) if rate is not None else ""
        key = self.key(client_id)
        async with store.pipeline(self.redis) as pipe:
            if rate is None:
                pipe.hdel(key, "rate_limit")
            fields = {"updated_at": now, "updated_by": actor,
                      **({"rate_limit": text} if rate is not None else {})}
            pipe.hset(key, mapping=cast(dict[Any, Any], fields))
            events.append_audit(pipe, self.keys, {
                **self.audit_fields, **events.client_rate_limit_entry(
                    client_id, rate_limit=text, actor=actor, at=now)})
            await events.execute_and_publish(self.redis, pipe, self.keys,
                                             [events.ClientChanged(client_id)])
        return await self.show(client_id)

    async def show(self, client_id: str) -> dict[str, str]:
        return cast(dict[str, str], await self.redis.hgetall(self.key(client_id)))

    async def list(self) -> list[tuple[str, dict[str, str]]]:
        """Every client record, by id (in a cluster, SCAN walks every primary)."""
        ids = []
        async for key in self.redis.scan_iter(match=self.keys.client_pattern, count=500):
            ids.append(self.keys.client_id_of(key))
        ids.sort()
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.hgetall(self.key(cid))
            rows = await pipe.execute()
        return list(zip(ids, rows, strict=True))
