"""Client governance across replicas: disable, scope narrowing, revocation, Redis outages."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from gateway.cli import commands as cli
from gateway.observe.metrics import GatewayMetrics
from gateway.pipeline.govern import ClientRecord, ClientRegistry, Fields
from tests.conftest import AuthServer, GatewayFactory
from tests.redis_server import RedisServer

TOKEN = "tok-governed-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


async def test_cli_disable_reaches_every_replica_within_100ms(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    auth_server.issue(TOKEN, client_id="app1")
    # polling slowed right down: only the published event can meet the bound
    replicas = [await make_gateway(client_refresh_interval=30, keyspace_notifications=False)
                for _ in range(3)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    monkeypatch.setenv("GATEWAY_REDIS_URL", replicas[0].gw.settings.redis_url)
    started = time.perf_counter()
    code = await asyncio.to_thread(cli.main, ["clients", "disable", "app1", "--reason",
                                              "leaked secret", "--actor", "alice"])
    assert code == 0
    cli_done = time.perf_counter() - started
    delays = await asyncio.gather(*[gw.until_status(401, 1.0, HEADERS) for gw in replicas])
    assert max(delays) < 0.1, delays
    assert "disabled" in capsys.readouterr().out
    record = await redis.hgetall("gw:client:app1")
    assert record["disabled"] == "1"
    assert record["reason"] == "leaked secret" and record["updated_by"] == "alice"
    entries: Any = await redis.xrange("gw:audit")
    assert entries[-1][1]["action"] == "client.disabled"
    assert cli_done < 5
    metrics = await replicas[0].metrics()
    assert 'gateway_auth_decisions_total{client_id="app1",decision="client_disabled"}' in metrics
    assert 'gateway_client_record_invalidations_total{source="event"}' in metrics
    code = await asyncio.to_thread(cli.main, ["clients", "enable", "app1"])
    assert code == 0
    await asyncio.gather(*[gw.until_status(200, 1.0, HEADERS) for gw in replicas])


@pytest.mark.parametrize("keyspace", [True, False], ids=["keyspace-events", "polling-only"])
async def test_redis_cli_hset_reaches_replicas_within_1s(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        keyspace: bool) -> None:
    auth_server.issue(TOKEN, client_id="app2")
    if not keyspace:
        await redis.config_set("notify-keyspace-events", "")
    replicas = [await make_gateway(keyspace_notifications=keyspace) for _ in range(2)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    # what security staff type: HSET gw:client:app2 disabled 1 (no event published)
    await redis.hset("gw:client:app2", "disabled", "1")
    delays = await asyncio.gather(*[gw.until_status(401, 2.0, HEADERS) for gw in replicas])
    assert max(delays) < 1.0, delays
    if keyspace:
        assert max(delays) < 0.1, delays
    await redis.hset("gw:client:app2", "disabled", "0")
    await asyncio.gather(*[gw.until_status(200, 2.0, HEADERS) for gw in replicas])
    await redis.config_set("notify-keyspace-events", "")


async def test_tokens_revoke_refuses_a_cached_token_everywhere(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    auth_server.issue(TOKEN, client_id="app3")
    replicas = [await make_gateway() for _ in range(2)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    monkeypatch.setenv("GATEWAY_REDIS_URL", replicas[0].gw.settings.redis_url)
    # the token stays active at this authorization server: only the caches know
    assert await asyncio.to_thread(cli.main, ["tokens", "revoke", TOKEN]) == 0
    delays = await asyncio.gather(*[gw.until_status(401, 1.0, HEADERS) for gw in replicas])
    assert max(delays) < 0.1
    calls = auth_server.calls
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 401
    assert auth_server.calls == calls  # pinned as revoked in Redis: not re-validated
    entries: Any = await redis.xrange("gw:audit")
    assert entries[-1][1]["action"] == "token.revoked"
    assert TOKEN not in str(entries)


async def test_tokens_revoke_calls_the_revocation_endpoint(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        monkeypatch: pytest.MonkeyPatch, aiohttp_server: AiohttpServer) -> None:
    seen: list[tuple[str, str]] = []

    async def revoke(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append((str(form["token"]), request.headers.get("Authorization", "")))
        auth_server.tokens.pop(str(form["token"]), None)
        return web.Response()

    app = web.Application()
    app.router.add_post("/revoke", revoke)
    server = await aiohttp_server(app)
    monkeypatch.setenv("GATEWAY_REDIS_URL", (await make_gateway()).gw.settings.redis_url)
    monkeypatch.setenv("GATEWAY_REVOCATION_URL", str(server.make_url("/revoke")))
    monkeypatch.setenv("GATEWAY_INTROSPECTION_CLIENT_ID", "gateway")
    monkeypatch.setenv("GATEWAY_INTROSPECTION_CLIENT_SECRET", "gw-secret")
    auth_server.issue(TOKEN)
    assert await asyncio.to_thread(cli.main, ["tokens", "revoke", TOKEN]) == 0
    assert seen == [(TOKEN, "Basic Z2F0ZXdheTpndy1zZWNyZXQ=")]
    assert TOKEN not in auth_server.tokens


async def test_redis_outage_and_restart(make_gateway: GatewayFactory, auth_server: AuthServer,
                                        own_redis: RedisServer, own_redis_client: Redis) -> None:
    auth_server.issue(TOKEN, client_id="app4")
    auth_server.issue("second-token-abc", client_id="app4")
    auth_server.issue("third-token-abc", client_id="newcomer")
    gw = await make_gateway(redis_url=own_redis.url, local_cache_ttl=60)
    assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    own_redis.stop()
    # cached token and a known client: served from the replica's memory
    assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    # a new token of a known client: validated at the authorization server directly
    resp = await gw.client.get("/2/0/x", headers={"Authorization": "Bearer second-token-abc"})
    assert resp.status == 200
    # a client never seen before cannot be checked against the registry: fail closed
    resp = await gw.client.get("/2/0/x", headers={"Authorization": "Bearer third-token-abc"})
    assert resp.status == 503
    assert "Retry-After" in resp.headers
    # degraded, not unready: one Redis outage must not take every replica out at once
    ready = await gw.admin.get("/readyz")
    assert ready.status == 200
    assert "serving degraded" in (await ready.json())["checks"]["redis"]
    assert "gateway_redis_up 0.0" in await gw.metrics()
    own_redis.start()
    deadline = time.monotonic() + 10
    while "gateway_redis_up 1.0" not in await gw.metrics():
        assert time.monotonic() < deadline, "the gateway never saw Redis again"
        await asyncio.sleep(0.1)
    await asyncio.wait_for(gw.gw.running().events.connected.wait(), 10)
    # after the restart, a disable published through the CLI path reaches the replica
    from gateway.pipeline.govern import ClientAdmin

    await ClientAdmin(own_redis_client, key_prefix="gw:").set_disabled(
        "app4", True, actor="test")
    await gw.until_status(401, 1.5, HEADERS)
    metrics = await gw.metrics()
    assert 'gateway_redis_errors_total{operation="token_cache_get"}' in metrics


async def test_a_slow_poll_does_not_undo_a_newer_re_read(redis: Redis) -> None:
    # the 0.5 s poll reads every record; if an event re-reads one record while the poll's
    # answer is still on its way, the poll's older answer must not overwrite it
    registry = ClientRegistry(redis, key_prefix="gw:", metrics=GatewayMetrics())
    await redis.hset("gw:client:appR", mapping={"disabled": "0"})
    await registry.refresh(["appR"])
    assert registry.cached("appR") == ClientRecord("appR", exists=True, disabled=False)

    answered, release = asyncio.Event(), asyncio.Event()
    read = registry._read

    async def slow_read(ids: list[str]) -> list[Fields]:
        answer = await read(ids)  # read now (enabled), delivered late
        if not answered.is_set():  # the poll's read: the first one
            answered.set()
            await release.wait()
        return answer

    registry._read = slow_read  # type: ignore[method-assign]
    poll = asyncio.create_task(registry.refresh())
    await answered.wait()
    await redis.hset("gw:client:appR", "disabled", "1")
    await registry.refresh(["appR"])  # the event's re-read: newer
    assert registry.cached("appR") is not None and registry.cached("appR").disabled  # type: ignore[union-attr]
    release.set()
    await poll
    record = registry.cached("appR")
    assert record is not None and record.disabled
    # and the next poll still applies changes
    await redis.hset("gw:client:appR", "disabled", "0")
    await registry.refresh()
    record = registry.cached("appR")
    assert record is not None and not record.disabled
