"""The servers the benchmark puts around the gateway, each run in a process of its own:

    python -m bench.services upstream --port P
    python -m bench.services introspection --port P [--clients N]
    python -m bench.services bare --port P --upstream URL
    python -m bench.services bare-lean --port P --upstream URL

- ``upstream``: a stand-in API. ``GET`` of any path answers a small JSON object;
  ``GET /2/0/bytes/{n}`` streams ``n`` bytes; ``POST``/``PUT`` reads the body as a
  stream and answers how many bytes came.
- ``introspection``: an RFC 7662 endpoint (``POST /introspect``). The tokens it knows
  are a rule rather than a list, so that the cold scenario can mint new ones on every
  request: ``t<n>.<anything>`` is active, issued to ``client<n mod N>`` with
  ``anaplan:read anaplan:write``, for an hour; ``w<n>.<anything>`` likewise but with
  ``anaplan:write`` only (a token that reads nothing); anything else is inactive.
  ``GET /stats`` counts the calls.
- ``bare``: the reference bare proxy, the thinnest aiohttp reverse proxy: no auth, no
  policy, no metrics; it strips hop-by-hop headers and streams both ways.
- ``bare-lean``: the same bare proxy forwarding through the gateway's own upstream
  client (:mod:`gateway.forward.upstream`) instead of aiohttp's ``ClientSession``. The gateway
  against it is what the gateway's features cost on the same forwarding core.

Each uses uvloop when it is installed, as ``oauth-gateway serve`` does, and several
processes may share one port (``SO_REUSEPORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from yarl import URL

CHUNK = 64 * 1024
SMALL_JSON = json.dumps({
    "meta": {"paging": {"currentPageSize": 2, "totalSize": 2}},
    "workspaces": [{"id": "8a81b09d5e8c6f27015ece3402487d33", "name": "Finance"},
                   {"id": "8a81b09d5e8c6f27015ece3402487d34", "name": "Sales"}],
}, separators=(",", ":")).encode()
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
SCOPES = "anaplan:read anaplan:write"


# -- the stand-in upstream ---------------------------------------------------------

async def _upstream(request: web.Request) -> web.StreamResponse:
    if request.method in ("POST", "PUT"):
        received = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            received += len(chunk)
        return web.Response(body=b'{"received":%d}' % received, content_type="application/json")
    if request.path.startswith("/2/0/bytes/"):
        size = int(request.path.rsplit("/", 1)[1])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        block = b"x" * CHUNK
        sent = 0
        while sent < size:
            part = block[: size - sent]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp
    return web.Response(body=SMALL_JSON, content_type="application/json")


def upstream_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", _upstream)
    return app


# -- the RFC 7662 endpoint ---------------------------------------------------------

class Introspection:
    """Answers RFC 7662 section 2.2 for the rule-defined token set; counts the calls."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.calls = 0
        self.active = 0

    def answer(self, token: str) -> dict[str, object]:
        head, dot, _ = token.partition(".")
        if not dot or head[:1] not in ("t", "w") or not head[1:].isdigit():
            return {"active": False}
        n = int(head[1:])
        self.active += 1
        scope = SCOPES if head[0] == "t" else "anaplan:write"
        return {"active": True, "client_id": f"client{n % self.clients}", "scope": scope,
                "exp": int(time.time()) + 3600, "sub": f"user{n}", "token_type": "Bearer"}

    async def introspect(self, request: web.Request) -> web.Response:
        self.calls += 1
        form = await request.post()
        return web.json_response(self.answer(str(form.get("token", ""))))

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls, "active": self.active,
                                  "inactive": self.calls - self.active})


def introspection_app(clients: int) -> web.Application:
    endpoint = Introspection(clients)
    app = web.Application()
    app.router.add_post("/introspect", endpoint.introspect)
    app.router.add_get("/stats", endpoint.stats)
    return app


# -- the reference bare proxy ------------------------------------------------------

def bare_proxy_app(upstream: str) -> web.Application:
    """Forward everything to ``upstream``: hop-by-hop headers stripped, bodies streamed."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=0),
            auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        yield
        await app[session_key].close()

    # the gateway's own upstream timeouts (aiohttp's sock_read, not the default 5-minute
    # total), so that both forward alike and the ratio is what the gateway adds
    timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0, sock_read=30.0)

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "host"]
        async with request.app[session_key].request(
                request.method, URL(upstream + request.raw_path, encoded=True),
                headers=headers, data=request.content if request.body_exists else None,
                allow_redirects=False, timeout=timeout, skip_auto_headers=(
                    "Accept-Encoding", "User-Agent", "Content-Type")) as resp:
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            for k, v in resp.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    out.headers.add(k, v)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_chunked(CHUNK):
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application(client_max_size=1024**3)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def lean_bare_proxy_app(upstream: str) -> web.Application:
    """:func:`bare_proxy_app`, forwarding through :class:`gateway.forward.upstream.UpstreamPool`."""
    from gateway.forward.upstream import UpstreamPool

    pool_key = web.AppKey("pool", UpstreamPool)

    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        app[pool_key] = UpstreamPool(limit=256, connect_timeout=5.0)
        yield
        await app[pool_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        pool = request.app[pool_key]
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "content-length")]
        headers.append(("Host", request.host))
        resp = await pool.request(
            request.method, pool.origin(upstream), request.raw_path, headers, read_timeout=30.0,
            body=request.content if request.body_exists else None,
            content_length=request.content_length)
        try:
            out = web.StreamResponse(status=resp.status, reason=resp.reason or None)
            for k, v in resp.headers:
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    out.headers.add(k, v)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            while chunk := await resp.read():
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            resp.release()

    app = web.Application(client_max_size=1024**3)
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


# -- running one -------------------------------------------------------------------

async def serve(app: web.Application, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` (shareable) until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024, reuse_port=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (as ``oauth-gateway serve`` uses), else asyncio's."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.services")
    parser.add_argument("kind", choices=("upstream", "introspection", "bare", "bare-lean"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="", help="base URL the bare proxy forwards to")
    parser.add_argument("--clients", type=int, default=300)
    args = parser.parse_args(argv)
    if args.kind == "upstream":
        app = upstream_app()
    elif args.kind == "introspection":
        app = introspection_app(args.clients)
    elif args.kind == "bare":
        app = bare_proxy_app(args.upstream)
    else:
        app = lean_bare_proxy_app(args.upstream)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(app, args.port))


if __name__ == "__main__":
    main()
