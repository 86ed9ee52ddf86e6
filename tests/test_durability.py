"""At start, Redis's eviction policy and persistence are checked: the built-in server
refuses a Redis that can evict its data, a pure gateway warns; a Redis that keeps nothing
on disk is a warning line; a Redis that forbids CONFIG is said so and the start goes on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.runtime.app import ConfigurationError
from tests.conftest import DEFAULT_POLICY, AuthGatewayFactory, GatewayFactory, Upstream
from tests.redis_server import RedisServer, free_port

CLI = str(Path(sys.executable).with_name("oauth-gateway"))


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
async def test_the_builtin_server_refuses_a_redis_that_evicts(
        make_auth_gateway: AuthGatewayFactory, own_redis: RedisServer,
        own_redis_client: Redis, policy: str) -> None:
    await own_redis_client.config_set("maxmemory-policy", policy)
    with pytest.raises(ConfigurationError) as refused:
        await make_auth_gateway(redis_url=own_redis.url)
    message = str(refused.value)
    assert f"maxmemory-policy is {policy}" in message
    assert "noeviction" in message and "GATEWAY_REDIS_ALLOW_EVICTION=true" in message
    if policy.startswith("volatile"):
        assert "refresh and access token records" in message


async def test_the_risk_accepted_starts_with_a_warning(
        make_auth_gateway: AuthGatewayFactory, own_redis: RedisServer,
        own_redis_client: Redis, caplog: pytest.LogCaptureFixture) -> None:
    await own_redis_client.config_set("maxmemory-policy", "allkeys-lfu")
    with caplog.at_level(logging.WARNING):
        h = await make_auth_gateway(redis_url=own_redis.url, redis_allow_eviction=True)
    assert (await h.client.get("/.well-known/oauth-authorization-server")).status == 200
    assert any("maxmemory-policy is allkeys-lfu" in r.getMessage()
               and "GATEWAY_REDIS_ALLOW_EVICTION=true" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_pure_gateway_only_warns(
        make_gateway: GatewayFactory, own_redis: RedisServer, own_redis_client: Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    await own_redis_client.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.WARNING):
        h = await make_gateway(redis_url=own_redis.url)
    assert (await h.admin.get("/readyz")).status == 200  # it serves
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("maxmemory-policy is allkeys-lru" in w and "gw:client:*" in w for w in warned)


async def test_no_persistence_is_a_warning_line_and_noeviction_none(
        make_auth_gateway: AuthGatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        await make_auth_gateway()  # the test Redis: noeviction, nothing on disk
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("keeps nothing on disk" in w and "appendonly yes" in w for w in warned)
    assert not any("maxmemory-policy" in w for w in warned)


async def test_persistence_on_is_not_warned_about(
        make_auth_gateway: AuthGatewayFactory, own_redis: RedisServer,
        own_redis_client: Redis, caplog: pytest.LogCaptureFixture) -> None:
    await own_redis_client.config_set("appendonly", "yes")
    with caplog.at_level(logging.WARNING):
        await make_auth_gateway(redis_url=own_redis.url)
    assert not any("nothing on disk" in r.getMessage() for r in caplog.records)


async def test_a_redis_that_forbids_config_is_said_so_and_the_start_goes_on(
        make_auth_gateway: AuthGatewayFactory, own_redis: RedisServer,
        own_redis_client: Redis, caplog: pytest.LogCaptureFixture) -> None:
    await own_redis_client.acl_setuser(
        "app", enabled=True, passwords=["+app-pass"], keys=["*"], channels=["*"],
        commands=["+@all", "-config"])
    url = own_redis.url.replace("redis://", "redis://app:app-pass@")
    with caplog.at_level(logging.WARNING):
        h = await make_auth_gateway(redis_url=url)
    assert (await h.client.get("/.well-known/oauth-authorization-server")).status == 200
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot read Redis's maxmemory-policy" in w and "noeviction" in w
               for w in warned), warned


def test_serve_refuses_with_exit_code_2_and_says_why(
        own_redis: RedisServer, upstream: Upstream, tmp_path: Path) -> None:
    import redis as sync_redis

    sync_redis.Redis.from_url(own_redis.url).config_set("maxmemory-policy", "allkeys-random")
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.format(upstream=upstream.url))
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
           "GATEWAY_REDIS_URL": own_redis.url,
           "GATEWAY_POLICIES": str(policy), "GATEWAY_ISSUER": f"http://127.0.0.1:{port}",
           "GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_ADMIN_LISTEN": "127.0.0.1:0",
           "GATEWAY_LOG_FORMAT": "text"}
    done = subprocess.run([CLI, "serve"], env=env, capture_output=True, timeout=30)
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert "cannot start" in stderr and "maxmemory-policy is allkeys-random" in stderr
