"""The fleet's nervous system: one Redis pub/sub subscriber per replica.

Channel ``{prefix}events`` carries JSON messages published by operator commands, built
and parsed by :mod:`gateway.state.events` (a type this release does not know is ignored):

- ``{"type": "client", "client_id": ...}``: a client record changed; re-read it.
- ``{"type": "user", "subject": ...}``: a person's record changed; re-read it.
- ``{"type": "token_revoked", "digest": ...}``: drop that token from the local layer.

When keyspace notifications are on, ``__keyspace@{db}__:{prefix}client:*`` and
``__keyspace@{db}__:{prefix}user:*`` tell of changes made with plain ``redis-cli``.
After any disconnection, and when Redis Sentinel has moved the master (the Redis watch
tells, :meth:`EventSubscriber.moved`), the subscriber re-subscribes, re-reads every client
and person record and empties the local token layer, since messages published meanwhile
are lost (pub/sub is fire-and-forget).

On Redis Cluster the subscription is held on one node, which is enough: a PUBLISH on
any node reaches the subscribers on every node. Keyspace notifications are not used
there: each node reports only its own keys, and the gateway leaves a cluster's
configuration alone; the registry's polling bounds a ``redis-cli`` change under 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway.authn.cache import TokenCache
from gateway.observe.metrics import GatewayMetrics
from gateway.pipeline.govern import ClientRegistry
from gateway.pipeline.people import UserRegistry
from gateway.state import connection as store
from gateway.state import events
from gateway.state.keys import Keys

log = logging.getLogger(__name__)


async def enable_keyspace_notifications(redis: Redis) -> bool:
    """Add ``K`` and ``h`` to ``notify-keyspace-events``; False if the server forbids it."""
    try:
        current = (await redis.config_get("notify-keyspace-events")).get(
            "notify-keyspace-events", "")
        flags = set(current or "")
        if "K" in flags and ("h" in flags or "A" in flags):
            return True
        await redis.config_set("notify-keyspace-events", "".join(sorted(flags | {"K", "h"})))
        return True
    except ResponseError as exc:  # managed services often rename or forbid CONFIG
        log.info("keyspace notifications unavailable (%s); relying on events and polling", exc)
        return False


class EventSubscriber:
    """Listens on the events channel (and keyspace notifications) and applies them."""

    def __init__(self, redis: Redis, *, key_prefix: str, registry: ClientRegistry,
                 cache: TokenCache | None, metrics: GatewayMetrics,
                 keyspace: bool = True, users: UserRegistry | None = None) -> None:
        self.redis = redis
        self.keys = Keys(key_prefix)
        self.registry = registry
        self.users = users
        self.cache = cache
        self.metrics = metrics
        cluster = store.is_cluster(redis)
        self.keyspace = keyspace and not cluster  # node-local in a cluster (module docstring)
        self.channel = self.keys.events
        db = 0 if cluster else redis.connection_pool.connection_kwargs.get("db", 0)
        self.keyspace_pattern = self.keys.client_notifications(db)
        self._keyspace_prefix = self.keys.client_notification_prefix(db)
        self.user_keyspace_pattern = self.keys.user_notifications(db)
        self._user_keyspace_prefix = self.keys.user_notification_prefix(db)
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._moved = False

    def wake(self) -> None:
        """Redis answers again: reconnect now rather than at the end of the backoff, so
        what changed while it was away is re-read (and enforced) at once."""
        self._wake.set()

    def moved(self) -> None:
        """The Redis master moved (Sentinel): subscribe again on the new one and re-read
        every record, as after a lost connection (what was published meanwhile is lost)."""
        self._moved = True

    async def run(self) -> None:
        """Background task: subscribe, dispatch, reconnect with backoff, forever."""
        delay = 0.1
        first = True
        while True:
            self._moved = False  # a move noticed from now on makes it subscribe again
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                if store.is_cluster(self.redis):
                    # a cluster client learns which node holds which slot on a command
                    # (again after losing a node); the subscription is placed by that map
                    await self.redis.ping()
                await pubsub.subscribe(self.channel)
                notified = self.keyspace and await enable_keyspace_notifications(self.redis)
                if notified:
                    await pubsub.psubscribe(self.keyspace_pattern)
                if self.users is not None:
                    if notified:  # every record, then notifications of any newer one
                        await pubsub.psubscribe(self.user_keyspace_pattern)
                        await self.users.load_all()
                    else:
                        self.users.partial()
                        if not first:
                            await self.users.refresh()
                if not first:  # anything published while we were away is lost: resync
                    await self.registry.refresh()
                    if self.cache is not None:
                        self.cache.local.clear()
                first = False
                self.connected.set()
                delay = 0.1
                while not self._moved:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        await self._dispatch(message)
                self.connected.clear()
                log.warning("event subscriber: the Redis master moved; subscribing again")
                continue  # at once, on the new master
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.connected.clear()
                self.metrics.redis_errors.labels("subscribe").inc()
                log.warning("event subscriber lost Redis (%s); reconnecting in %.1fs",
                            type(exc).__name__, delay)
            except Exception:
                self.connected.clear()
                log.exception("event subscriber failed; restarting")
            finally:
                with contextlib.suppress(Exception):  # the connection may be gone already
                    await pubsub.aclose()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # not wait_for (see RedisWatch.check)
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            delay = min(delay * 2, 5.0)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel", "")
        if message.get("type") == "pmessage" and channel.startswith(self._keyspace_prefix):
            client_id = channel[len(self._keyspace_prefix):]
            self.metrics.client_disable_events.labels("keyspace").inc()
            await self._reread(client_id)
            return
        if (message.get("type") == "pmessage" and self.users is not None
                and channel.startswith(self._user_keyspace_prefix)):
            await self._reread_person(channel[len(self._user_keyspace_prefix):])
            return
        if channel != self.channel:
            return
        event = events.parse(message.get("data"))
        if isinstance(event, events.ClientChanged):
            self.metrics.client_disable_events.labels("event").inc()
            await self._reread(event.client_id)
        elif isinstance(event, events.UserChanged) and self.users is not None:
            await self._reread_person(event.subject)
        elif isinstance(event, events.TokenRevoked) and self.cache is not None:
            self.cache.local.discard(event.digest)

    async def _reread(self, client_id: str) -> None:
        try:
            await self.registry.refresh([client_id])
        except RedisError:
            self.registry.invalidate(client_id)

    async def _reread_person(self, subject: str) -> None:
        assert self.users is not None
        try:
            await self.users.refresh([subject])
        except RedisError:
            self.users.invalidate(subject)
