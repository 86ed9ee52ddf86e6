"""One connection's life: reused while both sides keep it alive, closed when either does
not, when its upstream speaks out of turn, or when its answer is left unread; and the one
retry, when a pooled connection closed as the request was sent on it."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.forward.upstream import UpstreamBroken, UpstreamDisconnected
from gateway.forward.upstream.connection import CLOSED
from gateway.forward.upstream.exchange import Exchange
from tests.upstream.peers import (
    GUARD,
    PoolFactory,
    RawFactory,
    RawServer,
    Serve,
    answer,
    echo_path,
    eventually,
    fetch,
    keep_alive,
    parts,
    path_of,
    request,
)


async def test_sequential_requests_share_one_connection(
        aiohttp_server: AiohttpServer, make_pool: PoolFactory) -> None:
    peers: list[int] = []
    hosts: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        hosts.append(request.headers["Host"])
        return web.Response(body=request.path.encode())

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    pool = make_pool()
    url = str(server.make_url("")).rstrip("/")
    for i in range(5):
        resp, body = await fetch(pool, url, f"/n/{i}")
        assert (resp.status, body) == (200, f"/n/{i}".encode())
        assert pool.open_connections == 1
    assert len(peers) == 5
    assert len(set(peers)) == 1  # one TCP connection carried all five
    assert hosts == ["upstream.test"] * 5


@pytest.mark.parametrize("status_line", [
    "HTTP/1.1 200 OK\r\nConnection: close", "HTTP/1.0 200 OK"])
async def test_response_that_ends_the_connection_is_not_reused(
        raw_server: RawFactory, make_pool: PoolFactory, status_line: str) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        head = await server.next_request(reader)
        assert head is not None
        writer.write(f"{status_line}\r\nContent-Length: 4\r\n\r\n".encode() + b"done")
        await writer.drain()
        await server.drain(reader)  # answers nothing more on it: the client is to close

    server = await raw_server(serve)
    pool = make_pool()
    for target in ("/1", "/2"):
        resp, body = await fetch(pool, server.url, target, read_timeout=0.5)
        assert (resp.status, body) == (200, b"done")
    assert await eventually(lambda: server.eofs == 2)
    assert server.connections == 2
    assert pool.open_connections == 0


async def test_upstream_closing_an_idle_connection_is_noticed(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        head = await server.next_request(reader)
        assert head is not None
        writer.write(echo_path(head))  # keep-alive by default, then closes anyway
        await writer.drain()

    server = await raw_server(serve)
    pool = make_pool()
    await fetch(pool, server.url, "/1")
    assert await eventually(lambda: pool.open_connections == 0)
    resp, body = await fetch(pool, server.url, "/2")
    assert (resp.status, body) == (200, b"/2")
    assert server.connections == 2


async def test_unsolicited_bytes_drop_an_idle_connection(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (head := await server.next_request(reader)) is not None:
            writer.write(echo_path(head))
            await writer.drain()
            if server.connections == 1:
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
                await writer.drain()

    server = await raw_server(serve)
    pool = make_pool()
    assert (await fetch(pool, server.url, "/1"))[1] == b"/1"
    assert await eventually(lambda: server.eofs == 1)
    assert pool.open_connections == 0
    assert (await fetch(pool, server.url, "/2"))[1] == b"/2"
    assert server.connections == 2


@pytest.mark.parametrize("size", [10, 4 * 1024 * 1024])
async def test_release_before_the_end_closes_the_connection(
        raw_server: RawFactory, make_pool: PoolFactory, size: int) -> None:
    server = await raw_server(keep_alive(lambda head: answer(b"b" * size)))
    pool = make_pool()
    resp = await request(pool, server.url)
    assert resp.status == 200
    resp.release()
    assert await eventually(lambda: server.eofs == 1)
    assert pool.open_connections == 0
    _, body = await fetch(pool, server.url)
    assert body == b"b" * size
    assert server.connections == 2


def closes_on_the_second_request() -> Serve:
    """Answers the first request of each connection; on the first connection it reads the
    second request and closes without a byte (the keep-alive race: the upstream closed
    an idle connection just as the pool sent on it)."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        first = server.connections == 1
        while (head := await server.next_request(reader)) is not None:
            if first and len(server.heads) == 2:
                return  # closes
            writer.write(echo_path(head))
            await writer.drain()
    return serve


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_an_idempotent_request_is_sent_again_when_a_pooled_connection_closes_unanswered(
        raw_server: RawFactory, make_pool: PoolFactory, method: str) -> None:
    server = await raw_server(closes_on_the_second_request())
    pool = make_pool()
    await fetch(pool, server.url, "/1")
    resp, body = await fetch(pool, server.url, "/2", method)
    assert (resp.status, body) == (200, b"/2")
    assert server.connections == 2
    assert [path_of(h) for h in server.heads] == ["/1", "/2", "/2"]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_non_idempotent_request_is_never_sent_twice(
        raw_server: RawFactory, make_pool: PoolFactory, method: str) -> None:
    server = await raw_server(closes_on_the_second_request())
    pool = make_pool()
    await fetch(pool, server.url, "/1")
    with pytest.raises(UpstreamBroken):
        await fetch(pool, server.url, "/2", method)
    assert [path_of(h) for h in server.heads] == ["/1", "/2"]


async def test_a_request_with_a_body_is_never_sent_twice(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    server = await raw_server(closes_on_the_second_request())
    pool = make_pool()
    await fetch(pool, server.url, "/1")
    with pytest.raises(UpstreamBroken):
        await fetch(pool, server.url, "/2", "PUT", body=parts(b"abc"), content_length=3)
    assert [path_of(h) for h in server.heads] == ["/1", "/2"]


async def test_a_connection_closed_after_part_of_an_answer_is_not_retried(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if await server.next_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await writer.drain()

    server = await raw_server(serve)
    pool = make_pool()
    with pytest.raises(UpstreamBroken):
        await fetch(pool, server.url, "/1")
    assert server.connections == 1


async def test_a_response_let_go_late_leaves_its_connections_next_exchange_alone(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """An answer complete with its head gives its connection back at once, and the next
    request may be sent on it before the first caller reads or releases its response.
    Those late calls, to an exchange no longer current, leave the connection alone."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (head := await server.next_request(reader)) is not None:
            if path_of(head) == "/slow":
                await asyncio.sleep(0.1)
                writer.write(echo_path(head))
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    server = await raw_server(serve)
    pool = make_pool(limit=1)
    first = await request(pool, server.url, "/empty")
    second = asyncio.ensure_future(fetch(pool, server.url, "/slow"))
    assert await eventually(lambda: len(server.heads) == 2)  # on the same connection
    assert await first.read() == b""
    first.release()
    resp, body = await asyncio.wait_for(second, GUARD)
    assert (resp.status, body) == (200, b"/slow")
    assert server.connections == 1


async def test_a_fresh_connection_closed_before_its_request_fails_at_once(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """An upstream that closes a connection just as it is made (one at its connection
    limit does) must not leave the request waiting out its read timeout: nothing was sent,
    so it is refused at once as a disconnection, which the pool may retry."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await raw_server(serve)
    pool = make_pool()
    conn = await pool._connect(pool.origin(server.url))
    assert await eventually(lambda: conn.state is CLOSED)  # its close came first
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamDisconnected):
        async with asyncio.timeout(GUARD):
            await Exchange(conn, False, 30.0).run(
                b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n", None, None)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert await eventually(lambda: pool.open_connections == 0)
