"""The Redis connection and the fleet-wide values kept there (the token-digest key, the
schema version).

The client is built once per process by the app factory and handed to every
component (redis-py style: collaborators are passed in). Retries are bounded and
short: a request must not wait long on a Redis that is gone, and the client
reconnects by itself once it is back.

On Redis Cluster the client is a :class:`~redis.asyncio.cluster.RedisCluster`, typed
as :class:`~redis.asyncio.Redis` like the others: it takes the same commands, and
components keep one type. What a cluster does differently goes through the helpers
here: a MULTI/EXEC transaction and a multi-key command must stay within one hash slot,
and a cluster pipeline carries no PUBLISH (:func:`pipeline`,
:func:`execute_and_publish`, :func:`is_cluster`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.state.keys import SCHEMA_VERSION, Keys

log = logging.getLogger(__name__)

_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 1.0,
    "socket_timeout": 2.0,
    "health_check_interval": 15,
    "retry_on_error": [RedisConnectionError, RedisTimeoutError],
}


def _retry() -> AsyncRetry:
    # one quick retry: a request must not wait long on a Redis that is gone
    return AsyncRetry(ExponentialBackoff(cap=0.25, base=0.05), 1)


def connect(url: str) -> Redis:
    """A pooled async client for ``url``.

    - ``redis://``, ``rediss://`` (TLS), ``unix://``: one server.
    - ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``
      (``rediss+sentinel://`` for TLS): the current master of ``service``, found through
      Redis Sentinel and followed across failovers. The password is the data nodes';
      ``?sentinel_password=...`` authenticates to the sentinels.
    - ``redis+cluster://[[user]:password@]host:port[,host:port...][/]``
      (``rediss+cluster://`` for TLS): a Redis Cluster, discovered from any of the nodes
      named and followed across resharding and failovers. Database 0 only.
    """
    parts = urlsplit(url)
    if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel(url)
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster(url)
    return Redis.from_url(url, retry=_retry(), max_connections=512, **_OPTIONS)


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    """``host[:port][,host[:port]...]`` after any ``user:password@``; IPv6 in brackets."""
    hosts: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or host.endswith(":") or item.endswith("]"):  # no port, or bare IPv6
            host, port = item, ""
        hosts.append((host.strip("[]"), int(port or default_port)))
    return hosts


def _credentials(url: str) -> tuple[str | None, str | None]:
    """``(username, password)`` of ``url``, percent-decoded."""
    parts = urlsplit(url)
    return (unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None)


class _Cluster(RedisCluster):
    """A :class:`RedisCluster` that reports "no node answers" as a ConnectionError.

    redis-py raises a bare :class:`RedisClusterException` when it cannot (re)discover
    the cluster, at start or after losing a node; the gateway's outage handling
    (503 with Retry-After, the last client record read, reconnect with backoff) is
    keyed on :class:`RedisError`, as for one server that is down.
    """

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        # the arguments differ between redis-py versions: passed on as they come
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise RedisConnectionError(str(exc)) from exc


def _cluster(url: str) -> Redis:
    parts = urlsplit(url)
    hosts = _hosts(parts.netloc, 6379)
    if not hosts:
        raise ValueError("a redis+cluster:// URL needs at least one host:port")
    if parts.path.strip("/"):
        raise ValueError("a redis+cluster:// URL takes no database: a cluster has only "
                         "database 0")
    if parts.query:
        raise ValueError("a redis+cluster:// URL takes no query parameters")
    username, password = _credentials(url)
    client = _Cluster(startup_nodes=[ClusterNode(host, port) for host, port in hosts],
                      username=username, password=password,
                      ssl=parts.scheme == "rediss+cluster",
                      retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                      max_connections=512, **_OPTIONS)
    return cast(Redis, client)  # same commands; see the module docstring


def _sentinel(url: str) -> Redis:
    parts = urlsplit(url)
    hosts = _hosts(parts.netloc, 26379)
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL needs the service name as its path")
    service, db = path[0], int(path[1]) if len(path) > 1 else 0
    query = parse_qs(parts.query)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"][0]
    tls = parts.scheme.startswith("rediss")
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, ssl=tls)
    username, password = _credentials(url)
    client: Redis = sentinel.master_for(service, db=db, username=username, password=password,
                                        retry=_retry(), max_connections=512, **_OPTIONS)
    return client


Address = tuple[str, int]


async def follow_master(redis: Redis, known: Address | None) -> Address | None:
    """On a ``redis+sentinel://`` client: where the sentinels say the master is (None on
    any other client). When that is not ``known``, the master moved: every connection is
    dropped, those in use too, so that each one reconnects to the new master.

    redis-py asks the sentinels only when it opens a connection, and a connection it holds
    goes on serving after a failover that leaves the old master up (``SENTINEL FAILOVER``,
    a partition): reads stale, writes lost once the old master is made a replica, the
    event subscription deaf to what is published on the new one. The Redis watch calls
    this every second; raises :class:`RedisError` when no sentinel can say.
    """
    pool = getattr(redis, "connection_pool", None)  # a cluster client has none
    if not isinstance(pool, SentinelConnectionPool):
        return None
    host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
    address = (str(host), int(port))
    if known is not None and address != known:
        log.warning("Redis Sentinel moved the master of %s from %s:%s to %s:%s: reconnecting",
                    pool.service_name, *known, *address)
        await pool.disconnect(inuse_connections=True)
    return address


async def drop_strays(redis: Redis, address: Address) -> int:
    """On a ``redis+sentinel://`` client: drop the connections that point elsewhere than
    ``address`` (the master); how many. A connection that looked the master up just
    before a move and connected just after :func:`follow_master` dropped the others
    still serves the old master: its reads are stale (a disable missed until the next
    poll). The Redis watch calls this every second; the caller re-reads what it holds
    when any was dropped, since what it read through them may be stale."""
    pool = getattr(redis, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return 0
    held = [*getattr(pool, "_available_connections", ()),
            *getattr(pool, "_in_use_connections", ())]
    dropped = 0
    for conn in held:
        if conn.is_connected and (str(conn.host), int(conn.port)) != address:
            log.warning("a Redis connection to %s:%s, no longer the master, is dropped",
                        conn.host, conn.port)
            await conn.disconnect()
            dropped += 1
    return dropped


def is_cluster(redis: Redis) -> bool:
    """Whether ``redis`` is a Redis Cluster client (see :func:`connect`)."""
    return isinstance(redis, RedisCluster)


def pipeline(redis: Redis, *, transaction: bool = True) -> Pipeline:
    """A pipeline for writes that belong together but touch several keys.

    On one server it is what ``redis.pipeline(transaction=...)`` gives: MULTI/EXEC,
    all applied or none. In a cluster a transaction cannot span hash slots, so it is a
    plain pipeline there: each command applies atomically, in order per node, but a
    failure midway may leave some of them applied. A transaction on keys of one slot
    (WATCH included) is fine in a cluster too: use ``redis.pipeline()`` for that.
    """
    return redis.pipeline(transaction=transaction and not is_cluster(redis))


async def execute_and_publish(redis: Redis, pipe: Pipeline, channel: str,
                              messages: Sequence[str]) -> None:
    """Execute ``pipe``, then let every subscriber of ``channel`` hear ``messages``.

    On one server the PUBLISHes ride in the pipeline itself (inside its MULTI when it
    is a transaction): one round trip, and nobody hears of a change that was not made.
    A cluster pipeline refuses PUBLISH and sends its commands to their nodes
    concurrently, so a notice sent with it could overtake the write it announces and a
    replica re-read the old value: there they are published once the writes are
    acknowledged. PUBLISH on any cluster node reaches the subscribers on every node.
    """
    if not is_cluster(redis):
        for message in messages:
            pipe.publish(channel, message)
        await pipe.execute()
        return
    await pipe.execute()
    for start in range(0, len(messages), 64):  # bounded: each one holds a connection
        await asyncio.gather(*(redis.publish(channel, m) for m in messages[start:start + 64]))


async def digest_key(redis: Redis, prefix: str, configured: str) -> bytes:
    """The key of the token digest: the configured one, else one random key shared by the
    fleet through ``{prefix}meta:digest_key`` (created once, with SET NX)."""
    if configured:
        try:
            return bytes.fromhex(configured)
        except ValueError:
            return configured.encode()
    key = Keys(prefix).digest_key
    await redis.set(key, secrets.token_hex(32), nx=True)
    value = await redis.get(key)
    if not value:
        raise RedisError(f"{key} could not be read back")
    return bytes.fromhex(str(value))


async def claim_schema(redis: Redis, keys: Keys) -> int | None:
    """Record :data:`~gateway.state.keys.SCHEMA_VERSION` in ``keys.schema`` unless a
    version is there already (SET NX), and return the version found (None: unreadable).

    An older version is left as is. A newer one means a later release has changed the
    layout in a way this one may misread: a warning is logged, and the process goes on
    (refusing would turn a rollback during an upgrade into an outage)."""
    await redis.set(keys.schema, str(SCHEMA_VERSION), nx=True)
    raw = await redis.get(keys.schema)
    try:
        found = int(str(raw))
    except ValueError:
        log.warning("%s holds %r, not a schema version; this release writes version %d",
                    keys.schema, raw, SCHEMA_VERSION)
        return None
    if found > SCHEMA_VERSION:
        log.warning(
            "%s is %d but this release of oauth-gateway knows schema version %d only: a "
            "newer release has changed the Redis layout, and this process may misread what "
            "it wrote. Run the release the rest of the fleet runs.",
            keys.schema, found, SCHEMA_VERSION)
    return found


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
