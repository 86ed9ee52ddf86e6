"""One request and its response on one connection: an :class:`Exchange`.

An exchange is made for each request (each attempt, when one is sent again) and holds
everything that belongs to it alone: where its answer stands (interim answers, whether
the final head came, how it is framed, whether the connection may be kept), the future
its caller waits on for the head, the response it hands out, the read timer, the task
sending the request body and its waiter. Its connection points at it while it is
current; once the answer was read to its end the connection is given back without it,
or closed. Nothing is reset for the next request: the next request has an exchange of
its own.

An exchange that is no longer current can still be called: by its response (read to its
end, released late), by its timer or its body sender. Those calls change nothing on the
connection, which may carry another exchange by then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable

import httptools

from gateway.forward.upstream.connection import ACTIVE, CLOSED, MAX_HEAD, Connection
from gateway.forward.upstream.errors import (
    BodyFailed,
    UpstreamBroken,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.forward.upstream.response import UpstreamResponse

MAX_INTERIM = 16  # 1xx responses accepted before the final one


class Exchange:
    """One request sent on ``conn`` and the answer to it, read with a silence timeout of
    ``timeout`` seconds (0: none). Made current on ``conn`` as it is created."""

    __slots__ = ("answered", "awaiting_body", "body_sent", "conn", "drained", "framed", "head",
                 "head_bytes", "head_only", "heard", "interim", "keep_alive", "loop",
                 "response", "sender", "timeout", "timer")

    def __init__(self, conn: Connection, head_only: bool, timeout: float) -> None:
        self.conn = conn
        self.loop = loop = conn.loop
        self.head_only = head_only  # an answer to HEAD: no body, whatever it announces
        self.timeout = timeout
        # the caller waits on this for the response's head; None once settled
        self.head: asyncio.Future[UpstreamResponse] | None = loop.create_future()
        self.response: UpstreamResponse | None = None  # until the answer was read whole
        # the answer so far
        self.answered = False  # its final (non-1xx) head has come
        self.head_bytes = 0  # bytes received while no final head was complete
        self.interim = 0  # 1xx responses before it
        self.framed = False  # its body has a length or chunks (else: ends at the close)
        self.keep_alive = False
        # the silence timer
        self.heard = 0.0
        self.timer: asyncio.TimerHandle | None = None
        # the request body
        self.body_sent = True
        self.awaiting_body = False  # the sender waits for the client's next chunk
        self.sender: asyncio.Task[None] | None = None
        self.drained: asyncio.Future[None] | None = None
        conn.exchange = self
        if conn.state is not CLOSED:  # (closed by the upstream in the meantime: it stays so)
            conn.state = ACTIVE

    def __repr__(self) -> str:
        current = "current" if self.conn.exchange is self else "over"
        return f"<Exchange on {self.conn.origin.key} {current}>"

    async def run(self, head: bytes, body: AsyncIterable[bytes] | None, length: int | None
                  ) -> UpstreamResponse:
        """Send ``head`` and ``body`` (chunked when ``length`` is None) and wait for the
        response's head."""
        future = self.head
        assert future is not None
        conn = self.conn
        transport = conn.transport
        assert transport is not None
        if conn.state is CLOSED:
            # the upstream closed the connection before the request could start on it
            # (its close may even have been heard already): nothing was sent, so say so
            # now, as a disconnection the pool may retry, rather than after the timeout
            self.head = None
            future.cancel()
            if conn.exchange is self:
                conn.exchange = None
            conn.close()
            raise UpstreamDisconnected("The upstream closed the connection before the request.")
        transport.write(head)
        self._arm()
        if body is not None:
            self.body_sent = False
            self.sender = self.loop.create_task(self._send(body, length))
        try:
            return await future
        except BaseException:
            self.head = None
            if conn.exchange is self:
                self.abandon()
            raise

    # -- what the connection hears -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the upstream, while this exchange is current."""
        self.heard = self.loop.time()
        if not self.answered:
            self.head_bytes += len(data)
        try:
            self.conn.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # (this exchange may have ended in the same read, its connection back in the
            # pool: bytes past its answer are out of step, and the connection goes)
            cause = exc.__cause__ or exc.__context__
            self.fail(cause if isinstance(cause, UpstreamError) else
                      UpstreamBroken("The upstream sent a malformed response."))
            return
        if not self.answered and self.head_bytes > MAX_HEAD:
            self.fail(UpstreamBroken("The upstream sent too large a header."))

    def lost(self) -> None:
        """The connection closed, by either side."""
        self._stop_timer()
        response = self.response
        if response is not None and not response.complete and not self.framed \
                and not self.head_only:
            response._finish()  # a body delimited by the connection's close (RFC 9112 6.3)
        elif self.head is not None and self.head_bytes == 0:
            self.fail(UpstreamDisconnected("The upstream closed the connection early."))
        else:
            self.fail(UpstreamBroken("The upstream closed the connection early."))
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_exception(UpstreamBroken("The upstream closed the connection."))

    def writable(self) -> None:
        """The transport takes writes again."""
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- the answer, as the connection's parser reads it --------------------------------

    def on_head(self, status: int, reason: str, headers: list[tuple[str, str]],
                content_length: int | None, framed: bool, keep_alive: bool) -> None:
        """A head is complete: an interim one, or the answer's."""
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamBroken("The upstream switched protocols, which is not relayed.")
            return  # interim: its message completes next, and the final one follows
        self.answered = True
        self.framed = framed
        self.keep_alive = keep_alive
        response = self.response = UpstreamResponse(self, status, reason, headers,
                                                    content_length)
        head = self.head
        self.head = None
        if self.head_only or status in (204, 304):
            if self.head_only:
                self.conn.new_parser()
            response._finish()  # (which may give the connection back at once)
        if head is not None and not head.done():
            head.set_result(response)

    def on_message_complete(self) -> None:
        if not self.answered:  # an interim response ended
            self.head_bytes = 0
            self.interim += 1
            if self.interim > MAX_INTERIM:  # each one is activity: bounded, or endless
                raise UpstreamBroken("The upstream sent too many interim (1xx) responses.")
            return
        response = self.response
        if response is not None and not response.complete:
            response._finish()

    # -- the response's calls ------------------------------------------------------------

    def pause_reading(self) -> None:
        transport = self.conn.transport
        if transport is not None:
            transport.pause_reading()

    def resume_reading(self) -> None:
        conn = self.conn
        if conn.exchange is self and conn.state is not CLOSED and conn.transport is not None:
            conn.transport.resume_reading()
            response = self.response
            if response is not None and not response.complete:
                # the upstream's silence counts from now (a timer still pending would
                # count our pause as its silence)
                self.heard = self.loop.time()
                self._arm()

    def done(self) -> None:
        """The response was read to its end: give the connection back if everything
        allows (the request body sent whole, and keep-alive on both sides), else close it."""
        self._stop_timer()
        self.response = None  # (it points here: no cycle left for the collector)
        conn = self.conn
        if conn.exchange is not self or conn.state is CLOSED:
            return
        if self.body_sent and self.keep_alive:
            conn.pool._release(conn)
        else:
            self._close()

    def abandon(self) -> None:
        """The caller gave up on the exchange: its connection is unusable."""
        if self.conn.exchange is self:
            self.fail(UpstreamBroken("The exchange was abandoned."))

    # -- failing, and the silence timer --------------------------------------------------

    def fail(self, exc: UpstreamError) -> None:
        """End the exchange with ``exc`` and close the connection."""
        head = self.head
        if head is not None:
            self.head = None
            if not head.done():
                head.set_exception(exc)
        else:
            response = self.response
            if response is not None and not response.complete:
                response._fail(exc)
        self.response = None
        self._stop_timer()
        self._close()

    def _close(self) -> None:
        sender = self.sender
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()
        self.conn.close(abort=not self.body_sent)

    def _expire(self) -> None:
        self.timer = None
        if self.conn.exchange is not self:
            return
        response = self.response
        if response is not None and response.complete:
            return  # the upstream said all; a client slow to read it is not its silence
        if response is not None and response.paused:
            return  # we stopped reading; resume_reading arms the timer again
        if self.awaiting_body:
            return  # we wait for the client's body, not the upstream; _send arms it again
        due = self.heard + self.timeout
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._expire)
            return
        self.fail(UpstreamTimeout(f"The upstream was silent for {self.timeout:g} seconds."))

    def _arm(self) -> None:
        if self.timer is None and self.timeout > 0 and self.conn.state is not CLOSED:
            self.heard = self.loop.time()  # (0: no timeout)
            self.timer = self.loop.call_at(self.heard + self.timeout, self._expire)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- the request body ------------------------------------------------------------------

    def _waited_for_client(self) -> None:
        """The sender got the client's next chunk (or its end): the upstream's silence is
        measured from now, as the time spent waiting for the client was not its."""
        self.awaiting_body = False
        self.heard = self.loop.time()
        self._arm()

    async def _send(self, body: AsyncIterable[bytes], length: int | None) -> None:
        conn = self.conn
        transport = conn.transport
        assert transport is not None
        chunked = length is None
        left = length or 0  # bytes the Content-Length still announces
        try:
            self.awaiting_body = True
            async for chunk in body:
                self._waited_for_client()
                if conn.state is CLOSED:
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
                if not conn.can_write:
                    self.drained = self.loop.create_future()
                    await self.drained
                self.awaiting_body = True
            self._waited_for_client()
            if left:  # the upstream would take the next request's bytes for the rest
                raise ValueError("The request body is shorter than its Content-Length.")
            if chunked and conn.state is not CLOSED:
                transport.write(b"0\r\n\r\n")
            self.body_sent = True
        except UpstreamError:
            return  # the connection is gone; the exchange reports it
        except Exception as exc:  # the client's body failed: nothing more can be sent
            if conn.exchange is self:
                self.fail(BodyFailed(exc))
        finally:
            self.awaiting_body = False
