"""The administrators' web console, ``/console/``, driven over HTTP as a browser would:
every form with its CSRF token, every change through the service layer (audited as
``console:<username>``), a non-admin refused everywhere."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from redis.asyncio import Redis
from yarl import URL

from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.forms import find_form, forms

PASSWORD = "correct horse battery"
MOMENT = r"\d{4}-\d\d-\d\d \d\d:\d\d \((just now|\d+ (minute|hour|day)s? ago)\)"
PAGES = ("/console/", "/console/clients", "/console/clients/new", "/console/grants",
         "/console/people", "/console/audit", "/console/settings")


@pytest.fixture
async def h(make_auth_gateway: AuthGatewayFactory) -> AuthHarness:
    h = await make_auth_gateway()
    await h.auth.add_user("root", PASSWORD, actor="test", admin=True)
    await h.auth.add_user("alice", PASSWORD, actor="test")
    return h


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def sign_in(h: AuthHarness, browser: aiohttp.ClientSession, username: str,
                  next_url: str = "/console/") -> aiohttp.ClientResponse:
    page = await browser.get(h.issuer + "/oauth/login?next=" + next_url)
    form = find_form(await page.text(), field_name="username")
    return await browser.post(h.issuer + "/oauth/login", data={
        **form.fields, "username": username, "password": PASSWORD})


async def post(h: AuthHarness, browser: aiohttp.ClientSession, page_path: str, action: str,
               values: dict[str, Any] | None = None, **kw: Any) -> aiohttp.ClientResponse:
    """Open ``page_path``, fill the form posting to ``action`` and send it."""
    html = await (await browser.get(h.issuer + page_path)).text()
    found = [f for f in forms(html) if f.action == action]
    assert found, f"no form to {action} on {page_path}:\n{html}"
    form = max(found, key=lambda f: len(f.fields))  # the settings' reset form is bare
    data: Any = {**form.fields, **(values or {})}
    return await browser.post(h.issuer + action, data=data, **kw)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def audit(redis: Redis) -> list[dict[str, str]]:
    entries: Any = await redis.xrange("gw:audit")
    return [f for _, f in entries]


async def test_signed_out_is_sent_to_login_and_back(h: AuthHarness,
                                                    browser: aiohttp.ClientSession) -> None:
    resp = await browser.get(h.issuer + "/console/clients?status=active",
                             allow_redirects=False)
    assert resp.status == 303
    location = urlsplit(resp.headers["Location"])
    assert location.path == "/oauth/login"
    assert parse_qs(location.query)["next"] == ["/console/clients?status=active"]
    page = await sign_in(h, browser, "root", "/console/clients")
    assert page.status == 200 and str(page.url).endswith("/console/clients")
    assert "<h1>Clients</h1>" in await page.text()


async def test_a_non_admin_gets_403_everywhere(h: AuthHarness, browser: aiohttp.ClientSession,
                                               redis: Redis) -> None:
    client, _ = await h.auth.create_client(name="App", grant="device_code", redirect_uris=[],
                                           scopes=["anaplan:read"], actor="t")
    await sign_in(h, browser, "alice")
    for path in (*PAGES, f"/console/clients/{client.client_id}"):
        resp = await browser.get(h.issuer + path)
        assert resp.status == 403, path
        assert "Administrators only" in await resp.text()
    csrf = browser.cookie_jar.filter_cookies(URL(h.issuer))["gw_csrf"].value
    before = len(await audit(redis))
    for action in (f"/console/clients/{client.client_id}/disable", "/console/people/add",
                   f"/console/clients/{client.client_id}/delete", "/console/settings"):
        resp = await browser.post(h.issuer + action, data={
            "csrf_token": csrf, "confirm": client.client_id, "name": "eve",
            "password": PASSWORD})
        assert resp.status == 403, action
    assert len(await audit(redis)) == before
    assert not (await h.auth.get(client.client_id)).disabled
    # the role taken away cuts the console at the next request
    await h.auth.set_admin("alice", True, actor="t")
    assert (await browser.get(h.issuer + "/console/")).status == 200
    await h.auth.set_admin("alice", False, actor="t")
    assert (await browser.get(h.issuer + "/console/")).status == 403


async def test_every_page_renders_for_an_admin(h: AuthHarness,
                                               browser: aiohttp.ClientSession) -> None:
    await sign_in(h, browser, "root")
    for path in PAGES:
        resp = await browser.get(h.issuer + path)
        assert resp.status == 200, path
        html = await resp.text()
        assert 'aria-current="page"' in html and "Signed in as <strong>root</strong>" in html
        assert resp.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


async def test_create_a_device_client_with_its_policy_then_disable_it(
        h: AuthHarness, browser: aiohttp.ClientSession, redis: Redis) -> None:
    await sign_in(h, browser, "root")
    html = await (await browser.get(h.issuer + "/console/clients")).text()
    assert "oauth-gateway command line" in html  # the CLI's own client, always there
    # without the CSRF token: refused, nothing made
    refused = await browser.post(h.issuer + "/console/clients/new", data={
        "csrf_token": "x" * 32, "name": "Build CLI", "flow": "device_code"})
    assert refused.status == 403 and len(await h.auth.list_clients()) == 1
    resp = await post(h, browser, "/console/clients/new", "/console/clients/new", {
        "name": "Build CLI", "flow": "device_code", "scopes": "anaplan:read",
        "access_token_ttl_value": "1", "access_token_ttl_unit": "hours",
        "refresh_mode": "non_rotatable"})
    assert resp.status == 200, await resp.text()
    [client] = [c for c in await h.auth.list_clients() if c.name == "Build CLI"]
    assert str(resp.url).endswith(f"/console/clients/{client.client_id}?done=created")
    assert client.name == "Build CLI" and client.scopes == ("anaplan:read",)
    assert client.policy.access_token_ttl == 3600 and client.policy.refresh_mode == \
        "non_rotatable"
    html = await resp.text()
    assert "Client created." in html and "Public (no secret)" in html
    [created] = [e for e in await audit(redis) if e["action"] == "client.created"
                 and e["client_id"] == client.client_id]
    assert created["actor"] == "console:root"

    # a token of it works; disabled from the console, the gateway refuses it within 1 s
    grant = await h.auth.issuer.new_grant(client, username="alice", sub="s-alice",
                                          scope="anaplan:read", grant_type=client.grant_type,
                                          label="laptop")
    token = str((await h.auth.issuer.issue(client, grant, scope="anaplan:read",
                                           grant_type=client.grant_type))["access_token"])
    assert (await h.client.get("/2/0/ws", headers=bearer(token))).status == 200
    page = f"/console/clients/{client.client_id}"
    resp = await post(h, browser, page, f"{page}/disable", {"reason": "leaked"})
    assert resp.status == 200 and "Client disabled" in await resp.text()
    started = time.monotonic()
    while (await h.client.get("/2/0/ws", headers=bearer(token))).status != 401:
        assert time.monotonic() - started < 1.0, "the disabled client's token still works"
        await asyncio.sleep(0.05)
    [disabled] = [e for e in await audit(redis) if e["action"] == "client.disabled"]
    assert (disabled["actor"], disabled["reason"]) == ("console:root", "leaked")
    listing = await browser.get(h.issuer + "/console/clients?status=disabled")
    assert "Build CLI" in await listing.text()
    listing = await browser.get(h.issuer + "/console/clients?status=active")
    assert "Build CLI" not in await listing.text()
    listing = await browser.get(h.issuer + "/console/clients?status=disabled&q=nothing")
    assert "No client matches these filters" in await listing.text()
    resp = await post(h, browser, page, f"{page}/enable")
    assert "Client enabled" in await resp.text()
    assert not (await h.auth.get(client.client_id)).disabled


async def test_policy_rotation_grants_and_delete(h: AuthHarness,
                                                 browser: aiohttp.ClientSession,
                                                 redis: Redis) -> None:
    client, secret = await h.auth.create_client(
        name="Budget Planner", grant="authorization_code", scopes=["anaplan:read"],
        redirect_uris=["https://app.example/cb"], actor="t")
    grant = await h.auth.issuer.new_grant(client, username="alice", sub="s-alice",
                                          scope="anaplan:read", grant_type=client.grant_type,
                                          label="Chrome on Linux")
    await sign_in(h, browser, "root")
    page = f"/console/clients/{client.client_id}"
    html = await (await browser.get(h.issuer + page)).text()
    assert "Chrome on Linux" in html and len(re.findall(MOMENT, html)) >= 3
    resp = await post(h, browser, page, f"{page}/policy", {
        "refresh_mode": "non_rotatable", "idle_timeout_value": "7",
        "idle_timeout_unit": "days"})
    assert "Token policy saved" in await resp.text()
    updated = await h.auth.get(client.client_id)
    assert updated.policy.refresh_mode == "non_rotatable"
    assert updated.policy.idle_timeout == 7 * 86400
    bad = await post(h, browser, page, f"{page}/policy", {"access_token_ttl_value": "5",
                                                          "access_token_ttl_unit": "seconds"})
    assert bad.status == 400 and "access token lifetime" in await bad.text()

    resp = await post(h, browser, page, f"{page}/rotate-secret", {"grace": "3600"})
    html = await resp.text()
    assert resp.status == 200 and "Copy the secret now" in html
    new_secret = re.search(r'<p class="secret" id="secret">([^<]+)</p>', html)
    assert new_secret and new_secret.group(1) != secret
    assert "The old secret keeps working for 1 hour" in html
    assert (await h.auth.get(client.client_id)).old_secret_expires_at > time.time() + 3500

    resp = await post(h, browser, page, f"/console/grants/{grant.grant_id}/revoke")
    assert str(resp.url).endswith(f"{page}?done=revoked")
    assert (await h.auth.store.get_grant(grant.grant_id)).revoked  # type: ignore[union-attr]

    confirm = await browser.get(h.issuer + f"{page}/delete")
    assert "Delete Budget Planner?" in await confirm.text()
    # a delete without the confirmation field goes back to the confirmation step
    csrf = browser.cookie_jar.filter_cookies(URL(h.issuer))["gw_csrf"].value
    resp = await browser.post(h.issuer + f"{page}/delete", data={"csrf_token": csrf})
    assert str(resp.url).endswith(f"{page}/delete")
    assert await h.auth.store.get_client(client.client_id) is not None
    resp = await post(h, browser, f"{page}/delete", f"{page}/delete", {"reason": "retired"})
    assert "Client deleted" in await resp.text()
    assert await h.auth.store.get_client(client.client_id) is None
    actions = {e["action"]: e for e in await audit(redis) if e.get("actor") == "console:root"}
    assert {"client.updated", "client.secret_rotated", "grant.revoked",
            "client.deleted"} <= set(actions)


async def test_people_forms(h: AuthHarness, browser: aiohttp.ClientSession,
                            redis: Redis) -> None:
    await sign_in(h, browser, "root")
    resp = await post(h, browser, "/console/people", "/console/people/add", {
        "name": "bob", "password": "a-long-password", "admin": "1"})
    assert "Person added" in await resp.text()
    assert (await h.auth.user_view("bob"))["admin"]
    resp = await post(h, browser, "/console/people", "/console/people/add", {
        "name": "bob", "password": "a-long-password"})
    assert resp.status == 400 and "exists" in await resp.text()
    csrf = browser.cookie_jar.filter_cookies(URL(h.issuer))["gw_csrf"].value
    for action, values in (("role", {"admin": "0"}), ("disable", {"reason": "left"}),
                           ("password", {"password": "another-password"}),
                           ("enable", {})):
        resp = await browser.post(h.issuer + f"/console/people/{action}", data={
            "csrf_token": csrf, "name": "bob", **values})
        assert resp.status == 200, (action, await resp.text())
    view = await h.auth.user_view("bob")
    assert not view["admin"] and not view["disabled"]
    acts = [e["action"] for e in await audit(redis) if e.get("actor") == "console:root"]
    assert acts.count("user.role_changed") == 2 and "user.password_set" in acts
    # an admin cannot take their own role away here (no lock-out by a slip)
    resp = await browser.post(h.issuer + "/console/people/role", data={
        "csrf_token": csrf, "name": "root", "admin": "0"})
    assert resp.status == 400 and (await h.auth.user_view("root"))["admin"]


async def test_audit_filters_and_export(h: AuthHarness, browser: aiohttp.ClientSession
                                        ) -> None:
    client, _ = await h.auth.create_client(name="App", grant="device_code", redirect_uris=[],
                                           scopes=[], actor="t")
    await h.auth.set_disabled(client.client_id, True, actor="someone", reason="x")
    await sign_in(h, browser, "root")
    html = await (await browser.get(h.issuer + "/console/audit?actor=someone")).text()
    assert "client.disabled" in html and "user.added" not in html
    resp = await browser.get(h.issuer + "/console/audit/export?actor=someone")
    assert resp.status == 200
    assert resp.headers["Content-Disposition"].startswith('attachment; filename="gateway-audit-')
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [e["action"] for e in lines] == ["client.disabled"]
    assert lines[0]["client_id"] == client.client_id


async def test_tenant_settings(h: AuthHarness, browser: aiohttp.ClientSession,
                               redis: Redis) -> None:
    machine, secret = await h.auth.create_client(name="M", grant="client_credentials",
                                                 redirect_uris=[], scopes=[], actor="t")
    await sign_in(h, browser, "root")
    html = await (await browser.get(h.issuer + "/console/settings")).text()
    assert "(from: default)" in html and "(from: console)" not in html
    resp = await post(h, browser, "/console/settings", "/console/settings", {
        "self_service": "0", "flows": "device_code", "access_token_ttl_value": "10",
        "access_token_ttl_unit": "minutes", "admin_groups": "ops, sec"})
    html = await resp.text()
    assert "Settings saved" in html and "(from: console)" in html
    assert await redis.hgetall("gw:as:tenant") == {
        "self_service": "0", "flows": "device_code", "access_token_ttl": "600",
        "admin_groups": "ops,sec"}
    # new clients: only the device flow, with the tenant's default policy
    with pytest.raises(ValueError, match="only for device_code"):
        await h.auth.create_client(name="W", grant="authorization_code",
                                   redirect_uris=["https://a.example/cb"], scopes=[],
                                   actor="t")
    client, _ = await h.auth.create_client(name="D", grant="device_code", redirect_uris=[],
                                           scopes=["anaplan:read"], actor="t")
    assert client.policy.access_token_ttl == 600
    # self-service off: no new grant (a machine's first token: access_denied)
    await asyncio.sleep(1.1)  # the server's tenant cache (at most 1 s)
    resp = await h.client.post("/oauth/token", data={"grant_type": "client_credentials"},
                               headers={"Authorization": aiohttp.encode_basic_auth(
                                   machine.client_id, str(secret))})
    assert resp.status == 400 and (await resp.json())["error"] == "access_denied"
    entry = [e for e in await audit(redis) if e["action"] == "tenant.updated"]
    assert entry and entry[0]["actor"] == "console:root"
    # back to the environment's value
    await post(h, browser, "/console/settings", "/console/settings",
               {"reset_self_service": "1"})
    assert "self_service" not in await redis.hgetall("gw:as:tenant")
    await asyncio.sleep(1.1)
    resp = await h.client.post("/oauth/token", data={"grant_type": "client_credentials"},
                               headers={"Authorization": aiohttp.encode_basic_auth(
                                   machine.client_id, str(secret))})
    assert resp.status == 200, await resp.text()
