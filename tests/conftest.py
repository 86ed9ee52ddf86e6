"""Shared fixtures: a real Redis, a real upstream, a real RFC 7662 server, the gateway."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer
from redis.asyncio import Redis

from gateway.appkeys import GATEWAY
from gateway.authserver import AuthAdmin, DeviceFlowTiming
from gateway.config.settings import load_settings
from gateway.runtime.app import Gateway, create_apps
from gateway.runtime.listener import GuardedRunner
from gateway.runtime.server import listener_runner
from tests.redis_server import RedisServer, free_port


class ListenerServer(TestServer):
    """The proxy app served as ``oauth-gateway serve`` serves it: the proxy listener's own
    protocol first, aiohttp's for the built-in server's paths (and what it hands over)."""

    async def _make_runner(self, **kwargs: Any) -> GuardedRunner:
        kwargs.pop("handler_cancellation", None)
        return listener_runner(self.app, **kwargs)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, to stop and restart (the session's stays up)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def own_redis_client(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@dataclass
class Received:
    """One request as the upstream saw it."""

    method: str
    raw_path: str
    headers: CIMultiDict[str]
    header_list: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    server: TestServer
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    """An aiohttp app on loopback that records every request it gets."""
    holder: list[Upstream] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        holder[0].received.append(Received(
            request.method, request.raw_path, CIMultiDict(request.headers),
            list(request.headers.items()), body))
        path = request.path
        if path.startswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", "5")))
        if path.startswith("/big"):
            size = int(request.query.get("n", "1048576"))
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = size
            await resp.prepare(request)
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                part = chunk[: size - sent]
                await resp.write(part)
                sent += len(part)
            await resp.write_eof()
            return resp
        if path.startswith("/status/"):
            return web.json_response({"status": path}, status=int(path.rsplit("/", 1)[1]))
        return web.json_response(
            {"path": path, "method": request.method, "length": len(body)},
            headers={"Connection": "close, X-Secret-Hop", "X-Secret-Hop": "1",
                     "Keep-Alive": "timeout=5", "X-Upstream": "yes"})

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    holder.append(Upstream(server))
    return holder[0]


@dataclass
class AuthServer:
    """A real RFC 7662 endpoint: ``tokens`` maps token -> introspection answer."""

    server: TestServer
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: int = 0
    delay: float = 0.0
    failing: bool = False
    auth_headers: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/introspect"))

    def issue(self, token: str, *, client_id: str = "app1", scope: str = "anaplan:read",
              ttl: int = 3600, **extra: Any) -> str:
        import time

        self.tokens[token] = {"active": True, "client_id": client_id, "scope": scope,
                              "exp": int(time.time()) + ttl, "sub": "user1", **extra}
        return token


@pytest.fixture
async def auth_server(aiohttp_server: AiohttpServer) -> AuthServer:
    holder: list[AuthServer] = []

    async def introspect(request: web.Request) -> web.Response:
        a = holder[0]
        a.calls += 1
        a.auth_headers.append(request.headers.get("Authorization", ""))
        if a.delay:
            await asyncio.sleep(a.delay)
        if a.failing:
            return web.json_response({"error": "down"}, status=503)
        form = await request.post()
        answer = a.tokens.get(str(form.get("token", "")), {"active": False})
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/introspect", introspect)
    server = await aiohttp_server(app)
    holder.append(AuthServer(server))
    return holder[0]


DEFAULT_POLICY = """
upstreams:
  api: {upstream}
routes:
  - name: read
    upstream: api
    methods: [GET, HEAD]
    path: /2/0/**
    scopes: [anaplan:read]
  - name: write
    upstream: api
    methods: [POST, PUT, PATCH, DELETE]
    path: /2/0/**
    scopes: [anaplan:write]
  - name: slow
    upstream: api
    path: /slow
    scopes: []
  - name: big
    upstream: api
    path: /big
    scopes: []
  - name: status
    upstream: api
    path: /status/*
    scopes: []
"""


class _Polling:
    client: TestClient[web.Request, web.Application]

    async def until_status(self, status: int, limit: float, headers: Mapping[str, str],
                           path: str = "/2/0/x") -> float:
        """Poll ``GET path`` until the gateway answers ``status``; the seconds it took."""
        started = time.perf_counter()
        while time.perf_counter() - started < limit:
            resp = await self.client.get(path, headers=headers)
            await resp.read()
            if resp.status == status:
                return time.perf_counter() - started
            await asyncio.sleep(0.005)
        raise AssertionError(f"status {status} not seen within {limit}s")


@dataclass
class Harness(_Polling):
    """A running gateway: its proxy and admin test clients, and what it logged."""

    client: TestClient[web.Request, web.Application]
    admin: TestClient[web.Request, web.Application]
    gw: Gateway
    log: io.StringIO
    policy_file: Path

    def log_lines(self) -> list[dict[str, Any]]:
        self.gw.access_log.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line]

    async def metrics(self) -> str:
        resp = await self.admin.get("/metrics")
        return await resp.text()


GatewayFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_gateway(aiohttp_client: AiohttpClient, redis_server: RedisServer,
                       redis: Redis, tmp_path: Path, upstream: Upstream,
                       auth_server: AuthServer) -> GatewayFactory:
    """Start a gateway in front of ``upstream``, validating at ``auth_server``."""

    async def factory(policy: str | None = None, **overrides: Any) -> Harness:
        policy_file = tmp_path / f"policy-{len(list(tmp_path.iterdir()))}.yaml"
        policy_file.write_text((policy or DEFAULT_POLICY).format(upstream=upstream.url))
        values: dict[str, Any] = {
            "redis_url": redis_server.url, "policies": str(policy_file),
            "introspection_url": auth_server.url, "introspection_client_id": "gateway",
            "introspection_client_secret": "gw-secret", "introspection_retries": 1,
            "introspection_timeout": 1.0,
        }
        values.update(overrides)
        settings = load_settings(environ={}, **values)
        stream = io.StringIO()
        proxy, admin = create_apps(settings, log_stream=stream)
        client = cast("TestClient[web.Request, web.Application]",
                      await aiohttp_client(ListenerServer(proxy)))
        admin_client = await aiohttp_client(admin)
        return Harness(client, admin_client, proxy[GATEWAY], stream, policy_file)

    return factory


@dataclass
class AuthHarness(_Polling):
    """A gateway with the built-in authorization server, and an admin to drive it."""

    client: TestClient[web.Request, web.Application]
    admin: TestClient[web.Request, web.Application]
    gw: Gateway
    log: io.StringIO
    issuer: str
    auth: AuthAdmin

    async def metrics(self) -> str:
        resp = await self.admin.get("/metrics")
        return await resp.text()


AuthGatewayFactory = Callable[..., Awaitable[AuthHarness]]


@pytest.fixture
async def make_auth_gateway(aiohttp_client: AiohttpClient, redis_server: RedisServer,
                            redis: Redis, tmp_path: Path, upstream: Upstream
                            ) -> AsyncIterator[AuthGatewayFactory]:
    """Start a gateway whose built-in authorization server issues the tokens it checks.

    The issuer is the gateway's own loopback URL (``/oauth/*`` on the proxy listener).
    ``auth`` is an :class:`AuthAdmin` on the same Redis (what the CLI uses): the
    session's server, or the one ``redis_url=`` names."""
    own_clients: list[Redis] = []

    async def factory(policy: str | None = None, *, device: DeviceFlowTiming | None = None,
                      **overrides: Any) -> AuthHarness:
        from gateway.protocol.tokens import TokenDigester
        from gateway.state.connection import connect, digest_key

        port = free_port()
        issuer = f"http://127.0.0.1:{port}"
        policy_file = tmp_path / f"policy-{len(list(tmp_path.iterdir()))}.yaml"
        policy_file.write_text((policy or DEFAULT_POLICY).format(upstream=upstream.url))
        values: dict[str, Any] = {"redis_url": redis_server.url, "policies": str(policy_file),
                                  "issuer": issuer}
        values.update(overrides)
        settings = load_settings(environ={}, **values)
        stream = io.StringIO()
        proxy, admin_app = create_apps(settings, log_stream=stream, device=device)
        client = cast("TestClient[web.Request, web.Application]",
                      await aiohttp_client(ListenerServer(proxy, port=port)))
        admin_client = await aiohttp_client(admin_app)
        admin_redis = redis
        if settings.redis_url != redis_server.url:  # another topology (Sentinel, Cluster)
            admin_redis = connect(settings.redis_url)
            own_clients.append(admin_redis)
        key = await digest_key(admin_redis, settings.key_prefix, settings.token_digest_key)
        auth = AuthAdmin(admin_redis, settings, TokenDigester(key))
        return AuthHarness(client, admin_client, proxy[GATEWAY], stream, issuer, auth)

    yield factory
    for own in own_clients:
        await own.aclose()
