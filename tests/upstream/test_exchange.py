"""One exchange: how an answer is framed and parsed, and what an answer that is not
HTTP, or too large, or one too many, does to its request and its connection."""

from __future__ import annotations

import asyncio
import gc

import pytest

from gateway.forward.upstream import UpstreamBroken, UpstreamError
from tests.upstream.peers import (
    BIG,
    GUARD,
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
    read_until_error,
    request,
    write_once,
)


async def test_chunked_and_length_bodies_arrive_intact_on_one_connection(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    def respond(head: bytes) -> bytes:
        if path_of(head) == "/chunked":
            pieces = [BIG[:1], BIG[1:70000], BIG[70000:]]
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n"
                    + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
        return answer(BIG, extra="X-Kind: length\r\n")

    server = await raw_server(keep_alive(respond))
    pool = make_pool()
    for target in ("/chunked", "/length", "/chunked", "/length"):
        resp, body = await fetch(pool, server.url, target)
        assert resp.status == 200
        assert body == BIG
        assert ("X-Kind", target[1:]) in resp.headers
    assert resp.content_length == len(BIG)
    assert server.connections == 1
    assert pool.open_connections == 1


@pytest.mark.parametrize("framing", ["", "Transfer-Encoding: gzip\r\n"], ids=["none", "te-gzip"])
async def test_close_delimited_body_arrives_whole_and_its_connection_is_not_reused(
        raw_server: RawFactory, make_pool: PoolFactory, framing: str) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        head = await server.next_request(reader)
        assert head is not None
        if path_of(head) == "/close":  # not Content-Length, nor chunked last: ends at close
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         + framing.encode() + b"\r\n")
            for i in range(0, len(BIG), 30000):
                writer.write(BIG[i:i + 30000])
                await writer.drain()
                await asyncio.sleep(0.01)
            return  # closes
        writer.write(echo_path(head))
        await writer.drain()
        await server.drain(reader)

    server = await raw_server(serve)
    pool = make_pool()
    resp, body = await fetch(pool, server.url, "/close")
    assert resp.status == 200
    assert resp.content_length is None
    assert body == BIG
    assert await eventually(lambda: pool.open_connections == 0)
    resp, body = await fetch(pool, server.url, "/next")
    assert body == b"/next"
    assert server.connections == 2


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
], ids=["100", "100+103"])
async def test_interim_responses_are_skipped(raw_server: RawFactory, make_pool: PoolFactory,
                                             interim: bytes) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while await server.next_request(reader) is not None:
            writer.write(interim)
            await writer.drain()
            await asyncio.sleep(0.02)  # the final response in a separate segment
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: 1\r\n\r\nok")
            await writer.drain()

    server = await raw_server(serve)
    pool = make_pool()
    for _ in range(2):
        resp, body = await fetch(pool, server.url)
        assert (resp.status, resp.reason, body) == (200, "OK", b"ok")
        assert resp.headers == [("Content-Length", "2"), ("X-Final", "1")]
    assert server.connections == 1


async def test_endless_interim_responses_are_refused(raw_server: RawFactory,
                                                     make_pool: PoolFactory) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if await server.next_request(reader) is not None:
            for _ in range(1000):  # each within the read timeout: activity, never an answer
                writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.001)
            await asyncio.sleep(GUARD)

    server = await raw_server(serve)
    with pytest.raises(UpstreamBroken, match="interim"):
        await request(make_pool(), server.url, read_timeout=0.5)


async def test_head_response_has_no_body_and_the_connection_is_reused(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    def respond(head: bytes) -> bytes:
        if head.startswith(b"HEAD "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # and no body, rightly
        return answer(b"hello")

    server = await raw_server(keep_alive(respond))
    pool = make_pool()
    resp, body = await asyncio.wait_for(fetch(pool, server.url, "/h", "HEAD"), 1)
    assert (resp.status, resp.content_length, body) == (200, 5, b"")
    resp, body = await asyncio.wait_for(fetch(pool, server.url, "/g"), 1)
    assert (resp.status, body) == (200, b"hello")
    resp, body = await asyncio.wait_for(fetch(pool, server.url, "/h", "HEAD"), 1)
    assert body == b""
    assert server.connections == 1
    assert [h.split(b" ", 1)[0] for h in server.heads] == [b"HEAD", b"GET", b"HEAD"]


@pytest.mark.parametrize("status_line", [
    "204 No Content\r\n",
    "304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n",
])
async def test_no_content_and_not_modified_have_no_body(
        raw_server: RawFactory, make_pool: PoolFactory, status_line: str) -> None:
    def respond(head: bytes) -> bytes:
        if path_of(head) == "/empty":
            return f"HTTP/1.1 {status_line}\r\n".encode()
        return answer(b"after")

    server = await raw_server(keep_alive(respond))
    pool = make_pool()
    resp, body = await asyncio.wait_for(fetch(pool, server.url, "/empty"), 1)
    assert resp.status == int(status_line[:3])
    assert body == b""
    # the next response on the same connection is read from its first byte
    resp, body = await asyncio.wait_for(fetch(pool, server.url, "/next"), 1)
    assert (resp.status, body) == (200, b"after")
    assert server.connections == 1


async def test_malformed_response_is_broken(raw_server: RawFactory,
                                            make_pool: PoolFactory) -> None:
    server = await raw_server(write_once(b"garbage\r\n\r\n"))
    pool = make_pool()
    with pytest.raises(UpstreamBroken):
        await request(pool, server.url)
    assert await eventually(lambda: server.eofs == 1)  # and the connection was closed
    assert pool.open_connections == 0


async def test_switching_protocols_is_refused(raw_server: RawFactory,
                                              make_pool: PoolFactory) -> None:
    server = await raw_server(write_once(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x05hello"))
    pool = make_pool()
    with pytest.raises(UpstreamError, match="switched protocols"):
        await request(pool, server.url)
    assert await eventually(lambda: server.eofs == 1)
    assert pool.open_connections == 0


LINES = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(67))


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + LINES + b"\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + LINES,
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Endless: " + b"v" * 70000,
], ids=["whole", "unterminated", "one-endless-line"])
async def test_header_section_over_64_kib_is_broken(
        raw_server: RawFactory, make_pool: PoolFactory, head: bytes) -> None:
    assert 65536 < len(head) < 72000
    server = await raw_server(write_once(head))
    pool = make_pool()
    with pytest.raises(UpstreamBroken, match="too large a header"):
        await request(pool, server.url)
    assert await eventually(lambda: server.eofs == 1)


async def test_header_section_just_under_64_kib_is_accepted(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(63))
    server = await raw_server(keep_alive(
        lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + lines + b"\r\nok"))
    pool = make_pool()
    resp, body = await fetch(pool, server.url)
    assert (resp.status, body, len(resp.headers)) == (200, b"ok", 64)


@pytest.mark.parametrize("cut", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"0123456789",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
], ids=["length", "chunked"])
async def test_upstream_closing_mid_body_breaks_the_read(
        raw_server: RawFactory, make_pool: PoolFactory, cut: bytes) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.next_request(reader)
        writer.write(cut)
        await writer.drain()
        await asyncio.sleep(0.05)  # the head is read before the close

    server = await raw_server(serve)
    pool = make_pool()
    resp = await request(pool, server.url)
    assert resp.status == 200
    got, error = await read_until_error(resp)
    resp.release()
    assert isinstance(error, UpstreamBroken)
    assert got == b"0123456789"
    assert await eventually(lambda: pool.open_connections == 0)


async def test_a_second_response_in_the_same_write_does_not_desync_the_pool(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """An upstream that answers once too often, in the same segment, must not make the
    pool hand out its connection twice (two requests on one connection: one hangs)."""
    def respond(head: bytes) -> bytes:
        if path_of(head) == "/twice":
            return b"HTTP/1.1 204 No Content\r\n\r\n" * 2
        return echo_path(head)

    server = await raw_server(keep_alive(respond))
    pool = make_pool()
    resp, body = await fetch(pool, server.url, "/twice")
    assert (resp.status, body) == (204, b"")
    results = await asyncio.wait_for(asyncio.gather(
        fetch(pool, server.url, "/a", read_timeout=0.5),
        fetch(pool, server.url, "/b", read_timeout=0.5)), 2)
    assert [body for _, body in results] == [b"/a", b"/b"]


async def test_a_chunked_answer_with_trailers_arrives_whole_without_them(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    server = await raw_server(keep_alive(lambda head: (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Digest: sha-256=x\r\n\r\n")))
    pool = make_pool()
    for _ in range(2):  # and the connection stays in step for the next one
        resp, body = await fetch(pool, server.url)
        assert body == b"abcde"
        assert ("X-Digest", "sha-256=x") not in resp.headers
    assert server.connections == 1


async def test_exchanges_leave_nothing_for_the_cycle_collector(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """A request's exchange, response and waiters are freed as soon as they are let go,
    not left in reference cycles for the collector: the gateway makes them at its full
    request rate."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (head := await server.next_request(reader)) is not None:
            if header_of(head, "Transfer-Encoding") == "chunked":
                await reader.readuntil(b"\r\n0\r\n\r\n")
            else:
                await reader.readexactly(int(header_of(head, "Content-Length") or 0))
            if path_of(head) == "/empty":
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            elif path_of(head) == "/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n")
            else:
                writer.write(echo_path(head))
            await writer.drain()

    server = await raw_server(serve)
    pool = make_pool()
    exchanges = [("GET", "/get", None, None), ("HEAD", "/head", None, None),
                 ("GET", "/empty", None, None), ("GET", "/chunked", None, None),
                 ("POST", "/length", b"abc", 3), ("POST", "/chunks", b"abc", None)]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for method, target, body, length in exchanges * 3:
            await fetch(pool, server.url, target, method,
                        body=parts(body) if body else None, content_length=length)
        gc.collect()
        ours = [o for o in gc.garbage
                if type(o).__module__.startswith("gateway.forward.upstream")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []
    assert server.connections == 1
