"""The pool: keep-alive connections per origin, a bound on how many are open, and the
requests waiting for one.

A request takes the origin's most recently used idle connection, else opens one when
fewer than ``limit`` are open (closing the longest-idle connection of another origin to
make room, if need be), else waits its turn. The connect timeout covers the wait, the
TCP connect and the TLS handshake. Idle connections are closed after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterable
from typing import Any

from gateway.forward.upstream.connection import CLOSED, IDLE, Connection, Origin
from gateway.forward.upstream.errors import (
    UpstreamDisconnected,
    UpstreamError,
    UpstreamUnreachable,
)
from gateway.forward.upstream.exchange import Exchange
from gateway.forward.upstream.response import UpstreamResponse

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})


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
        self._idle: dict[str, deque[Connection]] = {}  # per origin, most recent last
        self._open = 0  # connections counted against the limit, connecting ones included
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    def __repr__(self) -> str:
        idle = {key: len(conns) for key, conns in self._idle.items() if conns}
        idle_count = sum(idle.values())
        per_origin = " (" + ", ".join(f"{key}={n}" for key, n in idle.items()) + ")" if idle else ""
        limit = "no limit" if self.limit == sys.maxsize else f"limit {self.limit}"
        return (f"<UpstreamPool {self._open} open, {limit}: {self._open - idle_count} in use,"
                f" {idle_count} idle{per_origin}, {len(self._waiters)} waiting"
                f"{', closing' if self._closing else ''}>")

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
        elif method not in NO_BODY_METHODS:  # RFC 9110 8.6: a POST says it has none
            headers.append(("Content-Length", "0"))
        text = f"{method} {target} HTTP/1.1\r\n" + "".join(
            [f"{k}: {v}\r\n" for k, v in headers]) + "\r\n"
        lines = len(headers) + 2
        if text.count("\n") != lines or text.count("\r") != lines:
            raise UpstreamError("A header meant for the upstream holds a line break.")
        head = text.encode("utf-8", "surrogateescape")
        head_only = method == "HEAD"
        conn = self._reuse(origin) or await self._connect(origin)
        try:
            return await Exchange(conn, head_only, read_timeout).run(head, body, content_length)
        except UpstreamDisconnected:
            # a keep-alive connection the upstream closed as we sent: once more, on a
            # fresh one, when the request is idempotent and has no body (RFC 9112 9.3.1)
            if body is not None or method not in IDEMPOTENT_METHODS:
                raise
        conn = self._reuse(origin) or await self._connect(origin)
        return await Exchange(conn, head_only, read_timeout).run(head, body, content_length)

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
                idle.popleft().close()
        await asyncio.sleep(0)  # let the transports report their close

    # -- taking a connection ---------------------------------------------------------------

    def _reuse(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            # a transport already closing (reset by the upstream) before its
            # connection_lost ran: a request sent there would be lost
            if conn.state is IDLE and conn.transport is not None \
                    and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, origin: Origin) -> Connection:
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
                made: list[Connection] = []

                def factory() -> Connection:
                    made.append(Connection(self, origin, self.loop))
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
                        made[0].close()
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
        oldest: Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.origin.key].popleft()
        oldest.close()
        self._open -= 1
        oldest.pool = _DETACHED
        return True

    # -- what connections report -----------------------------------------------------------

    def _release(self, conn: Connection) -> None:
        """``conn``'s exchange ended and left it reusable: idle until the next one."""
        conn.exchange = None
        if conn.state is CLOSED or self._closing:
            conn.close()
            return
        conn.state = IDLE
        conn.idle_since = self.loop.time()
        idle = self._idle.get(conn.origin.key)
        if idle is None:
            idle = self._idle[conn.origin.key] = deque()
        idle.append(conn)
        if self._waiters:
            self._wake_one()
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout, self._sweep)

    def _forget(self, conn: Connection) -> None:
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
                idle.popleft().close()
            left = left or bool(idle)
        if left:
            self._sweeper = self.loop.call_later(self.idle_timeout, self._sweep)


class _Detached:
    """The pool of a connection already uncounted (closed to make room, or made by a
    connect that failed): what it reports changes no count."""

    def _forget(self, conn: Any) -> None:
        pass

    def _release(self, conn: Any) -> None:
        conn.exchange = None
        conn.close()


_DETACHED: Any = _Detached()
