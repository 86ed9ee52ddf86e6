"""Whether this replica reaches Redis, and what it serves while it does not.

A Redis outage does not take the gateway out of its Service (unless
``GATEWAY_READY_REQUIRES_REDIS`` says so): every replica would leave at once, and the
requests that need no Redis would be refused with the rest. Instead the replica serves
in a degraded mode:

- tokens the in-process layer holds, and clients and people the mirrors hold, go on
  working up to their TTLs (their last-read state is enforced);
- tokens an external authority validates (introspection, JWT, Anaplan validate) are
  validated there, as always, without the shared cache;
- what needs Redis (the built-in server's endpoints and tokens, a client or person never
  read) answers 503 ``temporarily_unavailable`` with ``Retry-After``
  (:func:`redis_outage_middleware`), never 401 for a token that may be valid, never 500.

``gateway_redis_up`` (1/0) says which mode holds; :class:`RedisWatch` keeps it current.
On reconnection the event subscriber re-subscribes and re-reads every mirrored record, so
a disable written while this replica could not hear of it is enforced at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.observe.metrics import GatewayMetrics
from gateway.protocol.errors import ServiceUnavailable, error_response
from gateway.state import connection as store

log = logging.getLogger(__name__)

#: seconds a client is asked to wait (``Retry-After``) when a request needs Redis
RETRY_AFTER = 2


_SETTLE_CHECKS = 20  # after a Sentinel move, this many looks at down_interval (5 s)


class RedisWatch:
    """Pings Redis every ``interval`` seconds (``down_interval`` while it is down, so
    its return is noticed soon) and publishes the answer as ``up`` and as the
    ``gateway_redis_up`` gauge; logs each change of state once, and calls ``on_up`` when
    Redis answers again (the event subscriber reconnects and resyncs then).

    On ``redis+sentinel://`` it also asks the sentinels where the master is, and when it
    has moved drops the connections to the old one and calls ``on_moved`` (the event
    subscriber subscribes again on the new master and resyncs)."""

    def __init__(self, redis: Redis, metrics: GatewayMetrics, *, interval: float = 1.0,
                 down_interval: float = 0.25, timeout: float = 1.0,
                 on_up: Callable[[], None] | None = None,
                 on_moved: Callable[[], None] | None = None) -> None:
        self.redis = redis
        self.metrics = metrics
        self.interval = interval
        self.down_interval = down_interval
        self.timeout = timeout
        self.on_up = on_up
        self.on_moved = on_moved
        self._settling = 0  # quick looks left after a move (Sentinel)
        self.master: store.Address | None = None  # Sentinel: where the master was last
        self.up = True
        self.reason = "ok"
        metrics.redis_up.set(1)

    async def follow(self) -> None:
        """On Sentinel: ask where the master is; if it moved, reconnect and tell."""
        try:  # each sentinel is asked within its own socket timeouts
            master = await store.follow_master(self.redis, self.master)
        except (RedisError, OSError):
            return  # no sentinel can say (or none sees a master): the ping tells the rest
        moved = self.master is not None and master != self.master
        if not moved and master is not None and await store.drop_strays(self.redis, master):
            moved = True  # what was read through them may be stale: re-read, as after a move
        if moved:
            # a connection opened as the move happened may still reach the old master:
            # look every down_interval for a while, so its stale reads are soon redone
            self._settling = _SETTLE_CHECKS
            if self.on_moved is not None:
                self.on_moved()
        elif self._settling:
            self._settling -= 1
        self.master = master

    async def check(self) -> bool:
        """Ping once; the new state."""
        try:
            # not wait_for: on 3.11 it drops a cancellation that meets the answer, and
            # this loop would outlive the app's shutdown
            async with asyncio.timeout(self.timeout):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            self._set(False, f"unreachable ({type(exc).__name__})")
        else:
            self._set(True, "ok")
        return self.up

    def _set(self, up: bool, reason: str) -> None:
        if up != self.up:
            if up:
                log.warning("Redis is reachable again: leaving degraded mode")
                if self.on_up is not None:
                    self.on_up()
            else:
                log.error("Redis is %s: serving in degraded mode (cached tokens and external "
                          "validators only; what needs Redis answers 503)", reason)
        self.up, self.reason = up, reason
        self.metrics.redis_up.set(1 if up else 0)

    async def run(self) -> None:
        """Background task: follow and check every ``interval`` seconds, forever."""
        while True:
            await self.follow()  # here, not in check(): /readyz does not wait on sentinels
            up = await self.check()
            quick = not up or self._settling
            await asyncio.sleep(self.down_interval if quick else self.interval)


def redis_outage_middleware(metrics: GatewayMetrics) -> Middleware:
    """An aiohttp middleware: a request whose handler needed Redis and could not reach it
    gets 503 ``temporarily_unavailable`` with ``Retry-After``, not aiohttp's bare 500.
    Installed with the built-in server, whose endpoints read Redis; the proxy pipeline
    answers its own refusals, this one included, without a middleware's cost."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RedisError as exc:
            metrics.redis_errors.labels("request").inc()
            log.warning("%s %s needs Redis, which failed (%s): 503", request.method,
                        request.path, type(exc).__name__)
            return error_response(ServiceUnavailable(
                "The gateway's store (Redis) cannot be reached, and this request needs it; "
                "retry later.", retry_after=RETRY_AFTER))

    return middleware
