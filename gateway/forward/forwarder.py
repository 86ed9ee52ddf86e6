"""The forwarding stage: mutate the request for the upstream, stream both ways.

- Bodies stream in both directions; nothing is buffered whole. A request body larger
  than ``max_body_size`` is refused with 413 (from ``Content-Length`` before any byte
  is read, or mid-stream for chunked uploads); a client that pauses mid-body for more
  than ``client_body_timeout`` seconds gets 408.
- Hop-by-hop headers (RFC 9110 section 7.6.1), and every header the ``Connection``
  header names, are removed in both directions.
- ``X-Forwarded-For/-Proto/-Host`` and ``X-Request-Id`` are set; ``Host`` is the
  upstream's.
- Credentials are the upstream's credential mode's to put on
  (:mod:`gateway.forward.credentials`): the client's ``Authorization`` is never copied,
  the mode appends what the upstream receives. A mode that renews its own credentials
  gets one retry after a 401 when the request had no body to replay; otherwise such a
  401 answers 502 (it is about the gateway's credentials, not the client's).
- A failed connect answers 502, an upstream silent for ``upstream_timeout`` seconds
  (the upstream's own ``timeout`` when its policy sets one) answers 504 before its
  headers, with JSON bodies, and breaks the stream after. The one retry is the upstream
  client's: an idempotent request without a body whose pooled connection closed before
  any answer (:mod:`gateway.forward.upstream`).

Every request passes here, so per-request work is kept to what the request needs: the
upstream's origin, path prefix and ``Host`` are worked out once, the header sets are
only copied when a ``Connection`` header names more to drop, and the upstream client
(:mod:`gateway.forward.upstream`) is a lean one of our own rather than aiohttp's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import NamedTuple

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.config.policy import Route, Upstream
from gateway.forward.credentials import CredentialMode, Credentials, mode_for
from gateway.forward.upstream import (
    Origin,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.protocol.errors import (
    BadGateway,
    GatewayError,
    GatewayTimeout,
    PayloadTooLarge,
    RequestTimeout,
)
from gateway.protocol.requests import ClientRequest
from gateway.protocol.tokens import PresentedToken

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
# never copied from the client: we set them, or they are ours to decide
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "x-request-id", "content-length"}
# an untrusted client's forwarding claims are replaced, never extended
_UNTRUSTED_DROP = _REQUEST_DROP | {"forwarded", "x-forwarded-for", "x-forwarded-proto",
                                   "x-forwarded-host"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id"}  # the request id is ours


def _dropped(headers: CIMultiDictProxy[str], always: frozenset[str]) -> frozenset[str]:
    """``always``, plus every header the ``Connection`` header names."""
    if "Connection" not in headers:
        return always
    return _named(always, headers.getall("Connection"))


def _dropped_from(headers: list[tuple[str, str]], always: frozenset[str]) -> frozenset[str]:
    """As :func:`_dropped`, for the upstream's headers (a list of pairs)."""
    values = [v for k, v in headers if len(k) == 10 and k.lower() == "connection"]
    return _named(always, values) if values else always


def _named(always: frozenset[str], values: list[str]) -> frozenset[str]:
    names = {v.strip().lower() for value in values for v in value.split(",")}
    names.discard("")
    return always | names


class _Place(NamedTuple):
    """An upstream as the forwarder uses it: its origin, URL path prefix, ``Host``,
    credential mode, and the client headers it never copies (trusted proxy, untrusted)."""

    origin: Origin
    path: str
    host: str
    mode: CredentialMode
    drop_trusted: frozenset[str]
    drop_untrusted: frozenset[str]


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


class _CappedBody:
    """The client's body, streamed as it arrives; raises once it passes ``limit`` bytes,
    or when the client pauses longer than ``idle`` seconds (0: no limit).

    ``exceeded`` and ``stalled`` record why: the upstream client reports a body that
    failed as a failed exchange, and the forwarder answers 413 or 408 rather than 502.
    Without the pause limit, a client that stops mid-upload would hold an upstream
    connection, and a place in the pool, for as long as it stayed connected.
    """

    def __init__(self, request: ClientRequest, limit: int, idle: float) -> None:
        self.request = request
        self.limit = limit
        self.idle = idle or None
        self.exceeded = False
        self.stalled = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        content = self.request.content
        while True:
            # whatever has arrived, as it arrives (the stream's own buffer is bounded:
            # aiohttp stops reading from the client while it is full)
            try:
                async with asyncio.timeout(self.idle):
                    chunk = await content.readany()
            except TimeoutError:
                self.stalled = True
                raise _BodyStalled from None
            if not chunk:
                return
            seen += len(chunk)
            if seen > self.limit:
                self.exceeded = True
                raise _BodyTooLarge
            yield chunk


class UpstreamForwarder:
    """Forwards allowed requests over the app's :class:`~gateway.forward.upstream.UpstreamPool`."""

    def __init__(self, pool: UpstreamPool, *, upstream_timeout: float, max_body_size: int,
                 trusted_proxies: int = 0, client_body_timeout: float = 60.0,
                 credentials: Mapping[str, CredentialMode] | None = None) -> None:
        self.pool = pool
        #: credential modes by upstream name, for those :func:`mode_for` cannot build
        self.credentials = dict(credentials or {})
        self.client_body_timeout = client_body_timeout
        self.upstream_timeout = upstream_timeout
        self.max_body_size = max_body_size
        self.trusted_proxies = trusted_proxies
        self._places: dict[str, _Place] = {}

    def _place(self, upstream: Upstream) -> _Place:
        """Where ``upstream``'s requests go, worked out once per upstream."""
        place = self._places.get(upstream.name)
        if place is None:
            mode = self.credentials.get(upstream.name) or mode_for(upstream)
            place = self._places[upstream.name] = _Place(
                self.pool.origin(upstream.url), upstream.base_path, upstream.host, mode,
                _REQUEST_DROP | mode.drop, _UNTRUSTED_DROP | mode.drop)
        return place

    def upstream_headers(self, request: ClientRequest, place: _Place, credentials: Credentials,
                         request_id: str) -> list[tuple[str, str]]:
        """The headers the upstream receives, in order, ``credentials`` last."""
        headers = request.headers
        extend = self.trusted_proxies > 0 and "X-Forwarded-For" in headers
        drop = _dropped(headers, place.drop_trusted if extend else place.drop_untrusted)
        out = [(k, v) for k, v in headers.items() if k.lower() not in drop]
        peer = request.remote or ""
        if extend:
            # several fields are one list (RFC 9110 section 5.3); the last proxy's is the last
            prior = ", ".join(headers.getall("X-Forwarded-For"))
            out = [(k, v) for k, v in out if k.lower() != "x-forwarded-for"]
            out.append(("X-Forwarded-For", f"{prior}, {peer}"))
            if "X-Forwarded-Proto" not in headers:
                out.append(("X-Forwarded-Proto", request.scheme))
            if "X-Forwarded-Host" not in headers:
                out.append(("X-Forwarded-Host", request.host))
        else:
            out += (("X-Forwarded-For", peer), ("X-Forwarded-Proto", request.scheme),
                    ("X-Forwarded-Host", request.host))
        out += (("X-Request-Id", request_id), ("Host", place.host))
        out += credentials
        return out

    async def forward(self, request: web.Request, route: Route, token: PresentedToken,
                      request_id: str, observe_upstream: Callable[[float, int], None],
                      subject: str | None = None, extra_headers: dict[str, str] | None = None
                      ) -> web.StreamResponse:
        """Send the request upstream and stream the answer back to the client through
        aiohttp, with ``extra_headers`` (the gateway's own, e.g. rate-limit fields) added to
        its answer."""
        resp = await self.exchange(request, route, token, request_id, observe_upstream,
                                   subject)
        try:
            return await self._relay(request, resp, request_id, extra_headers)
        finally:
            resp.release()

    async def exchange(self, request: ClientRequest, route: Route, token: PresentedToken,
                       request_id: str, observe_upstream: Callable[[float, int], None],
                       subject: str | None = None) -> UpstreamResponse:
        """Send the request upstream and return the answer's head, its body still to read
        (the caller releases it). Raises a :class:`GatewayError` for what the client is
        told instead: 413, 408, 502, 504."""
        length = request.content_length
        if length is not None and length > self.max_body_size:
            raise PayloadTooLarge(
                f"The request body exceeds the limit of {self.max_body_size} bytes.")
        upstream = route.upstream
        place = self._place(upstream)
        mode = place.mode
        credentials = await mode.obtain(token, subject) if mode.awaits else mode.apply(token)
        data: _CappedBody | None = None
        if request.body_exists:
            data = _CappedBody(request, self.max_body_size, self.client_body_timeout)
        started = time.perf_counter()
        limit = upstream.timeout or self.upstream_timeout
        try:
            resp = await self.pool.request(
                request.method, place.origin, place.path + request.raw_path,
                self.upstream_headers(request, place, credentials, request_id),
                read_timeout=limit, body=data, content_length=length)
            if resp.status == 401 and mode.renews:
                resp = await self._renewed(request, place, token, credentials, request_id,
                                           resp, data, limit, subject)
        except UpstreamError as exc:
            if data is not None and data.exceeded:
                raise PayloadTooLarge(
                    f"The request body exceeds the limit of {self.max_body_size} bytes."
                ) from None
            if data is not None and data.stalled:
                raise RequestTimeout(
                    f"The request body paused for more than {self.client_body_timeout:g} "
                    "seconds.") from None
            raise self._failure(exc, limit) from None
        try:
            observe_upstream(time.perf_counter() - started, resp.status)
        except BaseException:
            resp.release()
            raise
        return resp

    async def _renewed(self, request: ClientRequest, place: _Place, token: PresentedToken,
                       sent: Credentials, request_id: str, resp: UpstreamResponse,
                       data: _CappedBody | None, limit: float, subject: str | None
                       ) -> UpstreamResponse:
        """The upstream refused the mode's credentials: renew them, and retry once when
        nothing of the request is lost (no body: a 401 means it was not acted on)."""
        resp.release()
        retry = await place.mode.refused(sent, subject) and data is None
        if retry:
            credentials = await place.mode.obtain(token, subject)
            resp = await self.pool.request(
                request.method, place.origin, place.path + request.raw_path,
                self.upstream_headers(request, place, credentials, request_id),
                read_timeout=limit, body=None, content_length=request.content_length)
            if resp.status != 401:
                return resp
            resp.release()
        raise BadGateway(
            f"The upstream refused the gateway's {place.mode.name} credentials"
            + ("." if retry else "; the request had a body and was not retried."))

    @staticmethod
    def _failure(exc: UpstreamError, limit: float) -> GatewayError:
        """The answer to an exchange that produced no upstream response."""
        if isinstance(exc, UpstreamTimeout):
            return GatewayTimeout(f"The upstream did not answer within {limit:g} seconds.")
        return BadGateway(str(exc))

    @staticmethod
    def answer_headers(resp: UpstreamResponse, request_id: str,
                       extra_headers: dict[str, str] | None = None) -> list[tuple[str, str]]:
        """The headers the client gets with the upstream's answer, ``Content-Length``
        aside: hop-by-hop ones dropped, the request id appended, and ``extra_headers``
        (the gateway's own) in place of the upstream's of the same names."""
        drop = _dropped_from(resp.headers, _RESPONSE_DROP)
        if extra_headers:  # the gateway's word replaces the upstream's
            drop = drop | {name.lower() for name in extra_headers}
            return [*[(k, v) for k, v in resp.headers if k.lower() not in drop],
                    ("X-Request-Id", request_id), *extra_headers.items()]
        return [*[(k, v) for k, v in resp.headers if k.lower() not in drop],
                ("X-Request-Id", request_id)]

    async def _relay(self, request: web.Request, resp: UpstreamResponse,
                     request_id: str, extra_headers: dict[str, str] | None = None
                     ) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, reason=resp.reason or None)
        out.headers.extend(self.answer_headers(resp, request_id, extra_headers))
        head = request.method == "HEAD"
        if resp.content_length is not None and not head and resp.status not in (204, 304):
            out.content_length = resp.content_length
        elif head and resp.content_length is not None:
            out.headers["Content-Length"] = str(resp.content_length)
        await out.prepare(request)
        if head or resp.status in (204, 304):
            await out.write_eof()
            return out
        try:
            while chunk := await resp.read():
                await out.write(chunk)
        except UpstreamError:
            # headers are gone already: the only honest signal left is a broken stream
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out
