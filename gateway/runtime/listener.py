"""The proxy listener's connections, guarded at the protocol level.

- ``GATEWAY_MAX_CONNECTIONS``: past that many open client connections, a new one gets a
  canned 503 and is closed at once, before any parsing: refusing costs no task and no
  timer. ``gateway_connections_refused_total`` counts them, and one warning line per
  :data:`LOG_INTERVAL` says how many there were.
- ``GATEWAY_HEADER_TIMEOUT``: a new connection must complete its first request's headers
  within that many seconds of opening; a keep-alive connection, within that many seconds
  of the next request's first bytes. The deadline is total, however slowly the bytes
  trickle in (aiohttp's own keep-alive timer does the cutting, re-aimed: no timer of our
  own unless a request's head arrives in pieces).
- ``GATEWAY_KEEPALIVE_TIMEOUT``: an idle keep-alive connection is closed after that long.
- A malformed request gets a fixed 400 body and one info line naming a reason, never a
  header value (aiohttp's own error line quotes the raw bytes, tokens included), and is
  counted in ``gateway_bad_requests_total{reason}``.
- ``accept()`` failing for want of descriptors is one warning line per interval and
  ``gateway_accept_errors_total``, not a traceback per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import resource
from collections.abc import Callable
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.observe.accesslog import AccessLog
from gateway.observe.metrics import NO_ROUTE, GatewayMetrics
from gateway.pipeline.handler import ProxyPipeline
from gateway.runtime.app import PROXY_ROUTE
from gateway.runtime.fastpath import FastProtocol

log = logging.getLogger("gateway.listener")

#: seconds between two warning lines about the same kind of trouble
LOG_INTERVAL = 10.0
#: descriptors kept for everything but client connections (Redis, upstreams, logs, files)
_RESERVED_DESCRIPTORS = 128
_ACCEPT_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_REFUSED_BODY = json.dumps({
    "error": "temporarily_unavailable",
    "error_description": "The gateway has too many open connections; retry shortly."}).encode()
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
            + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY)
_BAD_REQUEST_BODY = json.dumps({
    "error": "invalid_request",
    "error_description": "The request is not well-formed HTTP/1.1."})

_MALFORMED_BODY_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BAD_REQUEST_BODY)).encode()
    + b"\r\n\r\n" + _BAD_REQUEST_BODY.encode())


class Throttled:
    """A warning logged at most once per interval, with how often it happened meanwhile."""

    def __init__(self, message: str, interval: float = LOG_INTERVAL) -> None:
        self.message = message  # %-format with one %d: the count
        self.interval = interval
        self.count = 0
        self._next = 0.0

    def note(self, now: float) -> None:
        self.count += 1
        if now >= self._next:
            log.warning(self.message, self.count)
            self.count = 0
            self._next = now + self.interval


def bad_request_reason(exc: BaseException | None) -> str:
    """The ``reason`` label of a parse failure: from its type and llhttp's description,
    never from the bytes it quotes."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return "too_large"
    if isinstance(exc, (http_exceptions.BadStatusLine, http_exceptions.InvalidURLError)):
        return "bad_request_line"
    if isinstance(exc, http_exceptions.InvalidHeader):
        return "bad_header"
    if isinstance(exc, (http_exceptions.TransferEncodingError,
                        http_exceptions.ContentLengthError)):
        return "bad_chunking"
    message = getattr(exc, "message", "")
    what = (message if isinstance(message, str) else "").split(":", 1)[0].lower()
    for words, reason in ((("too long", "too large", "too many"), "too_large"),
                          (("chunk",), "bad_chunking"),
                          (("header", "content-length", "transfer-encoding"), "bad_header"),
                          (("method", "url", "version", "status line", "request line"),
                           "bad_request_line")):
        if any(word in what for word in words):
            return reason
    return "other"


class ConnectionGuard:
    """What the proxy listener's connections share: the limits, the count, the metrics."""

    def __init__(self, *, header_timeout: float, max_connections: int,
                 metrics: GatewayMetrics, access_log: AccessLog | None = None) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.metrics = metrics
        self.access_log = access_log
        self.open = 0
        metrics.open_connections.set_function(lambda: self.open)
        self._refusals = Throttled(
            f"connection limit reached (GATEWAY_MAX_CONNECTIONS={max_connections}): "
            "%d new connections refused with 503")
        self._accept_failures = Throttled(
            "accept() failed for want of file descriptors or memory: %d times; the "
            "listener retries (raise the open-file limit, or lower GATEWAY_MAX_CONNECTIONS)")

    def refuse(self, transport: asyncio.Transport, now: float) -> None:
        self.metrics.connections_refused.inc()
        self._refusals.note(now)
        transport.write(_REFUSAL)
        transport.close()

    def _malformed(self, remote: str | None, status: int, reason: str) -> None:
        self.metrics.bad_requests.labels(reason).inc()
        # info, not error: a client's mistake, and no header value in it
        log.info("malformed request from %s refused with %d: %s", remote, status, reason)
        if self.access_log is not None:
            self.access_log.record("-", "-", NO_ROUTE, "unknown", status, "bad_request", 0.0,
                                   0.0, remote)

    def malformed_body(self, transport: asyncio.Transport, remote: str | None,
                       answer: bool) -> None:
        """A request body the fast path cannot frame (bad chunking): 400 when no answer
        has started, and the connection closed."""
        self._malformed(remote, 400, "bad_chunking")
        if answer:
            transport.write(_MALFORMED_BODY_ANSWER)
        transport.close()

    def bad_request(self, request: BaseRequest, status: int, exc: BaseException | None
                    ) -> web.Response:
        self._malformed(request.remote, status, bad_request_reason(exc))
        resp = web.Response(status=status, text=_BAD_REQUEST_BODY,
                            content_type="application/json")
        resp.force_close()
        return resp

    def exception_handler(self, previous: Callable[[asyncio.AbstractEventLoop,
                                                    dict[str, Any]], object] | None
                          ) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
        """An event-loop exception handler that quiets ``accept()`` running out of
        resources (asyncio reports each failed attempt, with its traceback)."""

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if (isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS
                    and "accept" in str(context.get("message", ""))):
                self.metrics.accept_errors.inc()
                self._accept_failures.note(loop.time())
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        return handle


class GuardedHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the guard's limits (see the module docstring)."""

    __slots__ = ("_adopted", "_counted", "_deadline", "_guard", "_head_started")

    def __init__(self, manager: GuardedServer, *, guard: ConnectionGuard,
                 adopted: bool | None = None, deadline: float = 0.0, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._counted = False
        self._head_started = False
        #: handed over by the listener's own protocol, which counted it (True) or not,
        #: with the header deadline it had set (a head in pieces has it in all)
        self._adopted = adopted
        self._deadline = deadline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if self._adopted is not None:  # already let in, and counted, by the fast path
            self._counted = self._adopted
            super().connection_made(transport)
            self._cut_at(self._deadline)
            return
        if guard.open >= guard.max_connections:
            # never started: no parser task, and connection_lost has nothing to undo
            self._manager = None
            self._force_close = True
            guard.refuse(transport, self._loop.time())  # type: ignore[arg-type]
            return
        guard.open += 1
        self._counted = True
        super().connection_made(transport)
        # aiohttp gives a new connection the keep-alive timeout to send its first request;
        # here it gets the header timeout
        self._cut_at(self._loop.time() + guard.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # bytes of a request came but not its whole head: the rest has until the
            # header deadline, however slowly it trickles (the common whole-head read
            # never comes here)
            if not self._head_started and data and not self._force_close:
                self._head_started = True
                self._cut_at(min(self._next_keepalive_close_time,
                                 self._loop.time() + self._guard.header_timeout))
        elif self._head_started:
            self._head_started = False

    def _cut_at(self, when: float) -> None:
        """Close the connection at ``when`` if it is still waiting for a request then.

        The timer is aiohttp's keep-alive one (its handle and its deadline), which aiohttp
        re-aims after each response; one that fires early re-arms itself."""
        handle = self._keepalive_handle
        if handle is None or when < self._next_keepalive_close_time:
            if handle is not None:
                handle.cancel()
            self._keepalive_handle = self._loop.call_at(when, self._deadline_reached)
        self._next_keepalive_close_time = when

    def _deadline_reached(self) -> None:
        # aiohttp's _process_keepalive, but also before a first request (older aiohttp
        # versions only time a connection out once it has been kept alive)
        self._keepalive_handle = None
        if self._force_close:
            return
        close_time = self._next_keepalive_close_time
        if self._loop.time() < close_time:
            self._keepalive_handle = self._loop.call_at(close_time, self._deadline_reached)
        elif self._waiter is not None and not self._waiter.done():
            self.force_close()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if isinstance(exc, http_exceptions.HttpProcessingError):
            if request.writer.output_size > 0:  # as aiohttp: nothing more can be said
                raise ConnectionError("response already started")
            return self._guard.bad_request(request, status, exc)
        if isinstance(exc, ConnectionError) and self.transport is None:
            # the client left before its answer: normal traffic (the pipeline records it)
            resp = web.Response(status=499)
            resp.force_close()
            return resp
        return super().handle_error(request, status, exc, message)


class GuardedServer(web.Server):
    """aiohttp's low-level server making :class:`GuardedHandler` protocols."""

    def __init__(self, handler: Any, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._handler_kwargs = {k: v for k, v in kwargs.items()
                                if k not in ("request_factory", "handler_cancellation",
                                             "loop")}
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, guard=self.guard, loop=asyncio.get_running_loop(),
                              **self._handler_kwargs)


class FastServer(GuardedServer):
    """The proxy listener's server: connections start on the lean protocol
    (:mod:`gateway.runtime.fastpath`) and are handed to aiohttp's for what is not the
    proxy's. ``pipeline`` gives the started gateway's pipeline."""

    def __init__(self, handler: Any, *, guard: ConnectionGuard,
                 pipeline: Callable[[], ProxyPipeline], handoff_segments: frozenset[bytes],
                 **kwargs: Any) -> None:
        super().__init__(handler, guard=guard, **kwargs)
        self.pipeline = pipeline
        self.handoff_segments = handoff_segments
        self.keepalive_timeout = float(kwargs.get("keepalive_timeout", 75.0))
        self.fast: dict[FastProtocol, None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # deadlines are kept to within an eighth of the shorter timeout (0.05 to 1 s)
        self.sweep_interval = min(1.0, max(0.05, min(guard.header_timeout,
                                                     self.keepalive_timeout) / 8))

    def __call__(self) -> Any:
        return FastProtocol(self, self.pipeline)

    def aiohttp_protocol(self, counted: bool, deadline: float) -> RequestHandler:
        """aiohttp's protocol for a connection the fast path hands over, whose request
        head must be complete by ``deadline`` (the loop's time)."""
        return GuardedHandler(self, guard=self.guard, adopted=counted, deadline=deadline,
                              loop=asyncio.get_running_loop(), **self._handler_kwargs)

    def adopt(self, conn: FastProtocol, transport: asyncio.Transport) -> None:
        self.fast[conn] = None
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def forget(self, conn: FastProtocol) -> None:
        self.fast.pop(conn, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = loop.time()
            for conn in list(self.fast):
                conn.sweep(now)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for conn in list(self.fast):
            conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await asyncio.gather(super().shutdown(timeout),
                             *[conn.shutdown(timeout) for conn in list(self.fast)])
        self.fast.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


def handoff_segments(app: web.Application) -> frozenset[bytes] | None:
    """The first path segments (folded to lower case) of every route of ``app`` besides
    its catch-all: requests under them are aiohttp's. ``None`` when a route's first
    segment is a pattern, which the fast path cannot tell apart: then aiohttp serves all."""
    segments: set[bytes] = set()
    for route in app.router.resources():
        path = route.canonical
        if route.name == PROXY_ROUTE:
            continue
        first = path[1:].split("/", 1)[0]
        if "{" in first:
            return None
        segments.add(first.lower().encode())
    return frozenset(segments)


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose server is a :class:`GuardedServer`, or a :class:`FastServer`
    when ``pipeline`` is given."""

    def __init__(self, app: web.Application, *, guard: ConnectionGuard,
                 pipeline: Callable[[], ProxyPipeline] | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard
        self.pipeline = pipeline
        # what aiohttp hands on to each connection's protocol
        self._handler_kwargs = {k: v for k, v in kwargs.items() if k not in (
            "handle_signals", "shutdown_timeout", "handler_cancellation")}

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's start-up runs here
        segments = handoff_segments(self.app) if self.pipeline is not None else None
        if self.pipeline is not None and segments is None:
            log.warning("a route of the proxy app starts with a pattern: every request is "
                        "served by aiohttp's protocol, not the fast path")
        if segments is not None and self.pipeline is not None:
            return FastServer(plain.request_handler, request_factory=plain.request_factory,
                              handler_cancellation=plain.handler_cancellation,
                              guard=self.guard, pipeline=self.pipeline,
                              handoff_segments=segments, **self._handler_kwargs)
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation, guard=self.guard,
                             **self._handler_kwargs)


def descriptor_room(wanted: int, reserved: int) -> int:
    """How many client connections the open-file limit allows, after raising its soft
    limit to the hard one (as nginx and Go do): ``wanted``, or fewer, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = max(int(soft) - reserved - _RESERVED_DESCRIPTORS, 1)
    if wanted > room:
        log.warning("GATEWAY_MAX_CONNECTIONS=%d is more than the open-file limit (%d) leaves "
                    "room for: client connections are capped at %d", wanted, soft, room)
        return room
    return wanted
