"""Redis outages: the gateway stays in its Service and serves what needs no Redis.

Cached tokens and known clients and people go on working, tokens an external server
validates are still served, what needs Redis answers 503 with ``Retry-After`` (never 401
for a token that may be valid, never 500), ``/readyz`` stays 200 unless
``GATEWAY_READY_REQUIRES_REDIS`` says otherwise, and ``gateway_redis_up`` tells. A disable
written while a replica could not hear of it is enforced as soon as Redis is back.

Two kinds of outage: the test's own ``redis-server`` stopped (its data is gone when it
starts again), and the replica's link to Redis cut while Redis itself stays up (what a
network partition or a Sentinel failover looks like from a replica), so that an operator
can disable someone meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from redis.asyncio import Redis

from gateway.authn.cache import TokenCache
from gateway.authn.validators.base import TokenInfo
from gateway.observe.metrics import GatewayMetrics
from gateway.pipeline.govern import ClientAdmin
from gateway.pipeline.people import UserAdmin
from gateway.protocol.tokens import TokenDigester
from gateway.state import events
from gateway.state.keys import Keys
from tests.conftest import AuthGatewayFactory, AuthServer, GatewayFactory
from tests.redis_server import RedisServer, free_port
from tests.test_people import _builtin_token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class RedisLink:
    """A TCP relay between a gateway and Redis, which the test cuts and restores: the
    replica loses Redis while Redis itself stays up (and an operator can still write)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


async def redis_up(h: Any) -> float:
    for line in (await h.metrics()).splitlines():
        if line.startswith("gateway_redis_up "):
            return float(line.split()[1])
    raise AssertionError("gateway_redis_up is not exported")


async def until_redis_up(h: Any, value: float, within: float = 5.0) -> float:
    """Seconds until ``gateway_redis_up`` shows ``value``."""
    started = time.monotonic()
    while await redis_up(h) != value:
        assert time.monotonic() - started < within, f"gateway_redis_up never became {value}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


class Load:
    """Requests with a token, one after the other, until stopped: every status seen."""

    def __init__(self, h: Any, token: str) -> None:
        self.h, self.token = h, token
        self.statuses: list[int] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            resp = await self.h.client.get("/2/0/x", headers=bearer(self.token))
            await resp.read()
            self.statuses.append(resp.status)
            await asyncio.sleep(0.005)

    async def stop(self) -> list[int]:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.statuses


async def test_a_cut_link_serves_degraded_then_enforces_what_changed_meanwhile(
        make_gateway: GatewayFactory, auth_server: AuthServer,
        own_redis: RedisServer, own_redis_client: Redis) -> None:
    link = RedisLink(own_redis.port)
    await link.restore()
    auth_server.issue("tok-outage-client-a", client_id="app-a", sub="person-a")
    auth_server.issue("tok-outage-person-b", client_id="app-b", sub="person-b")
    auth_server.issue("tok-outage-fresh-a", client_id="app-a", sub="person-c")
    auth_server.issue("tok-outage-newcomer", client_id="newcomer", sub="person-d")
    gw = await make_gateway(redis_url=link.url, local_cache_ttl=60)
    await asyncio.wait_for(gw.gw.running().events.connected.wait(), 5)
    for token in ("tok-outage-client-a", "tok-outage-person-b"):
        assert (await gw.client.get("/2/0/x", headers=bearer(token))).status == 200
    assert await redis_up(gw) == 1

    await link.cut()
    load = Load(gw, "tok-outage-client-a")
    await until_redis_up(gw, 0)
    ready = await gw.admin.get("/readyz")
    assert ready.status == 200, await ready.text()
    body = await ready.json()
    assert body["status"] == "ready" and "serving degraded" in body["checks"]["redis"]
    # cached tokens of known clients: served from the replica's memory
    assert (await gw.client.get("/2/0/x", headers=bearer("tok-outage-person-b"))).status == 200
    # a new token of a known client: validated at the authorization server directly
    assert (await gw.client.get("/2/0/x", headers=bearer("tok-outage-fresh-a"))).status == 200
    # a client never seen before cannot be checked: 503, not 401 nor 500
    resp = await gw.client.get("/2/0/x", headers=bearer("tok-outage-newcomer"))
    assert resp.status == 503
    assert resp.headers["Retry-After"].isdigit()
    assert (await resp.json())["error"] == "temporarily_unavailable"
    # meanwhile security staff disable a client and a person; this replica cannot hear
    await ClientAdmin(own_redis_client, key_prefix="gw:").set_disabled(
        "app-a", True, actor="test")
    await UserAdmin(own_redis_client, key_prefix="gw:").set_disabled(
        "person-b", True, actor="test")
    await asyncio.sleep(0.3)
    statuses = await load.stop()
    assert statuses and set(statuses) == {200}, statuses  # no wrong 401, no 500

    await link.restore()
    came_back = time.monotonic()
    await gw.until_status(401, 2.0, bearer("tok-outage-client-a"))
    await gw.until_status(401, 2.0, bearer("tok-outage-person-b"))
    assert time.monotonic() - came_back < 1.5
    await until_redis_up(gw, 1)
    assert (await gw.admin.get("/readyz")).status == 200
    # the client whose token came in during the outage is disabled as well
    assert (await gw.client.get("/2/0/x", headers=bearer("tok-outage-fresh-a"))).status == 401
    await link.cut()


async def test_ready_requires_redis_takes_the_replica_out(
        make_gateway: GatewayFactory, own_redis: RedisServer) -> None:
    gw = await make_gateway(redis_url=own_redis.url, ready_requires_redis=True)
    assert (await gw.admin.get("/readyz")).status == 200
    own_redis.stop()
    ready = await gw.admin.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["status"] == "not ready" and body["checks"]["redis"].startswith("unreachable")
    assert await redis_up(gw) == 0


async def test_the_built_in_server_answers_503_while_redis_is_down(
        make_auth_gateway: AuthGatewayFactory, own_redis: RedisServer) -> None:
    h = await make_auth_gateway(redis_url=own_redis.url, local_cache_ttl=60)
    _, cached = await _builtin_token(h, "dora")
    _, uncached = await _builtin_token(h, "erin")
    assert (await h.client.get("/2/0/x", headers=bearer(cached))).status == 200
    own_redis.stop()
    load = Load(h, cached)
    # a token the replica validated: served
    assert (await h.client.get("/2/0/x", headers=bearer(cached))).status == 200
    # a token whose validation needs Redis: 503 with Retry-After, never 401 nor 500
    resp = await h.client.get("/2/0/x", headers=bearer(uncached))
    assert resp.status == 503
    assert resp.headers["Retry-After"].isdigit()
    body = await resp.json()
    assert body["error"] == "temporarily_unavailable" and body["error_description"]
    # the built-in server's endpoints need Redis too
    for path, form in (("/oauth/token", {"grant_type": "client_credentials",
                                         "client_id": "c", "client_secret": "s"}),
                       ("/oauth/revoke", {"token": "x", "client_id": "c",
                                          "client_secret": "s"}),
                       ("/oauth/device_authorization", {"client_id": "c"})):
        resp = await h.client.post(path, data=form)
        assert resp.status == 503, (path, await resp.text())
        assert resp.headers["Retry-After"].isdigit()
        assert (await resp.json())["error"] == "temporarily_unavailable"
    assert (await h.admin.get("/readyz")).status == 200
    await until_redis_up(h, 0)
    statuses = await load.stop()
    assert statuses and set(statuses) == {200}, statuses
    metrics = await h.metrics()
    assert 'gateway_redis_errors_total{operation="token_validate"}' in metrics


class GatedValidator:
    """Answers "active" only when the test lets it, so a revocation can land meanwhile."""

    name = "gated"

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def validate(self, token: str) -> TokenInfo:
        self.asked.set()
        await self.release.wait()
        return TokenInfo(active=True, client_id="app-r", scopes=frozenset({"anaplan:read"}),
                         exp=time.time() + 3600)

    async def close(self) -> None:
        """Nothing to release."""


async def test_a_validation_in_flight_does_not_overwrite_a_revocation_pin(
        redis: Redis) -> None:
    validator = GatedValidator()
    cache = TokenCache(redis=redis, validator=validator, digester=TokenDigester(b"k" * 32),
                       metrics=GatewayMetrics(), key_prefix="gw:", local_ttl=30,
                       local_size=100, max_ttl=300, negative_ttl=5)
    token = "tok-revoked-while-validated"
    lookup = asyncio.create_task(cache.lookup(token))
    await validator.asked.wait()  # Redis missed; the validator is being asked
    digest = cache.digester.digest(token)
    await cache.purge(digest, revoked_for=60)  # the revocation pins it meanwhile
    validator.release.set()  # ... and the validator's older, active answer arrives
    _, info = await lookup
    assert not info.active
    assert await redis.get(Keys("gw:").token(digest)) == events.REVOKED_MARKER
    assert 59_000 < await redis.pttl(Keys("gw:").token(digest)) <= 60_000
    assert not (await cache.lookup(token))[1].active  # nor later, from either layer


async def test_a_validation_stores_its_answer_when_none_is_held(redis: Redis) -> None:
    validator = GatedValidator()
    validator.release.set()
    cache = TokenCache(redis=redis, validator=validator, digester=TokenDigester(b"k" * 32),
                       metrics=GatewayMetrics(), key_prefix="gw:", local_ttl=30,
                       local_size=100, max_ttl=300, negative_ttl=5)
    token = "tok-stored-as-validated"
    digest = cache.digester.digest(token)
    _, info = await cache.lookup(token)
    assert info.active and info.client_id == "app-r"
    stored = TokenInfo.from_json(str(await redis.get(Keys("gw:").token(digest))))
    assert stored.active and stored.client_id == "app-r"
    assert 299_000 < await redis.pttl(Keys("gw:").token(digest)) <= 300_000
