"""Request bodies: framed by length or chunked, sent while the answer is awaited, and
never able to put the connection out of step with the upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.forward.upstream import UpstreamError
from tests.upstream.peers import (
    ALL_BYTES,
    PoolFactory,
    RawFactory,
    RawServer,
    answer,
    echo_path,
    eventually,
    fetch,
    header_of,
    keep_alive,
    parts,
    path_of,
    request,
)


async def recording_server(aiohttp_server: AiohttpServer
                           ) -> tuple[str, list[tuple[web.Request, bytes]]]:
    seen: list[tuple[web.Request, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request, body))
        return web.Response(body=b"%d" % len(body))

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


async def test_body_with_content_length_is_sent_as_is(
        aiohttp_server: AiohttpServer, make_pool: PoolFactory) -> None:
    url, seen = await recording_server(aiohttp_server)
    pool = make_pool()
    pieces = [ALL_BYTES * 300, b"", b"0\r\n\r\n", ALL_BYTES[::-1] * 1000]
    body = b"".join(pieces)
    resp, answer_body = await fetch(pool, url, "/put", "PUT", body=parts(*pieces),
                                    content_length=len(body))
    assert (resp.status, answer_body) == (200, str(len(body)).encode())
    [(request, got)] = seen
    assert got == body
    assert request.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in request.headers


async def test_body_without_length_is_sent_chunked(
        aiohttp_server: AiohttpServer, make_pool: PoolFactory) -> None:
    url, seen = await recording_server(aiohttp_server)
    pool = make_pool()
    pieces = [ALL_BYTES * 300, b"", b"0\r\n\r\n", ALL_BYTES[::-1] * 1000, b"\r\n"]
    resp, _ = await fetch(pool, url, "/post", "POST", body=parts(*pieces))
    assert resp.status == 200
    # an empty piece mid-stream is not the end of the body; and the connection is kept
    _, answer_body = await fetch(pool, url, "/again", "POST", body=parts(b"", b"abc"))
    assert answer_body == b"3"
    (request, got), (again, got_again) = seen
    assert got == b"".join(pieces)
    assert got_again == b"abc"
    assert request.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in request.headers
    assert request.transport is again.transport  # one connection


async def test_post_without_body_says_so_and_get_says_nothing(
        aiohttp_server: AiohttpServer, make_pool: PoolFactory) -> None:
    url, seen = await recording_server(aiohttp_server)
    pool = make_pool()
    await asyncio.wait_for(fetch(pool, url, "/p", "POST"), 1)
    await asyncio.wait_for(fetch(pool, url, "/g", "GET"), 1)
    (post, post_body), (get, _) = seen
    assert (post.headers["Content-Length"], post_body) == ("0", b"")
    assert "Transfer-Encoding" not in post.headers
    assert "Content-Length" not in get.headers and "Transfer-Encoding" not in get.headers


@pytest.mark.parametrize("length", [None, 100])
async def test_failing_body_fails_the_request_with_its_cause(
        raw_server: RawFactory, make_pool: PoolFactory, length: int | None) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.next_request(reader)
        await server.drain(reader)

    boom = RuntimeError("the client went away")

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        await asyncio.sleep(0.05)
        raise boom

    server = await raw_server(serve)
    pool = make_pool()
    with pytest.raises(UpstreamError) as caught:
        await fetch(pool, server.url, "/", "POST", body=failing(), content_length=length)
    assert caught.value.__cause__ is boom
    assert await eventually(lambda: server.eofs == 1)
    # the upstream never saw a body that looked complete
    assert bytes(server.received) in (b"partial", b"7\r\npartial\r\n")
    assert pool.open_connections == 0


@pytest.mark.parametrize(("then_close", "extra"), [
    (True, "Connection: close\r\n"),
    (False, "Connection: close\r\n"),
    (False, ""),  # keep-alive, yet the rest of the body would be read as the next request
], ids=["closes", "stays-open", "stays-open-keep-alive"])
async def test_early_answer_is_returned_and_its_connection_dropped(
        raw_server: RawFactory, make_pool: PoolFactory, then_close: bool, extra: str) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        head = await server.next_request(reader)
        assert head is not None
        if path_of(head) != "/upload":
            writer.write(echo_path(head))
            await writer.drain()
            await server.drain(reader)
            return
        await asyncio.sleep(0.05)  # let the upload get going; read none of it
        writer.write(answer(b"too large", status="413 Content Too Large", extra=extra))
        await writer.drain()
        if not then_close:
            await asyncio.sleep(10)  # nor ever read it

    produced = 0

    async def upload() -> AsyncIterator[bytes]:
        nonlocal produced
        chunk = b"u" * 65536
        while produced < 1024**3:
            produced += len(chunk)
            yield chunk

    server = await raw_server(serve)
    pool = make_pool(limit=1, connect_timeout=0.5)
    resp, body = await fetch(pool, server.url, "/upload", "POST", body=upload())
    assert (resp.status, body) == (413, b"too large")
    assert produced < 1024**3
    assert await eventually(lambda: pool.open_connections == 0)
    resp, body = await fetch(pool, server.url, "/next")
    assert (resp.status, body) == (200, b"/next")
    assert server.connections == 2


@pytest.mark.parametrize(("target", "headers"), [
    ("/", [("X-Evil", "a\r\nX-Injected: 1")]),
    ("/", [("X-Evil", "a\nb")]),
    ("/", [("X-Evil", "a\rb")]),
    ("/", [("X-Evil\r\nX-Injected", "1")]),
    ("/ HTTP/1.1\r\nX-Injected: 1\r\nX-Rest:", []),
], ids=["crlf-value", "lf-value", "cr-value", "crlf-name", "crlf-target"])
async def test_line_break_in_the_head_is_refused_before_sending(
        raw_server: RawFactory, make_pool: PoolFactory, target: str,
        headers: list[tuple[str, str]]) -> None:
    server = await raw_server(keep_alive(echo_path))
    pool = make_pool()
    with pytest.raises(UpstreamError, match="line break"):
        await request(pool, server.url, target, headers=headers)
    await asyncio.sleep(0.05)
    assert server.connections == 0
    assert pool.open_connections == 0


@pytest.mark.parametrize(("pieces", "length"), [
    ([b"hello"], 10),
    ([b"abc", b"GET /smuggled HTTP/1.1\r\nHost: upstream.test\r\n\r\n"], 3),
], ids=["shorter", "longer"])
async def test_a_body_not_matching_its_content_length_never_reaches_the_next_request(
        raw_server: RawFactory, make_pool: PoolFactory, pieces: list[bytes], length: int
        ) -> None:
    """The upstream frames the body by the Content-Length we sent: bytes short would be
    taken from the next request on the connection, bytes over would be a request of
    their own (smuggled). Such a body fails its request and its connection."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (head := await server.next_request(reader)) is not None:
            if path_of(head) == "/upload":  # answers at once, then reads the body
                writer.write(answer(b"early"))
                await writer.drain()
                await reader.readexactly(int(header_of(head, "Content-Length") or 0))
            else:
                writer.write(echo_path(head))
                await writer.drain()

    server = await raw_server(serve)
    pool = make_pool()
    with pytest.raises(UpstreamError):
        await fetch(pool, server.url, "/upload", "POST", body=parts(*pieces),
                    content_length=length)
    assert (await fetch(pool, server.url, "/next"))[1] == b"/next"
    await asyncio.sleep(0.05)
    assert [path_of(h) for h in server.heads] == ["/upload", "/next"]
