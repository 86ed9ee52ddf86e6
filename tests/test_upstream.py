"""The upstream client against real peers on loopback, well-behaved and not.

Peers are aiohttp apps, or raw ``asyncio`` servers that write exact bytes where the
point is an upstream that misbehaves. What is asserted is what a user of the client
notices: status, headers, body bytes, what reached the upstream, how many TCP
connections it saw, and how long a failure took.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_aiohttp import AiohttpServer

from gateway.forward.upstream import (
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tests.redis_server import free_port

ALL_BYTES = bytes(range(256))
HOST = ("Host", "upstream.test")


# --- peers ------------------------------------------------------------------------------

class RawServer:
    """A TCP server on loopback whose ``serve`` coroutine writes exact bytes.

    ``connections`` counts accepted connections, ``eofs`` the ones the client closed (as
    the server noticed: EOF or a reset), ``heads`` every request head.
    """

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.connections = 0
        self.eofs = 0
        self.heads: list[bytes] = []
        self.received = bytearray()  # every byte read by drain()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.serve(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.eofs += 1  # the client closed (or reset) the connection under us
        except asyncio.CancelledError:
            pass  # the test is over
        finally:
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request head (its body, if any, is left unread); None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eofs += 1
            return None
        self.heads.append(head)
        return head

    async def drain(self, reader: asyncio.StreamReader) -> None:
        """Read (and keep) everything until the client closes."""
        try:
            while data := await reader.read(65536):
                self.received += data
        except ConnectionError:
            pass
        self.eofs += 1

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


Serve = Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RawFactory = Callable[[Serve], Awaitable[RawServer]]
PoolFactory = Callable[..., UpstreamPool]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawFactory]:
    servers: list[RawServer] = []

    async def start(serve: Serve) -> RawServer:
        server = RawServer(serve)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    """Pools built in the test's loop, closed after it."""
    pools: list[UpstreamPool] = []

    def make(**kwargs: float | int | ssl.SSLContext) -> UpstreamPool:
        settings: dict[str, float | int | ssl.SSLContext] = {
            "limit": 8, "connect_timeout": 0.5, "idle_timeout": 5.0}
        settings.update(kwargs)
        pool = UpstreamPool(**settings)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


def path_of(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode("latin-1")


def header_of(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def answer(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode("latin-1") + body


def keep_alive(respond: Callable[[bytes], bytes]) -> Serve:
    """A well-behaved keep-alive server: answers each request head with ``respond``."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (head := await server.next_request(reader)) is not None:
            writer.write(respond(head))
            await writer.drain()
    return serve


def echo_path(head: bytes) -> bytes:
    return answer(path_of(head).encode())


GUARD = 3.0  # no step here takes this long: a client that hangs fails the test, not CI


async def request(pool: UpstreamPool, url: str, target: str = "/", method: str = "GET", *,
                  headers: list[tuple[str, str]] | None = None, read_timeout: float = 1.0,
                  body: AsyncIterable[bytes] | None = None, content_length: int | None = None
                  ) -> UpstreamResponse:
    """``pool.request`` with ``Host`` set, the origin looked up, and a guard on hanging."""
    return await asyncio.wait_for(
        pool.request(method, pool.origin(url), target, [HOST, *(headers or [])],
                     read_timeout=read_timeout, body=body, content_length=content_length),
        GUARD)


async def read_all(resp: UpstreamResponse) -> bytes:
    data, error = await read_until_error(resp)
    if error is not None:
        raise error
    return data


async def read_until_error(resp: UpstreamResponse) -> tuple[bytes, UpstreamError | None]:
    """The body as far as it came, and the error that ended it early, if one did."""
    got = []
    try:
        async with asyncio.timeout(GUARD):
            while chunk := await resp.read():
                got.append(chunk)
    except UpstreamError as exc:
        return b"".join(got), exc
    return b"".join(got), None


async def fetch(pool: UpstreamPool, url: str, target: str = "/", method: str = "GET", *,
                headers: list[tuple[str, str]] | None = None, read_timeout: float = 1.0,
                body: AsyncIterable[bytes] | None = None, content_length: int | None = None
                ) -> tuple[UpstreamResponse, bytes]:
    """One whole exchange: the response (released) and its body."""
    resp = await request(pool, url, target, method, headers=headers,
                         read_timeout=read_timeout, body=body, content_length=content_length)
    try:
        data = await read_all(resp)
    finally:
        resp.release()
    return resp, data


async def eventually(check: Callable[[], bool], within: float = 1.0) -> bool:
    """Whether ``check`` becomes true within ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def parts(*chunks: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        if pause:
            await asyncio.sleep(pause)
        yield chunk


# --- keep-alive -------------------------------------------------------------------------

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


# --- response framing -----------------------------------------------------------------

BIG = ALL_BYTES * 400  # 100 KiB


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


def write_once(data: bytes) -> Serve:
    """A server that answers the first request with ``data``, then waits for EOF."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if await server.next_request(reader) is not None:
            writer.write(data)
            await writer.drain()
            await server.drain(reader)
    return serve


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


# --- read timeout ------------------------------------------------------------------------

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


# --- connecting and the limit ----------------------------------------------------------

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


# --- request bodies ----------------------------------------------------------------------

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


# --- idle connections ----------------------------------------------------------------

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


# --- TLS ---------------------------------------------------------------------------------

def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def tls_server(aiohttp_server: AiohttpServer, tmp_path: Path
                     ) -> tuple[int, Path, list[int]]:
    cert_path, key_path = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    peers: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.Response(body=b"secure " + request.path.encode())

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app, ssl=server_ctx)
    assert server.port is not None
    return server.port, cert_path, peers


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_tls_to_a_trusted_certificate(aiohttp_server: AiohttpServer, tmp_path: Path,
                                            make_pool: PoolFactory, host: str) -> None:
    port, cert_path, peers = await tls_server(aiohttp_server, tmp_path)
    pool = make_pool(ssl_context=ssl.create_default_context(cafile=str(cert_path)))
    for i in range(2):
        resp, body = await fetch(pool, f"https://{host}:{port}", f"/{i}")
        assert (resp.status, body) == (200, b"secure /%d" % i)
    assert len(peers) == 2 and len(set(peers)) == 1


async def test_tls_to_an_untrusted_certificate_is_unreachable(
        aiohttp_server: AiohttpServer, tmp_path: Path, make_pool: PoolFactory) -> None:
    port, _, peers = await tls_server(aiohttp_server, tmp_path)
    pool = make_pool(connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(UpstreamUnreachable, match="CERTIFICATE_VERIFY_FAILED") as caught:
        await fetch(pool, f"https://localhost:{port}")
    assert time.monotonic() - started < 1.0
    assert not isinstance(caught.value, ssl.SSLError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert peers == []
    assert pool.open_connections == 0


# --- ownership, timers and cancellation ------------------------------------------------

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
