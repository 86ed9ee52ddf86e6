"""The proxy listener's own HTTP/1.1 protocol: client requests straight to the pipeline.

aiohttp's server costs most of a proxied request's CPU (its request and response
objects, the application and router layers, the payload stream and the writer: about
250k of a request's 390k instructions, docs/PERFORMANCE.md). A proxy needs little of
it, so the listener's connections start on :class:`FastProtocol`:

- It reads a request's head (up to the blank line), and the request line says where
  the request goes. The built-in server's paths (the first path segment of any route
  the proxy app has besides its catch-all: ``/oauth/``, ``/console/``, ``/.well-known/``
  and the rest, in any letter case) and anything unusual (another HTTP version, an
  absolute or ``*`` target, a percent sign in the first segment, ``Expect``, ``Upgrade``,
  a transfer coding other than ``chunked``, a head llhttp refuses or longer than
  :data:`MAX_HEAD`, a head aiohttp's parser refuses where llhttp does not: no ``Host``,
  a second ``Host`` or other single-valued field, more than :data:`MAX_HEADERS`
  fields; whitespace ending a field value, which aiohttp strips and llhttp keeps) are
  **handed off**: the connection's protocol becomes aiohttp's
  (:class:`~gateway.runtime.listener.GuardedHandler`), which is given the bytes received
  so far, untouched, and serves that connection from then on exactly as before. Pages,
  endpoints, the console, the admin API, malformed requests and their 400s all stay
  aiohttp's.
- Everything else goes to :meth:`~gateway.pipeline.handler.ProxyPipeline.handle_direct`.
  The head is parsed by httptools (llhttp, the parser aiohttp vendors too); the answer is
  written by this module: one ``write`` for a small answer whose body came with its
  head, streamed with flow control otherwise.
- The guard's limits hold as on aiohttp's protocol: the connection cap, the header
  deadline (total, from the connection's start or the next request's first byte) and the
  keep-alive timeout, enforced by one sweep a fraction of a second apart rather than a
  timer per request.
- A client that leaves cancels its request's task (recorded as 499), as aiohttp does with
  ``handler_cancellation``. Pipelined requests are answered in order, the next one once
  the client takes more of the answers (flow control). A request answered before its
  body was read (413, 408, a refusal) closes the connection once the rest of the body
  has been read and dropped (or :data:`LINGER` seconds passed), as aiohttp lingers.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qsl

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from gateway.forward.upstream import UpstreamError, UpstreamResponse
from gateway.pipeline.handler import ProxyPipeline

if TYPE_CHECKING:
    from gateway.runtime.listener import FastServer

log = logging.getLogger("gateway.listener")

#: the longest request head served here: aiohttp's limit for one line; a longer head is
#: handed to aiohttp, whose limits (lines, fields, their count) then refuse it or not
MAX_HEAD = 8190
#: bytes of a pipelined next request kept while one is served, before reading pauses
MAX_PIPELINED = 64 * 1024
#: request body bytes buffered for the forwarder before reading from the client pauses
BODY_HIGH_WATER = 256 * 1024
#: seconds the unread rest of an answered request's body is read and dropped, at most
#: (aiohttp's ``lingering_time``)
LINGER = 10.0
#: aiohttp's limit on a request's header fields; a head with more is handed to it
MAX_HEADERS = 128
#: fields aiohttp's parser refuses to see twice in a head (its ``SINGLETON_HEADERS``)
_SINGLETONS = frozenset(("content-length", "content-location", "content-range",
                         "content-type", "etag", "host", "max-forwards", "server",
                         "transfer-encoding", "user-agent"))
#: fields that make a request aiohttp's: ``Expect`` (its interim answer), and the
#: pre-RFC 6455 WebSocket handshake (which it refuses)
_HANDOFF_HEADERS = frozenset(("expect", "sec-websocket-key1"))
_NO_BODY_STATUSES = frozenset((204, 304))
_EMPTY_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())


class _Handoff(Exception):
    """This request is aiohttp's to serve."""


class _Pipelined(Exception):
    """A next request began in the same read as a chunked body ended."""


class _Dates:
    """The ``Date`` header value, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True)
        return self._value


DATES = _Dates()


class _Body:
    """A request body as it arrives, read by the forwarder with :meth:`readany`."""

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "done")

    def __init__(self, conn: FastProtocol) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.done = False  # the whole body has arrived

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > BODY_HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def readany(self) -> bytes:
        while True:
            if self._chunks:
                data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
                self._chunks.clear()
                self._size = 0
                self._conn.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            await waiter


class _Dropped(_Body):
    """The rest of a body whose request has been answered, read and dropped until it
    ends (then the connection closes) or :data:`LINGER` seconds pass: a client that
    sends its whole body before reading sees its answer (a 413, say), not a reset for
    closing on unread bytes (aiohttp's lingering close)."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> None:
        self.done = True
        if self._conn.transport is not None:
            self._conn.transport.close()

    def fail(self, exc: BaseException) -> None:
        self.finish()


class _NoBody:
    __slots__ = ()

    async def readany(self) -> bytes:
        return b""


_NO_BODY = _NoBody()


class FastRequest:
    """One request on a :class:`FastProtocol` connection: what the pipeline reads of it
    (aiohttp's names and meanings) and how it answers."""

    __slots__ = ("_conn", "body_exists", "closing", "content", "content_length", "headers",
                 "host", "method", "raw_path", "remote", "started")

    scheme = "http"  # the listener speaks plain HTTP; TLS ends in front of it

    def __init__(self, conn: FastProtocol, method: str, raw_path: str,
                 headers: CIMultiDictProxy[str], content_length: int | None,
                 body: _Body | None, closing: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.remote = conn.remote
        self.host = headers.get("Host") or conn.local
        self.content_length = content_length
        self.body_exists = body is not None
        self.content: _Body | _NoBody = body if body is not None else _NO_BODY
        self.closing = closing  # the connection closes after this answer
        self.started = False  # the answer's head has been written

    @property
    def query(self) -> MultiDictProxy[str]:
        _, sep, query = self.raw_path.partition("?")
        if not sep:
            return _EMPTY_QUERY
        return MultiDictProxy(MultiDict(parse_qsl(query, keep_blank_values=True)))

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def _head(self, status: int, reason: str, headers: Iterable[tuple[str, str]],
              framing: str, date: bool) -> bytes:
        body = self.content
        if isinstance(body, _Body) and not body.done:
            self.closing = True  # the rest of an unread body would be taken as a request
        text = "".join([f"HTTP/1.1 {status} {reason}\r\n",
                        *[f"{k}: {v}\r\n" for k, v in headers], framing,
                        f"Date: {DATES.now()}\r\n" if date else "",
                        "Connection: close\r\n\r\n" if self.closing else "\r\n"])
        if text.count("\n") != text.count("\r\n"):  # a value with a line break: never sent
            raise UpstreamError("A response header holds a line break.")
        return text.encode("utf-8", "surrogateescape")

    def answer(self, status: int, reason: str, headers: Iterable[tuple[str, str]],
               body: bytes) -> None:
        transport = self._conn.transport
        if transport is None:
            return
        if self.started:  # an answer is under way: all that can be said is a broken stream
            self.closing = True
            transport.close()
            return
        self.started = True
        kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "date",
                                                                  "connection")]
        head = self._head(status, reason, kept, f"Content-Length: {len(body)}\r\n", True)
        transport.write(head + body if self.method != "HEAD" else head)

    async def relay(self, resp: UpstreamResponse, headers: list[tuple[str, str]]) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is None:
            raise ConnectionResetError("the client has gone")
        status = resp.status
        length = resp.content_length
        reason = resp.reason or ""
        # the upstream's Date is kept; a proxy adds one only where it is missing
        date = True
        for k, _ in headers:
            if len(k) == 4 and k.lower() == "date":
                date = False
                break
        if self.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200:
            framing = (f"Content-Length: {length}\r\n"
                       if self.method == "HEAD" and length is not None else "")
            self.started = True
            transport.write(self._head(status, reason, headers, framing, date))
            return
        chunked = length is None
        head = self._head(status, reason, headers, "Transfer-Encoding: chunked\r\n"
                          if chunked else f"Content-Length: {length}\r\n", date)
        self.started = True
        # a small answer has usually arrived with its head: one write for both
        data = resp.read_nowait()
        try:
            if chunked:
                transport.write(head + b"%x\r\n%b\r\n" % (len(data), data) if data else head)
                while data := await resp.read():
                    transport = await conn.writable()
                    transport.write(b"%x\r\n%b\r\n" % (len(data), data))
                transport = await conn.writable()
                transport.write(b"0\r\n\r\n")
            else:
                transport.write(head + data if data else head)
                while data := await resp.read():
                    transport = await conn.writable()
                    transport.write(data)
        except UpstreamError:
            # headers are gone already: the only honest signal left is a broken stream
            self.closing = True
            if conn.transport is not None:
                conn.transport.close()


class FastProtocol(asyncio.Protocol):
    """One client connection of the proxy listener (see the module docstring)."""

    def __init__(self, server: FastServer, pipeline: Callable[[], ProxyPipeline]) -> None:
        self.server = server
        self.guard = server.guard
        self._pipeline = pipeline
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.local = ""
        self.parser = httptools.HttpRequestParser(self)
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.deadline = 0.0  # when an idle or half-sent connection is closed
        self.closing = False  # no request after the current one
        self.paused_writing = False
        self.paused_reading = False
        self.counted = False
        # the request being parsed
        self._complete = False
        self._keep_alive = True
        self._body: _Body | None = None
        self._request: FastRequest | None = None
        self._remaining: int | None = None  # body bytes still to come (Content-Length)
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio's callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but do all it does
        transport = cast(asyncio.Transport, transport)
        guard = self.guard
        now = self._loop.time()
        if guard.open >= guard.max_connections:
            guard.refuse(transport, now)
            return
        guard.open += 1
        self.counted = True
        self.transport = transport
        self.server.adopt(self, transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, (tuple, list)) and len(sock) >= 2:
            self.local = f"{sock[0]}:{sock[1]}"
        self.deadline = now + guard.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.guard.open -= 1
        self.server.forget(self)
        self.transport = None
        if self._body is not None:
            self._body.fail(ConnectionResetError("the client has gone"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the client has gone"))
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._body is not None and not self._body.done:
            self._feed_body(data)
            return
        self.buffer += data
        if self.task is None:
            self._next_request()
        if len(self.buffer) > MAX_PIPELINED:
            self.pause_reading()

    def eof_received(self) -> bool | None:
        # as aiohttp: a client that ends its side has left (asyncio then closes the
        # transport, and connection_lost cancels a request in flight: 499)
        return None

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)
        elif self.task is None and self.buffer:
            self._next_request()  # a pipelined request waited for the client to read

    async def writable(self) -> asyncio.Transport:
        """The transport, once it takes more (flow control); raises when the client left."""
        if self.paused_writing and self.transport is not None:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the client has gone")
        return transport

    def pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused_reading and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()

    # -- httptools' callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second message in one feed: only after a chunked body
            raise _Pipelined

    # no on_url, no on_header: llhttp checks the head, and _parse reads it afterwards
    # in one pass (a Python call per header costs more than splitting the text)

    def on_headers_complete(self) -> None:
        # llhttp forgets it once the message is complete, within the same feed
        self._keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        self._complete = True
        if self._body is not None:
            self._body.finish()

    # -- requests -------------------------------------------------------------------------

    def _next_request(self) -> None:
        """Start on the request at the head of the buffer, if its head has arrived."""
        buffer = self.buffer
        # while the client does not read its answers, its next requests wait (and reading
        # pauses once they fill MAX_PIPELINED): answers never pile up in memory
        if not buffer or self.transport is None or self.paused_writing:
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HEAD:
            if len(buffer) > MAX_HEAD:
                self._hand_off()
            else:  # a head in pieces has until the header deadline, whatever else is left
                self.deadline = min(self.deadline, self._loop.time() + self.guard.header_timeout)
            return
        try:
            request = self._parse(bytes(buffer[:end + 4]))
        except _Handoff:
            self._hand_off()
            return
        del buffer[:end + 4]
        self._request = request
        self.deadline = float("inf")  # the request's own timeouts apply from here
        if self._body is not None and buffer:
            rest = bytes(buffer)
            buffer.clear()
            self._feed_body(rest)
        self.task = self._loop.create_task(self._serve(request))

    def _parse(self, head: bytes) -> FastRequest:
        """The request whose head is ``head``; raises :class:`_Handoff` for aiohttp's."""
        line = head[:head.find(b"\r\n")]
        parts = line.split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[1][:1] != b"/":
            raise _Handoff
        target = parts[1]
        first = target[1:].split(b"/", 1)[0].split(b"?", 1)[0]
        if b"%" in first or first.lower() in self.server.handoff_segments:
            raise _Handoff
        self._complete = False
        self._body = None
        self._remaining = None
        try:
            self.parser.feed_data(head)
        except httptools.HttpParserError:
            raise _Handoff from None  # aiohttp refuses it, with the guard's 400
        except httptools.HttpParserUpgrade:  # not an HttpParserError: llhttp stopped at
            raise _Handoff from None  # an upgrade or CONNECT, aiohttp's to decide on
        length: int | None = None
        chunked = False
        names: list[tuple[str, str]] = []
        # llhttp accepted the head (strict: no obs-fold, no bare LF, names are tokens), so
        # each line between the request line and the blank one is `name:OWS value OWS`
        # (read here in one pass: a Python call per field from llhttp costs more)
        fields = head.decode("utf-8", "surrogateescape").split("\r\n")[1:-2]
        if len(fields) > MAX_HEADERS:
            raise _Handoff
        seen: set[str] = set()
        for field in fields:
            key, _, text = field.partition(":")
            text = text.strip(" \t")
            folded = key.lower()
            if folded in _SINGLETONS:
                if folded in seen:  # aiohttp refuses a second one: which one counts?
                    raise _Handoff
                seen.add(folded)
                if folded == "content-length":
                    length = int(text)  # llhttp has checked it is one number
                elif folded == "transfer-encoding":
                    if text.lower() != "chunked":
                        raise _Handoff
                    chunked = True
            elif folded in _HANDOFF_HEADERS:
                raise _Handoff
            names.append((key, text))
        if "host" not in seen:  # HTTP/1.1 requires it: aiohttp refuses the request
            raise _Handoff
        headers = CIMultiDictProxy(CIMultiDict(names))
        body: _Body | None = None
        if chunked or (length is not None and length > 0):
            body = self._body = _Body(self)
            self._remaining = None if chunked else length
            if self._complete:  # cannot be, with a body still to come; be safe
                body.finish()
        try:
            method = parts[0].decode("ascii")
            raw_path = target.decode("ascii")
        except UnicodeDecodeError:
            raise _Handoff from None
        closing = self.closing or not self._keep_alive
        return FastRequest(self, method, raw_path, headers, length, body, closing)

    def _feed_body(self, data: bytes) -> None:
        body = self._body
        assert body is not None
        remaining = self._remaining
        if remaining is not None:
            if len(data) > remaining:  # the next (pipelined) request's bytes follow
                self.buffer += data[remaining:]
                data = data[:remaining]
            self._remaining = remaining - len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__cause__ or exc.__context__, _Pipelined):
                # what follows a chunked body in the same read is not framed for us:
                # answer this request, then close (a client retries what went unanswered)
                self.closing = True
                return
            self.closing = True
            body.fail(ConnectionResetError("the request body is not well-formed"))
            request = self._request
            if self.transport is not None and request is not None:
                self.guard.malformed_body(self.transport, self.remote, not request.started)
                request.started = True  # what the pipeline says next is not sent

    async def _serve(self, request: FastRequest) -> None:
        try:
            await self._pipeline().handle_direct(request)
        except asyncio.CancelledError:
            pass  # the client left (recorded by the pipeline), or the server stopped
        except Exception:  # the pipeline answers its own failures; this is a last resort
            log.exception("unexpected error serving a request")
            request.closing = True
        finally:
            self._done(request)

    def _done(self, request: FastRequest) -> None:
        self.task = None
        self._request = None
        body = self._body
        self._body = None
        transport = self.transport
        if transport is None:
            return
        if body is not None and not body.done and request.started:
            self._linger()
            return
        if request.closing or self.closing or not request.started:
            transport.close()
            return
        self.deadline = self._loop.time() + self.server.keepalive_timeout
        self.resume_reading()
        if self.buffer:
            self._next_request()

    def _linger(self) -> None:
        """Read and drop the rest of the answered request's body, then close (its answer
        said ``Connection: close``)."""
        self.closing = True
        self._body = _Dropped(self)
        self.buffer.clear()
        self.deadline = self._loop.time() + LINGER
        self.resume_reading()

    # -- hand-off and shutdown ------------------------------------------------------------

    def _hand_off(self) -> None:
        """From now on this connection is aiohttp's, with what was received so far."""
        transport = self.transport
        if transport is None:
            return
        data = bytes(self.buffer)
        self.buffer.clear()
        self.server.forget(self)
        counted, self.counted = self.counted, False
        self.transport = None
        if self.paused_reading:
            transport.resume_reading()
        # the head's deadline goes with it: total, however the head is split
        deadline = min(self.deadline, self._loop.time() + self.guard.header_timeout)
        handler = self.server.aiohttp_protocol(counted, deadline)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)

    def close(self) -> None:
        """Stop after the request in flight (the server is stopping)."""
        self.closing = True
        if self.task is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Let the request in flight finish within ``timeout`` seconds, then close."""
        self.closing = True
        task = self.task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        if self.transport is not None:
            self.transport.close()

    def sweep(self, now: float) -> None:
        """Close the connection when it sat idle, or half-sent a head, past its deadline."""
        if self.task is None and now >= self.deadline and self.transport is not None:
            self.transport.close()

