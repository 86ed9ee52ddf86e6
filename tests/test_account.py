"""A person's own page, ``/account/``: the apps and devices holding their grants, and a
button that ends each, through the same path as ``grants revoke``."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.authserver.account import moment
from gateway.authserver.models import Grant, OAuthClient
from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.forms import forms

PASSWORD = "correct horse battery"
#: a moment as the page shows it
MOMENT = r"\d{4}-\d\d-\d\d \d\d:\d\d \((just now|\d+ (minute|hour|day)s? ago)\)"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _grant(h: AuthHarness, client: OAuthClient, username: str, label: str
                 ) -> tuple[Grant, str]:
    """A grant of ``username`` to ``client`` on the device ``label``, and a token of it."""
    sub = (await h.auth.store.get_user(username))["sub"]
    grant = await h.auth.issuer.new_grant(client, username=username, sub=sub,
                                          scope="anaplan:read", grant_type=client.grant_type,
                                          label=label)
    body = await h.auth.issuer.issue(client, grant, scope="anaplan:read",
                                     grant_type=client.grant_type)
    return grant, str(body["access_token"])


async def _sign_in(h: AuthHarness, username: str) -> None:
    """Sign in on the harness's client (its cookie jar keeps the session)."""
    page = await h.client.get("/oauth/login?next=/account/")
    assert page.status == 200
    [form] = forms(await page.text())
    resp = await h.client.post("/oauth/login", data={
        **form.fields, "username": username, "password": PASSWORD}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/account/"


def _revoke_forms(html: str) -> dict[str, dict[str, str]]:
    """The page's revoke forms by grant id."""
    return {f.fields["grant_id"]: f.fields for f in forms(html) if f.action == "/account/revoke"}


@pytest.fixture
async def scene(make_auth_gateway: AuthGatewayFactory) -> dict[str, Any]:
    h = await make_auth_gateway()
    for name in ("alice", "bob", "carol"):
        await h.auth.add_user(name, PASSWORD, actor="test")
    cli, _ = await h.auth.create_client(name="Build CLI", grant="device_code",
                                        redirect_uris=[], scopes=["anaplan:read"], actor="t")
    app, _ = await h.auth.create_client(
        name="Budget Planner", grant="authorization_code", scopes=["anaplan:read"],
        redirect_uris=["https://app.example/cb"], actor="t")
    laptop, laptop_token = await _grant(h, cli, "alice", "work laptop")
    browser, browser_token = await _grant(h, app, "alice", "Chrome on Linux")
    bobs, bobs_token = await _grant(h, cli, "bob", "bob's phone")
    return {"h": h, "laptop": laptop, "laptop_token": laptop_token, "browser": browser,
            "browser_token": browser_token, "bobs": bobs, "bobs_token": bobs_token}


async def test_a_person_sees_their_grants_and_revokes_one(scene: dict[str, Any],
                                                          redis: Redis) -> None:
    h: AuthHarness = scene["h"]
    await _sign_in(h, "alice")
    page = await h.client.get("/account/")
    assert page.status == 200
    html = await page.text()
    assert "You are signed in as <strong>alice</strong>" in html
    assert "<h1>Your account</h1>" in html
    for text in ("Build CLI", "work laptop", "Budget Planner", "Chrome on Linux",
                 "Read your Anaplan data", "Revoke a device you lost"):
        assert text in html, text
    assert "bob&#39;s phone" not in html and "bob's phone" not in html
    assert len(re.findall(MOMENT, html)) == 4, html  # granted and last used, twice
    assert any(f.action == "/oauth/logout" for f in forms(html))  # sign out
    revokable = _revoke_forms(html)
    assert set(revokable) == {scene["laptop"].grant_id, scene["browser"].grant_id}

    # without the CSRF token: refused, nothing ends
    refused = await h.client.post("/account/revoke", data={
        "grant_id": scene["laptop"].grant_id, "csrf_token": "x" * 32}, allow_redirects=False)
    assert refused.status == 403
    assert (await h.client.get("/2/0/ws", headers=bearer(scene["laptop_token"]))).status == 200

    resp = await h.client.post("/account/revoke", data=revokable[scene["laptop"].grant_id],
                               allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == f"/account/?revoked={scene['laptop'].grant_id}"
    started = time.monotonic()
    while (await h.client.get("/2/0/ws", headers=bearer(scene["laptop_token"]))).status != 401:
        assert time.monotonic() - started < 1.0, "the revoked grant's token still works"
        await asyncio.sleep(0.05)
    assert (await h.client.get("/2/0/ws", headers=bearer(scene["browser_token"]))).status == 200
    assert (await h.client.get("/2/0/ws", headers=bearer(scene["bobs_token"]))).status == 200

    after = await h.client.get(resp.headers["Location"])
    html = await after.text()
    assert "Access removed: Build CLI on work laptop can no longer use your account" in html
    assert set(_revoke_forms(html)) == {scene["browser"].grant_id}

    grant = await h.auth.store.get_grant(scene["laptop"].grant_id)
    assert grant is not None and grant.revoked and grant.revoked_reason == "revoked_by_user"
    entries: Any = await redis.xrange("gw:audit")
    [ended] = [f for _, f in entries if f["action"] == "grant.revoked"]
    assert (ended["actor"], ended["user"], ended["grant_id"], ended["reason"]) == (
        "alice", "alice", scene["laptop"].grant_id, "revoked_by_user")
    assert 'gateway_as_grants_revoked_total{reason="revoked_by_user"} 1.0' in await h.metrics()


async def test_someone_elses_grant_is_not_found_and_nothing_changes(
        scene: dict[str, Any], redis: Redis) -> None:
    h: AuthHarness = scene["h"]
    await _sign_in(h, "alice")
    html = await (await h.client.get("/account/")).text()
    own = _revoke_forms(html)[scene["laptop"].grant_id]
    for other in (scene["bobs"].grant_id, "g_nosuchgrant", ""):
        resp = await h.client.post("/account/revoke", data={**own, "grant_id": other},
                                   allow_redirects=False)
        assert resp.status == 404, other
        assert "nothing was changed" in await resp.text()
    bobs = await h.auth.store.get_grant(scene["bobs"].grant_id)
    assert bobs is not None and not bobs.revoked
    assert (await h.client.get("/2/0/ws", headers=bearer(scene["bobs_token"]))).status == 200
    entries: Any = await redis.xrange("gw:audit")
    assert not [f for _, f in entries if f["action"] == "grant.revoked"]
    # a ``?revoked=`` naming someone else's grant says nothing about it
    bob_revoked = await h.client.get(f"/account/?revoked={scene['bobs'].grant_id}")
    assert "Access removed" not in await bob_revoked.text()


async def test_signed_out_goes_to_login_and_the_old_path_redirects(
        scene: dict[str, Any]) -> None:
    h: AuthHarness = scene["h"]
    resp = await h.client.get("/account/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/oauth/login?next=/account/"
    resp = await h.client.post("/account/revoke", data={"grant_id": scene["laptop"].grant_id},
                               allow_redirects=False)
    assert resp.status == 403  # no CSRF cookie, no session: nothing ends
    for old in ("/oauth/account", "/account"):
        resp = await h.client.get(old, allow_redirects=False)
        assert resp.status == 301 and resp.headers["Location"] == "/account/", old
    # the reserved-path check knows the page: another method or path never reaches a route
    assert (await h.client.delete("/account/")).status == 405
    assert (await h.client.get("/account/other")).status == 404


async def test_a_person_without_grants_reads_so(scene: dict[str, Any]) -> None:
    h: AuthHarness = scene["h"]
    await _sign_in(h, "carol")
    html = await (await h.client.get("/account/")).text()
    assert "No apps or devices can use your account right now." in html
    assert _revoke_forms(html) == {}


@pytest.mark.parametrize(("ago", "text"), [
    (3 * 60, "2026-12-05 15:42 (3 minutes ago)"),
    (61, "2026-12-05 15:44 (1 minute ago)"),
    (20, "2026-12-05 15:45 (just now)"),
    (2 * 3600, "2026-12-05 13:45 (2 hours ago)"),
    (3 * 86400, "2026-12-02 15:45 (3 days ago)"),
    (-300, "2026-12-05 15:50 (in 5 minutes)"),
])
def test_a_moment_reads_as_a_date_and_how_long_ago(ago: int, text: str) -> None:
    assert moment(1796485532 - ago, now=1796485532)["text"] == text
    assert moment(0)["text"] == "Never"
