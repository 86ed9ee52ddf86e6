"""Token usage per client, fleet-wide: requests and distinct tokens over a recent window.

Each replica counts in memory and, every second, adds its counts to Redis in one
pipeline, in per-minute buckets:

- ``{prefix}usage:req:{client_id}:{minute}``: INCRBY of requests;
- ``{prefix}usage:tok:{client_id}:{minute}``: a HyperLogLog of token *digests*
  (PFADD), so "distinct tokens" is fleet-wide, ~0.8% error, 12 KB a bucket at most;
- ``{prefix}usage:clients``: a sorted set of client ids by last use.

Buckets expire after the window. Every 15 s each replica sums the window (GET and
PFCOUNT over the window's buckets, a union) and publishes the gauges
``gateway_client_window_requests`` and ``gateway_client_window_distinct_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .metrics import MAX_CLIENT_LABELS, GatewayMetrics

log = logging.getLogger(__name__)
BUCKET = 60


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
        async with self.redis.pipeline(transaction=False) as pipe:
            for client_id, count in requests.items():
                rkey = f"{self.prefix}usage:req:{client_id}:{bucket}"
                tkey = f"{self.prefix}usage:tok:{client_id}:{bucket}"
                pipe.incrby(rkey, count)
                pipe.expire(rkey, ttl)
                pipe.pfadd(tkey, *digests[client_id])
                pipe.expire(tkey, ttl)
                pipe.zadd(f"{self.prefix}usage:clients", {client_id: now})
            pipe.zremrangebyscore(f"{self.prefix}usage:clients", 0, now - self.window)
            try:
                await pipe.execute()
            except RedisError:
                # keep the counts for the next flush rather than lose them
                for client_id, count in requests.items():
                    self._requests[client_id] += count
                    self._digests[client_id].update(digests[client_id])
                raise

    async def window_counts(self) -> dict[str, tuple[int, int]]:
        """``client_id -> (requests, distinct tokens)`` over the window, fleet-wide."""
        now = time.time()
        clients: list[str] = list(await self.redis.zrangebyscore(  # type: ignore[arg-type]
            f"{self.prefix}usage:clients", now - self.window, "+inf",
            start=0, num=MAX_CLIENT_LABELS))
        last = int(now) // BUCKET
        buckets = range(last - self.window // BUCKET + 1, last + 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in clients:
                pipe.mget([f"{self.prefix}usage:req:{cid}:{b}" for b in buckets])
                pipe.pfcount(*[f"{self.prefix}usage:tok:{cid}:{b}" for b in buckets])
            results = await pipe.execute()
        out: dict[str, tuple[int, int]] = {}
        for i, cid in enumerate(clients):
            counts, distinct = results[2 * i], results[2 * i + 1]
            out[cid] = (sum(int(c) for c in counts if c), int(distinct))
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
