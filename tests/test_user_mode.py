"""Sign in with Anaplan, and ``credentials: user``: a person signs in at the Anaplan OAuth
stand-in through the built-in server's login page, an app gets a grant from them (device
flow), and its calls reach the upstream with the person's own Anaplan token."""

from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from gateway.authserver import DeviceFlowTiming
from gateway.demo.oauthservice import OAuthStandIn
from gateway.state.keys import Keys
from gateway.state.signins import SignInStore
from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.test_flow_device import Browser, DevicePoller, device_and_browser

CALLBACK = "/oauth/sso/anaplan/callback"
KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
EMAIL = "alice@example.com"
GUID = OAuthStandIn.guid(EMAIL)


@dataclass
class Anaplan:
    standin: OAuthStandIn
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def anaplan(aiohttp_server: AiohttpServer) -> Anaplan:
    standin = OAuthStandIn("gw-client", "gw-client-secret")
    return Anaplan(standin, await aiohttp_server(standin.app()))


async def signin_gateway(make: AuthGatewayFactory, anaplan: Anaplan, policy: str | None = None,
                         **overrides: Any) -> AuthHarness:
    values: dict[str, Any] = {
        "anaplan_oauth_url": anaplan.url, "anaplan_auth_url": anaplan.url,
        "anaplan_client_id": "gw-client", "anaplan_client_secret": "gw-client-secret",
        "secret_keys": KEY_A, **overrides}
    h = await make(policy, device=DeviceFlowTiming(expires_in=60, interval=1), **values)
    anaplan.standin.redirect_uris.append(h.issuer + CALLBACK)
    return h


async def sign_in_with_anaplan(browser: Browser, next_path: str) -> str:
    """From the login page, through the "Sign in with Anaplan" link: where it ends."""
    page = await browser.get("/oauth/login?next=" + next_path)
    link = re.search(r'href="(/oauth/sso/anaplan/start\?next=[^"]+)"', page.text)
    assert link, page.text
    landed = await browser.get(link.group(1).replace("&amp;", "&"))
    assert landed.status == 200, landed.text
    return landed.url


async def test_sign_in_with_anaplan_lands_signed_in_as_the_user_guid(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    h = await signin_gateway(make_auth_gateway, anaplan)
    browser = Browser(h.issuer)
    try:
        landed = await sign_in_with_anaplan(browser, "/account/")
        page = await browser.get("/account/")
    finally:
        await browser.http.close()
    assert landed == h.issuer + "/account/"
    assert f"signed in as <strong>{EMAIL}</strong>" in page.text
    user = await redis.hgetall(f"gw:as:user:{EMAIL}")
    assert user["sub"] == GUID and user["sso_sub"] == GUID and user["sso"] == anaplan.url
    assert "password_hash" not in user
    assert anaplan.standin.calls["token"] == 1 and anaplan.standin.calls["validate"] == 1
    assert await redis.keys("gw:as:sso_state:*") == []
    # the person's Anaplan tokens are kept sealed: no token in clear anywhere in Redis
    sealed = await redis.get(f"gw:anaplan_signin:{GUID}")
    assert sealed
    stored = await SignInStore(redis, Keys("gw:"), [base64.b64decode(KEY_A)]).load(GUID)
    assert stored is not None and stored.signin.username == EMAIL
    assert anaplan.standin.live(stored.signin.access_token) is not None
    for key in await redis.keys("*"):
        value = await redis.get(key) if await redis.type(key) == "string" else ""
        assert stored.signin.access_token not in (value or "")
        assert stored.signin.refresh_token not in (value or "")
    # another key does not open it
    assert await SignInStore(redis, Keys("gw:"), [base64.b64decode(KEY_B)]).load(GUID) is None


async def test_sign_in_link_only_when_configured_and_state_is_checked(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan) -> None:
    plain = await make_auth_gateway()
    browser = Browser(plain.issuer)
    try:
        page = await browser.get("/oauth/login")
        assert "Sign in with Anaplan" not in page.text
        gone = await browser.get("/oauth/sso/anaplan/start")
        assert gone.status == 404 and "not configured" in gone.text
    finally:
        await browser.http.close()
    h = await signin_gateway(make_auth_gateway, anaplan)
    other = Browser(h.issuer)
    try:
        forged = await other.get(CALLBACK + "?code=abc&state=" + "x" * 43)
        assert forged.status == 400 and "unknown, expired or already used" in forged.text
        async with other.http.get(h.issuer + "/oauth/sso/anaplan/start?next=/oauth/account",
                                  allow_redirects=False) as resp:
            authorize = resp.headers["Location"]
        assert authorize.startswith(anaplan.url + "/auth/authorize?")
        assert "scope=openid+email+offline_access" in authorize \
            or "scope=openid%20email%20offline_access" in authorize
        async with other.http.get(authorize, allow_redirects=False) as resp:
            back = resp.headers["Location"]
        victim = Browser(h.issuer)  # login CSRF: another browser cannot finish it
        try:
            refused = await victim.get(back)
            assert refused.status == 400 and "started in another browser" in refused.text
        finally:
            await victim.http.close()
    finally:
        await other.http.close()


async def device_grant(h: AuthHarness, browser: Browser, scope: str = "anaplan:read"
                       ) -> dict[str, Any]:
    """An app's device grant, approved by a person who signs in with Anaplan."""
    client, _ = await h.auth.create_client(
        name="Anaplan CLI", grant="device_code", redirect_uris=[], scopes=[scope],
        actor="test")
    async with device_and_browser(h, client.client_id) as (device, _):
        status, auth = await device.start(scope=scope)
        assert status == 200
        waiting = asyncio.create_task(DevicePoller.wait_for_token(device, auth))
        page = await browser.get(auth["verification_uri_complete"])
        if "/oauth/login" in page.url:
            landed = await sign_in_with_anaplan(
                browser, "/oauth/device%3Fuser_code%3D" + auth["user_code"])
            page = await browser.get(landed)
        consent = await browser.submit(page, user_code=auth["user_code"])
        done = await browser.submit(consent, "approve")
        assert done.status == 200, done.text
        return await asyncio.wait_for(waiting, 10)


USER_POLICY = """
upstreams:
  api:
    url: {anaplan}
    credentials: user
routes:
  - name: read
    upstream: api
    methods: [GET]
    path: /2/0/**
    scopes: [anaplan:read]
"""


async def user_gateway(make: AuthGatewayFactory, anaplan: Anaplan, **overrides: Any
                       ) -> AuthHarness:
    policy = USER_POLICY.replace("{anaplan}", anaplan.url)
    return await signin_gateway(make, anaplan, policy, **overrides)


async def signed_in_app(h: AuthHarness) -> tuple[dict[str, Any], dict[str, str]]:
    browser = Browser(h.issuer)
    try:
        tokens = await device_grant(h, browser)
    finally:
        await browser.http.close()
    return tokens, {"Authorization": f"Bearer {tokens['access_token']}"}


def stored(redis: Redis) -> SignInStore:
    return SignInStore(redis, Keys("gw:"), [base64.b64decode(KEY_A)])


async def test_user_mode_sends_the_persons_anaplan_token_never_the_clients(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    h = await user_gateway(make_auth_gateway, anaplan)
    tokens, bearer = await signed_in_app(h)
    [grant] = await h.auth.list_grants(username=EMAIL)
    assert grant.username == EMAIL
    resp = await h.client.get("/2/0/workspaces", headers=bearer)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["user"] == EMAIL
    mine = await stored(redis).load(GUID)
    assert mine is not None
    assert anaplan.standin.api_authorizations == [f"AnaplanAuthToken {mine.signin.access_token}"]
    assert tokens["access_token"] not in " ".join(anaplan.standin.api_authorizations)
    assert anaplan.standin.calls["refresh"] == 0


async def test_token_of_nobody_or_without_anaplan_sign_in_is_401(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    h = await user_gateway(make_auth_gateway, anaplan)
    _, bearer = await signed_in_app(h)
    await redis.delete(f"gw:anaplan_signin:{GUID}")  # the sign-in is gone
    resp = await h.client.get("/2/0/workspaces", headers=bearer)
    assert resp.status == 401
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert anaplan.standin.calls["api"] == 0


async def test_stale_anaplan_token_is_refreshed_and_swapped(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    h = await user_gateway(make_auth_gateway, anaplan)
    _, bearer = await signed_in_app(h)
    before = await stored(redis).load(GUID)
    assert before is not None
    # past three quarters of its life: refreshed before it is sent
    old = before.signin
    aged = type(old)(old.username, old.access_token, old.refresh_token,
                     old.expires_at - 2000, old.obtained_at - 2000)
    assert await stored(redis).swap(GUID, before, aged)
    resp = await h.client.get("/2/0/workspaces", headers=bearer)
    assert resp.status == 200
    after = await stored(redis).load(GUID)
    assert after is not None and anaplan.standin.calls["refresh"] == 1
    assert after.signin.access_token != old.access_token
    assert after.signin.refresh_token != old.refresh_token  # rotated
    assert anaplan.standin.api_authorizations[-1] == \
        f"AnaplanAuthToken {after.signin.access_token}"
    # an upstream 401 (the token died at Anaplan) renews it once and retries
    anaplan.standin.stale()
    resp = await h.client.get("/2/0/models", headers=bearer)
    assert resp.status == 200 and anaplan.standin.calls["refresh"] == 2


async def test_three_replicas_refreshing_at_once_make_one_call(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    one = await user_gateway(make_auth_gateway, anaplan)
    others = [await user_gateway(make_auth_gateway, anaplan) for _ in range(2)]
    _, bearer = await signed_in_app(one)
    anaplan.standin.stale()
    anaplan.standin.refresh_delay = 0.3  # every replica sees the 401 while one refreshes
    answers = await asyncio.gather(*(h.client.get("/2/0/workspaces", headers=bearer)
                                     for h in (one, *others) * 2))
    assert [r.status for r in answers] == [200] * 6
    assert anaplan.standin.calls["refresh"] == 1
    assert anaplan.standin.calls["reuse_detected"] == 0


async def test_anaplan_refusing_the_refresh_ends_the_grant(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    h = await user_gateway(make_auth_gateway, anaplan)
    tokens, bearer = await signed_in_app(h)
    anaplan.standin.stale()
    anaplan.standin.refuse_refresh = True
    resp = await h.client.get("/2/0/workspaces", headers=bearer)
    assert resp.status == 401
    assert await redis.exists(f"gw:anaplan_signin:{GUID}") == 0
    [grant] = await h.auth.list_grants(username=EMAIL)
    assert grant.revoked and grant.revoked_reason == "anaplan_signin_ended"
    assert (await h.client.get("/2/0/workspaces", headers=bearer)).status == 401
    refresh = await h.client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": grant.client_id})
    assert refresh.status == 400  # the app's next login starts over


async def test_user_mode_without_secret_keys_is_refused_at_start(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan) -> None:
    from gateway.runtime.app import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"credentials: user.*GATEWAY_SECRET_KEYS"):
        await user_gateway(make_auth_gateway, anaplan, secret_keys="")


async def test_the_persons_tokens_are_sealed_and_open_after_key_rotation(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    h = await user_gateway(make_auth_gateway, anaplan)
    _, bearer = await signed_in_app(h)
    mine = await stored(redis).load(GUID)
    assert mine is not None
    raw = str(await redis.get(f"gw:anaplan_signin:{GUID}"))
    assert mine.signin.access_token not in raw and mine.signin.refresh_token not in raw
    assert EMAIL not in raw
    keys = Keys("gw:")
    assert await SignInStore(redis, keys, [base64.b64decode(KEY_B)]).load(GUID) is None
    rotated = SignInStore(redis, keys, [base64.b64decode(KEY_B), base64.b64decode(KEY_A)])
    opened = await rotated.load(GUID)
    assert opened is not None and opened.signin.access_token == mine.signin.access_token
    # a replica started with the new key first serves the same person without a refresh
    after = await user_gateway(make_auth_gateway, anaplan, secret_keys=f"{KEY_B},{KEY_A}")
    assert (await after.client.get("/2/0/workspaces", headers=bearer)).status == 200
    assert anaplan.standin.calls["refresh"] == 0


@pytest.mark.parametrize("cut", ["client", "person", "grant"])
async def test_a_disable_stops_the_persons_credential_at_once(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis,
        cut: str) -> None:
    replicas = [await user_gateway(make_auth_gateway, anaplan) for _ in range(2)]
    h = replicas[0]
    _, bearer = await signed_in_app(h)
    for r in replicas:
        assert (await r.client.get("/2/0/workspaces", headers=bearer)).status == 200
    [grant] = await h.auth.list_grants(username=EMAIL)
    if cut == "client":
        await h.auth.set_disabled(grant.client_id, True, actor="test")
    elif cut == "person":
        await h.auth.set_user_disabled(GUID, True, actor="test")
    else:
        await h.auth.revoke_grant(grant.grant_id, actor="test")
    delays = await asyncio.gather(*(r.until_status(401, 1.0, bearer, "/2/0/workspaces")
                                    for r in replicas))
    assert max(delays) < 0.1, delays
    calls = anaplan.standin.calls["api"]
    for r in replicas:
        resp = await r.client.get("/2/0/workspaces", headers=bearer)
        assert resp.status == 401
    assert anaplan.standin.calls["api"] == calls  # the Anaplan token is not sent again


async def test_anaplan_down_with_no_live_token_answers_503_and_sends_nothing(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis) -> None:
    h = await user_gateway(make_auth_gateway, anaplan)
    _, bearer = await signed_in_app(h)
    before = await stored(redis).load(GUID)
    assert before is not None
    old = before.signin
    expired = type(old)(old.username, old.access_token, old.refresh_token,
                        old.obtained_at - 1, old.obtained_at - 3600)
    assert await stored(redis).swap(GUID, before, expired)
    await anaplan.server.close()  # Anaplan's OAuth service is unreachable
    calls = anaplan.standin.calls["api"]
    resp = await h.client.get("/2/0/workspaces", headers=bearer)
    assert resp.status == 503, await resp.text()
    assert int(resp.headers["Retry-After"]) > 0
    assert (await resp.json())["error"] == "temporarily_unavailable"
    assert anaplan.standin.calls["api"] == calls
    # the grant stands: Anaplan did not refuse the refresh token, it was only away
    [grant] = await h.auth.list_grants(username=EMAIL)
    assert not grant.revoked and await stored(redis).load(GUID) is not None


async def test_secret_keys_reseal_lets_the_old_key_go(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan, redis: Redis,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Rotation's middle step: every sealed value (a person's sign-in, a service
    identity's token) sealed again under the new first key, its TTL kept."""
    import json
    import time

    from gateway.cli import commands as cli
    from gateway.forward.credentials.anaplan import AnaplanToken
    from gateway.forward.credentials.sharing import Shared, SharedToken

    h = await user_gateway(make_auth_gateway, anaplan)
    await signed_in_app(h)
    keys = Keys("gw:")
    old, new = [base64.b64decode(KEY_A)], [base64.b64decode(KEY_B)]
    service = SharedToken(redis, keys, "integration", old)
    fence = await service.lock(5)
    assert fence is not None
    assert await service.write(Shared(AnaplanToken("svc-token", time.time() + 600), time.time()),
                               fence, time.time())
    assert await SignInStore(redis, keys, new).load(GUID) is None  # not yet

    monkeypatch.setenv("GATEWAY_REDIS_URL", h.gw.settings.redis_url)
    monkeypatch.setenv("GATEWAY_SECRET_KEYS", f"{KEY_B},{KEY_A}")
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["secret-keys", "reseal", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"resealed": 2, "current": 0, "unreadable": 0}
    person = await SignInStore(redis, keys, new).load(GUID)  # the old key is not needed
    assert person is not None and person.signin.username == EMAIL
    shared = await SharedToken(redis, keys, "integration", new).read()
    assert shared is not None and shared.token.value == "svc-token"
    assert 590_000 < await redis.pttl(keys.upstream_credential("integration")) <= 600_000
    stream: Any = await redis.xrange(keys.audit)
    assert stream[-1][1]["action"] == "secret_keys.resealed"
    # again: nothing to do; with a key that opens nothing: said, and a failing exit code
    assert await asyncio.to_thread(cli.main, ["secret-keys", "reseal", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["current"] == 2
    monkeypatch.setenv("GATEWAY_SECRET_KEYS", base64.b64encode(b"c" * 32).decode())
    assert await asyncio.to_thread(cli.main, ["secret-keys", "reseal"]) == 1
    assert "2 that no listed key opens" in capsys.readouterr().out
