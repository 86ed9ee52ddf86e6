"""The console's "Confirm it's you" step before its most dangerous changes (deleting a
client, rotating a secret, changing the tenant settings), and the person's address in
every console audit entry."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.forms import find_form
from tests.test_console import PASSWORD, audit, post, sign_in


@pytest.fixture
async def h(make_auth_gateway: AuthGatewayFactory) -> AuthHarness:
    h = await make_auth_gateway()
    await h.auth.add_user("root", PASSWORD, actor="test", admin=True)
    return h


@pytest.fixture
async def browser() -> Any:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def age_session(redis: Redis, seconds: int) -> None:
    """Make every console session's sign-in ``seconds`` old."""
    async for key in redis.scan_iter(match="gw:as:session:*"):
        data = json.loads(await redis.get(key) or "{}")
        data["auth_time"] -= seconds
        await redis.set(key, json.dumps(data), keepttl=True)


async def machine_client(h: AuthHarness) -> str:
    client, _ = await h.auth.create_client(name="Nightly export", grant="client_credentials",
                                           scopes=["anaplan:read"], redirect_uris=[],
                                           actor="t")
    return client.client_id


async def test_a_fresh_session_rotates_at_once(h: AuthHarness, browser: aiohttp.ClientSession,
                                               redis: Redis) -> None:
    cid = await machine_client(h)
    await sign_in(h, browser, "root")
    page = f"/console/clients/{cid}"
    resp = await post(h, browser, page, f"{page}/rotate-secret", {"grace": "0"})
    assert resp.status == 200 and "Copy the secret now" in await resp.text()
    [rotated] = [e for e in await audit(redis) if e["action"] == "client.secret_rotated"]
    assert rotated["actor"] == "console:root" and rotated["remote"] == "127.0.0.1"
    assert not [e for e in await audit(redis) if e["action"] == "console.reauthenticated"]


async def test_an_old_session_confirms_with_its_password_first(
        h: AuthHarness, browser: aiohttp.ClientSession, redis: Redis) -> None:
    cid = await machine_client(h)
    before = (await h.auth.get(cid)).secret_hash
    await sign_in(h, browser, "root")
    await age_session(redis, 600)
    page = f"/console/clients/{cid}"
    resp = await post(h, browser, page, f"{page}/rotate-secret", {"grace": "3600"})
    html = await resp.text()
    assert resp.status == 200 and "Confirm it's you" in html
    assert "Nothing has been changed yet" in html
    assert (await h.auth.get(cid)).secret_hash == before
    form = find_form(html, field_name="reauth_password")
    assert form.fields["grace"] == "3600"  # the change asked for, carried along

    wrong = await browser.post(h.issuer + form.action,
                               data={**form.fields, "reauth_password": "not it"})
    assert wrong.status == 401 and "Wrong password" in await wrong.text()
    assert (await h.auth.get(cid)).secret_hash == before

    right = await browser.post(h.issuer + form.action,
                               data={**form.fields, "reauth_password": PASSWORD})
    html = await right.text()
    assert right.status == 200 and "Copy the secret now" in html
    assert "The old secret keeps working for 1 hour" in html
    assert (await h.auth.get(cid)).secret_hash != before
    entries = await audit(redis)
    [confirmed] = [e for e in entries if e["action"] == "console.reauthenticated"]
    assert confirmed["user"] == "root" and confirmed["remote"] == "127.0.0.1"
    assert [e["reason"] for e in entries if e["action"] == "login.failed"] == [
        "reauthentication"]
    # the session is recent again: the next dangerous change needs no password
    resp = await post(h, browser, "/console/settings", "/console/settings",
                      {"self_service": "0"})
    assert "Settings saved" in await resp.text()
    assert not (await h.auth.tenant_settings()).self_service


async def test_wrong_passwords_are_throttled_like_login(
        h: AuthHarness, browser: aiohttp.ClientSession, redis: Redis) -> None:
    cid = await machine_client(h)
    await sign_in(h, browser, "root")
    await age_session(redis, 600)
    page = f"/console/clients/{cid}/delete"
    html = await (await post(h, browser, page, page, {"reason": "gone"})).text()
    form = find_form(html, field_name="reauth_password")
    for _ in range(5):
        resp = await browser.post(h.issuer + page,
                                  data={**form.fields, "reauth_password": "guess"})
        assert resp.status == 401
    # held back now, even with the right password: the login page's back-off
    resp = await browser.post(h.issuer + page,
                              data={**form.fields, "reauth_password": PASSWORD})
    assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    assert "Too many wrong passwords" in await resp.text()
    assert await h.auth.store.get_client(cid) is not None
    assert any(e["action"] == "login.throttled" for e in await audit(redis))


async def test_sso_users_are_sent_to_sign_in_again(
        h: AuthHarness, browser: aiohttp.ClientSession, redis: Redis) -> None:
    await sign_in(h, browser, "root")
    async for key in redis.scan_iter(match="gw:as:session:*"):
        data = json.loads(await redis.get(key) or "{}")
        data.update(method="sso", auth_time=data["auth_time"] - 600)
        await redis.set(key, json.dumps(data), keepttl=True)
    resp = await post(h, browser, "/console/settings", "/console/settings",
                      {"self_service": "0", "reauth_password": PASSWORD})
    html = await resp.text()
    assert "Confirm it's you" in html and 'name="reauth_password"' not in html
    assert 'href="/oauth/sso/start?next=%2Fconsole%2Fsettings"' in html
    assert (await h.auth.tenant_settings()).self_service


async def test_console_changes_are_audited_with_the_address(
        h: AuthHarness, browser: aiohttp.ClientSession, redis: Redis) -> None:
    cid = await machine_client(h)
    await sign_in(h, browser, "root")
    page = f"/console/clients/{cid}"
    await post(h, browser, page, f"{page}/disable", {"reason": "paused"})
    await post(h, browser, "/console/people", "/console/people/add",
               {"name": "carol", "password": PASSWORD})
    mine = {e["action"]: e for e in await audit(redis) if e.get("actor") == "console:root"}
    assert mine["client.disabled"]["remote"] == "127.0.0.1"
    assert mine["user.added"]["remote"] == "127.0.0.1"


async def test_the_confirm_page_carries_the_form_as_text(
        h: AuthHarness, browser: aiohttp.ClientSession, redis: Redis) -> None:
    from tests.test_pages_escaping import MARKUP, assert_inert
    cid = await machine_client(h)
    await sign_in(h, browser, "root")
    await age_session(redis, 600)
    page = f"/console/clients/{cid}/delete"
    resp = await post(h, browser, page, page, {"reason": MARKUP})
    html = await resp.text()
    assert_inert(html)
    form = find_form(html, field_name="reauth_password")
    assert form.fields["reason"] == MARKUP
    done = await browser.post(h.issuer + page,
                              data={**form.fields, "reauth_password": PASSWORD})
    assert "Client deleted" in await done.text()
    [deleted] = [e for e in await audit(redis) if e["action"] == "client.deleted"]
    assert deleted["reason"] == MARKUP and deleted["remote"] == "127.0.0.1"
