"""The read timeout: the upstream's silence while we wait for it, and only that (not a
slow client's upload, nor a pause in reading for a slow client)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from gateway.forward.upstream import UpstreamTimeout
from tests.upstream.peers import (
    ALL_BYTES,
    GUARD,
    PoolFactory,
    RawFactory,
    RawServer,
    answer,
    echo_path,
    eventually,
    fetch,
    keep_alive,
    parts,
    path_of,
    read_all,
    read_until_error,
    request,
)


async def test_silent_upstream_times_out(raw_server: RawFactory,
                                         make_pool: PoolFactory) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.next_request(reader)
        await server.drain(reader)  # never answers

    server = await raw_server(serve)
    pool = make_pool()
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await request(pool, server.url, read_timeout=0.3)
    assert 0.25 < time.monotonic() - started < 1.0
    assert await eventually(lambda: server.eofs == 1)  # the connection was closed
    assert pool.open_connections == 0


async def test_upstream_silent_mid_body_times_out_the_read(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await server.drain(reader)  # then silence

    server = await raw_server(serve)
    pool = make_pool()
    resp = await request(pool, server.url, read_timeout=0.3)
    assert resp.status == 200
    started = time.monotonic()
    got, error = await read_until_error(resp)
    resp.release()
    assert isinstance(error, UpstreamTimeout)
    assert 0.2 < time.monotonic() - started < 1.0
    assert got == b"x" * 10
    assert await eventually(lambda: server.eofs == 1)


async def test_slow_consumer_of_a_large_body_does_not_time_out(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    big = ALL_BYTES * 8192  # 2 MiB: reading pauses at 256 KiB buffered
    server = await raw_server(keep_alive(lambda _: answer(big)))
    pool = make_pool()
    for _ in range(2):
        resp = await request(pool, server.url, read_timeout=0.2)
        await asyncio.sleep(0.5)  # not reading, for longer than the read timeout
        got = await asyncio.wait_for(resp.read(), GUARD)
        assert len(got) <= 512 * 1024  # reading had paused: the rest waited upstream
        await asyncio.sleep(0.3)  # and once more, mid-body
        got += await read_all(resp)
        resp.release()
        assert got == big
    assert server.connections == 1  # and the connection was good for another exchange


async def test_slow_request_body_is_not_upstream_silence(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """The upstream waits for the body while the client sends it slowly: the read timeout
    measures the upstream's silence once it has something to answer, not the upload."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (head := await server.next_request(reader)) is not None:
            body = await reader.readuntil(b"\r\n0\r\n\r\n")
            if path_of(head) == "/answer":
                writer.write(answer(b"got %d" % len(body)))
                await writer.drain()

    server = await raw_server(serve)
    pool = make_pool()
    chunk = b"y" * 1000
    # the client takes longer between chunks than the read timeout
    resp, body = await fetch(pool, server.url, "/answer", "POST", read_timeout=0.2,
                             body=parts(chunk, chunk, chunk, pause=0.3))
    framed = 3 * len(b"3e8\r\n" + chunk + b"\r\n") + len(b"0\r\n\r\n")
    assert (resp.status, body) == (200, b"got %d" % framed)
    # the silence after the whole body still counts
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await fetch(pool, server.url, "/silent", "POST", read_timeout=0.2,
                    body=parts(chunk, pause=0.3))
    assert 0.45 < time.monotonic() - started < 1.0


async def test_upstream_that_stops_reading_the_body_times_out(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.next_request(reader)
        await asyncio.sleep(10)  # reads nothing more, answers nothing

    async def endless() -> AsyncIterator[bytes]:
        chunk = b"z" * 65536
        while True:
            yield chunk

    server = await raw_server(serve)
    pool = make_pool()
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await fetch(pool, server.url, "/", "PUT", read_timeout=0.3, body=endless())
    assert time.monotonic() - started < 1.5
    assert await eventually(lambda: pool.open_connections == 0)


async def test_an_answer_read_long_after_it_arrived_keeps_its_connection(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """The upstream answered in full; a slow client then takes longer than the read
    timeout to read it. That silence is not the upstream's fault: the connection is
    still good for the next request."""
    server = await raw_server(keep_alive(echo_path))
    pool = make_pool()
    resp = await request(pool, server.url, "/1", read_timeout=0.2)
    await asyncio.sleep(0.4)  # the whole answer is buffered meanwhile
    assert await read_all(resp) == b"/1"
    resp.release()
    assert (await fetch(pool, server.url, "/2"))[1] == b"/2"
    assert server.connections == 1


async def test_the_silence_after_a_paused_read_resumes_is_counted_from_the_resume(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """Reading paused for a slow client: the upstream's silence is measured from when we
    read again, not from its last byte (we were the ones not listening)."""
    burst = b"p" * (256 * 1024 + 1)  # reading pauses on its last byte: nothing left queued

    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await server.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(burst) + 4)
                     + burst)
        await writer.drain()
        await asyncio.sleep(0.5)  # 0.2 s after the client reads again, well within 0.4 s
        writer.write(b"tail")
        await writer.drain()
        await server.drain(reader)

    server = await raw_server(serve)
    pool = make_pool()
    resp = await request(pool, server.url, read_timeout=0.4)
    await asyncio.sleep(0.3)  # not reading, for less than the read timeout
    got, error = await read_until_error(resp)
    resp.release()
    assert error is None
    assert got == burst + b"tail"
