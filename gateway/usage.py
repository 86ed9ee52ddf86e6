"""Token usage per client, fleet-wide: requests and distinct tokens over a recent window.

Each replica counts in memory and, every second, adds its counts to Redis in one
pipeline, in per-minute buckets:

- ``{prefix}usage:req:{{client_id}}:{minute}``: INCRBY of requests;
- ``{prefix}usage:tok:{{client_id}}:{minute}``: a HyperLogLog of token *digests*
  (PFADD), so "distinct tokens" is fleet-wide, ~0.8% error, 12 KB a bucket at most;
- ``{prefix}usage:clients``: a sorted set of client ids by last use.

The client id is in braces (``gw:usage:req:{app1}:29340961``): a Redis Cluster hash
tag, so every bucket of one client lives in one hash slot and the window is summed
with one MGET and one PFCOUNT (a union) per client, which a cluster refuses across
slots.

Buckets expire after the window. Every 15 s each replica sums the window and
publishes the gauges ``gateway_client_window_requests`` and
``gateway_client_window_distinct_tokens``.

On one server (or Sentinel) a client's share of a flush, and of a report, is one Lua
script call over its keys (one hash slot) instead of four or two commands: redis-py's
cost is per command and per value it parses, and both tasks cover every active client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import store
from .metrics import MAX_CLIENT_LABELS, GatewayMetrics

log = logging.getLogger(__name__)
BUCKET = 60
_FLUSH_CHUNK = 32  # clients per pipeline in a flush
_DIGESTS_PER_CALL = 1000  # Lua's unpack() has a stack of ~8,000 values

# KEYS[1]: a client's request counter for this minute, KEYS[2]: its distinct-token
# HyperLogLog (one hash slot: the client id is their hash tag). ARGV[1]: seconds both
# live, ARGV[2]: requests to add, ARGV[3...]: token digests seen (at most
# _DIGESTS_PER_CALL). Returns 1. One command per client instead of four: redis-py
# spends tens of microseconds of CPU per command, and a flush covers every active
# client every second.
_ADD_USAGE = """
redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if #ARGV > 2 then
  redis.call('PFADD', KEYS[2], unpack(ARGV, 3))
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS: a client's request counters for the window's minutes, then its distinct-token
# HyperLogLogs for the same minutes, as many of each (one hash slot: the client id is
# their hash tag). Returns {requests over the window, distinct tokens over the window}.
_SUM_WINDOW = """
local n = #KEYS / 2
local total = 0
for i = 1, n do
  total = total + (tonumber(redis.call('GET', KEYS[i])) or 0)
end
return {total, redis.call('PFCOUNT', unpack(KEYS, n + 1))}
"""
_CLUSTER_READS = 32  # clients summed at once on a cluster (two commands each)


class UsageTracker:
    """Counts requests and distinct token digests per client."""

    def __init__(self, redis: Redis, *, key_prefix: str, metrics: GatewayMetrics,
                 window: int = 3600, flush_interval: float = 1.0,
                 report_interval: float = 15.0) -> None:
        self.redis = redis
        self.prefix = key_prefix
        self.metrics = metrics
        self.window = window
        self.flush_interval = flush_interval
        self.report_interval = report_interval
        self._requests: dict[str, int] = defaultdict(int)
        self._digests: dict[str, set[str]] = defaultdict(set)
        self._add_usage = redis.register_script(_ADD_USAGE)
        self._sum_window = redis.register_script(_SUM_WINDOW)
        self._cluster = store.is_cluster(redis)

    def key(self, kind: str, client_id: str, bucket: int) -> str:
        """The ``req`` or ``tok`` bucket of a client; ``{client_id}`` is the hash tag."""
        return f"{self.prefix}usage:{kind}:{{{client_id}}}:{bucket}"

    def record(self, client_id: str, digest: str) -> None:
        """Hot path: two dict operations, no I/O."""
        self._requests[client_id] += 1
        self._digests[client_id].add(digest)

    async def flush(self) -> None:
        if not self._requests:
            return
        requests, self._requests = self._requests, defaultdict(int)
        digests, self._digests = self._digests, defaultdict(set)
        bucket = int(time.time()) // BUCKET
        ttl = self.window + BUCKET
        now = time.time()
        items = list(requests.items())
        try:
            # pipelines of a few dozen clients: a flush that covers hundreds of clients
            # in one go would hold the event loop for milliseconds and show in p99
            for start in range(0, len(items), _FLUSH_CHUNK):
                await self._flush_chunk(items[start:start + _FLUSH_CHUNK], digests,
                                        bucket, ttl)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(f"{self.prefix}usage:clients", dict.fromkeys(requests, now))
                pipe.zremrangebyscore(f"{self.prefix}usage:clients", 0, now - self.window)
                await pipe.execute()
        except RedisError:
            # keep the counts for the next flush rather than lose them (a chunk already
            # written may be counted twice: an over-count beats a loss here)
            for client_id, count in requests.items():
                self._requests[client_id] += count
                self._digests[client_id].update(digests[client_id])
            raise

    async def _flush_chunk(self, items: list[tuple[str, int]], digests: dict[str, set[str]],
                           bucket: int, ttl: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for client_id, count in items:
                rkey = self.key("req", client_id, bucket)
                tkey = self.key("tok", client_id, bucket)
                seen = list(digests[client_id])
                if self._cluster:  # a cluster pipeline loads no script on its nodes
                    pipe.incrby(rkey, count)
                    pipe.expire(rkey, ttl)
                    pipe.pfadd(tkey, *seen)
                    pipe.expire(tkey, ttl)
                    continue
                await self._add_usage(keys=[rkey, tkey], client=pipe,
                                      args=[ttl, count, *seen[:_DIGESTS_PER_CALL]])
                for start in range(_DIGESTS_PER_CALL, len(seen), _DIGESTS_PER_CALL):
                    pipe.pfadd(tkey, *seen[start:start + _DIGESTS_PER_CALL])
            await pipe.execute()

    async def window_counts(self) -> dict[str, tuple[int, int]]:
        """``client_id -> (requests, distinct tokens)`` over the window, fleet-wide."""
        now = time.time()
        clients: list[str] = list(await self.redis.zrangebyscore(  # type: ignore[arg-type]
            f"{self.prefix}usage:clients", now - self.window, "+inf",
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
            # each client's window summed in Redis, one script call a client: parsing 60
            # counters a client in Python cost more than all the rest of the report
            async with self.redis.pipeline(transaction=False) as pipe:
                for cid in clients:
                    await self._sum_window(client=pipe, keys=[
                        *[self.key("req", cid, b) for b in buckets],
                        *[self.key("tok", cid, b) for b in buckets]])
                for total, distinct in await pipe.execute():
                    results += [[total], distinct]
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
