"""The Redis connection and the fleet-wide secrets kept there.

The client is built once per process by the app factory and handed to every
component (redis-py style: collaborators are passed in). Retries are bounded and
short: a request must not wait long on a Redis that is gone, and the client
reconnects by itself once it is back.
"""

from __future__ import annotations

import asyncio
import secrets

from redis.asyncio import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry


def connect(url: str) -> Redis:
    """A pooled async client for ``url`` (``redis://``, ``rediss://`` or ``unix://``)."""
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=512,
    )


async def digest_key(redis: Redis, prefix: str, configured: str) -> bytes:
    """The key of the token digest: the configured one, else one random key shared by the
    fleet through ``{prefix}meta:digest_key`` (created once, with SET NX)."""
    if configured:
        try:
            return bytes.fromhex(configured)
        except ValueError:
            return configured.encode()
    key = f"{prefix}meta:digest_key"
    await redis.set(key, secrets.token_hex(32), nx=True)
    value = await redis.get(key)
    if not value:
        raise RedisError(f"{key} could not be read back")
    return bytes.fromhex(str(value))


async def wait_for_redis(redis: Redis, within: float) -> None:
    """Ping until Redis answers, or raise the last error after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await redis.ping()
            return
        except RedisError:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(0.25)
