"""Per-client rate limits: 429 ``rate_limited`` with its headers, route weights, the
default limit, ``clients update --rate-limit``, and fleet totals in a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.cli import commands as cli
from gateway.config.policy import PolicyError, load_policy
from gateway.config.rates import Rate, optional_rate, parse_rate
from gateway.config.settings import SettingsError, load_settings
from gateway.pipeline.ratelimit import SYNC_INTERVAL
from tests.conftest import DEFAULT_POLICY, AuthServer, GatewayFactory, Upstream
from tests.redis_server import RedisServer

TOKEN = "tok-rate-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
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
    remaining = []
    for _ in range(3):
        resp = await h.client.get("/2/0/x", headers=HEADERS)
        assert resp.status == 200
        # allowed answers tell the client where it stands too
        assert resp.headers["RateLimit-Policy"] == f'"default";q=3;w={DAY}'
        match = re.fullmatch(r'"default";r=(\d+);t=(\d+)', resp.headers["RateLimit"])
        assert match is not None
        remaining.append(int(match[1]))
        assert 0 < int(match[2]) <= DAY
    assert remaining == [2, 1, 0]
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
    assert resp.status == 200 and resp.headers["RateLimit"].startswith('"default";r=3;')
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
    assert resp.status == 200 and resp.headers["RateLimit-Policy"].endswith("q=1000;w=86400")

    code = await asyncio.to_thread(cli.main, ["clients", "update", "ext-app",
                                              "--rate-limit", "2/24h", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["rate_limit"] == "2/86400s"
    assert await redis.hget("gw:client:ext-app", "rate_limit") == "2/86400s"
    # within the bounds of a disable: the event makes every replica re-read the record
    started = time.monotonic()
    while True:
        resp = await h.client.get("/2/0/x", headers=HEADERS)
        if resp.headers["RateLimit-Policy"].endswith("q=2;w=86400"):
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
    audit = await redis.xrange("gw:audit")
    actions = [(f["action"], f.get("rate_limit")) for _id, f in audit]
    assert ("client.rate_limit_set", "2/86400s") in actions
    assert ("client.rate_limit_set", "") in actions

    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        cli.main(["clients", "update", "ext-app", "--rate-limit", "lots"])
    assert exited.value.code == 2 and "N/PERIOD" in capsys.readouterr().err
