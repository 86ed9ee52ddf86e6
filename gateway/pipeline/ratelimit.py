"""Per-client rate limits, fleet-wide, decided locally and reconciled through Redis.

A client's limit (its record's ``rate_limit``, else ``GATEWAY_DEFAULT_RATE_LIMIT``) is
``N`` units per fixed window of ``PERIOD`` seconds, windows aligned on Unix time; a request
uses its route's ``weight`` units (default 1). Only admitted requests count.

One Redis round trip per request would cost about a quarter of the gateway's
throughput, so each replica decides on its own view and reconciles in batches:

- a replica keeps, per limited client, the fleet's total for the current window as read
  at its last sync (``synced``) and what it admitted since (``pending``), and admits a
  request while ``synced + pending + weight <= N``: a dict look-up and a few additions;
- every :data:`SYNC_INTERVAL` (0.1 s) it adds each client's ``pending`` to the window's
  counter in Redis (``INCRBY`` on :meth:`~gateway.state.keys.Keys.rate_limit`, one
  script call per few hundred clients) and reads the new fleet total back from the same
  command.

**How far the fleet can overshoot.** A replica learns another's admissions at most
``2 * SYNC_INTERVAL + RTT`` after they happen (the other's next sync, then its own). So
the fleet admits at most ``N + (R - 1) * L * (2 * SYNC_INTERVAL + RTT)`` units in a
window, with ``R`` replicas serving the client and ``L`` the units per second each of
them admits for it (about 0.2 s of traffic from each other replica), and never more
than ``R * N``. Fixed windows also let a client spend ``N`` at the end of one window and
``N`` more at the start of the next.

If Redis cannot be reached, each replica goes on limiting on its own count plus the
last fleet total it read (the fleet then admits up to ``R * N``); counts not written are
kept and written at the next successful sync.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config.rates import Rate
from gateway.observe.metrics import GatewayMetrics
from gateway.protocol.errors import RateLimited
from gateway.state import connection as store
from gateway.state.keys import Keys

log = logging.getLogger(__name__)

SYNC_INTERVAL = 0.1  # seconds between a replica's reconciliations with Redis
_SYNC_CHUNK = 500  # clients per script call (or pipeline), so Redis is never held long
POLICY_NAME = "default"  # the policy named in RateLimit-Policy and RateLimit

# KEYS: window counters. ARGV[1]: for each key in order, the units to add and the TTL in
# seconds, all in one space-separated string (redis-py's CPU cost is per value it sends,
# and a sync covers every limited client ten times a second). Returns each counter's new
# value: the fleet's total, this replica's included.
_ADD_AND_READ = """
local out, numbers = {}, {}
for word in string.gmatch(ARGV[1], '%S+') do
  numbers[#numbers + 1] = word
end
for i, key in ipairs(KEYS) do
  out[i] = redis.call('INCRBY', key, numbers[2 * i - 1])
  redis.call('EXPIRE', key, numbers[2 * i])
end
return out
"""


@dataclass(slots=True)
class Bucket:
    """One client's window, as this replica sees it."""

    rate: Rate
    window: int  # Unix time // rate.period
    ends: float  # Unix time the window ends
    key: str  # its counter in Redis
    synced: int = 0  # the fleet's total at the last sync (this replica's share included)
    inflight: int = 0  # units being written by the sync under way
    pending: int = 0  # units admitted here since

    @property
    def used(self) -> int:
        return self.synced + self.inflight + self.pending

    def headers(self, now: float) -> dict[str, str]:
        """The draft-ietf-httpapi-ratelimit-headers fields (``RateLimit-Policy``,
        ``RateLimit``) for this window."""
        return {"RateLimit-Policy": policy_field(self.rate),
                "RateLimit": f'"{POLICY_NAME}";r={max(0, self.rate.limit - self.used)};'
                             f"t={max(1, math.ceil(self.ends - now))}"}


    def advice(self) -> dict[str, str] | None:
        """The fields for an allowed answer: only once half the quota is used. Sent on
        every answer they cost about a tenth of the gateway's CPU a request (measured);
        a client far from its limit has no use for them, one nearing it does."""
        if self.used * 2 < self.rate.limit:
            return None
        return self.headers(time.time())


@functools.lru_cache(maxsize=1024)
def policy_field(rate: Rate) -> str:
    """``RateLimit-Policy`` of a limit (formatted once: it is sent on every answer)."""
    return f'"{POLICY_NAME}";q={rate.limit};w={rate.period}'


class RateLimiter:
    """Admits or refuses requests against each client's limit; syncs with the fleet."""

    def __init__(self, redis: Redis, *, key_prefix: str, metrics: GatewayMetrics,
                 sync_interval: float = SYNC_INTERVAL) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        self.metrics = metrics
        self.sync_interval = sync_interval
        self._buckets: dict[str, Bucket] = {}
        self._seen: set[str] = set()  # clients checked since the last sync
        # units admitted in windows that have since ended here, not written yet
        self._late: list[tuple[str, int, int]] = []  # (key, units, ttl)
        self._add_and_read = redis.register_script(_ADD_AND_READ)

    def admit(self, client_id: str, rate: Rate, weight: int) -> Bucket:
        """Count ``weight`` units of ``client_id``, or raise 429 :class:`RateLimited`.
        The hot path: no I/O."""
        now = time.time()
        bucket = self._buckets.get(client_id)
        if bucket is None or now >= bucket.ends or bucket.rate is not rate:
            bucket = self._open(client_id, rate, now, bucket)
        self._seen.add(client_id)
        if bucket.used + weight > rate.limit:
            self.metrics.limited(client_id)
            headers = bucket.headers(now)
            headers["Retry-After"] = str(max(1, math.ceil(bucket.ends - now)))
            raise RateLimited(
                f"The client is over its rate limit of {rate.limit} per {rate.period} "
                "seconds; retry after the number of seconds in Retry-After.",
                headers=headers)
        bucket.pending += weight
        return bucket

    def _open(self, client_id: str, rate: Rate, now: float, old: Bucket | None) -> Bucket:
        """The bucket of the current window (a new one, unless only the limit changed)."""
        window = int(now // rate.period)
        if old is not None and old.rate.period == rate.period and old.window == window:
            old.rate = rate  # the same counter, another limit
            return old
        if old is not None and old.pending:  # admitted in a window now over: still counted
            self._late.append((old.key, old.pending, 2 * old.rate.period))
            old.pending = 0
        bucket = self._buckets[client_id] = Bucket(
            rate, window, (window + 1) * rate.period,
            self.keys.rate_limit(client_id, rate.period, window))
        return bucket

    async def sync(self) -> None:
        """Write every pending count and read the fleet's totals back (batched)."""
        seen, self._seen = self._seen, set()
        late, self._late = self._late, []
        batch: list[tuple[str, Bucket, int]] = []
        for cid in seen:
            bucket = self._buckets.get(cid)
            if bucket is not None:
                batch.append((cid, bucket, bucket.pending))
                bucket.inflight += bucket.pending
                bucket.pending = 0
        writes = [(b.key, units, 2 * b.rate.period) for _cid, b, units in batch]
        try:
            totals = await self._write(writes + late)
        except RedisError:
            for cid, bucket, units in batch:  # written at the next sync instead
                bucket.inflight -= units
                bucket.pending += units
                self._seen.add(cid)
            self._late += late
            raise
        for (_cid, bucket, units), total in zip(batch, totals, strict=False):
            bucket.inflight -= units
            bucket.synced = int(total)
        self._forget(time.time())

    def _forget(self, now: float) -> None:
        """Drop the buckets of windows over with nothing left to write."""
        for cid in [c for c, b in self._buckets.items()
                    if now >= b.ends and not b.pending and not b.inflight]:
            del self._buckets[cid]

    async def _write(self, writes: list[tuple[str, int, int]]) -> list[int]:
        totals: list[int] = []
        for start in range(0, len(writes), _SYNC_CHUNK):
            chunk = writes[start:start + _SYNC_CHUNK]
            if store.is_cluster(self.redis):  # a script's keys must share a slot there
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, units, ttl in chunk:
                        pipe.incrby(key, units)
                        pipe.expire(key, ttl)
                    answers = await pipe.execute()
                totals += [int(a) for a in answers[::2]]
            else:
                numbers = " ".join(f"{units} {ttl}" for _key, units, ttl in chunk)
                totals += [int(t) for t in await self._add_and_read(
                    keys=[key for key, _units, _ttl in chunk], args=[numbers])]
        return totals

    async def run(self) -> None:
        """Background task: sync every ``sync_interval``; survives Redis outages."""
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except RedisError:
                self.metrics.redis_errors.labels("rate_limit").inc()
            except Exception:  # never let the limiter's sync die
                log.exception("rate limit sync failed")
