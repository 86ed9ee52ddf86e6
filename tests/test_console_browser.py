"""The console in a real browser (Playwright, Debian's chromium): an admin signs in,
creates a device client, disables another and sees the gateway refuse its token; every
page passes axe-core (nothing serious or critical) and is saved as a screenshot
(``build/screenshots/console-*.png``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from playwright.async_api import Browser

from tests.conftest import AuthGatewayFactory
from tests.test_pages_browser import (  # noqa: F401 - fixtures
    assert_accessible,
    axe,
    browser,
    chromium,
)

ADMIN, PASSWORD = "root", "correct horse battery"
SHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"


async def test_an_admin_uses_the_console_in_chromium(
        make_auth_gateway: AuthGatewayFactory, browser: Browser, axe: Path) -> None:  # noqa: F811
    h = await make_auth_gateway()
    await h.auth.add_user(ADMIN, PASSWORD, actor="test", admin=True)
    await h.auth.add_user("alice", PASSWORD, actor="test")
    app, _ = await h.auth.create_client(
        name="Budget Planner", grant="authorization_code", scopes=["anaplan:read"],
        redirect_uris=["https://planner.example.com/callback"], actor="test")
    sub = (await h.auth.store.get_user("alice"))["sub"]
    grant = await h.auth.issuer.new_grant(app, username="alice", sub=sub,
                                          scope="anaplan:read", grant_type=app.grant_type,
                                          label="Chrome on macOS")
    token = str((await h.auth.issuer.issue(app, grant, scope="anaplan:read",
                                           grant_type=app.grant_type))["access_token"])
    bearer = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        assert (await h.client.get("/2/0/workspaces", headers=bearer)).status == 200
    assert (await h.client.get("/2/0/workspaces")).status == 401  # a refusal to show
    SHOTS.mkdir(parents=True, exist_ok=True)
    # the pages allow no script: axe-core is let in by the test browser alone
    context = await browser.new_context(bypass_csp=True, viewport={"width": 1280,
                                                                   "height": 800})
    page = await context.new_page()
    try:
        await page.goto(h.issuer + "/console/")
        assert "/oauth/login?next=/console/" in page.url
        await page.fill("input[name=username]", ADMIN)
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[name=login]")
        await page.wait_for_url(h.issuer + "/console/")
        assert await page.inner_text("h1") == "Overview"
        await asyncio.sleep(1.2)  # the usage counts reach Redis within a second
        await page.reload()
        await assert_accessible(page, axe)
        await page.screenshot(path=str(SHOTS / "console-overview.png"), full_page=True)

        # create a device client: non-rotatable refresh tokens, one-hour access tokens
        await page.get_by_role("link", name="Clients", exact=True).click()
        await assert_accessible(page, axe)
        await page.get_by_role("link", name="Create a client").click()
        await assert_accessible(page, axe)
        await page.fill("#name", "Build CLI")
        await page.get_by_label("Device (command lines, devices)").check()
        await page.get_by_label("anaplan:read").check()
        await page.fill("#access_token_ttl_value", "1")
        await page.select_option("select[name=access_token_ttl_unit]", "hours")
        await page.get_by_label("Non-rotatable", exact=False).check()
        await page.screenshot(path=str(SHOTS / "console-client-new.png"), full_page=True)
        await page.get_by_role("button", name="Create client").click()
        await page.get_by_role("status").wait_for()
        assert await page.inner_text("h1") == "Build CLI Active"
        [made] = [c for c in await h.auth.list_clients() if c.name == "Build CLI"]
        assert (made.policy.access_token_ttl, made.policy.refresh_mode) == (
            3600, "non_rotatable")

        # disable the planner; the gateway refuses its token within a second
        await page.goto(h.issuer + f"/console/clients/{app.client_id}")
        await assert_accessible(page, axe)
        await page.screenshot(path=str(SHOTS / "console-client.png"), full_page=True)
        await page.fill("#reason", "suspected leak")
        await page.get_by_role("button", name="Disable this client").click()
        await page.get_by_role("status").wait_for()
        started = time.monotonic()
        while (await h.client.get("/2/0/workspaces", headers=bearer)).status != 401:
            assert time.monotonic() - started < 1.0, "the disabled client's token works"
            await asyncio.sleep(0.05)

        await page.goto(h.issuer + "/console/clients")
        await page.screenshot(path=str(SHOTS / "console-clients.png"), full_page=True)
        for name in ("grants", "people", "audit", "settings"):
            await page.goto(h.issuer + f"/console/{name}")
            assert (await page.inner_text("h1")) in (name.title(), "Tenant settings")
            await assert_accessible(page, axe)
            await page.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)
        await page.goto(h.issuer + f"/console/clients/{made.client_id}/delete")
        await assert_accessible(page, axe)
    finally:
        await context.close()
