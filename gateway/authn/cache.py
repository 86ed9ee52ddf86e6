"""The two-layer token cache in front of the validator, with single-flight.

Layer 1 is in-process (:class:`LocalCache`): bounded, least-recently-used, a short
TTL. Layer 2 is Redis, shared by the fleet, under ``{prefix}token:{digest}``, where
the digest is keyed (:class:`~gateway.tokens.TokenDigester`), so no token can be
recovered from Redis. An entry never outlives the token's ``exp`` nor
``cache_max_ttl``, and a hit never extends it: a Redis hit carries the entry's
remaining PTTL into the local layer. Inactive answers are cached for
``negative_cache_ttl`` so a flood of bad tokens cannot flood the authorization server.
Concurrent look-ups of one uncached token share one validator call per process, and
concurrent look-ups of different tokens share Redis round trips (:class:`EntryReader`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.authn.validators.base import TokenInfo, TokenValidator, ValidatorUnavailable
from gateway.observe.metrics import GatewayMetrics
from gateway.protocol.errors import IntrospectionUnavailable, ServiceUnavailable
from gateway.protocol.tokens import TokenDigester
from gateway.state import connection as store
from gateway.state import events
from gateway.state.keys import Keys

log = logging.getLogger(__name__)


class LocalCache:
    """A bounded LRU map of digest -> (expires_at monotonic, TokenInfo)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[str, tuple[float, TokenInfo]] = OrderedDict()

    def get(self, digest: str, now: float) -> TokenInfo | None:
        item = self._data.get(digest)
        if item is None:
            return None
        if item[0] <= now:
            del self._data[digest]
            return None
        self._data.move_to_end(digest)
        return item[1]

    def put(self, digest: str, info: TokenInfo, expires_at: float) -> None:
        self._data[digest] = (expires_at, info)
        self._data.move_to_end(digest)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def discard(self, digest: str) -> None:
        self._data.pop(digest, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# KEYS: the token entries wanted. Returns one string per key, in KEYS order: its
# remaining lifetime in milliseconds (PTTL: -2 absent, -1 no expiry), a space, and its
# value (nothing when absent; a cached value is never empty). One string rather than
# two values per key: redis-py parses replies in Python, a few microseconds a value.
_READ_ENTRIES = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('PTTL', key) .. ' ' .. (redis.call('GET', key) or '')
end
return out
"""


# KEYS[1]: a token entry; ARGV: the validator's answer and its lifetime in ms. Stores the
# answer unless the key holds one already, and returns what it holds then (nil when it
# stored). A revocation pins the key while a validation may be in flight; a plain SET of
# the older, active answer would overwrite the pin and bring the revoked token back.
_STORE_ENTRY = """
local held = redis.call('GET', KEYS[1])
if held then
  return {held, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""


class EntryReader:
    """Reads token entries from Redis, many per round trip.

    Look-ups that arrive while a read is in flight queue up and leave together in the
    next one, one script call for the whole batch: the busier the gateway, the larger
    the batches. redis-py spends tens of microseconds of CPU on every command, as much
    as forwarding a request; a batch shares that cost among its look-ups.
    """

    def __init__(self, redis: Redis, max_batch: int = 256) -> None:
        self._script = redis.register_script(_READ_ENTRIES)
        # the keys of one script call must share a hash slot in a cluster
        self._max_batch = 1 if store.is_cluster(redis) else max_batch
        self._queue: list[tuple[str, asyncio.Future[tuple[str | None, int]]]] = []
        self._drainer: asyncio.Task[None] | None = None

    def read(self, key: str) -> asyncio.Future[tuple[str | None, int]]:
        """A future of ``(value or None, PTTL in ms)``, or of a :class:`RedisError`."""
        future: asyncio.Future[tuple[str | None, int]] = \
            asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        batch: list[tuple[str, asyncio.Future[tuple[str | None, int]]]] = []
        try:
            while self._queue:
                batch = self._queue[:self._max_batch]
                del self._queue[:self._max_batch]
                try:
                    entries = await self._script(keys=[key for key, _ in batch])
                except Exception as exc:  # every waiter hears of it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for entry, (_, future) in zip(entries, batch, strict=True):
                    if not future.done():  # a waiter may have given up
                        pttl, _, value = entry.partition(" ")
                        future.set_result((value or None, int(pttl)))
        except BaseException:  # cancelled (shutdown): nobody may wait for ever
            for _, future in batch + self._queue:
                future.cancel()
            self._queue.clear()
            raise
        finally:
            self._drainer = None


class _Flight:
    """One look-up on its way (Redis, then maybe the validator) and the requests waiting
    for it. Each waiter has a future of its own, so a client that hangs up cancels only
    its own wait (what ``asyncio.shield`` gave, with one future a waiter instead of two
    and their callbacks). Settling it answers every waiter and ends the flight."""

    __slots__ = ("digest", "inflight", "waiters")

    def __init__(self, inflight: dict[str, _Flight], digest: str) -> None:
        self.inflight = inflight
        self.digest = digest
        self.waiters: list[asyncio.Future[TokenInfo]] = []
        inflight[digest] = self

    def wait(self) -> asyncio.Future[TokenInfo]:
        waiter: asyncio.Future[TokenInfo] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return waiter

    def _settled(self) -> list[asyncio.Future[TokenInfo]]:
        if self.inflight.get(self.digest) is self:
            del self.inflight[self.digest]
        return [w for w in self.waiters if not w.done()]  # a waiter may have given up

    def set_result(self, info: TokenInfo) -> None:
        for waiter in self._settled():
            waiter.set_result(info)

    def set_exception(self, exc: BaseException) -> None:
        for waiter in self._settled():
            waiter.set_exception(exc)

    def cancel(self) -> None:
        for waiter in self._settled():
            waiter.cancel()


class TokenCache:
    """Answer "what is this token?" from the cheapest layer that knows."""

    def __init__(self, *, redis: Redis, validator: TokenValidator, digester: TokenDigester,
                 metrics: GatewayMetrics, key_prefix: str, local_ttl: float, local_size: int,
                 max_ttl: int, negative_ttl: int) -> None:
        self.redis = redis
        self.validator = validator
        self.digester = digester
        self.metrics = metrics
        self.local = LocalCache(local_size)
        self.keys = Keys(key_prefix)
        self._local_ttl = local_ttl
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._inflight: dict[str, _Flight] = {}
        self._validating: set[asyncio.Task[None]] = set()  # referenced until done
        self._reads = EntryReader(redis)
        self._store_entry = redis.register_script(_STORE_ENTRY)

    def key(self, digest: str) -> str:
        return self.keys.token(digest)

    async def lookup(self, token: str) -> tuple[str, TokenInfo]:
        """Return ``(digest, info)``, ``info`` inactive when the token is past its ``exp``;
        raise :class:`IntrospectionUnavailable` to fail closed."""
        digest, info = self.cached(token)
        if info is None:
            info = await self.fetch(token, digest)
        return digest, info

    def cached(self, token: str) -> tuple[str, TokenInfo | None]:
        """The in-process layer alone (the common case, no coroutine): ``(digest, info)``,
        ``info`` None when that layer does not know the token (then :meth:`fetch`)."""
        digest = self.digester.digest(token)
        info = self.local.get(digest, time.monotonic())
        if info is None:
            self.metrics.cache_local_miss.inc()
            return digest, None
        self.metrics.cache_local_hit.inc()
        if info.active and info.expired():
            return digest, TokenInfo.inactive()
        return digest, info

    async def fetch(self, token: str, digest: str) -> TokenInfo:
        """Redis, then the validator, for a token the in-process layer does not know;
        concurrent fetches of one token share one flight."""
        flight = self._inflight.get(digest)
        if flight is None:
            flight = _Flight(self._inflight, digest)
            self._reads.read(self.key(digest)).add_done_callback(
                functools.partial(self._redis_answered, token, digest, flight))
        info = await flight.wait()
        if info.active and info.expired():  # an entry is never kept past exp; clocks differ
            return TokenInfo.inactive()
        return info

    def _redis_answered(self, token: str, digest: str, future: _Flight,
                        read: asyncio.Future[tuple[str | None, int]]) -> None:
        """Redis answered a look-up: a hit settles it here (no task of its own, the
        common case when the in-process layer misses), a miss goes to the validator."""
        if read.cancelled():  # shutdown
            future.cancel()
            return
        error = read.exception()
        raw, pttl = (None, -2) if error else read.result()
        if isinstance(error, RedisError):  # as if Redis did not know the token
            self.metrics.redis_errors.labels("token_cache_get").inc()
        elif error is not None:
            future.set_exception(error)
            return
        if raw is not None:
            self.metrics.cache_redis_hit.inc()
            try:
                info = TokenInfo.from_json(raw)
            except Exception as exc:  # handed to every waiter
                future.set_exception(exc)
                return
            remaining = pttl / 1000 if pttl and pttl > 0 else self._local_ttl
            self._store_local(digest, info, remaining)
            future.set_result(info)
            return
        self.metrics.cache_redis_miss.inc()
        # a task of its own, so a client that hangs up does not cancel the validation
        # that other requests are waiting on
        validating = asyncio.create_task(self._validate(token, digest, future))
        self._validating.add(validating)
        validating.add_done_callback(self._validating.discard)

    async def _validate(self, token: str, digest: str, future: _Flight) -> None:
        try:
            info = await self._introspect(token, digest)
        except asyncio.CancelledError:  # shutdown
            future.cancel()
            raise
        except BaseException as exc:  # handed to every waiter
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            future.set_result(info)

    async def _introspect(self, token: str, digest: str) -> TokenInfo:
        """Ask the validator about a token Redis does not know; cache its answer."""
        started = time.perf_counter()
        try:
            info = await self.validator.validate(token)
        except ValidatorUnavailable as exc:
            self.metrics.introspection_outcome["error"].inc()
            self.metrics.introspection_duration.observe(time.perf_counter() - started)
            log.warning("token validation unavailable: %s", exc)
            raise IntrospectionUnavailable(
                "The authorization server cannot be reached to validate this token; "
                "retry later.") from None
        except RedisError as exc:  # the built-in server's tokens live in Redis
            self.metrics.introspection_outcome["error"].inc()
            self.metrics.redis_errors.labels("token_validate").inc()
            log.warning("token validation needs Redis, which failed: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "The token store (Redis) cannot be reached to validate this token; "
                "retry later.") from None
        self.metrics.introspection_duration.observe(time.perf_counter() - started)
        self.metrics.introspection_outcome["active" if info.active else "inactive"].inc()
        if info.active and info.expired():
            info = TokenInfo.inactive()
        ttl = self._ttl_for(info)
        try:
            held = await self._store_entry(keys=[self.key(digest)],
                                           args=[info.to_json(), max(1, int(ttl * 1000))])
        except RedisError:
            self.metrics.redis_errors.labels("token_cache_set").inc()
        else:
            if held:  # a revocation's pin (or another replica's answer) came first: it wins
                raw, pttl = held
                try:
                    info = TokenInfo.from_json(raw)
                except (ValueError, TypeError):  # unreadable: refused, never trusted
                    info = TokenInfo.inactive()
                ttl = int(pttl) / 1000 if int(pttl) > 0 else min(ttl, self._local_ttl)
        self._store_local(digest, info, ttl)
        return info

    def _ttl_for(self, info: TokenInfo) -> float:
        if not info.active:
            return float(self._negative_ttl)
        ttl = float(self._max_ttl)
        if info.exp is not None:
            ttl = min(ttl, info.exp - time.time())
        return max(ttl, 0.001)

    def _store_local(self, digest: str, info: TokenInfo, remaining: float) -> None:
        ttl = min(self._local_ttl, remaining)
        if ttl > 0:
            self.local.put(digest, info, time.monotonic() + ttl)

    async def purge(self, digest: str, *, revoked_for: float | None = None) -> None:
        """Forget a token everywhere this process can reach; with ``revoked_for``, pin it
        as inactive in Redis for that many seconds so no replica re-validates it."""
        self.local.discard(digest)
        if revoked_for:
            await events.pin_revoked(self.redis, self.keys, digest, revoked_for)
        else:
            await self.redis.delete(self.key(digest))
