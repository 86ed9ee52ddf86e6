"""RFC 7662 introspection against a real loopback authorization server."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.authn.validators.base import ValidatorUnavailable
from gateway.authn.validators.introspection import IntrospectionClient
from tests.conftest import GatewayFactory, Upstream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class AuthServer:
    """Counts and records the requests reaching the introspection endpoint."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[tuple[str | None, dict[str, str]]] = []
        self.url = ""


async def serve(aiohttp_server: AiohttpServer, answer: Handler) -> AuthServer:
    state = AuthServer()

    async def introspect(request: web.Request) -> web.StreamResponse:
        state.calls += 1
        form = await request.post()
        state.seen.append((request.headers.get("Authorization"),
                           {k: str(v) for k, v in form.items()}))
        return await answer(request)

    app = web.Application()
    app.router.add_post("/introspect", introspect)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/introspect"))
    return state


def json_answer(body: dict[str, Any], status: int = 200) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status)
    return answer


def client(session: aiohttp.ClientSession, url: str, **kw: Any) -> IntrospectionClient:
    kw.setdefault("backoff", 0.0)
    return IntrospectionClient(session, url, client_id="gw", client_secret="s3cret", **kw)


async def test_active_token_with_scope_string(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    exp = int(time.time()) + 600
    srv = await serve(aiohttp_server, json_answer({
        "active": True, "scope": "anaplan:read anaplan:write", "client_id": "c-1",
        "exp": exp, "sub": "u-1", "username": "alice"}))
    info = await client(session, srv.url).validate("tok-1")
    assert info.active
    assert info.scopes == {"anaplan:read", "anaplan:write"}
    assert (info.client_id, info.exp, info.sub, info.username) == ("c-1", exp, "u-1", "alice")
    assert srv.seen[0][1] == {"token": "tok-1", "token_type_hint": "access_token"}


async def test_scp_list_gives_scopes(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, json_answer(
        {"active": True, "scp": ["anaplan:read", "audit"], "client_id": "c-2"}))
    info = await client(session, srv.url).validate("tok")
    assert info.active and info.scopes == {"anaplan:read", "audit"}


async def test_inactive_token(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, json_answer({"active": False}))
    info = await client(session, srv.url).validate("tok")
    assert not info.active


async def test_refresh_token_is_no_access_token(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, json_answer(
        {"active": True, "token_type": "refresh_token", "scope": "anaplan:read"}))
    assert not (await client(session, srv.url).validate("tok")).active


async def test_client_secret_basic_reaches_server_exactly(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, json_answer({"active": False}))
    await client(session, srv.url).validate("tok")
    expected = "Basic " + base64.b64encode(b"gw:s3cret").decode()
    assert srv.seen[0][0] == expected


async def test_5xx_is_retried_up_to_the_bound(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, json_answer({"error": "down"}, status=503))
    with pytest.raises(ValidatorUnavailable):
        await client(session, srv.url, retries=2).validate("tok")
    assert srv.calls == 3


async def test_5xx_then_success_is_answered(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    answers = [500, 502, 200]

    async def flaky(request: web.Request) -> web.StreamResponse:
        status = answers.pop(0)
        return web.json_response({"active": status == 200}, status=status)

    srv = await serve(aiohttp_server, flaky)
    info = await client(session, srv.url, retries=2).validate("tok")
    assert info.active and srv.calls == 3


async def test_connection_refused_is_retried_up_to_the_bound() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    attempts = 0

    async def on_start(session: aiohttp.ClientSession, ctx: SimpleNamespace,
                       params: aiohttp.TraceRequestStartParams) -> None:
        nonlocal attempts
        attempts += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as s:
        with pytest.raises(ValidatorUnavailable, match="unreachable"):
            await client(s, f"http://127.0.0.1:{port}/introspect", retries=3).validate("tok")
    assert attempts == 4


async def test_dropped_connections_are_retried_up_to_the_bound(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    srv = await serve(aiohttp_server, hang_up)
    with pytest.raises(ValidatorUnavailable):
        await client(session, srv.url, retries=1).validate("tok")
    assert srv.calls == 2


@pytest.mark.parametrize(("status", "error"), [
    (400, "invalid_client"), (400, "unauthorized_client"), (401, "invalid_client"),
    (403, "access_denied"), (404, "not_found")])
async def test_the_gateways_credentials_refused_is_unavailable_and_not_retried(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, status: int,
        error: str) -> None:
    srv = await serve(aiohttp_server, json_answer({"error": error}, status=status))
    with pytest.raises(ValidatorUnavailable, match=f"{status}.*credentials"):
        await client(session, srv.url, retries=3).validate("tok")
    assert srv.calls == 1


@pytest.mark.parametrize("body", [
    # npm oidc-provider, asked about a JWT
    b'{"error":"unsupported_token_type","error_description":"Structured JWT Tokens cannot '
    b'be introspected via the introspection_endpoint"}',
    b'{"error":"invalid_request"}', b'{"error":"invalid_token"}', b"", b"<html>bad</html>"])
async def test_400_about_the_token_is_inactive_and_not_retried(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, body: bytes) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, body=body, content_type="application/json")

    srv = await serve(aiohttp_server, answer)
    info = await client(session, srv.url, retries=3).validate("eyJhbGciOiJub25lIn0.e30.")
    assert not info.active
    assert srv.calls == 1


async def test_timeout_is_honoured(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.5)
        return web.json_response({"active": True})

    srv = await serve(aiohttp_server, slow)
    started = time.monotonic()
    with pytest.raises(ValidatorUnavailable):
        await client(session, srv.url, timeout=0.2, retries=1).validate("tok")
    elapsed = time.monotonic() - started
    assert elapsed < 0.2 * 2 + 0.4
    assert srv.calls == 2


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"scope": "a"}', b"[true]"])
async def test_unreadable_answer_is_unavailable(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, body: bytes) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    srv = await serve(aiohttp_server, garbage)
    with pytest.raises(ValidatorUnavailable):
        await client(session, srv.url).validate("tok")
    assert srv.calls == 1


async def test_at_the_gateway_a_400_is_401_cached_negatively_not_503(
        aiohttp_server: AiohttpServer, make_gateway: GatewayFactory, upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    srv = await serve(aiohttp_server, json_answer(
        {"error": "unsupported_token_type",
         "error_description": "Structured JWT Tokens cannot be introspected"}, status=400))
    gw = await make_gateway(introspection_url=srv.url)
    jwt_shaped = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    for _ in range(2):
        resp = await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {jwt_shaped}"})
        assert resp.status == 401
        assert "Retry-After" not in resp.headers
        assert (await resp.json())["error"] == "invalid_token"
    assert srv.calls == 1  # the second answer came from the negative cache
    assert upstream.received == []
    assert "credentials" not in caplog.text
