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

import pytest
from redis.asyncio import Redis

from tests.conftest import AuthServer, GatewayFactory, Harness, Upstream

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


async def _exchange(gw: Harness, raw: bytes, count: int = 1
                    ) -> tuple[list[tuple[int, bytes, bytes]], bytes]:
    """Send ``raw`` on a new connection: ``count`` answers, then what else came before
    the gateway closed the connection (or 0.5 s passed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.port)
    try:
        writer.write(raw)
        answers = await _answers(reader, count)
        try:
            rest = await asyncio.wait_for(reader.read(65536), 0.5)
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
