"""The forwarding stage as a client and an upstream see it: bytes, headers, errors, memory."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import AuthServer, GatewayFactory, Harness, Upstream
from tests.redis_server import free_port

TOKEN = "tok-proxy-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALL_BYTES = bytes(range(256))
GENERATED_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

ONE_ROUTE_POLICY = """
upstreams:
  api:
    url: {url}
{extra}
routes:
  - name: any
    upstream: api
    path: /2/0/**
    scopes: []
"""


def policy_for(url: str, **upstream_keys: str) -> str:
    """A one-route policy whose upstream mapping carries ``upstream_keys``."""
    extra = "\n".join(f"    {key}: {value}" for key, value in upstream_keys.items())
    # make_gateway runs str.format on the policy, so the URL goes in literally or as
    # the {upstream} placeholder
    return ONE_ROUTE_POLICY.replace("{url}", url).replace("{extra}", extra)


async def raw_exchange(gw: Harness, head: str, body: bytes = b""
                       ) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as written; return status, headers (lower-cased) and every byte
    that followed the header block until the gateway closed the connection."""
    assert gw.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    writer.write((head + "Host: gw.example\r\nConnection: close\r\n\r\n").encode("latin-1")
                 + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers, rest


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# --- bodies and query strings ---------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_binary_body_is_forwarded_byte_for_byte(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream,
        method: str) -> None:
    auth_server.issue(TOKEN, scope="anaplan:write")
    gw = await make_gateway()
    body = ALL_BYTES * 300 + b"\r\n0\r\n\r\n" + ALL_BYTES[::-1]
    resp = await gw.client.request(method, "/2/0/files/f1", data=body, headers={
        **AUTH, "Content-Type": "application/octet-stream"})
    assert resp.status == 200
    [got] = upstream.received
    assert got.method == method
    assert got.body == body
    assert got.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in got.headers
    assert (await resp.json())["length"] == len(body)
    # an empty body is announced as empty, not dropped into a hanging request
    resp = await gw.client.request(method, "/2/0/files/f2", data=b"", headers=AUTH)
    assert resp.status == 200
    assert upstream.received[-1].body == b""
    assert upstream.received[-1].headers.get("Content-Length", "0") == "0"


async def test_query_string_is_forwarded_raw(make_gateway: GatewayFactory,
                                             auth_server: AuthServer,
                                             upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    target = "/2/0/items?q=a%20b+c&name=%C3%A9t%C3%A9&slash=%2F&pct=%25&empty=&flag&a=1&a=2"
    status, _, _ = await raw_exchange(gw, f"GET {target} HTTP/1.1\r\n"
                                          f"Authorization: Bearer {TOKEN}\r\n")
    assert status == 200
    [got] = upstream.received
    assert got.raw_path == target


async def test_chunked_upload_arrives_intact(make_gateway: GatewayFactory,
                                             auth_server: AuthServer,
                                             upstream: Upstream) -> None:
    auth_server.issue(TOKEN, scope="anaplan:write")
    gw = await make_gateway()
    parts = [ALL_BYTES * 100, b"", ALL_BYTES, b"0\r\n\r\n", ALL_BYTES * 1000]
    resp = await gw.client.post("/2/0/upload", data=chunks(*parts), headers=AUTH)
    assert resp.status == 200
    [got] = upstream.received
    assert got.body == b"".join(parts)
    assert (await resp.json())["length"] == len(got.body)


# --- headers ----------------------------------------------------------------------------

async def test_hop_by_hop_request_headers_never_reach_the_upstream(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    status, _, _ = await raw_exchange(
        gw, "GET /2/0/x HTTP/1.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\n"
            "Connection: X-Foo, x-bar\r\n"
            "X-Foo: 1\r\nX-Bar: 2\r\n"
            "Keep-Alive: timeout=5\r\n"
            "TE: trailers\r\n"
            "Upgrade: h2c\r\n"
            "Proxy-Authorization: Basic dXNlcjpwdw==\r\n"
            "Proxy-Connection: keep-alive\r\n"
            "X-Kept: yes\r\n")
    assert status == 200
    [got] = upstream.received
    names = {name.lower() for name, _ in got.header_list}
    for hop in ("x-foo", "x-bar", "keep-alive", "te", "upgrade", "proxy-authorization",
                "proxy-connection"):
        assert hop not in names, hop
    assert "x-foo" not in got.headers.get("Connection", "").lower()
    assert got.headers["X-Kept"] == "yes"


async def test_hop_by_hop_response_headers_never_reach_the_client(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/x", headers=AUTH)
    assert resp.status == 200
    assert resp.headers["X-Upstream"] == "yes"
    assert "X-Secret-Hop" not in resp.headers
    assert "Keep-Alive" not in resp.headers
    assert "x-secret-hop" not in resp.headers.get("Connection", "").lower()
    assert (await resp.json())["path"] == "/2/0/x"


async def test_end_to_end_headers_pass_through(make_gateway: GatewayFactory,
                                               auth_server: AuthServer,
                                               upstream: Upstream) -> None:
    auth_server.issue(TOKEN, scope="anaplan:write")
    gw = await make_gateway()
    resp = await gw.client.post("/2/0/x", data=b'{"a": 1}', headers=[
        *AUTH.items(), ("X-Custom", "one"), ("X-Custom", "two"),
        ("Accept", "application/vnd.anaplan+json; q=0.9, */*; q=0.1"),
        ("Content-Type", "application/json; charset=utf-8")])
    assert resp.status == 200
    [got] = upstream.received
    assert got.headers.getall("X-Custom") == ["one", "two"]
    assert got.headers["Accept"] == "application/vnd.anaplan+json; q=0.9, */*; q=0.1"
    assert got.headers["Content-Type"] == "application/json; charset=utf-8"
    assert resp.headers["Content-Type"].startswith("application/json")


async def test_untrusted_forwarding_claims_are_replaced(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/x", headers={
        **AUTH, "Host": "gateway.example:8443", "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
        "Forwarded": "for=6.6.6.6"})
    assert resp.status == 200
    [got] = upstream.received
    assert got.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert got.headers.getall("X-Forwarded-Host") == ["gateway.example:8443"]
    assert got.headers.getall("X-Forwarded-Proto") == ["http"]
    assert "Forwarded" not in got.headers
    assert got.headers.getall("Host") == [upstream.url.removeprefix("http://")]


async def test_trusted_proxy_chain_is_appended(make_gateway: GatewayFactory,
                                               auth_server: AuthServer,
                                               upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway(trusted_proxies=1)
    assert (await gw.client.get("/2/0/x", headers={
        **AUTH, "X-Forwarded-For": "203.0.113.7"})).status == 200
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    # one list split over several fields (RFC 9110 section 5.3): the trusted proxy's
    # entry is the last one and must not be lost
    assert (await gw.client.get("/2/0/x", headers=[
        *AUTH.items(), ("X-Forwarded-For", "198.51.100.1, 198.51.100.2"),
        ("X-Forwarded-For", "203.0.113.9")])).status == 200
    first, second, third = upstream.received
    assert first.headers.getall("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert second.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert third.headers.getall("X-Forwarded-For") == [
        "198.51.100.1, 198.51.100.2, 203.0.113.9, 127.0.0.1"]
    assert first.headers["Host"] == upstream.url.removeprefix("http://")


async def test_sane_request_id_is_kept(make_gateway: GatewayFactory, auth_server: AuthServer,
                                       upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/x", headers={**AUTH, "X-Request-Id": "req-42.a:b_c"})
    assert resp.status == 200
    assert resp.headers["X-Request-Id"] == "req-42.a:b_c"
    assert upstream.received[0].headers.getall("X-Request-Id") == ["req-42.a:b_c"]


@pytest.mark.parametrize("sent", ["has spaces in it", "a" * 300, "id\"<script>", "é"])
async def test_insane_request_id_is_replaced(make_gateway: GatewayFactory,
                                             auth_server: AuthServer, upstream: Upstream,
                                             sent: str) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/x", headers={**AUTH, "X-Request-Id": sent})
    assert resp.status == 200
    answered = resp.headers["X-Request-Id"]
    assert answered != sent
    assert GENERATED_ID.fullmatch(answered)
    assert upstream.received[0].headers.getall("X-Request-Id") == [answered]


async def test_refusals_carry_a_request_id(make_gateway: GatewayFactory,
                                           upstream: Upstream) -> None:
    gw = await make_gateway()
    resp = await gw.client.get("/2/0/x", headers={"X-Request-Id": "trace-7"})
    assert resp.status == 401
    assert resp.headers["X-Request-Id"] == "trace-7"
    resp = await gw.client.get("/2/0/x", headers={"Authorization": "Bearer unknown-token"})
    assert resp.status == 401
    assert GENERATED_ID.fullmatch(resp.headers["X-Request-Id"])
    assert upstream.received == []


# --- upstream credentials -------------------------------------------------------------

async def test_token_is_forwarded_in_the_upstreams_scheme(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for("{upstream}", scheme="AnaplanAuthToken"))
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    assert (await gw.client.get("/2/0/x", headers={
        "Authorization": f"AnaplanAuthToken {TOKEN}"})).status == 200
    assert [r.headers.getall("Authorization") for r in upstream.received] == [
        [f"AnaplanAuthToken {TOKEN}"]] * 2


async def test_stripped_credentials_never_reach_the_upstream(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for("{upstream}", credentials="strip"))
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    [got] = upstream.received
    assert "Authorization" not in got.headers
    assert TOKEN not in repr(got.header_list)


async def test_replaced_credentials(make_gateway: GatewayFactory, auth_server: AuthServer,
                                    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    monkeypatch.setenv("PROXY_TEST_API_KEY", "service-key-123")
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for(
        "{upstream}", credentials="replace", replace_value_env="PROXY_TEST_API_KEY",
        replace_header="X-Api-Key"))
    resp = await gw.client.get("/2/0/x", headers={**AUTH, "X-Api-Key": "forged"})
    assert resp.status == 200
    [got] = upstream.received
    assert got.headers.getall("X-Api-Key") == ["service-key-123"]
    assert "Authorization" not in got.headers
    assert TOKEN not in repr(got.header_list)


# --- responses --------------------------------------------------------------------------

async def test_large_download_streams_intact(make_gateway: GatewayFactory,
                                             auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    size = 1024 * 1024 + 17
    resp = await gw.client.get(f"/big?n={size}", headers=AUTH)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(size)
    assert resp.headers["Content-Type"] == "application/octet-stream"
    body = await resp.read()
    assert len(body) == size
    assert body == b"x" * size


async def test_head_returns_headers_and_no_body(make_gateway: GatewayFactory,
                                                auth_server: AuthServer,
                                                upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    status, headers, rest = await raw_exchange(
        gw, f"HEAD /2/0/x HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n")
    assert status == 200
    assert headers["x-upstream"] == "yes"
    # what the upstream's HEAD answer announced (its GET body, with "HEAD" as the method)
    announced = json.dumps({"path": "/2/0/x", "method": "HEAD", "length": 0})
    assert headers.get("content-length") == str(len(announced))
    assert "transfer-encoding" not in headers
    assert rest == b""
    assert upstream.received[-1].method == "HEAD"


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses_pass_through(make_gateway: GatewayFactory,
                                              auth_server: AuthServer, code: int) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway()
    status, headers, rest = await raw_exchange(
        gw, f"GET /status/{code} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n")
    assert status == code
    assert rest == b""
    assert "transfer-encoding" not in headers
    assert headers.get("content-length", "0") == "0"
    assert headers["x-request-id"]


# --- body-size limit ------------------------------------------------------------------

async def test_oversize_body_with_content_length_is_refused_unsent(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN, scope="anaplan:write")
    gw = await make_gateway(max_body_size=1000)
    resp = await gw.client.post("/2/0/x", data=b"z" * 2000, headers=AUTH)
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    assert upstream.received == []
    # the limit itself is allowed
    resp = await gw.client.post("/2/0/x", data=b"z" * 1000, headers=AUTH)
    assert resp.status == 200
    assert [len(r.body) for r in upstream.received] == [1000]


async def test_oversize_chunked_upload_is_refused(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(TOKEN, scope="anaplan:write")
    gw = await make_gateway(max_body_size=1000)
    resp = await gw.client.post("/2/0/x", data=chunks(b"a" * 600, b"b" * 600, b"c" * 600),
                                headers=AUTH)
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    await asyncio.sleep(0.1)  # let the upstream finish with whatever it got
    assert all(len(r.body) <= 1000 for r in upstream.received)
    # a chunked upload within the limit still goes through
    resp = await gw.client.post("/2/0/x", data=chunks(b"a" * 500, b"b" * 500), headers=AUTH)
    assert resp.status == 200
    assert upstream.received[-1].body == b"a" * 500 + b"b" * 500


# --- upstream failures ------------------------------------------------------------------

async def test_upstream_down_is_502(make_gateway: GatewayFactory,
                                    auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for(f"http://127.0.0.1:{free_port()}"))
    resp = await gw.client.get("/2/0/x", headers=AUTH)
    assert resp.status == 502
    assert (await resp.json())["error"] == "bad_gateway"
    assert resp.headers["X-Request-Id"]


async def test_slow_upstream_is_504_on_time(make_gateway: GatewayFactory,
                                            auth_server: AuthServer,
                                            upstream: Upstream) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway(upstream_timeout=0.5)
    started = time.monotonic()
    resp = await gw.client.get("/slow?s=3", headers=AUTH)
    elapsed = time.monotonic() - started
    assert resp.status == 504
    assert (await resp.json())["error"] == "gateway_timeout"
    assert 0.4 <= elapsed < 1.2
    assert len(upstream.received) == 1


async def test_post_to_a_failing_upstream_is_attempted_once(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    accepted = 0

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        auth_server.issue(TOKEN)
        gw = await make_gateway(policy_for(f"http://127.0.0.1:{port}"))
        resp = await gw.client.post("/2/0/x", data=b"pay once", headers=AUTH)
        assert resp.status == 502
        assert (await resp.json())["error"] == "bad_gateway"
        await asyncio.sleep(0.2)
        assert accepted == 1
    finally:
        server.close()
        await server.wait_closed()


# --- memory -----------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


async def test_large_upload_streams_without_buffering(
        make_gateway: GatewayFactory, auth_server: AuthServer,
        aiohttp_server: AiohttpServer) -> None:
    counted: list[int] = []

    async def count(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            total += len(chunk)
        counted.append(total)
        return web.json_response({"length": total})

    app = web.Application()
    app.router.add_post("/{tail:.*}", count)
    sink = await aiohttp_server(app)
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for(str(sink.make_url("")).rstrip("/")))
    mib = b"\x5a" * (1024 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield mib

    exact_peak = _reset_peak_rss()
    peak = baseline = _status_kib("VmRSS")
    done = asyncio.Event()

    async def sample() -> None:  # the fallback when VmHWM cannot be reset
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _status_kib("VmRSS"))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        resp = await gw.client.post("/2/0/bulk", data=body(), headers=AUTH,
                                    timeout=aiohttp.ClientTimeout(total=30))
        assert resp.status == 200
        assert json.loads(await resp.read())["length"] == 64 * 1024 * 1024
    finally:
        done.set()
        await sampler
    peak = max(peak, _status_kib("VmHWM") if exact_peak else 0)
    assert counted == [64 * 1024 * 1024]
    assert peak - baseline < 30 * 1024, f"RSS grew by {(peak - baseline) // 1024} MiB"


async def test_upstream_connections_are_kept_alive_and_reused(
        make_gateway: GatewayFactory, auth_server: AuthServer,
        aiohttp_server: AiohttpServer) -> None:
    peers: list[tuple[str, int]] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        await asyncio.sleep(0.05 if request.path.endswith("/slow") else 0)
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    sink = await aiohttp_server(app)
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for(str(sink.make_url("")).rstrip("/")))
    for i in range(10):
        resp = await gw.client.get(f"/2/0/seq/{i}", headers=AUTH)
        assert resp.status == 200
        assert (await resp.json())["path"] == f"/2/0/seq/{i}"
    assert len(set(peers)) == 1  # one upstream connection for ten requests in a row
    peers.clear()
    answers = await asyncio.gather(*(gw.client.get("/2/0/slow", headers=AUTH)
                                     for _ in range(5)))
    assert [r.status for r in answers] == [200] * 5
    assert len(set(peers)) == 5  # concurrent requests each get a connection of their own
    peers.clear()
    for _ in range(5):
        assert (await gw.client.head("/2/0/again", headers=AUTH)).status == 200
        assert (await gw.client.post("/2/0/again", data=b"x" * 10, headers=AUTH)).status == 200
    assert len(set(peers)) == 1  # the pool hands back the most recently used one


async def test_a_client_that_stalls_mid_upload_gets_408_and_frees_the_upstream(
        make_gateway: GatewayFactory, auth_server: AuthServer,
        aiohttp_server: AiohttpServer) -> None:
    ended: list[str] = []

    async def sink(request: web.Request) -> web.Response:
        try:
            await request.read()
        except BaseException as exc:  # the gateway let the upstream connection go
            ended.append(type(exc).__name__)
            raise
        ended.append("whole")
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink)
    upstream = await aiohttp_server(app)
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for(str(upstream.make_url("")).rstrip("/")),
                            client_body_timeout=0.3)
    assert gw.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    started = time.monotonic()
    writer.write(f"POST /2/0/upload HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer "
                 f"{TOKEN}\r\nContent-Length: 100\r\n\r\n".encode() + b"x" * 10)
    await writer.drain()  # ... and nothing more: the client has stalled
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    body = await asyncio.wait_for(reader.readexactly(length), timeout=5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"] == "request_timeout"
    assert 0.25 < time.monotonic() - started < 3
    for _ in range(100):  # the upstream's side of the exchange ends too
        if ended:
            break
        await asyncio.sleep(0.02)
    assert ended and ended != ["whole"]


async def test_a_slow_but_steady_upload_is_not_cut(
        make_gateway: GatewayFactory, auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN)
    gw = await make_gateway(policy_for("{upstream}"), client_body_timeout=0.3)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(5):  # 1 s in all, never a pause of 0.3 s
            await asyncio.sleep(0.2)
            yield b"y" * 1000

    resp = await gw.client.post("/2/0/slow-upload", data=body(), headers=AUTH)
    assert resp.status == 200
    assert json.loads(await resp.read())["length"] == 5000
