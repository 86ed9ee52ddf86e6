"""One TCP (or TLS) connection to an upstream, from its connect to its close.

A connection owns its transport and the response parser of its byte stream, and points
at the exchange it currently carries, if any. What it hears goes to that exchange: the
bytes, each answer's head once parsed, the body, the end of the stream, the transport's
flow control. With no exchange current, bytes from the upstream are unsolicited and the
connection is closed. What belongs to one request (where its answer stands, its timer,
its waiters, the body being sent) lives in its
:class:`~gateway.forward.upstream.exchange.Exchange`, made fresh for each request, so
that nothing of one exchange is left over for the next; the connection keeps only the
message its parser is reading, reset as each message begins.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httptools

from gateway.forward.upstream.errors import UpstreamBroken

if TYPE_CHECKING:
    from gateway.forward.upstream.exchange import Exchange
    from gateway.forward.upstream.pool import UpstreamPool

MAX_HEAD = 64 * 1024  # bytes of status line and headers accepted from an upstream
UNSOLICITED = "The upstream sent data nobody asked for."


class ConnState(enum.Enum):
    """Where a connection is in its life: NEW → ACTIVE ⇄ IDLE, and CLOSED from any."""

    NEW = "new"  # connecting, or connected and not used yet
    ACTIVE = "active"  # carrying an exchange
    IDLE = "idle"  # in its origin's pool, for the next exchange
    CLOSED = "closed"  # closing or closed, by either side: never used again


# The members as module constants: ``ConnState.X`` is looked up through the enum's
# metaclass, many times slower than a global, and these are compared on every request.
NEW, ACTIVE, IDLE, CLOSED = ConnState.NEW, ConnState.ACTIVE, ConnState.IDLE, ConnState.CLOSED


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

    def __repr__(self) -> str:
        return f"Origin({self.key!r})"


class Connection(asyncio.Protocol):
    """One connection to ``origin``; ``exchange`` is the exchange it carries, if any.

    ``pool`` is told when the connection closes (``_forget``) and when an exchange leaves
    it reusable (``_release``)."""

    __slots__ = ("can_write", "content_length", "exchange", "framed", "head_size", "headers",
                 "idle_since", "loop", "origin", "parser", "pool", "reason", "state",
                 "transport")

    def __init__(self, pool: UpstreamPool, origin: Origin, loop: asyncio.AbstractEventLoop
                 ) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = NEW
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.can_write = True
        # the message being read (its head goes to the exchange once complete)
        self.head_size = 0  # bytes of its status line and headers
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.framed = False  # the body has a length or chunks (else: ends at the close)

    def __repr__(self) -> str:
        return f"<Connection {self.origin.key} {self.state.value}>"

    def new_parser(self) -> None:
        """Parse the stream afresh from its next byte. llhttp cannot be told that an answer
        was to HEAD, and would take the next answer's bytes for the body it announced."""
        self.parser = httptools.HttpResponseParser(self)

    def close(self, *, abort: bool = False) -> None:
        """Close the transport; ``abort`` drops what is still unsent."""
        self.state = CLOSED
        transport = self.transport
        if transport is None:
            return
        if abort or transport.get_write_buffer_size():
            # unsent bytes: close() would wait for the upstream to read them, and the
            # connection would stay open (and counted against the limit) until it did
            transport.abort()
        elif not transport.is_closing():
            transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # nothing asked: an idle connection must stay silent
            self.close()
            return
        exchange.feed(data)

    def eof_received(self) -> bool | None:
        self.state = CLOSED  # not to be taken from the pool in the meantime
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.lost()
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        exchange = self.exchange
        if exchange is not None:
            exchange.writable()

    # -- httptools callbacks ---------------------------------------------------------------
    # The parser is the connection's, bound to it once (making one for each request would
    # put a costly allocation on the hot path), and so are its callbacks: they collect the
    # message being read, reset as each begins, and hand its head to the exchange current
    # then. With none current, an answer is unsolicited (after an answer
    # complete with its head, the connection may be back in the pool before the rest of
    # the same read is parsed).

    def on_message_begin(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.answered:  # (or a second answer to one request)
            raise UpstreamBroken(UNSOLICITED)
        self.head_size = 0
        self.headers = []
        self.content_length = None
        self.framed = False
        self.reason = ""

    def on_status(self, status: bytes) -> None:
        self.head_size += len(status)
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        if exchange is None or exchange.answered:
            return  # a trailer field, after the body: not relayed (the head has gone)
        # a head that arrived whole in one read is bounded here (the exchange bounds one
        # still arriving)
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
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
        exchange = self.exchange
        if exchange is not None:
            parser = self.parser
            exchange.on_head(parser.get_status_code(), self.reason, self.headers,
                             self.content_length, self.framed, parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # the body an answer to HEAD announced, read by the parser it had (replaced for
            # the next answer) from the rest of the same read: dropped
            return
        response = exchange.response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.on_message_complete()
