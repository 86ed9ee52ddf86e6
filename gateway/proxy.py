"""The forwarding stage: mutate the request for the upstream, stream both ways.

- Bodies stream in both directions; nothing is buffered whole. A request body larger
  than ``max_body_size`` is refused with 413 (from ``Content-Length`` before any byte
  is read, or mid-stream for chunked uploads).
- Hop-by-hop headers (RFC 9110 section 7.6.1), and every header the ``Connection``
  header names, are removed in both directions.
- ``X-Forwarded-For/-Proto/-Host`` and ``X-Request-Id`` are set; ``Host`` is the
  upstream's.
- The client's token travels in the scheme the upstream expects, or is stripped or
  replaced, per upstream policy.
- Nothing is retried: a failed connect answers 502, no response headers within
  ``upstream_timeout`` answers 504, with JSON bodies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .errors import BadGateway, GatewayError, GatewayTimeout, PayloadTooLarge
from .policy import Route, Upstream, replacement_credential
from .tokens import PresentedToken

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
# never copied from the client: we set them, or they are ours to decide
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "x-request-id", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_CHUNK = 64 * 1024


def _connection_tokens(headers: CIMultiDict[str] | object) -> set[str]:
    names: set[str] = set()
    getall = getattr(headers, "getall", None)
    if getall is None:
        return names
    for value in getall("Connection", []):
        names.update(v.strip().lower() for v in value.split(",") if v.strip())
    return names


class _BodyTooLarge(Exception):
    pass


class _CappedBody:
    """The client's body, streamed in chunks; raises once it passes ``limit`` bytes.

    ``exceeded`` records it, because aiohttp reports an exception raised while it
    writes a body as a connection error whose wrapping varies between versions.
    """

    def __init__(self, request: web.Request, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.request.content.iter_chunked(_CHUNK):
            seen += len(chunk)
            if seen > self.limit:
                self.exceeded = True
                raise _BodyTooLarge
            yield chunk


class UpstreamForwarder:
    """Forwards allowed requests over one pooled ``ClientSession`` owned by the app."""

    def __init__(self, session: aiohttp.ClientSession, *, connect_timeout: float,
                 upstream_timeout: float, max_body_size: int, trusted_proxies: int = 0
                 ) -> None:
        self.session = session
        self.upstream_timeout = upstream_timeout
        self.max_body_size = max_body_size
        self.trusted_proxies = trusted_proxies
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout,
            sock_read=upstream_timeout)

    def upstream_headers(self, request: web.Request, upstream: Upstream,
                         token: PresentedToken, request_id: str) -> CIMultiDict[str]:
        """The headers the upstream receives."""
        drop = _REQUEST_DROP | _connection_tokens(request.headers)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            if name.lower() not in drop:
                out.add(name, value)
        peer = request.remote or ""
        # several fields are one list (RFC 9110 section 5.3); the last proxy's is the last
        prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
        if self.trusted_proxies > 0 and prior:
            out["X-Forwarded-For"] = f"{prior}, {peer}"
        else:  # an untrusted client's claim is replaced, never extended
            out["X-Forwarded-For"] = peer
            out.popall("Forwarded", None)
            out["X-Forwarded-Proto"] = request.scheme
            out["X-Forwarded-Host"] = request.host
        out.setdefault("X-Forwarded-Proto", request.scheme)
        out.setdefault("X-Forwarded-Host", request.host)
        out["X-Request-Id"] = request_id
        out["Host"] = upstream.host
        if upstream.credentials == "forward":
            out["Authorization"] = f"{upstream.scheme} {token.value}"
        elif upstream.credentials == "replace":
            out[upstream.replace_header] = replacement_credential(upstream)
        return out

    async def forward(self, request: web.Request, route: Route, token: PresentedToken,
                      request_id: str, observe_upstream: Callable[[float], None]
                      ) -> web.StreamResponse:
        """Send the request upstream and stream the answer back to the client."""
        length = request.content_length
        if length is not None and length > self.max_body_size:
            raise PayloadTooLarge(
                f"The request body exceeds the limit of {self.max_body_size} bytes.")
        upstream = route.upstream
        url = URL(upstream.url + request.raw_path, encoded=True)
        headers = self.upstream_headers(request, upstream, token, request_id)
        data: _CappedBody | None = None
        if request.body_exists:
            data = _CappedBody(request, self.max_body_size)
            if length is not None:
                headers["Content-Length"] = str(length)
        started = time.perf_counter()
        limit = upstream.timeout or self.upstream_timeout
        try:
            async with asyncio.timeout(limit):
                resp = await self.session.request(
                    request.method, url, headers=headers, data=data, allow_redirects=False,
                    timeout=self._timeout, auto_decompress=False, skip_auto_headers=(
                        "Accept-Encoding", "User-Agent", "Content-Type"))
        except (_BodyTooLarge, aiohttp.ClientError, OSError, TimeoutError) as exc:
            if data is not None and data.exceeded:
                raise PayloadTooLarge(
                    f"The request body exceeds the limit of {self.max_body_size} bytes."
                ) from None
            raise self._failure(exc, time.perf_counter() - started, limit) from None
        observe_upstream(time.perf_counter() - started)
        try:
            return await self._relay(request, resp, request_id)
        finally:
            resp.release()

    @staticmethod
    def _failure(exc: BaseException, elapsed: float, limit: float) -> GatewayError:
        """The answer to an exchange that produced no upstream response."""
        if isinstance(exc, aiohttp.ClientPayloadError):
            return BadGateway("The upstream broke the exchange.")
        if isinstance(exc, TimeoutError):  # aiohttp.ServerTimeoutError included
            if elapsed >= limit * 0.99:
                return GatewayTimeout(f"The upstream did not answer within {limit:g} seconds.")
            return BadGateway("The upstream could not be reached in time.")
        return BadGateway("The upstream could not be reached.")

    async def _relay(self, request: web.Request, resp: aiohttp.ClientResponse,
                     request_id: str) -> web.StreamResponse:
        drop = _RESPONSE_DROP | _connection_tokens(resp.headers)
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        for name, value in resp.headers.items():
            if name.lower() not in drop:
                out.headers.add(name, value)
        out.headers["X-Request-Id"] = request_id
        if resp.content_length is not None and request.method != "HEAD" \
                and resp.status not in (204, 304):
            out.content_length = resp.content_length
        elif request.method == "HEAD" and "Content-Length" in resp.headers:
            out.headers["Content-Length"] = resp.headers["Content-Length"]
        await out.prepare(request)
        if request.method == "HEAD" or resp.status in (204, 304):
            await out.write_eof()
            return out
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                await out.write(chunk)
        except (aiohttp.ClientError, TimeoutError):
            # headers are gone already: the only honest signal left is a broken stream
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out
