"""The upstream client: pooled keep-alive HTTP/1.1 connections that stream both ways.

Every allowed request crosses this package, so it is built for that one job and no
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

The parts: :mod:`.pool` (:class:`UpstreamPool`: connections per origin, the limit, the
waiters), :mod:`.connection` (one connection's life: its transport, its parser, its
state), :mod:`.exchange` (one request and its answer, made fresh for each request),
:mod:`.response` (:class:`UpstreamResponse`, the streamed answer handed to the caller)
and :mod:`.errors` (:class:`UpstreamError` and its kinds).
"""

from gateway.forward.upstream.connection import Origin
from gateway.forward.upstream.errors import (
    UpstreamBroken,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.forward.upstream.pool import UpstreamPool
from gateway.forward.upstream.response import UpstreamResponse

__all__ = [
    "Origin",
    "UpstreamBroken",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]
