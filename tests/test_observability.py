"""What operators watch: /healthz, /readyz, /metrics, per-client usage, the access log."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.observe.metrics import GatewayMetrics
from gateway.observe.usage import UsageTracker
from tests.conftest import AuthServer, GatewayFactory, Harness, Upstream

CONTRACT_METRICS = (
    "gateway_requests_total",
    "gateway_request_duration_seconds_bucket",
    "gateway_upstream_duration_seconds_bucket",
    "gateway_auth_decisions_total",
    "gateway_token_cache_requests_total",
    "gateway_introspection_requests_total",
    "gateway_introspection_duration_seconds_bucket",
)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name{labels}`` in an exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and dict(s.labels) == labels:
                return float(s.value)
    return None


def series_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def label_values(text: str) -> set[str]:
    return {v for family in text_string_to_metric_families(text)
            for s in family.samples for v in s.labels.values()}


async def get(h: Harness, path: str, token: str | None = None, method: str = "GET",
              **headers: str) -> tuple[int, CIMultiDict[str]]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = await h.client.request(method, path, headers=headers)
    await resp.read()
    return resp.status, CIMultiDict(resp.headers)


async def raw_get(h: Harness, target: str, token: str) -> int:
    """Send the request line exactly as written: the test client would normalise ``..``."""
    assert h.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", h.client.server.port)
    writer.write((f"GET {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                  "Connection: close\r\n\r\n").encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return int(data.split(b" ", 2)[1])


async def eventually(check: Callable[[], Any], limit: float = 2.0) -> None:
    """Retry ``check`` (which asserts) until it passes: the log and the metrics are written
    just after the response's last byte leaves."""
    deadline = time.monotonic() + limit
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                await result
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


# --- health and readiness ----------------------------------------------------------------

async def test_healthz(make_gateway: GatewayFactory) -> None:
    h = await make_gateway()
    resp = await h.admin.get("/healthz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == {"status": "ok"}


async def test_readyz_reports_redis_and_policies(make_gateway: GatewayFactory) -> None:
    h = await make_gateway()
    resp = await h.admin.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["policies"] == "5 routes"  # DEFAULT_POLICY in conftest
    h.gw.draining = True
    resp = await h.admin.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["checks"]["lifecycle"] == "draining"


async def test_admin_listener_serves_no_proxy_traffic(make_gateway: GatewayFactory,
                                                      upstream: Upstream) -> None:
    h = await make_gateway()
    resp = await h.admin.get("/2/0/workspaces")
    assert resp.status == 404
    assert upstream.received == []


# --- /metrics ----------------------------------------------------------------------------

async def test_metrics_exposition_after_traffic(make_gateway: GatewayFactory,
                                                auth_server: AuthServer) -> None:
    h = await make_gateway()
    good = auth_server.issue("tok-metrics-good-7Q2", client_id="appM", scope="anaplan:read")
    assert (await get(h, "/2/0/workspaces", good))[0] == 200
    assert (await get(h, "/2/0/workspaces", good, method="POST"))[0] == 403
    assert (await get(h, "/2/0/workspaces", "tok-metrics-unknown-9X4"))[0] == 401
    assert (await get(h, "/2/0/workspaces"))[0] == 401
    assert (await get(h, "/nowhere"))[0] == 404

    resp = await h.admin.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert resp.charset == "utf-8"
    assert "version=" in resp.headers["Content-Type"]
    assert set(CONTRACT_METRICS) <= series_names(await resp.text())

    async def check() -> None:
        text = await h.metrics()
        assert sample(text, "gateway_requests_total",
                      route="read", method="GET", status="200") == 1
        assert sample(text, "gateway_requests_total",
                      route="write", method="POST", status="403") == 1
        assert sample(text, "gateway_requests_total",
                      route="read", method="GET", status="401") == 2
        assert sample(text, "gateway_requests_total",
                      route="(none)", method="GET", status="404") == 1
        assert sample(text, "gateway_request_duration_seconds_count", route="read") == 3
        assert sample(text, "gateway_upstream_duration_seconds_count", route="read") == 1
        # refused requests never reached an upstream
        assert sample(text, "gateway_upstream_duration_seconds_count", route="write") == 0
        for client_id, decision in (("appM", "allowed"), ("appM", "insufficient_scope"),
                                    ("unknown", "invalid_token"),
                                    ("unknown", "missing_token")):
            assert sample(text, "gateway_auth_decisions_total",
                          client_id=client_id, decision=decision) == 1, (client_id, decision)
        assert sample(text, "gateway_introspection_requests_total", outcome="active") == 1
        assert sample(text, "gateway_introspection_requests_total", outcome="inactive") == 1
        assert sample(text, "gateway_introspection_requests_total", outcome="error") == 0
        assert sample(text, "gateway_introspection_duration_seconds_count") == 2

    await eventually(check)


async def test_local_cache_hit_counted_on_second_request(make_gateway: GatewayFactory,
                                                         auth_server: AuthServer) -> None:
    h = await make_gateway(local_cache_ttl=60)
    token = auth_server.issue("tok-cache-4D1", client_id="appC")
    assert (await get(h, "/2/0/x", token))[0] == 200
    text = await h.metrics()
    assert sample(text, "gateway_token_cache_requests_total", layer="local", result="hit") == 0
    assert sample(text, "gateway_token_cache_requests_total", layer="local", result="miss") == 1
    assert sample(text, "gateway_token_cache_requests_total", layer="redis", result="miss") == 1
    assert (await get(h, "/2/0/y", token))[0] == 200
    text = await h.metrics()
    assert sample(text, "gateway_token_cache_requests_total", layer="local", result="hit") == 1
    assert sample(text, "gateway_token_cache_requests_total", layer="local", result="miss") == 1
    assert sample(text, "gateway_introspection_requests_total", outcome="active") == 1
    assert auth_server.calls == 1


async def test_redis_layer_hit_counted_on_another_replica(make_gateway: GatewayFactory,
                                                          auth_server: AuthServer) -> None:
    first, second = await make_gateway(), await make_gateway()
    token = auth_server.issue("tok-cache-shared-8K", client_id="appC")
    assert (await get(first, "/2/0/x", token))[0] == 200
    assert (await get(second, "/2/0/x", token))[0] == 200
    text = await second.metrics()
    assert sample(text, "gateway_token_cache_requests_total", layer="redis", result="hit") == 1
    assert sample(text, "gateway_introspection_requests_total", outcome="active") == 0
    assert auth_server.calls == 1


async def test_labels_never_carry_tokens_or_raw_paths(make_gateway: GatewayFactory,
                                                      auth_server: AuthServer) -> None:
    h = await make_gateway()
    good = auth_server.issue("tokSECRETgood8f3e2d1", client_id="appL")
    bad = "tokSECRETbad5a6b7c8d"
    sent: list[tuple[str, str | None, str]] = [
        ("/2/0/secret-path-123", good, "GET"),
        ("/2/0/secret-path-123?q=secret-query-77", good, "GET"),
        ("/2/0/secret-path-123", good, "DELETE"),          # 403
        ("/2/0/secret-path-123", bad, "GET"),              # 401 invalid
        ("/secret-path-456/elsewhere", good, "GET"),       # 404 no route
        ("/2/0/secret-path-123", good, "PROPFIND"),        # 405, a method no route names
    ]
    statuses = [(await get(h, path, token, method))[0] for path, token, method in sent]
    assert statuses == [200, 200, 403, 401, 404, 405]
    assert await raw_get(h, "/2/0/secret-path-123/../x", good) == 400  # dot-segment
    text = await h.metrics()
    for secret in ("SECRET", "secret-path", "secret-query", "PROPFIND", good, bad):
        assert secret not in text, secret
    values = label_values(text)
    assert not any(v.startswith("/") for v in values), values
    assert sample(text, "gateway_requests_total", route="(none)", method="OTHER",
                  status="405") == 1
    assert sample(text, "gateway_requests_total", route="(none)", method="GET",
                  status="400") == 1


async def test_two_gateways_in_one_process_have_their_own_registries(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    busy, idle = await make_gateway(), await make_gateway()
    assert busy.gw.metrics.registry is not idle.gw.metrics.registry
    token = auth_server.issue("tok-registry-3R", client_id="appR")
    for _ in range(3):
        assert (await get(busy, "/2/0/x", token))[0] == 200
    busy_text, idle_text = await busy.metrics(), await idle.metrics()
    assert sample(busy_text, "gateway_requests_total",
                  route="read", method="GET", status="200") == 3
    assert sample(busy_text, "gateway_auth_decisions_total",
                  client_id="appR", decision="allowed") == 3
    assert sample(idle_text, "gateway_requests_total",
                  route="read", method="GET", status="200") is None
    assert sample(idle_text, "gateway_auth_decisions_total",
                  client_id="appR", decision="allowed") is None
    assert sample(idle_text, "gateway_request_duration_seconds_count", route="read") == 0
    assert sample(idle_text, "gateway_token_cache_requests_total",
                  layer="local", result="miss") == 0
    assert "appR" not in idle_text


# --- token usage per client, fleet-wide ----------------------------------------------------

async def test_client_usage_window_is_fleet_wide(make_gateway: GatewayFactory,
                                                 auth_server: AuthServer) -> None:
    one, two = await make_gateway(), await make_gateway()
    a1, a2, a3 = (auth_server.issue(f"tok-usage-a{i}-Z", client_id="appA") for i in (1, 2, 3))
    b1 = auth_server.issue("tok-usage-b1-Z", client_id="appB")
    # appA: 5 requests, 3 distinct tokens, a1 and a2 seen by both replicas
    for h, token in ((one, a1), (one, a1), (one, a2), (two, a2), (two, a3)):
        assert (await get(h, "/2/0/x", token))[0] == 200
    # refused requests are not usage
    assert (await get(two, "/2/0/x", a3, method="POST"))[0] == 403
    assert (await get(one, "/2/0/x", b1))[0] == 200

    async def check() -> None:
        # retried: a background flush may hold counts it has taken but not yet written
        for h in (one, two):
            await h.gw.running().pipeline.usage.flush()
        await one.gw.running().pipeline.usage.report()
        text = await one.metrics()
        assert 'gateway_client_window_requests{client_id="appA"} 5.0' in text
        assert 'gateway_client_window_distinct_tokens{client_id="appA"} 3.0' in text
        assert 'gateway_client_window_requests{client_id="appB"} 1.0' in text
        assert 'gateway_client_window_distinct_tokens{client_id="appB"} 1.0' in text
        for token in (a1, a2, a3, b1):
            assert token not in text

    await eventually(check, limit=3.0)


async def test_client_usage_counts_in_redis_hold_no_token(make_gateway: GatewayFactory,
                                                          auth_server: AuthServer) -> None:
    h = await make_gateway()
    token = auth_server.issue("tok-usage-redis-Q", client_id="appU")
    for _ in range(2):
        assert (await get(h, "/2/0/x", token))[0] == 200
    redis = h.gw.running().redis
    usage = h.gw.running().pipeline.usage

    async def check() -> None:
        await usage.flush()
        counted = 0
        async for k in redis.scan_iter("gw:usage:req:{appU}:*"):
            counted += int(await redis.get(k) or 0)
        assert counted == 2

    await eventually(check, limit=3.0)
    keys = sorted([k async for k in redis.scan_iter("gw:usage:*")])
    assert "gw:usage:clients" in keys
    assert await redis.zscore("gw:usage:clients", "appU") is not None
    for k in keys:
        if k.startswith("gw:usage:hour:"):  # the console's 24 h counts: a day and an hour
            assert 0 < await redis.ttl(k) <= 25 * 3600, k
            assert await redis.get(k) == "2"
        elif k != "gw:usage:clients":  # buckets expire with the window
            assert 0 < await redis.ttl(k) <= h.gw.settings.usage_window + 60, k
    assert token not in repr(keys)


async def test_client_usage_flush_of_many_clients_and_tokens_is_exact(redis: Redis) -> None:
    # a flush covers every active client in a few script calls: 150 clients span
    # several calls, one client's 2,500 tokens span several of its own values, and a
    # client id with spaces and braces stays one client
    usage = UsageTracker(redis, key_prefix="gw:", metrics=GatewayMetrics())
    clients = [f"app-{i:03d}" for i in range(149)] + ["odd {app} id"]
    for i, cid in enumerate(clients):
        for _ in range(i % 5 + 1):
            usage.record(cid, f"{i:040x}")
    for n in range(2500):
        usage.record("heavy", f"{n:040x}")
    await usage.flush()
    counts = await usage.window_counts()
    assert set(counts) == {*clients, "heavy"}
    for i, cid in enumerate(clients):
        assert counts[cid] == (i % 5 + 1, 1), cid
    requests, distinct = counts["heavy"]
    assert requests == 2500
    assert abs(distinct - 2500) < 2500 * 0.03  # a HyperLogLog: ~0.8% standard error
    assert await redis.zcard("gw:usage:clients") == 151
    assert await redis.exists("gw:usage:req:{odd {app} id}:" + str(int(time.time()) // 60))
    # a second flush adds to the same buckets
    usage.record("app-000", "0" * 40)
    await usage.flush()
    assert (await usage.window_counts())["app-000"] == (2, 1)


# --- access log ------------------------------------------------------------------------

async def test_access_log_json(make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    h = await make_gateway()
    token = auth_server.issue("tok-accesslog-J7", client_id="appJ")
    status, headers = await get(h, "/2/0/logged", token)
    assert status == 200
    generated = headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    status, headers = await get(h, "/2/0/logged", token, method="POST",
                                **{"X-Request-Id": "caller-id-42"})
    assert status == 403
    assert headers["X-Request-Id"] == "caller-id-42"
    status, headers = await get(h, "/2/0/logged", "tok-accesslog-bad-J8")
    assert status == 401
    rejected_id = headers["X-Request-Id"]

    def check() -> None:
        assert len(h.log_lines()) == 3

    await eventually(check)
    first, second, third = h.log_lines()
    for line in (first, second, third):
        assert {"request_id", "client_id", "route", "status", "decision", "duration_ms",
                "upstream_ms"} <= set(line)
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    assert (first["request_id"], first["client_id"], first["route"], first["status"],
            first["decision"]) == (generated, "appJ", "read", 200, "allowed")
    assert first["upstream_ms"] > 0
    assert first["duration_ms"] >= first["upstream_ms"]
    assert (second["request_id"], second["client_id"], second["route"], second["status"],
            second["decision"]) == ("caller-id-42", "appJ", "write", 403, "insufficient_scope")
    assert second["upstream_ms"] == 0
    assert (third["request_id"], third["client_id"], third["status"], third["decision"]) == (
        rejected_id, "unknown", 401, "invalid_token")
    raw = h.log.getvalue()
    for secret in (token, "tok-accesslog-bad-J8", "Authorization", "Bearer"):
        assert secret not in raw, secret


async def test_access_log_text(make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    h = await make_gateway(log_format="text")
    token = auth_server.issue("tok-accesslog-T9", client_id="appT")
    status, headers = await get(h, "/2/0/logged", token)
    assert status == 200
    assert (await get(h, "/2/0/logged"))[0] == 401

    def lines() -> list[str]:
        h.gw.access_log.flush()
        return h.log.getvalue().splitlines()

    def check() -> None:
        assert len(lines()) == 2

    await eventually(check)
    parsed: list[dict[str, str]] = []
    for line in lines():
        assert not line.startswith("{")
        pairs = line.split(" ")
        assert all(re.fullmatch(r"[a-z_]+=\S*", p) for p in pairs), line
        parsed.append(dict(p.split("=", 1) for p in pairs))
    ok, missing = parsed
    assert ok["request_id"] == headers["X-Request-Id"]
    assert (ok["client_id"], ok["route"], ok["status"], ok["decision"]) == (
        "appT", "read", "200", "allowed")
    assert float(ok["duration_ms"]) > 0 and float(ok["upstream_ms"]) > 0
    assert (missing["client_id"], missing["status"], missing["decision"]) == (
        "unknown", "401", "missing_token")
    raw = h.log.getvalue()
    for secret in (token, "Authorization", "Bearer"):
        assert secret not in raw, secret


async def test_access_log_off(make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    h = await make_gateway(access_log=False)
    token = auth_server.issue("tok-accesslog-off", client_id="appO")
    assert (await get(h, "/2/0/x", token))[0] == 200
    await asyncio.sleep(0.15)  # a background flush interval and a half
    h.gw.access_log.flush()
    assert h.log.getvalue() == ""
    text = await h.metrics()
    assert sample(text, "gateway_requests_total", route="read", method="GET", status="200") == 1


async def test_upstream_responses_count_the_upstreams_own_status(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    auth_server.issue("tok-upstream-status-1", client_id="app1")
    gw = await make_gateway()
    headers = {"Authorization": "Bearer tok-upstream-status-1"}
    assert (await gw.client.get("/status/503", headers=headers)).status == 503
    assert (await gw.client.get("/status/200", headers=headers)).status == 200
    assert (await gw.client.get("/status/404", headers=headers)).status == 404
    text = await gw.metrics()
    for status_class in ("5xx", "2xx", "4xx"):
        assert (f'gateway_upstream_responses_total{{route="status",status_class="{status_class}"}}'
                " 1.0") in text
    # a refusal by the gateway never reached an upstream: not counted there
    assert (await gw.client.get("/status/200")).status == 401
    assert 'gateway_upstream_responses_total{route="status",status_class="2xx"} 1.0' \
        in await gw.metrics()
