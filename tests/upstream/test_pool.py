"""The pool: connecting, the limit and the requests waiting for it, idle connections, and
its count of open connections staying true whatever is cancelled when."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.forward.upstream import UpstreamPool, UpstreamUnreachable
from tests.redis_server import free_port
from tests.upstream.peers import (
    BIG,
    GUARD,
    HOST,
    PoolFactory,
    RawFactory,
    RawServer,
    answer,
    echo_path,
    eventually,
    fetch,
    header_of,
    keep_alive,
    path_of,
    read_all,
    request,
)


async def test_refused_port_is_unreachable_at_once(make_pool: PoolFactory) -> None:
    pool = make_pool(connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(UpstreamUnreachable):
        await fetch(pool, f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 0.5
    assert pool.open_connections == 0


async def test_exhausted_pool_waits_for_the_connect_timeout_then_recovers(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    server = await raw_server(keep_alive(echo_path))
    pool = make_pool(limit=1, connect_timeout=0.3)
    held = await request(pool, server.url, "/held")
    started = time.monotonic()
    with pytest.raises(UpstreamUnreachable):
        await fetch(pool, server.url, "/second")
    assert 0.25 < time.monotonic() - started < 1.0
    assert server.connections == 1
    assert await read_all(held) == b"/held"
    held.release()
    _, body = await fetch(pool, server.url, "/third")
    assert body == b"/third"
    assert server.connections == 1
    assert [path_of(h) for h in server.heads] == ["/held", "/third"]


async def test_waiting_request_gets_the_released_connection(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    server = await raw_server(keep_alive(echo_path))
    pool = make_pool(limit=1, connect_timeout=1.0)
    held = await request(pool, server.url, "/held")
    waiting = asyncio.ensure_future(fetch(pool, server.url, "/waiting"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert await read_all(held) == b"/held"
    held.release()
    _, body = await asyncio.wait_for(waiting, 0.5)  # at once, not after connect_timeout
    assert body == b"/waiting"
    assert server.connections == 1


async def test_full_pool_closes_an_idle_connection_to_another_origin(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    first = await raw_server(keep_alive(echo_path))
    second = await raw_server(keep_alive(echo_path))
    pool = make_pool(limit=1)
    assert (await fetch(pool, first.url, "/1"))[1] == b"/1"
    assert (await fetch(pool, second.url, "/2"))[1] == b"/2"
    assert await eventually(lambda: first.eofs == 1)  # its idle connection made room
    assert pool.open_connections == 1
    assert (await fetch(pool, second.url, "/3"))[1] == b"/3"
    assert (await fetch(pool, first.url, "/4"))[1] == b"/4"
    assert (first.connections, second.connections) == (2, 1)
    assert pool.open_connections == 1


async def test_zero_means_no_limit_as_with_aiohttps_client(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    """GATEWAY_UPSTREAM_POOL_SIZE, _CONNECT_TIMEOUT and _TIMEOUT of 0 meant "none" to the
    aiohttp client this one replaced; they still do."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (head := await server.next_request(reader)) is not None:
            await asyncio.sleep(0.3)  # longer than any short timeout would allow
            writer.write(echo_path(head))
            await writer.drain()

    server = await raw_server(serve)
    pool = make_pool(limit=0, connect_timeout=0)
    answers = await asyncio.gather(*(fetch(pool, server.url, f"/{i}", read_timeout=0)
                                     for i in range(20)))
    assert sorted(body for _, body in answers) == sorted(f"/{i}".encode() for i in range(20))
    assert server.connections == 20  # all at once: no limit held any back


async def test_idle_connection_is_closed_after_the_idle_timeout(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    server = await raw_server(keep_alive(echo_path))
    pool = make_pool(idle_timeout=0.3)
    await fetch(pool, server.url, "/1")
    await asyncio.sleep(0.1)
    await fetch(pool, server.url, "/2")  # reused: idle only since now
    await asyncio.sleep(0.15)
    assert (pool.open_connections, server.eofs, server.connections) == (1, 0, 1)
    assert await eventually(lambda: server.eofs == 1, within=1.0)
    assert pool.open_connections == 0
    assert (await fetch(pool, server.url, "/3"))[1] == b"/3"
    assert server.connections == 2


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_answers_without_a_body_under_concurrency_never_strand_a_request(
        raw_server: RawFactory, make_pool: PoolFactory, method: str) -> None:
    """A 204 (or an answer to HEAD) is complete with its head, so its connection is back
    in the pool before the caller resumes: another request may take it in between, and
    the first caller must then leave that connection alone."""
    server = await raw_server(keep_alive(
        lambda head: b"HTTP/1.1 204 No Content\r\n\r\n" if method == "GET"
        else b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"))
    pool = make_pool(limit=4)

    async def client() -> int:
        done = 0
        for _ in range(100):
            resp, body = await fetch(pool, server.url, "/", method)
            assert (resp.status, body) == (200 if method == "HEAD" else 204, b"")
            done += 1
        return done

    assert await asyncio.gather(*(client() for _ in range(16))) == [100] * 16
    assert server.connections <= 4


async def test_a_pooled_connection_already_reset_is_not_handed_out(
        make_pool: PoolFactory) -> None:
    """The upstream resets an idle connection, and in the same turn of the loop a request
    takes it from the pool: the transport already knows it is closing (connection_lost
    is still to come). A POST sent there fails (never retried), though it need not have
    been sent there at all."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    accepted: list[socket.socket] = []

    async def serve(conn: socket.socket) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                if not (more := await loop.sock_recv(conn, 65536)):
                    return
                data += more
            head, data = data.split(b"\r\n\r\n", 1)
            await loop.sock_sendall(conn, echo_path(head))
            if conn is accepted[0]:
                return  # nothing left pending on it: the test resets it

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            accepted.append(conn)
            tasks.add(loop.create_task(serve(conn)))

    tasks = {loop.create_task(accept())}
    try:
        pool = make_pool()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert (await fetch(pool, url, "/1"))[1] == b"/1"
        # a peer whose bytes are handled just before the reset in the next turn: it wakes
        # this task after the transport saw the reset, before connection_lost runs
        woken = loop.create_future()

        class Waker(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                if not woken.done():
                    woken.set_result(None)

        ours, theirs = socket.socketpair()
        waker, _ = await loop.connect_accepted_socket(Waker, ours)
        theirs.send(b"x")
        accepted[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted[0].close()  # a reset, at once
        async with asyncio.timeout(GUARD):  # (not wait_for: the request is to start now)
            await woken
            resp = await pool.request("POST", pool.origin(url), "/2", [HOST], read_timeout=1.0)
        assert (resp.status, await read_all(resp)) == (200, b"/2")
        resp.release()
        waker.close()
        theirs.close()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.sleep(0)  # their pending socket operations end
        for conn in accepted:
            conn.close()
        listener.close()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


async def dribble(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)  # a turn of the loop between chunks
        yield chunk


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_requests_cancelled_at_every_step_leave_the_pool_count_true(loop: str) -> None:
    """Three requests on a pool of two (so one waits for a slot) cancelled after 0, 1, 2...
    turns of the loop: waiting for the slot, connecting, sending a body, awaiting the
    head, reading a body whose reading paused. After each round the pool counts exactly
    the connections really open, the limit holds, nothing is left pending, and the pool
    still serves. On its own loop, as production runs on uvloop: there a connect cut
    short after connection_made never reports connection_lost."""
    limit = 2

    async def scenario() -> None:
        errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        writers: set[asyncio.StreamWriter] = set()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            try:
                while head := await reader.readuntil(b"\r\n\r\n"):
                    await reader.readexactly(int(header_of(head, "Content-Length") or 0))
                    writer.write(answer(BIG * 3))  # 300 KiB: the client's reading pauses
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writers.discard(writer)
                writer.close()
                # a reset is the stream's close status too: taken here, else it may be
                # reported as never retrieved, depending on the collector's order
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        pool = UpstreamPool(limit=limit, connect_timeout=1.0)
        origin = pool.origin(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")

        async def one(method: str) -> bytes:
            body = dribble(b"a" * 10, b"b" * 10) if method == "POST" else None
            resp = await pool.request(method, origin, "/", [HOST], read_timeout=1.0,
                                      body=body, content_length=20 if body else None)
            got = []
            try:
                while chunk := await resp.read():
                    got.append(chunk)
                    await asyncio.sleep(0)
            finally:
                resp.release()
            return b"".join(got)

        for method in ("GET", "POST"):
            for turns in range(400):
                tasks = [asyncio.ensure_future(one(method)) for _ in range(limit + 1)]
                for _ in range(turns):
                    await asyncio.sleep(0)
                    assert 0 <= pool.open_connections <= limit
                for task in tasks:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                assert all(r == BIG * 3 or isinstance(r, asyncio.CancelledError)
                           for r in results), results
                assert await eventually(lambda: pool.open_connections == len(writers)), (
                    method, turns, pool.open_connections, len(writers))
                assert not pool._waiters
                if all(r == BIG * 3 for r in results):
                    break  # every step of the exchanges was cut short once
            else:
                raise AssertionError("the exchanges never completed")
        assert await asyncio.wait_for(one("GET"), GUARD) == BIG * 3
        await pool.close()
        assert await eventually(lambda: pool.open_connections == len(writers) == 0)
        server.close()
        await server.wait_closed()
        gc.collect()  # a task destroyed while pending would be reported now
        await asyncio.sleep(0)
        assert errors == []

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


async def test_the_pool_says_in_one_line_what_it_holds(
        raw_server: RawFactory, make_pool: PoolFactory) -> None:
    server = await raw_server(keep_alive(echo_path))
    pool = make_pool(limit=2)
    assert repr(pool) == "<UpstreamPool 0 open, limit 2: 0 in use, 0 idle, 0 waiting>"
    held = await request(pool, server.url, "/held")
    await fetch(pool, server.url, "/done")
    assert repr(pool) == (f"<UpstreamPool 2 open, limit 2: 1 in use, 1 idle ({server.url}=1),"
                          " 0 waiting>")
    held.release()
    assert repr(make_pool(limit=0)) == (
        "<UpstreamPool 0 open, no limit: 0 in use, 0 idle, 0 waiting>")
