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
- Nothing is retried: a failed connect answers 502, an upstream silent for
  ``upstream_timeout`` seconds (the upstream's own ``timeout`` when its policy sets
  one) answers 504 before its headers, with JSON bodies, and breaks the stream after.

Every request passes here, so per-request work is kept to what the request needs:
the upstream's timeouts and ``Host`` are worked out once, and the header sets are
only copied when a ``Connection`` header names more to drop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
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
# an untrusted client's forwarding claims are replaced, never extended
_UNTRUSTED_DROP = _REQUEST_DROP | {"forwarded", "x-forwarded-for", "x-forwarded-proto",
                                   "x-forwarded-host"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id"}  # the request id is ours
_CHUNK = 64 * 1024


def _dropped(headers: CIMultiDictProxy[str], always: frozenset[str]) -> frozenset[str]:
    """``always``, plus every header the ``Connection`` header names."""
    if "Connection" not in headers:
        return always
    names = {v.strip().lower() for value in headers.getall("Connection")
             for v in value.split(",")}
    names.discard("")
    return always | names


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
        self._connect_timeout = connect_timeout
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._hosts: dict[str, str] = {}

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        """Connect within the connect timeout; 504 when the upstream is silent for
        ``seconds`` (aiohttp's ``sock_read``, cheaper than a deadline of our own)."""
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(
                total=None, connect=self._connect_timeout,
                sock_connect=self._connect_timeout, sock_read=seconds)
        return timeout

    def upstream_headers(self, request: web.Request, upstream: Upstream,
                         token: PresentedToken, request_id: str) -> list[tuple[str, str]]:
        """The headers the upstream receives, in order (a list: cheaper to build than a
        multidict, and aiohttp copies them into its own anyway)."""
        headers = request.headers
        extend = self.trusted_proxies > 0 and "X-Forwarded-For" in headers
        drop = _dropped(headers, _REQUEST_DROP if extend else _UNTRUSTED_DROP)
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
        host = self._hosts.get(upstream.url)
        if host is None:
            host = self._hosts[upstream.url] = upstream.host
        out += (("X-Request-Id", request_id), ("Host", host))
        if upstream.credentials == "forward":
            out.append(("Authorization", f"{upstream.scheme} {token.value}"))
        elif upstream.credentials == "replace":  # the client's own value never passes
            name = upstream.replace_header.lower()
            out = [(k, v) for k, v in out if k.lower() != name]
            out.append((upstream.replace_header, replacement_credential(upstream)))
        return out

    async def forward(self, request: web.Request, route: Route, token: PresentedToken,
                      request_id: str, observe_upstream: Callable[[float, int], None]
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
                headers.append(("Content-Length", str(length)))
        started = time.perf_counter()
        limit = upstream.timeout or self.upstream_timeout
        try:
            resp = await self.session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False,
                timeout=self._timeout(limit), auto_decompress=False, skip_auto_headers=(
                    "Accept-Encoding", "User-Agent", "Content-Type"))
        except (_BodyTooLarge, aiohttp.ClientError, OSError, TimeoutError) as exc:
            if data is not None and data.exceeded:
                raise PayloadTooLarge(
                    f"The request body exceeds the limit of {self.max_body_size} bytes."
                ) from None
            raise self._failure(exc, time.perf_counter() - started, limit) from None
        observe_upstream(time.perf_counter() - started, resp.status)
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
        drop = _dropped(resp.headers, _RESPONSE_DROP)
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        out.headers.extend([*[(k, v) for k, v in resp.headers.items() if k.lower() not in drop],
                            ("X-Request-Id", request_id)])
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
