"""Token usage per client, fleet-wide: requests and distinct tokens over a recent window.

Each replica counts in memory and, every second, adds its counts to Redis in one
pipeline, in per-minute buckets (named by :class:`~gateway.state.keys.Keys`):

- ``{prefix}usage:req:{{client_id}}:{minute}``: INCRBY of requests;
- ``{prefix}usage:tok:{{client_id}}:{minute}``: a HyperLogLog of token *digests*
  (PFADD), so "distinct tokens" is fleet-wide, ~0.8% error, 12 KB a bucket at most;
- ``{prefix}usage:clients``: a sorted set of client ids by last use;
- ``{prefix}usage:hour:{{client_id}}:{hour}``: INCRBY of requests by the clock hour,
  kept 25 hours (the console's "requests over the last 24 h", whatever the window);
- ``{prefix}usage:decisions:{minute}``: a hash of authentication decisions
  (``gateway_auth_decisions_total``'s ``decision`` label) counted fleet-wide, kept an
  hour (the console's "refusals over the last hour").

The client id is in braces (``gw:usage:req:{app1}:29340961``): a Redis Cluster hash
tag, so every bucket of one client lives in one hash slot and the window is summed
with one MGET and one PFCOUNT (a union) per client, which a cluster refuses across
slots.

Buckets expire after the window. Every 15 s each replica sums the window and
publishes the gauges ``gateway_client_window_requests`` and
``gateway_client_window_distinct_tokens``.

On one server (or Sentinel) a flush is one Lua script call per few dozen clients, and a
report one per few clients, the scripts naming the keys themselves: redis-py's cost is
per command and per value it sends or parses, and both tasks cover every active client.
A cluster, where a script's keys must share a hash slot, gets pipelined plain commands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.observe.metrics import MAX_CLIENT_LABELS, GatewayMetrics
from gateway.state import connection as store
from gateway.state.keys import USAGE_KEY_LUA, Keys

log = logging.getLogger(__name__)
BUCKET = 60
HOUR = 3600
HOUR_TTL = 25 * HOUR  # the hourly counts: a day and the hour being counted
DECISIONS_TTL = HOUR + BUCKET  # the decision counts: the last hour
_FLUSH_CLIENTS = 64  # clients per script call (or pipeline, on a cluster) in a flush
_DIGESTS_PER_ARG = 1000  # Lua's unpack() has a stack of ~8,000 values
_REPORT_CLIENTS = 8  # clients summed per script call in a report

# KEYS[1]: the client set (``gw:usage:clients``). ARGV[1]: the usage key prefix
# (``gw:usage:``), ARGV[2]: the minute bucket, ARGV[3]: seconds the buckets live,
# ARGV[4]: now, ARGV[5]: the oldest last use kept in the client set, ARGV[6]: the hour
# bucket (requests by the hour, kept HOUR_TTL seconds); then pairs: a client
# id, and "requests digest digest ..." (at most _DIGESTS_PER_ARG digests; a client with
# more comes back in another pair, 0 requests). Returns 1. A few dozen clients per
# command, two values each, instead of four commands a client: redis-py spends tens of
# microseconds of CPU per command and about one per value it sends, and a flush covers
# every active client every second. The script names the buckets itself (with
# ``usage_key``, from :mod:`gateway.state.keys`), which a single server allows; a
# cluster gets plain commands.
_ADD_USAGE = USAGE_KEY_LUA + """
local prefix, bucket, ttl, now, hour = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
for c = 7, #ARGV, 2 do
  local cid = ARGV[c]
  local rkey = usage_key(prefix, 'req', cid, bucket)
  local tkey = usage_key(prefix, 'tok', cid, bucket)
  local fields = {}
  for word in string.gmatch(ARGV[c + 1], '%S+') do
    fields[#fields + 1] = word
  end
  redis.call('INCRBY', rkey, fields[1])
  redis.call('EXPIRE', rkey, ttl)
  local hkey = usage_key(prefix, 'hour', cid, hour)
  redis.call('INCRBY', hkey, fields[1])
  redis.call('EXPIRE', hkey, 90000)  -- HOUR_TTL
  if #fields > 1 then
    redis.call('PFADD', tkey, unpack(fields, 2))
  end
  redis.call('EXPIRE', tkey, ttl)
  redis.call('ZADD', KEYS[1], now, cid)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[5])
return 1
"""

# ARGV[1]: the usage key prefix (``gw:usage:``), ARGV[2]: the window's first
# minute bucket, ARGV[3]: its number of buckets, ARGV[4...]: client ids. Returns, for
# each client in order, {requests over the window, distinct tokens over the window},
# flattened. The script names its keys itself (60 counters and 60 HyperLogLogs a
# client, which packing and sending from Python cost more than the rest of the
# report); a single server allows that, a cluster does not, and gets plain commands.
_SUM_WINDOWS = USAGE_KEY_LUA + """
local prefix, first, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for c = 4, #ARGV do
  local cid = ARGV[c]
  local total, hlls = 0, {}
  for b = first, first + n - 1 do
    total = total + (tonumber(redis.call('GET', usage_key(prefix, 'req', cid, b))) or 0)
    hlls[#hlls + 1] = usage_key(prefix, 'tok', cid, b)
  end
  out[#out + 1] = total
  out[#out + 1] = redis.call('PFCOUNT', unpack(hlls))
end
return out
"""
_CLUSTER_READS = 32  # clients summed at once on a cluster (two commands each)


class UsageTracker:
    """Counts requests and distinct token digests per client."""

    def __init__(self, redis: Redis, *, key_prefix: str, metrics: GatewayMetrics,
                 window: int = 3600, flush_interval: float = 1.0,
                 report_interval: float = 15.0) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        self.metrics = metrics
        self.window = window
        self.flush_interval = flush_interval
        self.report_interval = report_interval
        self._requests: dict[str, int] = defaultdict(int)
        self._digests: dict[str, set[str]] = defaultdict(set)
        self._add_usage = redis.register_script(_ADD_USAGE)
        self._sum_windows = redis.register_script(_SUM_WINDOWS)
        self._cluster = store.is_cluster(redis)

    def key(self, kind: str, client_id: str, bucket: int) -> str:
        """The ``req`` or ``tok`` bucket of a client; ``{client_id}`` is the hash tag."""
        return self.keys.usage(kind, client_id, bucket)

    def record(self, client_id: str, digest: str) -> None:
        """Hot path: two dict operations, no I/O."""
        self._requests[client_id] += 1
        self._digests[client_id].add(digest)

    async def flush(self) -> None:
        await self._flush_decisions()
        if not self._requests:
            return
        requests, self._requests = self._requests, defaultdict(int)
        digests, self._digests = self._digests, defaultdict(set)
        bucket = int(time.time()) // BUCKET
        ttl = self.window + BUCKET
        now = time.time()
        try:
            # a few dozen clients at a time: a flush that covers hundreds of clients in
            # one go would hold the event loop (and Redis) for milliseconds, seen in p99
            if self._cluster:
                await self._flush_commands(requests, digests, bucket, ttl, now)
            else:
                await self._flush_scripts(requests, digests, bucket, ttl, now)
        except RedisError:
            # keep the counts for the next flush rather than lose them (a part already
            # written may be counted twice: an over-count beats a loss here)
            for client_id, count in requests.items():
                self._requests[client_id] += count
                self._digests[client_id].update(digests[client_id])
            raise

    async def _flush_decisions(self) -> None:
        """This replica's decision counts into the minute's fleet-wide hash."""
        tally = self.metrics.decision_tally
        if not tally:
            return
        self.metrics.decision_tally = {}
        key = self.keys.usage_decisions(int(time.time()) // BUCKET)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for decision, count in tally.items():
                    pipe.hincrby(key, decision, count)
                pipe.expire(key, DECISIONS_TTL)
                await pipe.execute()
        except RedisError:
            for decision, count in tally.items():
                self.metrics.decision_tally[decision] = \
                    self.metrics.decision_tally.get(decision, 0) + count
            raise

    async def _flush_scripts(self, requests: dict[str, int], digests: dict[str, set[str]],
                             bucket: int, ttl: int, now: float) -> None:
        """One script call per few dozen clients (one server or Sentinel)."""
        head: list[str | int | float] = [self.keys.usage_prefix, bucket, ttl, now,
                                         now - self.window, int(now) // HOUR]
        args: list[str | int | float] = []
        for client_id, count in requests.items():
            seen = list(digests[client_id])
            args += (client_id, " ".join([str(count), *seen[:_DIGESTS_PER_ARG]]))
            for start in range(_DIGESTS_PER_ARG, len(seen), _DIGESTS_PER_ARG):
                args += (client_id, " ".join(["0", *seen[start:start + _DIGESTS_PER_ARG]]))
            if len(args) >= 2 * _FLUSH_CLIENTS:
                await self._add_usage(keys=[self.keys.usage_clients], args=head + args)
                args = []
        if args:
            await self._add_usage(keys=[self.keys.usage_clients], args=head + args)

    async def _flush_commands(self, requests: dict[str, int], digests: dict[str, set[str]],
                              bucket: int, ttl: int, now: float) -> None:
        """Plain commands, pipelined per few dozen clients (a cluster: a script's keys
        must share a hash slot there)."""
        items = list(requests.items())
        for start in range(0, len(items), _FLUSH_CLIENTS):
            async with self.redis.pipeline(transaction=False) as pipe:
                for client_id, count in items[start:start + _FLUSH_CLIENTS]:
                    rkey = self.key("req", client_id, bucket)
                    tkey = self.key("tok", client_id, bucket)
                    pipe.incrby(rkey, count)
                    pipe.expire(rkey, ttl)
                    hkey = self.key("hour", client_id, int(now) // HOUR)
                    pipe.incrby(hkey, count)
                    pipe.expire(hkey, HOUR_TTL)
                    pipe.pfadd(tkey, *digests[client_id])
                    pipe.expire(tkey, ttl)
                await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.usage_clients, dict.fromkeys(requests, now))
            pipe.zremrangebyscore(self.keys.usage_clients, 0, now - self.window)
            await pipe.execute()

    async def window_counts(self) -> dict[str, tuple[int, int]]:
        """``client_id -> (requests, distinct tokens)`` over the window, fleet-wide."""
        now = time.time()
        clients: list[str] = list(await self.redis.zrangebyscore(  # type: ignore[arg-type]
            self.keys.usage_clients, now - self.window, "+inf",
            start=0, num=MAX_CLIENT_LABELS))
        last = int(now) // BUCKET
        buckets = range(last - self.window // BUCKET + 1, last + 1)
        results: list[Any] = []
        if store.is_cluster(self.redis):
            # a cluster pipeline refuses MGET and PFCOUNT: each is sent on its own (one
            # slot each, thanks to the hash tag), a bounded number at a time. A client
            # whose node is unreachable is left out rather than every client.
            for start in range(0, len(clients), _CLUSTER_READS):
                results += await asyncio.gather(*(
                    command for cid in clients[start:start + _CLUSTER_READS]
                    for command in (
                        self.redis.mget([self.key("req", cid, b) for b in buckets]),
                        self.redis.pfcount(*[self.key("tok", cid, b) for b in buckets]))),
                    return_exceptions=True)
        else:
            # each client's window summed in Redis, a few clients per script call:
            # parsing 60 counters a client in Python cost more than all the rest of the
            # report, and one call for every client would hold Redis for milliseconds
            for start in range(0, len(clients), _REPORT_CLIENTS):
                sums = await self._sum_windows(args=[
                    self.keys.usage_prefix, buckets[0], len(buckets),
                    *clients[start:start + _REPORT_CLIENTS]])
                for i in range(0, len(sums), 2):
                    results += [[sums[i]], sums[i + 1]]
        out: dict[str, tuple[int, int]] = {}
        errors = [r for r in results if isinstance(r, Exception)]
        if errors and len(errors) == len(results):
            raise errors[0]
        for i, cid in enumerate(clients):
            counts, distinct = results[2 * i], results[2 * i + 1]
            if isinstance(counts, Exception) or isinstance(distinct, Exception):
                continue
            out[cid] = (sum(int(c) for c in counts if c), int(distinct))
        if errors:
            log.warning("usage of %d clients could not be read (%s)",
                        len(clients) - len(out), type(errors[0]).__name__)
        return out

    async def report(self) -> None:
        for cid, (requests, distinct) in (await self.window_counts()).items():
            self.metrics.client_window_requests.labels(cid).set(requests)
            self.metrics.client_window_tokens.labels(cid).set(distinct)

    async def run(self) -> None:
        """Background task: flush every second, report every ``report_interval``."""
        next_report = 0.0
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
                if time.monotonic() >= next_report:
                    await self.report()
                    next_report = time.monotonic() + self.report_interval
            except RedisError:
                self.metrics.redis_errors.labels("usage").inc()
            except Exception:
                log.exception("usage flush failed")


# -- reads for the console --------------------------------------------------------------

async def daily_requests(redis: Redis, keys: Keys, client_ids: list[str],
                         now: float | None = None) -> dict[str, int]:
    """Requests of each client over the current clock hour and the 23 before it."""
    hour = int(time.time() if now is None else now) // HOUR
    out: dict[str, int] = {}
    for cid in client_ids:  # one MGET a client: its hours share a hash slot
        counts = await redis.mget([keys.usage("hour", cid, h)
                                   for h in range(hour - 23, hour + 1)])
        out[cid] = sum(int(c) for c in counts if c)
    return out


async def minute_requests(redis: Redis, keys: Keys, client_id: str, minutes: int,
                          now: float | None = None) -> list[int]:
    """A client's requests in each of the last ``minutes`` minutes, oldest first (as
    far back as the usage window keeps them)."""
    last = int(time.time() if now is None else now) // BUCKET
    counts = await redis.mget([keys.usage("req", client_id, b)
                               for b in range(last - minutes + 1, last + 1)])
    return [int(c) if c else 0 for c in counts]


async def recent_decisions(redis: Redis, keys: Keys, minutes: int = 60,
                           now: float | None = None) -> dict[str, int]:
    """Authentication decisions fleet-wide over the last ``minutes`` minutes, by kind."""
    last = int(time.time() if now is None else now) // BUCKET
    totals: dict[str, int] = defaultdict(int)
    async with redis.pipeline(transaction=False) as pipe:
        for b in range(last - minutes + 1, last + 1):
            pipe.hgetall(keys.usage_decisions(b))
        for fields in await pipe.execute():
            for decision, count in (fields or {}).items():
                totals[decision] += int(count)
    return dict(totals)


async def last_use(redis: Redis, keys: Keys, client_ids: list[str]) -> dict[str, float]:
    """When each client last made a request, as far back as the usage window keeps."""
    if not client_ids:
        return {}
    scores = await redis.zmscore(keys.usage_clients, client_ids)
    return {cid: float(s) for cid, s in zip(client_ids, scores, strict=True) if s}
