"""Per-client rate limits: 429 ``rate_limited`` with its headers, route weights, the
default limit, ``clients update --rate-limit``, and fleet totals in a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.cli import commands as cli
from gateway.config.policy import PolicyError, load_policy
from gateway.config.rates import Rate, optional_rate, parse_rate
from gateway.config.settings import SettingsError, load_settings
from gateway.pipeline.ratelimit import SYNC_INTERVAL
from tests.conftest import DEFAULT_POLICY, AuthServer, GatewayFactory, Upstream
from tests.redis_server import RedisServer, free_port

TOKEN = "tok-rate-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
CLI = str(Path(sys.executable).with_name("oauth-gateway"))
DAY = 86400  # windows of a day: a test never straddles two


def window_key(client_id: str, period: int = DAY) -> str:
    return f"gw:ratelimit:{{{client_id}}}:{period}:{int(time.time()) // period}"


async def settle() -> None:
    """Long enough for a replica's sync to write its counts and read the fleet's back."""
    await asyncio.sleep(3 * SYNC_INTERVAL + 0.1)


def test_rate_forms() -> None:
    assert parse_rate("600/60s") == Rate(600, 60)
    assert parse_rate("10/m") == Rate(10, 60)
    assert parse_rate("5000/1h") == Rate(5000, 3600)
    assert optional_rate("none") is None and optional_rate("") is None
    for bad in ("600", "0/60s", "600/0s", "600/60", "-1/60s", "600/60d", "a/60s"):
        with pytest.raises(ValueError, match="N/PERIOD"):
            parse_rate(bad)


def test_default_rate_limit_setting() -> None:
    assert load_settings(environ={}).default_rate_limit == ""
    s = load_settings(environ={"GATEWAY_DEFAULT_RATE_LIMIT": "600/60s"})
    assert s.default_rate_limit == "600/60s"
    with pytest.raises(SettingsError, match="GATEWAY_DEFAULT_RATE_LIMIT: expected N/PERIOD"):
        load_settings(environ={"GATEWAY_DEFAULT_RATE_LIMIT": "600 per minute"})


@pytest.mark.parametrize(("weight", "problem"), [
    ("0", "less than the minimum of 1"), ("-2", "less than the minimum of 1"),
    ("1.5", "is not of type 'integer'"), ("heavy", "is not of type 'integer'")])
def test_route_weight_must_be_a_positive_integer(tmp_path: Path, weight: str,
                                                 problem: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("upstreams: {api: https://api.example.com}\nroutes:\n"
                      f"  - {{name: bulk, upstream: api, path: /x, weight: {weight}}}\n")
    with pytest.raises(PolicyError, match=rf"route #1 \('bulk'\), key weight: .*{problem}"):
        load_policy(policy)
    policy.write_text("upstreams: {api: https://api.example.com}\nroutes:\n"
                      "  - {name: bulk, upstream: api, path: /x, weight: 5}\n"
                      "  - {name: light, upstream: api, path: /y}\n")
    assert [r.weight for r in load_policy(policy).routes] == [5, 1]


async def test_client_over_its_limit_gets_429_with_headers(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream,
        redis: Redis) -> None:
    auth_server.issue(TOKEN, client_id="app1")
    await redis.hset("gw:client:app1", "rate_limit", "3/24h")
    h = await make_gateway()
    resp = await h.client.get("/2/0/x", headers=HEADERS)
    assert resp.status == 200  # a third of the quota used: no fields yet (they cost CPU)
    assert "RateLimit" not in resp.headers and "RateLimit-Policy" not in resp.headers
    remaining = []
    for _ in range(2):
        resp = await h.client.get("/2/0/x", headers=HEADERS)
        assert resp.status == 200
        # from half the quota on, allowed answers tell the client where it stands
        assert resp.headers["RateLimit-Policy"] == f'"default";q=3;w={DAY}'
        match = re.fullmatch(r'"default";r=(\d+);t=(\d+)', resp.headers["RateLimit"])
        assert match is not None
        remaining.append(int(match[1]))
        assert 0 < int(match[2]) <= DAY
    assert remaining == [1, 0]
    resp = await h.client.get("/2/0/x", headers=HEADERS)
    assert resp.status == 429
    body = await resp.json()
    assert body["error"] == "rate_limited" and body["error_description"]
    assert set(body) == {"error", "error_description"}
    retry_after = int(resp.headers["Retry-After"])
    assert 0 < retry_after <= DAY
    assert resp.headers["RateLimit-Policy"] == f'"default";q=3;w={DAY}'
    assert resp.headers["RateLimit"] == f'"default";r=0;t={retry_after}'
    assert "X-Request-Id" in resp.headers
    assert len(upstream.received) == 3  # the refused request never reached the upstream
    metrics = await h.metrics()
    assert 'gateway_rate_limited_total{client_id="app1"} 1.0' in metrics
    assert ('gateway_auth_decisions_total{client_id="app1",decision="rate_limited"} 1.0'
            in metrics)
    await settle()
    assert await redis.get(window_key("app1")) == "3"  # the fleet's count, in Redis
    lines = [line for line in h.log_lines() if line.get("status") == 429]
    assert lines and lines[0]["decision"] == "rate_limited"


async def test_route_weight_and_default_limit(make_gateway: GatewayFactory,
                                              auth_server: AuthServer, redis: Redis) -> None:
    auth_server.issue(TOKEN, client_id="bulk-app")
    policy = DEFAULT_POLICY.replace("    path: /slow\n", "    path: /slow\n    weight: 3\n")
    h = await make_gateway(policy, default_rate_limit="4/24h")
    resp = await h.client.get("/2/0/x", headers=HEADERS)  # weight 1: 3 left
    assert resp.status == 200 and "RateLimit" not in resp.headers
    resp = await h.client.get("/slow?s=0", headers=HEADERS)  # weight 3: 0 left
    assert resp.status == 200 and resp.headers["RateLimit"].startswith('"default";r=0;')
    resp = await h.client.get("/2/0/x", headers=HEADERS)
    assert resp.status == 429
    await settle()
    assert await redis.get(window_key("bulk-app")) == "4"


async def test_client_without_limit_gets_no_rate_limit_headers(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN, client_id="free-app")
    h = await make_gateway()
    for _ in range(20):
        resp = await h.client.get("/2/0/x", headers=HEADERS)
        assert resp.status == 200
    assert "RateLimit" not in resp.headers and "RateLimit-Policy" not in resp.headers


async def test_unreadable_record_limit_fails_closed(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream,
        redis: Redis) -> None:
    auth_server.issue(TOKEN, client_id="typo-app")
    await redis.hset("gw:client:typo-app", "rate_limit", "600 per minute")
    h = await make_gateway(default_rate_limit="1000/24h")
    resp = await h.client.get("/2/0/x", headers=HEADERS)
    assert resp.status == 429 and (await resp.json())["error"] == "rate_limited"
    assert upstream.received == []


async def test_clients_update_sets_and_clears_the_limit_on_a_running_gateway(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        redis_server: RedisServer, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_server.url)
    auth_server.issue(TOKEN, client_id="ext-app")  # not a built-in server's client
    h = await make_gateway(default_rate_limit="1000/24h")
    resp = await h.client.get("/2/0/x", headers=HEADERS)
    assert resp.status == 200 and "RateLimit-Policy" not in resp.headers  # far from it

    code = await asyncio.to_thread(cli.main, ["clients", "update", "ext-app",
                                              "--rate-limit", "2/24h", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["rate_limit"] == "2/86400s"
    assert await redis.hget("gw:client:ext-app", "rate_limit") == "2/86400s"
    # within the bounds of a disable: the event makes every replica re-read the record
    started = time.monotonic()
    while True:
        resp = await h.client.get("/2/0/x", headers=HEADERS)
        if resp.headers.get("RateLimit-Policy", "").endswith("q=2;w=86400"):
            break
        assert time.monotonic() - started < 1.0, "the new limit was not applied in time"
        await asyncio.sleep(0.01)
    assert time.monotonic() - started < 0.1 + 0.05  # the event's bound, plus this loop
    # the one request counted under the old limit's window shares the counter (same period)
    while (await h.client.get("/2/0/x", headers=HEADERS)).status == 200:
        pass
    resp = await h.client.get("/2/0/x", headers=HEADERS)
    assert resp.status == 429

    code = await asyncio.to_thread(cli.main, ["clients", "update", "ext-app",
                                              "--rate-limit", "none"])
    assert code == 0 and "cleared" in capsys.readouterr().out
    assert await redis.hget("gw:client:ext-app", "rate_limit") is None
    await h.until_status(200, 1.0, HEADERS)  # back to the default limit
    audit = cast(list[tuple[str, dict[str, str]]], await redis.xrange("gw:audit"))
    actions = [(f["action"], f.get("rate_limit")) for _id, f in audit]
    assert ("client.rate_limit_set", "2/86400s") in actions
    assert ("client.rate_limit_set", "") in actions

    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        cli.main(["clients", "update", "ext-app", "--rate-limit", "lots"])
    assert exited.value.code == 2 and "N/PERIOD" in capsys.readouterr().err


FLEET_LIMIT = 1500


@pytest.fixture
async def fleet(redis_server: RedisServer, auth_server: AuthServer, upstream: Upstream,
                tmp_path: Path) -> AsyncIterator[list[str]]:
    """Three ``oauth-gateway serve`` processes sharing one Redis, with a default limit."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.format(upstream=upstream.url))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_POLICIES": str(policy),
                "GATEWAY_INTROSPECTION_URL": auth_server.url, "GATEWAY_ACCESS_LOG": "false",
                "GATEWAY_SHUTDOWN_TIMEOUT": "2",
                "GATEWAY_DEFAULT_RATE_LIMIT": f"{FLEET_LIMIT}/24h"})
    procs, urls, admins = [], [], []
    for _ in range(3):
        port, admin_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [CLI, "serve"], env={**env, "GATEWAY_LISTEN": f"127.0.0.1:{port}",
                                 "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")
        admins.append(f"http://127.0.0.1:{admin_port}")
    try:
        async with aiohttp.ClientSession() as session:
            for admin, proc in zip(admins, procs, strict=True):
                deadline = time.monotonic() + 20
                while True:
                    assert proc.poll() is None, "a gateway process exited"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(admin + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    assert time.monotonic() < deadline, "gateway not ready"
                    await asyncio.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def test_fleet_of_three_stays_within_the_stated_overshoot(
        fleet: list[str], auth_server: AuthServer, redis: Redis) -> None:
    """Three replicas hammered at once admit at least the limit, and no more than
    limit + (R - 1) * L * (2 * SYNC_INTERVAL + RTT), L each replica's admitted rate; Redis
    ends up holding exactly what the fleet admitted."""
    auth_server.issue(TOKEN, client_id="runaway")
    started = time.monotonic()
    admitted = [0, 0, 0]
    last_admitted = [started] * 3
    refused_since: list[float | None] = [None] * 3

    async def worker(session: aiohttp.ClientSession, i: int) -> None:
        while True:
            async with session.get(fleet[i] + "/2/0/x", headers=HEADERS) as resp:
                await resp.read()
                now = time.monotonic()
                if resp.status == 200:
                    admitted[i] += 1
                    last_admitted[i] = now
                    since = refused_since[i]
                    assert since is None or now - since < 1.0, \
                        "a replica kept admitting long after the fleet's limit"
                else:
                    assert resp.status == 429
                    assert resp.headers["RateLimit-Policy"] == \
                        f'"default";q={FLEET_LIMIT};w={DAY}'
                    since = refused_since[i] = refused_since[i] or now
                    if now - since > 0.5:
                        return

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, i) for i in range(3) for _ in range(4)))
    total = sum(admitted)
    rates = [n / max(0.01, last - started) for n, last in zip(admitted, last_admitted,
                                                                strict=True)]
    # the bound, with 0.1 s for Redis round trips and the event loops' scheduling on a
    # busy two-core machine
    bound = FLEET_LIMIT + (3 - 1) * max(rates) * (2 * SYNC_INTERVAL + 0.1)
    print(f"admitted {admitted} = {total} of {FLEET_LIMIT}; rates {rates}; bound {bound:.0f}")
    assert FLEET_LIMIT <= total <= bound
    await settle()
    assert await redis.get(window_key("runaway")) == str(total)
