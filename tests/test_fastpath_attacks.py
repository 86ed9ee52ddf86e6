"""The proxy listener's own HTTP/1.1 protocol (``gateway/runtime/fastpath.py``) under
attack: request smuggling and desync attempts, hand-off edge cases, header injection
from an upstream, clients that leave, and what must stay as aiohttp's protocol did it
(aiohttp's protocol is the reference: what the fast path does not serve exactly so, it
hands over). Raw sockets and exact bytes throughout."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time

import pytest
from redis.asyncio import Redis

from gateway.runtime.listener import FastServer
from tests import test_listener
from tests.conftest import AuthServer, GatewayFactory, Harness, Upstream
from tests.test_listener import Start

TOKEN = "tok-FASTPATH-ATTACK-5d1e08"
AUTH = f"Authorization: Bearer {TOKEN}"


def _req(path: str, *extra: str, method: str = "GET", host: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(["Host: gw"] if host else []), AUTH, *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _answers(reader: asyncio.StreamReader, count: int
                   ) -> list[tuple[int, bytes, bytes]]:
    """``count`` answers off a kept connection: status, head, body (by its length)."""
    out = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else b""
        out.append((status, head, body))
    return out


async def _exchange(gw: Harness, raw: bytes, count: int = 1, wait: float = 0.5
                    ) -> tuple[list[tuple[int, bytes, bytes]], bytes]:
    """Send ``raw`` on a new connection: ``count`` answers, then what else came before
    the gateway closed the connection (or ``wait`` seconds passed: ``(open)``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    try:
        writer.write(raw)
        answers = await _answers(reader, count)
        try:
            rest = await asyncio.wait_for(reader.read(65536), wait)
        except TimeoutError:
            rest = b"(open)"
        return answers, rest
    finally:
        writer.close()


@pytest.fixture
async def gw(make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis) -> Harness:
    auth_server.issue(TOKEN, scope="anaplan:read anaplan:write")
    return await make_gateway(max_body_size=1024, client_body_timeout=0.5)


# --- what aiohttp's parser refuses, or serves otherwise, is aiohttp's ------------------

async def test_upgrade_requests_are_handed_to_aiohttp_without_a_traceback(
        gw: Harness, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    # llhttp stops at an upgrade (Connection: Upgrade, or CONNECT): aiohttp's protocol
    # serves such a request as a plain one (it only switches for a WebSocket handler)
    with caplog.at_level(logging.WARNING):
        answers, _ = await _exchange(gw, _req("/2/0/h2c", "Connection: Upgrade",
                                              "Upgrade: h2c"))
        assert answers[0][0] == 200, answers
        answers, _ = await _exchange(gw, _req("/2/0/ws", "Connection: Upgrade",
                                              "Upgrade: websocket"))
        assert answers[0][0] == 200, answers
        answers, _ = await _exchange(gw, b"CONNECT gw:443 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert answers[0][0] in (400, 404, 405), answers
    assert [r.raw_path for r in upstream.received] == ["/2/0/h2c", "/2/0/ws"]
    # what the upstream got carries no Upgrade (a hop-by-hop header)
    assert all("Upgrade" not in r.headers for r in upstream.received)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("raw", [
    pytest.param(_req("/2/0/a", host=False), id="no-host"),
    pytest.param(_req("/2/0/a", "Host: evil.example"), id="two-hosts"),
    pytest.param(_req("/2/0/a", "Content-Type: a/b", "Content-Type: c/d", method="DELETE"),
                 id="two-content-types"),
    pytest.param(_req("/2/0/a", "User-Agent: a", "User-Agent: b"), id="two-user-agents"),
    pytest.param(_req("/2/0/a", *[f"X-H{i}: v" for i in range(130)]), id="130-headers"),
    pytest.param(_req("/2/0/a", "Sec-WebSocket-Key1: x"), id="old-websocket"),
])
async def test_heads_aiohttp_refuses_are_refused_as_it_refuses_them(
        gw: Harness, upstream: Upstream, raw: bytes) -> None:
    # a second Host is the classic: the gateway would route by one, a cache or the
    # upstream by the other; aiohttp's parser refuses these heads (400), so must the fast path
    answers, rest = await _exchange(gw, raw)
    status, head, body = answers[0]
    assert status == 400, answers
    assert json.loads(body)["error"] == "invalid_request"
    assert TOKEN.encode() not in head + body + rest
    assert rest == b""  # and the connection is closed
    assert upstream.received == []


# --- smuggling and desync: one framing, llhttp's, or a 400 and a closed connection -----

@pytest.mark.parametrize("raw", [
    pytest.param(_req("/2/0/a", "Content-Length: 4", "Transfer-Encoding: chunked",
                      method="POST") + b"0\r\n\r\n", id="cl-and-te"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding: chunked", "Content-Length: 4",
                      method="POST") + b"0\r\n\r\n", id="te-and-cl"),
    pytest.param(_req("/2/0/a", "Content-Length: 4", "Content-Length: 4", method="POST")
                 + b"abcd", id="two-content-lengths"),
    pytest.param(_req("/2/0/a", "Content-Length: 4, 4", method="POST") + b"abcd",
                 id="content-length-list"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding: chunked, chunked", method="POST")
                 + b"0\r\n\r\n", id="chunked-twice"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked",
                      method="POST") + b"0\r\n\r\n", id="two-transfer-encodings"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding : chunked", method="POST")
                 + b"0\r\n\r\n", id="space-before-colon"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding:", " chunked", method="POST")
                 + b"0\r\n\r\n", id="obs-fold-te"),
    pytest.param(_req("/2/0/a", "X-A: a", " b"), id="obs-fold"),
    pytest.param(b"GET /2/0/a HTTP/1.1\r\nHost: gw\nX-A: b\r\n" + AUTH.encode()
                 + b"\r\n\r\n", id="bare-lf-in-head"),
    pytest.param(b"GET /2/0/a HTTP/1.1\r\nHost: gw\rX-A: b\r\n\r\n", id="bare-cr"),
    pytest.param(_req("/2/0/a", "X-A: a\x00b"), id="nul-in-value"),
    pytest.param(b"GET /2/0/a\x00 HTTP/1.1\r\nHost: gw\r\n\r\n", id="nul-in-target"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding: chunked", method="POST")
                 + b"3;x=\"a\r\nb\"\r\nabc\r\n0\r\n\r\n", id="crlf-in-chunk-extension"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding: chunked", method="POST")
                 + b"3\nabc\n0\n\n", id="bare-lf-chunks"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding: chunked", method="POST")
                 + b"0x3\r\nabc\r\n0\r\n\r\n", id="chunk-size-0x"),
    pytest.param(_req("/2/0/a", "Transfer-Encoding: chunked", method="POST")
                 + b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\nhello", id="cl-in-trailer"),
])
async def test_ambiguous_framing_is_refused_and_the_connection_closed(
        gw: Harness, upstream: Upstream, raw: bytes) -> None:
    answers, rest = await _exchange(gw, raw + _req("/2/0/smuggled"))
    status, _head, body = answers[0]
    assert status == 400, answers
    assert json.loads(body)["error"] == "invalid_request"
    assert rest == b""  # no second answer: the smuggled request is never served
    assert "/2/0/smuggled" not in [r.raw_path for r in upstream.received]
    assert all(not r.body for r in upstream.received)


async def test_framing_llhttp_accepts_is_kept_request_by_request(
        gw: Harness, upstream: Upstream) -> None:
    # a Content-Length body, a GET with a body, a chunked body with extensions and
    # trailers, and requests behind each, all in one write
    raw = (_req("/2/0/cl", "Content-Length: 6", method="POST") + b"GET /x"
           + _req("/2/0/get-body", "Content-Length: 3") + b"abc"
           + _req("/2/0/chunked", "Transfer-Encoding: ChUnKeD", method="PUT")
           + b"3;ext=1;q=\"x\"\r\nabc\r\n0\r\nX-Trailer: t\r\nAuthorization: Bearer no\r\n\r\n")
    answers, _rest = await _exchange(gw, raw, 3)
    assert [a[0] for a in answers] == [200, 200, 200], answers
    assert [r.raw_path for r in upstream.received] == [
        "/2/0/cl", "/2/0/get-body", "/2/0/chunked"]
    assert [r.body for r in upstream.received] == [b"GET /x", b"abc", b"abc"]
    # trailers are not headers: none reached the upstream
    assert "X-Trailer" not in upstream.received[2].headers
    assert upstream.received[2].headers.getall("Authorization") == [f"Bearer {TOKEN}"]


async def test_a_head_split_at_every_byte_is_one_request(
        gw: Harness, upstream: Upstream) -> None:
    raw = _req("/2/0/slow-head") + _req("/2/0/next", "Content-Length: 2", method="POST")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    first = len(_req("/2/0/slow-head"))
    # byte by byte around both blank lines (the first ends exactly at its read's end)
    for cut in (*range(first - 6, first + 1), len(raw)):
        writer.write(raw[:cut])
        raw = raw[cut:]
        first -= cut
        await writer.drain()
        await asyncio.sleep(0.02)
    writer.write(b"ok")
    answers = await _answers(reader, 2)
    writer.close()
    assert [a[0] for a in answers] == [200, 200]
    assert [(r.raw_path, r.body) for r in upstream.received] == [
        ("/2/0/slow-head", b""), ("/2/0/next", b"ok")]


async def test_a_body_shorter_than_its_length_then_close(
        gw: Harness, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.write(_req("/2/0/short", "Content-Length: 100", method="POST") + b"only-this")
    await asyncio.sleep(0.2)
    writer.close()
    with caplog.at_level(logging.INFO):
        await asyncio.sleep(0.3)
    assert [r.raw_path for r in upstream.received if r.body] == []  # no short body passed on
    assert [(r["route"], r["status"]) for r in gw.log_lines()] == [("write", 499)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# --- the hand-off: whatever comes first on the connection, aiohttp answers it ----------

RESERVED = ["/oauth/token", "/OAUTH/token", "/%6Fauth/token", "/.well-known/openid-configuration",
            "/.WELL-KNOWN/oauth-authorization-server", "/console/", "/admin/api/clients",
            "/account/", "/token/", "/oauth?x=1"]


async def test_reserved_paths_behind_fast_requests_get_aiohttps_answer(
        gw: Harness, upstream: Upstream) -> None:
    for path in RESERVED:
        # the reference: the path as a connection's first request (aiohttp's from the start)
        [(alone, _, alone_body)], _ = await _exchange(gw, _req(path, method="POST"), wait=0)
        # the same as the 3rd of three pipelined requests, in one write
        answers, _ = await _exchange(gw, _req("/2/0/one") + _req("/2/0/two")
                                     + _req(path, method="POST"), 3, wait=0)
        assert [a[0] for a in answers] == [200, 200, alone], (path, answers)
        assert answers[2][2] == alone_body or alone != 200, path
        # and split across writes, the cut inside the reserved request's line
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
        raw = _req("/2/0/three") + _req(path, method="POST")
        cut = len(_req("/2/0/three")) + 7
        writer.write(raw[:cut])
        await asyncio.sleep(0.05)
        writer.write(raw[cut:])
        answers = await _answers(reader, 2)
        writer.close()
        assert [a[0] for a in answers] == [200, alone], (path, answers)
    # none of them ever reached the upstream
    assert {r.raw_path for r in upstream.received} == {"/2/0/one", "/2/0/two", "/2/0/three"}


@pytest.mark.parametrize(("raw", "statuses"), [
    pytest.param(b"GET http://gw/2/0/abs HTTP/1.1\r\nHost: gw\r\n" + AUTH.encode()
                 + b"\r\n\r\n", (400,), id="absolute-form"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n", (400, 404, 405), id="asterisk"),
    pytest.param(b"GET /2/0/old HTTP/1.0\r\n" + AUTH.encode() + b"\r\n\r\n", (200,),
                 id="http-1.0"),
    pytest.param(b"GET /2/0/old HTTP/1.0\r\nConnection: keep-alive\r\n" + AUTH.encode()
                 + b"\r\n\r\n", (200,), id="http-1.0-keep-alive"),
    pytest.param(_req("/2/0/" + "a" * 9000), (400, 414, 431), id="long-target"),
    pytest.param(_req("/2/0/a", "X-Long: " + "b" * 9000), (400, 431), id="long-field"),
    pytest.param(_req("/2/0/a", *[f"X-{i}: " + "c" * 90 for i in range(100)]), (200,),
                 id="long-head-short-fields"),
])
async def test_unusual_requests_are_aiohttps_after_a_fast_one(
        gw: Harness, raw: bytes, statuses: tuple[int, ...]) -> None:
    for prefix in (b"", _req("/2/0/first")):
        answers, rest = await _exchange(gw, prefix + raw, 2 if prefix else 1)
        status, head, body = answers[-1]
        assert status in statuses, (raw[:40], answers)
        assert TOKEN.encode() not in head + body + rest
        if status == 400:
            assert json.loads(body)["error"] == "invalid_request"


# --- refused bodies: never read as requests ---------------------------------------------

async def test_refused_bodies_are_never_read_as_requests(
        gw: Harness, upstream: Upstream) -> None:
    smuggled = _req("/2/0/smuggled")
    # 413 from Content-Length, the body (a request) already sent behind the head
    body = smuggled + b"x" * (1100 - len(smuggled))
    answers, rest = await _exchange(gw, _req("/2/0/big", "Content-Length: 1100",
                                             method="POST") + body)
    assert answers[0][0] == 413, answers
    # the body was read whole (it came with the head), so the connection may stay open;
    # it answers nothing more: what was in the body is not a request
    assert rest in (b"", b"(open)")
    # 413 mid-stream: a chunked body passing the limit, a request in its chunks
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (smuggled, b"y" * 1100))
    answers, rest = await _exchange(gw, _req("/2/0/big", "Transfer-Encoding: chunked",
                                             method="POST") + chunks)
    assert answers[0][0] == 413, answers
    assert rest in (b"", b"(open)")
    # a body that turns malformed mid-stream: 400, the rest never parsed
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.write(_req("/2/0/bad", "Transfer-Encoding: chunked", method="POST") + b"3\r\nabc\r\n")
    await asyncio.sleep(0.1)
    writer.write(b"zz\r\n" + smuggled)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"\r\n\r\n") == 1, data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"] == "invalid_request"
    # 408: a body that stops coming
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.write(_req("/2/0/stall", "Content-Length: 10", method="POST") + b"abc")
    [(status, head, _)] = await _answers(reader, 1)
    assert status == 408 and b"Connection: close" in head
    writer.write(b"0123456")  # the rest of the body ends it: the connection closes
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert "/2/0/smuggled" not in [r.raw_path for r in upstream.received]
    metrics = await gw.metrics()
    assert 'gateway_bad_requests_total{reason="bad_chunking"} 1.0' in metrics


# --- what an upstream sends cannot split the client's answer ----------------------------

_RAW_POLICY = """
upstreams:
  api: http://127.0.0.1:{port}
routes:
  - name: read
    upstream: api
    methods: [GET]
    path: /2/0/**
    scopes: [anaplan:read]
"""


@pytest.mark.parametrize("header", [
    b"X-A: a\nSet-Cookie: evil=1", b"X-A: a\rSet-Cookie: evil=1", b"X-A: a\x00Set-Cookie: evil=1",
    b"X-A: a\r\n Set-Cookie: evil=1", b"Set-Cookie: evil=1\r\nX-B: \x7f",
])
async def test_upstream_header_with_a_line_break_never_reaches_the_client(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        header: bytes) -> None:
    auth_server.issue(TOKEN, scope="anaplan:read")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + header + b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(_RAW_POLICY.replace("{port}", str(port)))
        answers, _ = await _exchange(gw, _req("/2/0/x"), wait=0)
    finally:
        server.close()
    status, head, _ = answers[0]
    assert status == 502, answers
    assert b"evil" not in head and head.count(b"\r\n\r\n") == 1


# --- the connection cap and the open-connections gauge -----------------------------------

def _gauge(metrics: str, name: str) -> float:
    found = re.search(rf"(?m)^{name} (\S+)$", metrics)
    assert found, name
    return float(found.group(1))


async def test_the_cap_counts_handed_off_connections_once_and_the_gauge_returns_to_zero(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis) -> None:
    auth_server.issue(TOKEN, scope="anaplan:read")
    gw = await make_gateway(max_connections=4)
    kept = []
    # two on the fast path, two handed over (one after a fast request), all kept open
    for raw, count in ((_req("/2/0/a"), 1), (_req("/2/0/b"), 1),
                       (_req("/oauth/token", method="POST"), 1),
                       (_req("/2/0/c") + _req("/.well-known/x"), 2)):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
        writer.write(raw)
        await _answers(reader, count)
        kept.append(writer)
    assert _gauge(await gw.metrics(), "gateway_open_connections") == 4
    answers, rest = await _exchange(gw, _req("/2/0/d"))
    assert answers[0][0] == 503 and rest == b""
    for writer in kept:
        writer.close()
    # and a churn of every kind of connection, closed by either side
    for raw in (_req("/2/0/e"), _req("/oauth/token"), _req("/2/0/f") + _req("/console/"),
                _req("/2/0/g", "Connection: close"), _req("/2/0/h", host=False),
                _req("/2/0/i", "Connection: Upgrade", "Upgrade: h2c"), b"GET /2/0/j HTT"):
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
            writer.write(raw)
            await asyncio.sleep(0.01)
            writer.close()
    for _ in range(50):
        if _gauge(await gw.metrics(), "gateway_open_connections") == 0:
            break
        await asyncio.sleep(0.05)
    assert _gauge(await gw.metrics(), "gateway_open_connections") == 0


def _fast_server(gw: Harness) -> FastServer:
    runner = gw.client.server.runner
    assert runner is not None and isinstance(runner.server, FastServer)
    return runner.server


# --- clients that stop reading, or leave -------------------------------------------------

async def test_a_client_that_never_reads_holds_a_bounded_buffer_and_leaving_is_499(
        gw: Harness, caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.transport.set_write_buffer_limits(0)
    writer.write(_req("/big?n=268435456"))  # 256 MiB, never read past the head
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    await asyncio.sleep(1.0)
    server = _fast_server(gw)
    [conn] = list(server.fast)
    assert conn.paused_writing and conn.transport is not None
    assert conn.transport.get_write_buffer_size() < 1024 * 1024
    with caplog.at_level(logging.INFO):
        writer.transport.abort()
        await asyncio.sleep(0.3)
    assert [(r["route"], r["status"]) for r in gw.log_lines()] == [("big", 499)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not server.fast


# --- stopping: on ``oauth-gateway serve`` (uvloop, and asyncio's loop) -------------------

gateway = test_listener.gateway


async def test_sigterm_drains_requests_in_flight_within_the_shutdown_timeout(
        gateway: Start, auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN, scope="anaplan:read")
    served = await gateway(GATEWAY_SHUTDOWN_TIMEOUT="1.5")

    async def connect(raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(raw)
        return reader, writer

    idle = await connect(_req("/2/0/idle"))
    await _answers(idle[0], 1)
    handed = await connect(_req("/2/0/first") + _req("/oauth/token"))
    await _answers(handed[0], 2)
    quick = await connect(_req("/slow?s=0.6"))
    stuck = await connect(_req("/slow?s=30"))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    [(status, _, _)] = await _answers(quick[0], 1)
    assert status == 200  # the request in flight is answered
    for reader, _ in (idle, handed, stuck):  # the others are closed
        assert await asyncio.wait_for(reader.read(), 5) in (b"", )
    code = await asyncio.to_thread(served.proc.wait, 10)
    assert time.monotonic() - started < 4.5
    assert code == 0
    for _, writer in (idle, handed, quick, stuck):
        writer.close()
    logs = served.logs()
    assert "Traceback" not in logs and "Task was destroyed" not in logs, logs


async def test_pipelining_without_reading_answers_does_not_grow_the_gateways_buffer(
        gw: Harness) -> None:
    # each small request is a larger answer (a 401): a client that sends and never reads
    # must stop being served once the gateway cannot write, not fill its memory
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    one = b"GET /2/0/x HTTP/1.1\r\nHost: gw\r\n\r\n"
    for _ in range(40):
        writer.write(one * 1000)
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    [conn] = list(_fast_server(gw).fast)
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() < 1024 * 1024
    # once the client reads, the waiting requests are answered, in order
    reader._transport.resume_reading()  # type: ignore[attr-defined]
    answers = await _answers(reader, 5000)
    assert {a[0] for a in answers} == {401}
    writer.transport.abort()


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])  # fast path; aiohttp's
async def test_a_large_upload_refused_early_still_reads_its_refusal(
        gw: Harness, upstream: Upstream, version: str) -> None:
    # a client that sends its whole body before reading (as most do) must see the 413,
    # not a connection reset: the gateway reads and drops the rest for a while (aiohttp's
    # lingering close), rather than closing on unread bytes
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    size = 8 * 1024 * 1024
    writer.write(_req("/2/0/upload", f"Content-Length: {size}", method="POST"
                      ).replace(b"HTTP/1.1", version.encode(), 1))
    chunk = b"z" * 65536
    for _ in range(size // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    [(status, _, body)] = await _answers(reader, 1)
    writer.close()
    assert status == 413 and json.loads(body)["error"] == "payload_too_large"
    assert upstream.received == []


async def test_the_dropped_rest_of_a_body_is_read_for_a_bounded_time(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.runtime.fastpath.LINGER", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    writer.write(_req("/2/0/endless", "Transfer-Encoding: chunked", method="POST")
                 + b"401\r\n" + b"q" * 1025 + b"\r\n")
    [(status, _, _)] = await _answers(reader, 1)
    assert status == 413
    started = asyncio.get_running_loop().time()
    with pytest.raises(ConnectionError):  # the loop runs until the gateway closes
        for _ in range(100):  # a body that never ends
            writer.write(b"400\r\n" + b"q" * 1024 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                raise ConnectionResetError
    assert asyncio.get_running_loop().time() - started < 2.0
    writer.close()


async def test_whitespace_after_a_field_value_is_not_part_of_it(
        gw: Harness, upstream: Upstream) -> None:
    # llhttp drops the whitespace before a value, not after it (aiohttp drops both)
    answers, _ = await _exchange(gw, _req("/2/0/ows", "X-Request-Id: trace-42 \t",
                                          "X-Custom: v  ").replace(b"Host: gw", b"Host: gw "),
                                 wait=0)
    status, head, _ = answers[0]
    assert status == 200 and b"\r\nX-Request-Id: trace-42\r\n" in head, head
    [seen] = upstream.received
    assert seen.headers["X-Request-Id"] == "trace-42"
    assert seen.headers["X-Forwarded-Host"] == "gw"
    assert seen.headers["X-Custom"] == "v"


async def test_the_header_deadline_is_total_across_the_hand_off(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(header_timeout=0.8)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    started = asyncio.get_running_loop().time()
    # a head trickled in: most of it on the fast path, the rest after its hand-off (past
    # 8190 bytes); the deadline counts from the connection's start all the same
    writer.write(b"GET /2/0/slow HTTP/1.1\r\nHost: gw\r\n")
    closed_at = None
    for i in range(40):
        await asyncio.sleep(0.05)
        try:
            writer.write(b"X-Pad-%d: %b\r\n" % (i, b"p" * 1000))
            await writer.drain()
        except ConnectionError:
            pass
        if reader.at_eof() or writer.transport.is_closing():
            closed_at = asyncio.get_running_loop().time() - started
            break
        try:
            if await asyncio.wait_for(reader.read(65536), 0.001) == b"":
                closed_at = asyncio.get_running_loop().time() - started
                break
        except TimeoutError:
            pass
    writer.close()
    assert closed_at is not None and closed_at < 1.15, closed_at  # 1.3 s when it restarted
