"""The upstream client: pooled keep-alive HTTP/1.1 connections that stream both ways.

Every allowed request crosses this module, so it is built for that one job and no
more: no cookies, redirects, proxies, decompression or tracing. Responses are parsed
by httptools (llhttp, the parser under uvicorn and the one vendored in aiohttp's C
parser). Measured with callgrind, a loop of keep-alive GETs costs ~310k instructions a
request through aiohttp's ``ClientSession`` and ~32k through this client, the whole
bare proxy ~520k (README, Performance).

- A connection carries one exchange at a time and returns to its origin's pool only
  when the response was read to its end, the request body was sent whole and both
  sides keep the connection alive; otherwise it is closed.
- ``limit`` bounds the open connections of the pool; a request waits for one within
  the connect timeout, which covers the wait, the TCP connect and the TLS handshake.
- The read timeout is a silence timeout: it fires when the upstream sends nothing for
  that long while we wait for it (never while we stopped reading for a slow client, nor
  while we wait for the client's next chunk of a request body).
- The request body is sent while the response is awaited, so an upstream that answers
  before reading the whole body is heard.
- Interim (1xx) responses are skipped (16 at most); an upgrade is a protocol error.
- Nothing is retried, except what aiohttp's client retried too: an idempotent request
  without a body whose connection closed before any byte of the answer (a pooled
  connection the upstream closed as we sent; RFC 9112 section 9.3.1), once.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterable
from typing import Any
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024  # bytes of response body buffered before reading pauses
_LOW_WATER = 64 * 1024
_MAX_HEAD = 64 * 1024  # bytes of status line and headers accepted from an upstream
_MAX_INTERIM = 16  # 1xx responses accepted before the final one
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})


class UpstreamError(Exception):
    """The exchange with the upstream failed; the message says how (no secrets in it)."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made within the connect timeout."""


class UpstreamTimeout(UpstreamError):
    """The upstream was silent for the read timeout."""


class UpstreamBroken(UpstreamError):
    """The upstream closed the connection early or sent something that is not HTTP."""


class UpstreamDisconnected(UpstreamBroken):
    """The connection closed before any byte of the answer: the request may be sent again
    when that cannot do harm (a pooled connection the upstream had just closed)."""


class Origin:
    """Where connections go: ``scheme://host:port``, with TLS for https."""

    __slots__ = ("host", "key", "port", "ssl")

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl_context if parts.scheme == "https" else None
        self.key = f"{parts.scheme}://{parts.netloc}"


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the exchange in flight on it."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        # the exchange
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.head_only = False
        self.head_bytes = 0  # bytes received while no final head was complete
        self.head_size = 0  # bytes of the current message's status line and headers
        self.answered = False  # the final response of this exchange has begun
        self.interim = 0  # 1xx responses of this exchange
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.framed = False
        self.keep_alive = False
        self.timeout = 0.0
        self.heard = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.body_sent = True
        self.awaiting_body = False  # the sender waits for the client's next chunk
        self.sender: asyncio.Task[None] | None = None
        # writing
        self.can_write = True
        self.drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        if self.response is None:
            if self.head is None:  # nothing asked: an idle connection must stay silent
                self._fail(UpstreamBroken("The upstream sent data nobody asked for."))
                return
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError) else
                       UpstreamBroken("The upstream sent a malformed response."))
            return
        if self.response is None and self.head_bytes > _MAX_HEAD:
            self._fail(UpstreamBroken("The upstream sent too large a header."))

    def eof_received(self) -> bool | None:
        self.closed = True  # not to be taken from the pool in the meantime
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        response = self.response
        if response is not None and not response.complete and not self.framed \
                and not self.head_only:
            response._finish()  # a body delimited by the connection's close (RFC 9112 6.3)
        elif self.head is not None and self.head_bytes == 0:
            self._fail(UpstreamDisconnected("The upstream closed the connection early."))
        else:
            self._fail(UpstreamBroken("The upstream closed the connection early."))
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(UpstreamBroken("The upstream closed the connection."))
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.answered:  # a second answer to one request: the stream is out of step
            raise UpstreamBroken("The upstream sent data nobody asked for.")
        self.head_size = 0
        self.headers = []
        self.content_length = None
        self.framed = False
        self.reason = ""

    def on_status(self, status: bytes) -> None:
        self.head_size += len(status)
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            return  # a trailer field, after the body: not relayed (the head has gone)
        # a head that arrived whole in one read is bounded here (data_received bounds
        # one still arriving)
        self.head_size += len(name) + len(value) + 4
        if self.head_size > _MAX_HEAD:
            raise UpstreamBroken("The upstream sent too large a header.")
        key = name.decode("latin-1")
        text = value.decode("utf-8", "surrogateescape")
        self.headers.append((key, text))
        if len(key) == 14 and key.lower() == "content-length":
            try:
                self.content_length = int(text)
            except ValueError:
                raise UpstreamBroken("The upstream sent an invalid Content-Length.") from None
            self.framed = True
        elif len(key) == 17 and key.lower() == "transfer-encoding":
            # chunked frames the body only as the final coding; any other final coding
            # leaves it delimited by the connection's close (RFC 9112 6.3)
            final = text.rsplit(",", 1)[-1].strip().lower()
            self.framed = self.content_length is not None or final == "chunked"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamBroken("The upstream switched protocols, which is not relayed.")
            return  # interim: its message completes next, and the final one follows
        self.answered = True
        self.keep_alive = self.parser.should_keep_alive()
        response = self.response = UpstreamResponse(self, status, self.reason, self.headers,
                                                    self.content_length)
        if self.head_only or status in (204, 304):
            if self.head_only:  # llhttp cannot be told the answer is to HEAD
                # (before _finish: its _done resets head_only, and may reuse the connection)
                self.parser = httptools.HttpResponseParser(self)
            response._finish()
        head = self.head
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:  # an interim response ended
            self.head_bytes = 0
            self.interim += 1
            if self.interim > _MAX_INTERIM:  # each one is activity: bounded, or endless
                raise UpstreamBroken("The upstream sent too many interim (1xx) responses.")
            return
        if not response.complete:
            response._finish()

    # -- the exchange ----------------------------------------------------------------------

    def _fail(self, exc: UpstreamError) -> None:
        """End the exchange with ``exc`` and close the connection."""
        head = self.head
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self.response is not None and not self.response.complete:
            self.response._fail(exc)
        self._stop_timer()
        self._close()

    def _expire(self) -> None:
        self.timer = None
        if self.response is not None and self.response.complete:
            return  # the upstream said all; a client slow to read it is not its silence
        if self.response is not None and self.response.paused:
            return  # we stopped reading; resume_reading arms the timer again
        if self.awaiting_body:
            return  # we wait for the client's body, not the upstream; _send arms it again
        due = self.heard + self.timeout
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._expire)
            return
        self._fail(UpstreamTimeout(f"The upstream was silent for {self.timeout:g} seconds."))

    def _arm(self) -> None:
        if self.timer is None and not self.closed and self.timeout > 0:  # 0: no timeout
            self.heard = self.loop.time()
            self.timer = self.loop.call_at(self.heard + self.timeout, self._expire)

    def _waited_for_client(self) -> None:
        """The sender got the client's next chunk (or its end): the upstream's silence is
        measured from now, as the time spent waiting for the client was not its."""
        self.awaiting_body = False
        self.heard = self.loop.time()
        self._arm()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def exchange(self, head: bytes, body: AsyncIterable[bytes] | None,
                       length: int | None, head_only: bool, read_timeout: float
                       ) -> UpstreamResponse:
        """Send ``head`` and ``body`` (chunked when ``length`` is None) and wait for the
        response's head."""
        future: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self.head = future
        self.response = None
        self.head_only = head_only
        self.head_bytes = 0
        self.answered = False
        self.interim = 0
        self.timeout = read_timeout
        transport = self.transport
        assert transport is not None
        transport.write(head)
        self._arm()
        self.body_sent = body is None
        if body is not None:
            self.sender = self.loop.create_task(self._send(body, length))
        try:
            return await future
        except BaseException:
            if self.head is future:  # else the connection already serves another exchange
                self._abandon()
            raise
        finally:
            if self.head is future:
                self.head = None

    async def _send(self, body: AsyncIterable[bytes], length: int | None) -> None:
        transport = self.transport
        assert transport is not None
        chunked = length is None
        left = length or 0  # bytes the Content-Length still announces
        try:
            self.awaiting_body = True
            async for chunk in body:
                self._waited_for_client()
                if self.closed:
                    return
                if chunked:
                    if chunk:
                        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    # bytes past the Content-Length would be read as a request of their
                    # own by the upstream (smuggled): never sent
                    left -= len(chunk)
                    if left < 0:
                        raise ValueError("The request body is longer than its Content-Length.")
                    transport.write(chunk)
                if not self.can_write:
                    self.drained = self.loop.create_future()
                    await self.drained
                self.awaiting_body = True
            self._waited_for_client()
            if left:  # the upstream would take the next request's bytes for the rest
                raise ValueError("The request body is shorter than its Content-Length.")
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
            self.body_sent = True
        except UpstreamError:
            return  # the connection is gone; the exchange reports it
        except Exception as exc:  # the client's body failed: nothing more can be sent
            self._fail(_BodyFailed(exc))
        finally:
            self.awaiting_body = False

    def _abandon(self) -> None:
        """The caller gave up on the exchange: this connection is unusable."""
        self._fail(UpstreamBroken("The exchange was abandoned."))

    def _done(self) -> None:
        """The response was read to its end: reuse the connection if everything allows
        (the request body sent whole, and keep-alive on both sides)."""
        self._stop_timer()
        self.head_only = False
        if self.closed:
            return
        if self.body_sent and self.keep_alive:
            self.pool._release(self)
        else:
            self._close()

    def _close(self) -> None:
        self.closed = True
        sender = self.sender
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()
        transport = self.transport
        if transport is None:
            return
        if not self.body_sent or transport.get_write_buffer_size():
            # unsent request bytes: close() would wait for the upstream to read them, and
            # the connection would stay open (and counted against the limit) until it did
            transport.abort()
        elif not transport.is_closing():
            transport.close()


class _BodyFailed(UpstreamError):
    """Reading the client's body failed; ``__cause__`` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("The request body could not be read.")
        self.__cause__ = cause


class UpstreamResponse:
    """The upstream's status and headers; the body is read with :meth:`read`."""

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "complete",
                 "content_length", "headers", "paused", "reason", "released", "status")

    def __init__(self, conn: _Connection, status: int, reason: str,
                 headers: list[tuple[str, str]], content_length: int | None) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self.complete = False
        self.released = False
        self.paused = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > _HIGH_WATER and not self.paused:
            self.paused = True
            transport = self._conn.transport
            if transport is not None:
                transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()
        if not self._chunks:
            self._conn._done()

    def _fail(self, exc: UpstreamError) -> None:
        self._error = exc
        self._wake()

    async def read(self) -> bytes:
        """The next part of the body (everything buffered so far); ``b""`` at its end."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._size = 0
                if self.paused:
                    self.paused = False
                    conn = self._conn
                    if conn.transport is not None and not conn.closed:
                        conn.transport.resume_reading()
                        if not self.complete:
                            # the upstream's silence counts from now (a timer still
                            # pending would count our pause as its silence)
                            conn.heard = conn.loop.time()
                            conn._arm()
                if self.complete:
                    self._conn._done()
                return data
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = waiter = self._conn.loop.create_future()
            await waiter

    def release(self) -> None:
        """Give the connection back (or close it, when the body was not read to its end)."""
        if self.released:
            return
        self.released = True
        if not (self.complete and not self._chunks):
            self._conn._abandon()


class UpstreamPool:
    """Keep-alive connections to any number of origins, ``limit`` open at most.

    As with aiohttp's client before it, 0 means none: no ``limit``, no
    ``connect_timeout``, and a ``read_timeout`` of 0 never fires."""

    def __init__(self, *, limit: int = 256, connect_timeout: float = 5.0,
                 idle_timeout: float = 15.0, ssl_context: ssl.SSLContext | None = None
                 ) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit if limit > 0 else sys.maxsize  # 0: no limit (as aiohttp's)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._ssl = ssl_context
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, deque[_Connection]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    def origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            if self._ssl is None and url.startswith("https:"):
                self._ssl = ssl.create_default_context()
            origin = self._origins[url] = Origin(url, self._ssl)
        return origin

    async def request(self, method: str, origin: Origin, target: str,
                      headers: list[tuple[str, str]], *, read_timeout: float,
                      body: AsyncIterable[bytes] | None = None,
                      content_length: int | None = None) -> UpstreamResponse:
        """Send ``method target`` with ``headers`` (``Host`` included, ``Content-Length``
        and ``Transfer-Encoding`` not) and wait for the response's head. A ``body``
        without ``content_length`` is sent chunked; one with it must yield exactly that
        many bytes, else the request fails (the upstream would take the difference from,
        or as, another request). Raises :class:`UpstreamError`."""
        if content_length is not None:
            headers.append(("Content-Length", str(content_length)))
        elif body is not None:
            headers.append(("Transfer-Encoding", "chunked"))
        elif method not in _NO_BODY_METHODS:  # RFC 9110 8.6: a POST says it has none
            headers.append(("Content-Length", "0"))
        text = f"{method} {target} HTTP/1.1\r\n" + "".join(
            [f"{k}: {v}\r\n" for k, v in headers]) + "\r\n"
        lines = len(headers) + 2
        if text.count("\n") != lines or text.count("\r") != lines:
            raise UpstreamError("A header meant for the upstream holds a line break.")
        head = text.encode("utf-8", "surrogateescape")
        conn = self._reuse(origin) or await self._connect(origin)
        try:
            return await conn.exchange(head, body, content_length, method == "HEAD", read_timeout)
        except UpstreamDisconnected:
            # a keep-alive connection the upstream closed as we sent: once more, on a
            # fresh one, when the request is idempotent and has no body (RFC 9112 9.3.1)
            if body is not None or method not in _IDEMPOTENT_METHODS:
                raise
        conn = self._reuse(origin) or await self._connect(origin)
        return await conn.exchange(head, body, content_length, method == "HEAD", read_timeout)

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            # a transport already closing (reset by the upstream) before its
            # connection_lost ran: a request sent there would be lost
            if not conn.closed and conn.transport is not None \
                    and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                while self._open >= self.limit:
                    if not self._close_an_idle():
                        waiter = self.loop.create_future()
                        self._waiters.append(waiter)
                        try:
                            await waiter
                        except BaseException:
                            if waiter in self._waiters:
                                self._waiters.remove(waiter)
                            elif waiter.done() and not waiter.cancelled():
                                self._wake_one()  # woken, but leaving: pass the turn on
                            raise
                        conn = self._reuse(origin)
                        if conn is not None:
                            return conn
                self._open += 1
                made: list[_Connection] = []

                def factory() -> _Connection:
                    made.append(_Connection(self, origin))
                    return made[0]

                try:
                    _, conn = await self.loop.create_connection(
                        factory, origin.host, origin.port,
                        ssl=origin.ssl, server_hostname=origin.host if origin.ssl else None)
                except BaseException:
                    # uncounted here, once: a connection already made is detached, as
                    # its connection_lost may come later, or never (uvloop, when the
                    # connect is cancelled after connection_made)
                    if made:
                        made[0].pool = _DETACHED
                        made[0]._close()
                    self._open -= 1
                    self._wake_one()
                    raise
                return conn
        except TimeoutError:
            raise UpstreamUnreachable(
                f"No connection to the upstream within {self.connect_timeout:g} seconds."
            ) from None
        except OSError as exc:
            raise UpstreamUnreachable(
                f"The upstream could not be reached: {exc.strerror or type(exc).__name__}."
            ) from None

    def _close_an_idle(self) -> bool:
        """Close the longest-idle connection of any origin to make room; False if none."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.origin.key].popleft()
        oldest._close()
        self._open -= 1
        oldest.pool = _DETACHED
        return True

    def _release(self, conn: _Connection) -> None:
        if conn.closed or self._closing:
            conn._close()
            return
        conn.response = None
        conn.sender = None
        conn.idle_since = self.loop.time()
        idle = self._idle.get(conn.origin.key)
        if idle is None:
            idle = self._idle[conn.origin.key] = deque()
        idle.append(conn)
        if self._waiters:
            self._wake_one()
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        """``conn`` closed: it no longer counts against the limit."""
        self._open -= 1
        idle = self._idle.get(conn.origin.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        expired = self.loop.time() - self.idle_timeout
        left = False
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= expired:
                idle.popleft()._close()
            left = left or bool(idle)
        if left:
            self._sweeper = self.loop.call_later(self.idle_timeout, self._sweep)

    @property
    def open_connections(self) -> int:
        return self._open

    async def close(self) -> None:
        """Close the idle connections; those in use close when their exchange ends."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for idle in self._idle.values():
            while idle:
                idle.popleft()._close()
        await asyncio.sleep(0)  # let the transports report their close


class _Detached:
    """The pool of a connection closed to make room: already uncounted."""

    def _forget(self, conn: Any) -> None:
        pass

    def _release(self, conn: Any) -> None:
        conn._close()


_DETACHED: Any = _Detached()
