"""Anaplan token validation against a real loopback stand-in for auth.anaplan.com."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.authn.validators.anaplan import AnaplanValidator
from gateway.authn.validators.base import ValidatorUnavailable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class AnaplanAuth:
    """Counts the calls and keeps the Authorization header of each."""

    def __init__(self) -> None:
        self.calls = 0
        self.authorization: list[str | None] = []
        self.url = ""


async def serve(aiohttp_server: AiohttpServer, answer: Handler) -> AnaplanAuth:
    state = AnaplanAuth()

    async def validate(request: web.Request) -> web.StreamResponse:
        state.calls += 1
        state.authorization.append(request.headers.get("Authorization"))
        return await answer(request)

    app = web.Application()
    app.router.add_get("/token/validate", validate)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/token/validate"))
    return state


def success(expires_at_ms: int, **token_info: Any) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({
            "meta": {"validationUrl": "https://auth.anaplan.com/token/validate"},
            "status": "SUCCESS",
            "statusMessage": "Token validated",
            "tokenInfo": {"expiresAt": expires_at_ms, "tokenId": "t-1", "userId": "u-42",
                          "refreshTokenId": "r-1", **token_info},
            "userInfo": {"userGuid": "8a81b09e5c3d", "userId": "u-42"},
        })
    return answer


def status_answer(status: int, body: dict[str, Any] | None = None) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(body or {"status": "FAILURE"}, status=status)
    return answer


def validator(session: aiohttp.ClientSession, url: str, **kw: Any) -> AnaplanValidator:
    kw.setdefault("backoff", 0.0)
    return AnaplanValidator(session, url, **kw)


async def test_success_maps_the_answer(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    expires_at = int((time.time() + 2100) * 1000)
    srv = await serve(aiohttp_server, success(expires_at, clientId="oauth-client-7"))
    info = await validator(session, srv.url).validate("anaplan-token-1")
    assert info.active
    assert srv.authorization == ["AnaplanAuthToken anaplan-token-1"]
    assert info.exp == expires_at / 1000
    assert info.client_id == "oauth-client-7"
    assert info.sub == "8a81b09e5c3d"  # userInfo.userGuid, not tokenInfo.userId
    assert info.scopes == {"anaplan:read", "anaplan:write"}


async def test_without_client_id_and_with_configured_scopes(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, success(int((time.time() + 60) * 1000)))
    v = validator(session, srv.url, default_scopes=frozenset({"anaplan:read"}))
    info = await v.validate("tok")
    assert info.active and info.client_id is None
    assert info.scopes == {"anaplan:read"}


async def test_401_is_inactive_without_retry(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, status_answer(401))
    info = await validator(session, srv.url, retries=3).validate("tok")
    assert not info.active
    assert srv.calls == 1


async def test_failure_status_is_inactive(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, status_answer(
        200, {"status": "FAILURE", "statusMessage": "Token invalid"}))
    assert not (await validator(session, srv.url).validate("tok")).active


async def test_expired_answer_is_inactive(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, success(int((time.time() - 5) * 1000)))
    assert not (await validator(session, srv.url).validate("tok")).active


async def test_5xx_is_retried_then_answered(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    statuses = [503, 500]
    ok = success(int((time.time() + 60) * 1000))

    async def flaky(request: web.Request) -> web.StreamResponse:
        if statuses:
            return web.json_response({"status": "FAILURE"}, status=statuses.pop(0))
        return await ok(request)

    srv = await serve(aiohttp_server, flaky)
    assert (await validator(session, srv.url, retries=2).validate("tok")).active
    assert srv.calls == 3


async def test_5xx_beyond_the_bound_is_unavailable(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    srv = await serve(aiohttp_server, status_answer(502))
    with pytest.raises(ValidatorUnavailable, match="502"):
        await validator(session, srv.url, retries=2).validate("tok")
    assert srv.calls == 3


async def test_a_bad_header_answer_is_inactive_without_retry(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    # what an Anaplan-style token service answers a token it cannot read
    srv = await serve(aiohttp_server, status_answer(
        400, {"status": "FAILURE_BAD_HEADER", "statusMessage": "Bad header"}))
    assert not (await validator(session, srv.url, retries=3).validate("a" * 5000)).active
    assert srv.calls == 1


@pytest.mark.parametrize("status", ["FAILURE_BAD_CREDENTIAL", "FAILURE_BAD_HEADER"])
async def test_every_failure_status_is_inactive(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, status: str) -> None:
    srv = await serve(aiohttp_server, status_answer(
        200, {"status": status, "statusMessage": "Token invalid"}))
    assert not (await validator(session, srv.url).validate("tok")).active


@pytest.mark.parametrize("status", [404, 429])
async def test_other_4xx_is_unavailable_without_retry(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, status: int) -> None:
    srv = await serve(aiohttp_server, status_answer(status))
    with pytest.raises(ValidatorUnavailable, match=str(status)):
        await validator(session, srv.url, retries=2).validate("tok")
    assert srv.calls == 1


@pytest.mark.parametrize("body", [
    b"<html>maintenance</html>",
    b'{"status": "SUCCESS"}',
    b'{"status": "SUCCESS", "tokenInfo": {"tokenId": "t"}}',
    b'{"status": "PENDING"}',
])
async def test_garbage_is_unavailable(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, body: bytes) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    srv = await serve(aiohttp_server, garbage)
    with pytest.raises(ValidatorUnavailable):
        await validator(session, srv.url).validate("tok")


@pytest.mark.parametrize("token", ["", "tok\r\nX-Injected: 1", "two words"])
async def test_malformed_token_never_reaches_anaplan(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, token: str) -> None:
    srv = await serve(aiohttp_server, success(int((time.time() + 60) * 1000)))
    assert not (await validator(session, srv.url).validate(token)).active
    assert srv.calls == 0
