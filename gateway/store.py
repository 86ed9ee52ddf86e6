"""The Redis connection and the fleet-wide secrets kept there.

The client is built once per process by the app factory and handed to every
component (redis-py style: collaborators are passed in). Retries are bounded and
short: a request must not wait long on a Redis that is gone, and the client
reconnects by itself once it is back.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 1.0,
    "socket_timeout": 2.0,
    "health_check_interval": 15,
    "retry_on_error": [RedisConnectionError, RedisTimeoutError],
}


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)


def connect(url: str) -> Redis:
    """A pooled async client for ``url``.

    - ``redis://``, ``rediss://`` (TLS), ``unix://``: one server.
    - ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``
      (``rediss+sentinel://`` for TLS): the current master of ``service``, found through
      Redis Sentinel and followed across failovers. The password is the data nodes';
      ``?sentinel_password=...`` authenticates to the sentinels.
    """
    parts = urlsplit(url)
    if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel(url)
    return Redis.from_url(url, retry=_retry(), max_connections=512, **_OPTIONS)


def _sentinel(url: str) -> Redis:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        hosts.append((host.strip("[]"), int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL needs the service name as its path")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    query = parse_qs(parts.query)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"][0]
    tls = parts.scheme.startswith("rediss")
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, ssl=tls)  # type: ignore[no-untyped-call]
    client: Redis = sentinel.master_for(
        service, db=db, username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        retry=_retry(), max_connections=512, **_OPTIONS)
    return client


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
