"""The upstream's answer as the forwarder sees it: status, headers, and a streamed body.

The body is buffered between the connection and the reader with flow control: past
``HIGH_WATER`` bytes not yet read, the connection stops reading from the upstream, and it
reads again once the reader has taken what was buffered.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.forward.upstream.errors import UpstreamError

if TYPE_CHECKING:
    from gateway.forward.upstream.exchange import Exchange

HIGH_WATER = 256 * 1024  # bytes of response body buffered before reading pauses


class UpstreamResponse:
    """The upstream's status and headers; the body is read with :meth:`read`, and the
    response is given back with :meth:`release` once the caller is done with it."""

    __slots__ = ("_chunks", "_error", "_exchange", "_size", "_waiter", "complete",
                 "content_length", "headers", "paused", "reason", "released", "status")

    def __init__(self, exchange: Exchange, status: int, reason: str,
                 headers: list[tuple[str, str]], content_length: int | None) -> None:
        self._exchange = exchange
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self.complete = False  # the body has arrived whole (it may not be read yet)
        self.released = False
        self.paused = False  # the connection stopped reading until this buffer is read
        self._chunks: list[bytes] = []
        self._size = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the exchange ---------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > HIGH_WATER and not self.paused:
            self.paused = True
            self._exchange.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()
        if not self._chunks:
            self._exchange.done()

    def _fail(self, exc: UpstreamError) -> None:
        if self._error is None:  # the first failure is the cause; the close it makes is not
            self._error = exc
        self._wake()

    # -- the reader's side -----------------------------------------------------------------

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self.paused:
            self.paused = False
            self._exchange.resume_reading()
        if self.complete:
            self._exchange.done()
        return data

    def read_nowait(self) -> bytes:
        """What of the body is buffered now, without waiting (``b""`` when nothing is,
        which is not the body's end: :meth:`read` says that). Lets a small answer that
        arrived with its head leave in one write."""
        return self._take() if self._chunks else b""

    async def read(self) -> bytes:
        """The next part of the body (everything buffered so far); ``b""`` at its end."""
        while True:
            if self._chunks:
                return self._take()
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = waiter = self._exchange.loop.create_future()
            await waiter

    def release(self) -> None:
        """Give the connection back (or close it, when the body was not read to its end)."""
        if self.released:
            return
        self.released = True
        if not (self.complete and not self._chunks):
            self._exchange.abandon()
