"""The gateway's background loops end when cancelled (at shutdown), even when what they
wait on completes at that very moment: on Python 3.11 ``asyncio.wait_for`` then returns
the result and drops the cancellation, and a loop around it never ends (the app's
cleanup, and the process's SIGTERM, wait on it forever)."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from redis.asyncio import Redis

from gateway.observe.metrics import GatewayMetrics
from gateway.runtime.health import RedisWatch


class PingWhenTold:
    """A Redis whose PING answers when the test says."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.asked = asyncio.Event()

    async def ping(self) -> bool:
        self.asked.set()
        return await self.answer


async def test_the_redis_watch_ends_when_cancelled_as_redis_answers() -> None:
    redis = PingWhenTold()
    watch = RedisWatch(cast(Redis, redis), GatewayMetrics(), interval=0.01)
    task = asyncio.create_task(watch.run())
    await redis.asked.wait()
    redis.answer.set_result(True)  # the answer and the shutdown, in one loop iteration
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)


async def test_the_event_subscriber_ends_when_cancelled_as_it_is_woken() -> None:
    from gateway.pipeline.govern import ClientRegistry
    from gateway.runtime.fleet import EventSubscriber
    from tests.redis_server import free_port

    metrics = GatewayMetrics()
    redis = Redis(port=free_port(), socket_connect_timeout=0.2)  # nobody there
    registry = ClientRegistry(redis, key_prefix="gw:", metrics=metrics)
    events = EventSubscriber(redis, key_prefix="gw:", registry=registry, cache=None,
                             metrics=metrics)
    task = asyncio.create_task(events.run())
    try:
        while not events._wake._waiters:  # backing off after the refused connection
            assert not task.done()
            await asyncio.sleep(0.005)
        events.wake()  # Redis is back, and the app shuts down, in one loop iteration
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
    finally:
        await redis.aclose()
