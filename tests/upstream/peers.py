"""Peers for the upstream client's tests, and the client's calls as the tests make them.

Peers are aiohttp apps, or raw ``asyncio`` servers (:class:`RawServer`) that write exact
bytes where the point is an upstream that misbehaves. What the tests assert is what a user
of the client notices: status, headers, body bytes, what reached the upstream, how many
TCP connections it saw, and how long a failure took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

from gateway.forward.upstream import UpstreamError, UpstreamPool, UpstreamResponse

ALL_BYTES = bytes(range(256))
BIG = ALL_BYTES * 400  # 100 KiB
HOST = ("Host", "upstream.test")


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


def write_once(data: bytes) -> Serve:
    """A server that answers the first request with ``data``, then waits for EOF."""
    async def serve(server: RawServer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if await server.next_request(reader) is not None:
            writer.write(data)
            await writer.drain()
            await server.drain(reader)
    return serve


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
