"""The proxy's decisions as a client sees them: status, headers, body, upstream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import AuthServer, GatewayFactory, Harness, Upstream

TOKEN = "tok-read-0123456789abcdef"


async def test_allowed_request_reaches_upstream_with_forwarded_headers(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/workspaces?tenantDetails=true",
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    assert (await resp.json())["path"] == "/2/0/workspaces"
    [got] = upstream.received
    assert got.raw_path == "/2/0/workspaces?tenantDetails=true"
    assert got.headers["Authorization"] == f"Bearer {TOKEN}"
    assert got.headers["X-Forwarded-For"] == "127.0.0.1"
    assert got.headers["X-Forwarded-Proto"] == "http"
    assert got.headers["Host"] == upstream.url.removeprefix("http://")
    assert got.headers["X-Request-Id"] == resp.headers["X-Request-Id"]
    # the introspection call used client_secret_basic with the gateway's credentials
    assert auth_server.auth_headers == ["Basic Z2F0ZXdheTpndy1zZWNyZXQ="]


async def test_anaplan_scheme_is_accepted(make_gateway: GatewayFactory,
                                          auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/models",
                               headers={"Authorization": f"AnaplanAuthToken {TOKEN}"})
    assert resp.status == 200


async def test_missing_token_gets_bare_challenge(make_gateway: GatewayFactory,
                                                 upstream: Upstream) -> None:
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/workspaces")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="oauth-gateway"'
    body = await resp.json()
    assert set(body) == {"error", "error_description"}
    assert upstream.received == []


async def test_unknown_scheme_is_treated_as_missing(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/workspaces", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="oauth-gateway"'


async def test_invalid_token_is_refused(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/workspaces", headers={"Authorization": "Bearer nope-nope"})
    assert resp.status == 401
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert (await resp.json())["error"] == "invalid_token"
    assert upstream.received == []


async def test_expired_token_is_refused(make_gateway: GatewayFactory,
                                        auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN, ttl=-5)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/workspaces", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 401


async def test_insufficient_scope_names_required_scope(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN, scope="anaplan:read")
    gw = await make_gateway()
    resp = await gw.client.post("/2/0/workspaces/w/models", json={},
                                headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 403
    challenge = resp.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="anaplan:write"' in challenge
    assert upstream.received == []


async def test_scp_list_is_understood(make_gateway: GatewayFactory,
                                      auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN, scope="", scp=["anaplan:write"])
    gw = await make_gateway()
    resp = await gw.client.put("/2/0/x", data=b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200


@pytest.mark.parametrize("name", [
    "access_token", "ACCESS_TOKEN", "Access_Token", "AnaplanAuthToken", "anaplanauthtoken",
    "ANAPLANAUTHTOKEN", "auth_token", "Auth_Token", "token", "Token", "access%5Ftoken"])
async def test_token_in_query_string_is_refused(make_gateway: GatewayFactory,
                                                auth_server: AuthServer, upstream: Upstream,
                                                name: str) -> None:
    # a good token in the header too: the query string's copy alone is refused
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get(f"/2/0/workspaces?x=1&{name}={TOKEN}",
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid_request"
    assert TOKEN not in body["error_description"]
    assert upstream.received == []


async def test_several_authorization_headers_are_refused(make_gateway: GatewayFactory,
                                                         auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/workspaces", headers=[
        ("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer other")])
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"


async def test_oversized_authorization_header_is_refused(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_auth_header=1024)
    resp = await gw.client.get("/2/0/workspaces",
                               headers={"Authorization": "Bearer " + "a" * 2000})
    assert resp.status == 400


async def test_no_route_is_404_and_never_forwarded(make_gateway: GatewayFactory,
                                                   auth_server: AuthServer,
                                                   upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/admin/secret", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 404
    assert (await resp.json())["error"] == "no_route"
    assert upstream.received == []


async def test_dangerous_paths_are_refused_before_matching(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    for path in ("/2/0/../../admin", "/2/0/./x", "/2/0/a%2Fb", "/2/0/a%5cb", "/2/0/%2e%2e/x",
                 "/2/0/a%00b", "/2/0/a%252fb", "/2/0/a\\b"):
        status, body = await raw_request(gw, f"GET {path} HTTP/1.1\r\n"
                                         f"Authorization: Bearer {TOKEN}\r\n")
        assert status == 400, path
        assert json.loads(body)["error"] == "invalid_request"
    assert upstream.received == []


async def raw_request(gw: Harness, head: str) -> tuple[int, bytes]:
    """Send bytes exactly as written (no client-side URL normalisation)."""
    assert gw.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    writer.write((head + "Host: gw\r\nConnection: close\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), body


async def test_disabled_client_is_refused_and_scopes_narrowed(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis) -> None:
    auth_server.issue(TOKEN, client_id="app1", scope="anaplan:read anaplan:write")
    gw = await make_gateway()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert (await gw.client.post("/2/0/x", data=b"1", headers=headers)).status == 200
    await redis.hset("gw:client:app1", mapping={"scopes": "anaplan:read"})
    await gw.gw.running().registry.refresh()
    resp = await gw.client.post("/2/0/x", data=b"1", headers=headers)
    assert resp.status == 403
    assert (await gw.client.get("/2/0/x", headers=headers)).status == 200
    await redis.hset("gw:client:app1", "disabled", "1")
    await gw.gw.running().registry.refresh()
    resp = await gw.client.get("/2/0/x", headers=headers)
    assert resp.status == 401
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert "disabled" in (await resp.json())["error_description"]


async def test_require_client_record(make_gateway: GatewayFactory, auth_server: AuthServer,
                                     redis: Redis) -> None:
    auth_server.issue(TOKEN, client_id="stranger")
    gw = await make_gateway(require_client_record=True)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert (await gw.client.get("/2/0/x", headers=headers)).status == 401
    await redis.hset("gw:client:stranger", "disabled", "0")
    await gw.gw.running().registry.refresh()
    assert (await gw.client.get("/2/0/x", headers=headers)).status == 200


async def test_authorization_server_down_gives_503_not_401(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    auth_server.issue("other-token-xyz")
    gw = await make_gateway()
    assert (await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {TOKEN}"})
            ).status == 200
    auth_server.failing = True
    resp = await gw.client.get("/2/0/x", headers={"Authorization": "Bearer other-token-xyz"})
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    assert (await resp.json())["error"] == "temporarily_unavailable"
    # the cached token keeps working while the authorization server is down
    assert (await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {TOKEN}"})
            ).status == 200
    assert len(upstream.received) == 2


async def test_concurrent_requests_share_one_introspection(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN)
    auth_server.delay = 0.2
    gw = await make_gateway()
    results = await asyncio.gather(*[
        gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {TOKEN}"})
        for _ in range(25)])
    assert [r.status for r in results] == [200] * 25
    assert auth_server.calls == 1


async def test_a_request_that_gives_up_does_not_fail_the_others_waiting(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    # three look-ups of one token share one introspection; the first request's client
    # hangs up (its wait is cancelled) before the answer: the other two still get it
    auth_server.issue(TOKEN)
    auth_server.delay = 0.3
    gw = await make_gateway()
    cache = gw.gw.running().pipeline.cache
    first = asyncio.create_task(cache.lookup(TOKEN))
    others = [asyncio.create_task(cache.lookup(TOKEN)) for _ in range(2)]
    await asyncio.sleep(0.1)
    first.cancel()
    answers = await asyncio.gather(*others)
    assert [info.active for _, info in answers] == [True, True]
    assert first.cancelled()
    assert auth_server.calls == 1
    assert (await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {TOKEN}"})
            ).status == 200
    assert auth_server.calls == 1  # cached by the flight the first request left


async def test_bad_tokens_are_negatively_cached(make_gateway: GatewayFactory,
                                                auth_server: AuthServer) -> None:
    gw = await make_gateway()
    for _ in range(5):
        resp = await gw.client.get("/2/0/x", headers={"Authorization": "Bearer bad-token"})
        assert resp.status == 401
    assert auth_server.calls == 1


async def test_cache_ttl_bounded_by_token_exp(make_gateway: GatewayFactory,
                                              auth_server: AuthServer, redis: Redis) -> None:
    auth_server.issue(TOKEN, ttl=2)
    gw = await make_gateway(cache_max_ttl=300)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert (await gw.client.get("/2/0/x", headers=headers)).status == 200
    keys = await redis.keys("gw:token:*")
    assert len(keys) == 1
    ttl = await redis.pttl(keys[0])
    assert 0 < ttl <= 2000
    await asyncio.sleep(2.2)
    assert (await gw.client.get("/2/0/x", headers=headers)).status == 401


async def test_redis_never_holds_a_token(make_gateway: GatewayFactory, auth_server: AuthServer,
                                         redis: Redis) -> None:
    auth_server.issue(TOKEN, client_id="app1")
    gw = await make_gateway()
    await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {TOKEN}"})
    await gw.client.get("/2/0/x", headers={"Authorization": "Bearer bad-token-123"})
    await gw.gw.running().pipeline.usage.flush()
    kwargs = redis.connection_pool.connection_kwargs
    raw: Redis = Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0))
    dump: list[Any] = []
    keys: list[Any] = await raw.keys("*")
    for key in keys:
        dump.append(key)
        kind = await raw.type(key)
        if kind == b"string":
            dump.append(await raw.get(key) or b"")
        elif kind == b"hash":
            dump.extend(list((await raw.hgetall(key)).items()))
        elif kind == b"zset":
            dump.extend(await raw.zrange(key, 0, -1))
        elif kind == b"stream":
            dump.append(repr(await raw.xrange(key)).encode())
    await raw.aclose()
    blob = b"\n".join(x if isinstance(x, bytes) else repr(x).encode() for x in dump)
    # (the keys alone: ``dump`` also holds hash fields, as pairs)
    assert any(k.startswith(b"gw:token:") for k in keys)
    assert any(k.startswith(b"gw:usage:tok:{app1}:") for k in keys)
    assert TOKEN.encode() not in blob and b"bad-token-123" not in blob


async def test_access_log_and_metrics_carry_no_token(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN, client_id="app1")
    gw = await make_gateway()
    await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {TOKEN}"})
    await gw.client.get("/2/0/x", headers={"Authorization": "Bearer wrong-token"})
    await gw.client.get("/2/0/x")
    metrics = await gw.metrics()
    assert 'gateway_auth_decisions_total{client_id="app1",decision="allowed"} 1.0' in metrics
    assert 'gateway_auth_decisions_total{client_id="unknown",decision="invalid_token"} 1.0' \
        in metrics
    assert 'decision="missing_token"' in metrics
    assert 'gateway_requests_total{method="GET",route="read",status="200"} 1.0' in metrics
    assert 'gateway_introspection_requests_total{outcome="active"} 1.0' in metrics
    assert 'gateway_token_cache_requests_total{layer="redis",result="miss"} 2.0' in metrics
    assert TOKEN not in metrics and "wrong-token" not in metrics and "/2/0/x" not in metrics
    lines = gw.log_lines()
    assert [line["status"] for line in lines] == [200, 401, 401]
    assert lines[0]["client_id"] == "app1" and lines[0]["route"] == "read"
    assert lines[0]["decision"] == "allowed" and lines[2]["decision"] == "missing_token"
    assert all(TOKEN not in str(line) for line in lines)
    assert all("Authorization" not in str(line) for line in lines)
    assert time.time() - lines[0]["ts"] < 60
