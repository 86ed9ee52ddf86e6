"""The login and consent pages in a real browser: headless Chromium driven by Playwright.

The gateway listens on a real loopback port (its issuer URL); a small client application
on another port receives the redirect. The browser types the credentials into the
``username``/``password`` fields and presses ``approve`` or ``deny`` (stable names), as a
person would; the test then plays the client's back end with Authlib.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); Playwright's own browser
downloads are not used.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]
from playwright.async_api import Browser, Page, async_playwright
from pytest_aiohttp import AiohttpServer

from tests.conftest import AuthGatewayFactory, AuthHarness, Upstream
from tests.tools import find, missing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/consent.png"
USER, PASSWORD = "alice", "correct horse battery"



@pytest.fixture(autouse=True)
def chromium() -> None:
    if not os.path.exists(CHROMIUM):
        missing(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")


@dataclass
class ClientApp:
    """The OAuth client's web app: records what each redirect brought."""

    redirect_uri: str
    received: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def client_app(aiohttp_server: AiohttpServer) -> ClientApp:
    holder: list[ClientApp] = []

    async def callback(request: web.Request) -> web.Response:
        holder[0].received.append(dict(request.query))
        outcome = "Signed in" if "code" in request.query else "Not signed in"
        return web.Response(text=f"<h1>{outcome}</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/callback", callback)
    server = await aiohttp_server(app)
    holder.append(ClientApp(str(server.make_url("/callback"))))
    return holder[0]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@dataclass
class Scene:
    h: AuthHarness
    app: ClientApp
    oauth: Any
    page: Page


@pytest.fixture
async def scene(make_auth_gateway: AuthGatewayFactory, client_app: ClientApp,
                browser: Browser, upstream: Upstream) -> AsyncIterator[Scene]:
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="test")
    client, secret = await h.auth.create_client(
        name="Budget Planner", grant="authorization_code", scopes=["anaplan:read"],
        redirect_uris=[client_app.redirect_uri], actor="test")
    oauth = AsyncOAuth2Client(client_id=client.client_id, client_secret=secret,
                              redirect_uri=client_app.redirect_uri, scope="anaplan:read",
                              code_challenge_method="S256", trust_env=False)
    context = await browser.new_context()
    page = await context.new_page()
    yield Scene(h, client_app, oauth, page)
    await context.close()
    await oauth.aclose()


async def sign_in_and_decide(s: Scene, button: str, *, screenshot: bool = False
                             ) -> tuple[str, str]:
    """Open the authorization URL, sign in, press ``button``; the verifier and state."""
    verifier = generate_token(48)
    url, state = s.oauth.create_authorization_url(s.h.issuer + "/oauth/authorize",
                                                  code_verifier=verifier)
    await s.page.goto(url)
    assert "/oauth/login" in s.page.url
    await s.page.fill("input[name=username]", USER)
    await s.page.fill("input[name=password]", PASSWORD)
    await s.page.click("button[type=submit]")
    await s.page.wait_for_selector("button[name=approve]")
    assert s.page.url.startswith(s.h.issuer + "/oauth/authorize?")
    heading = await s.page.inner_text("h1")
    assert heading == "Allow Budget Planner to use your account?"
    assert "Read your Anaplan data" in await s.page.inner_text("main")
    if screenshot:
        await s.page.screenshot(path=SCREENSHOT, full_page=True)
    await s.page.click(f"button[name={button}]")
    await s.page.wait_for_url(lambda url: url.startswith(s.app.redirect_uri + "?"),
                              timeout=10_000)
    return verifier, str(state)


async def test_a_person_signs_in_and_approves_in_chromium(scene: Scene,
                                                          upstream: Upstream) -> None:
    s = scene
    verifier, state = await sign_in_and_decide(s, "approve", screenshot=True)
    assert await s.page.inner_text("h1") == "Signed in"
    [got] = s.app.received
    assert got["state"] == state and got["iss"] == s.h.issuer
    assert got["code"].startswith("gwac_")
    token = await s.oauth.fetch_token(s.h.issuer + "/oauth/token", code=got["code"],
                                      code_verifier=verifier, state=state)
    resp = await s.h.client.get("/2/0/workspaces", headers={
        "Authorization": f"Bearer {token['access_token']}"})
    assert resp.status == 200
    assert upstream.received[-1].raw_path == "/2/0/workspaces"
    # the grant is named after the browser that approved it
    [grant] = await s.h.auth.list_grants(username=USER)
    assert "Chrome" in grant.label
    assert os.path.getsize(SCREENSHOT) > 5_000


async def test_a_person_denies_in_chromium(scene: Scene) -> None:
    s = scene
    _, state = await sign_in_and_decide(s, "deny")
    assert await s.page.inner_text("h1") == "Not signed in"
    [got] = s.app.received
    assert (got["error"], got["state"], got["iss"]) == ("access_denied", state, s.h.issuer)
    assert "code" not in got
    assert await s.h.auth.list_grants(username=USER) == []


# --- the account page -------------------------------------------------------------------

A11Y_DIR = Path(__file__).resolve().parent / "a11y"
AXE = A11Y_DIR / "node_modules" / "axe-core" / "axe.min.js"
ACCOUNT_SCREENSHOT = Path(__file__).resolve().parent.parent / "build" / "screenshots" / \
    "account.png"


@pytest.fixture(scope="session")
def axe() -> Path:
    """axe-core's script (npm, locked in tests/a11y), installed on first use."""
    if not AXE.is_file():
        npm = find("npm", install="apt-get install -y nodejs npm")
        done = subprocess.run([npm, "ci", "--prefix", str(A11Y_DIR), "--no-audit",
                               "--no-fund"], timeout=300, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"npm ci --prefix tests/a11y failed:\n{done.stderr}")
    return AXE


async def assert_accessible(page: Page, axe: Path) -> None:
    """axe-core finds nothing serious or critical on the page as it stands."""
    await page.add_script_tag(path=str(axe))
    found = await page.evaluate("""async () => (await axe.run()).violations.map(v => ({
        id: v.id, impact: v.impact, help: v.help,
        nodes: v.nodes.map(n => n.target.join(" "))}))""")
    serious = [v for v in found if v["impact"] in ("serious", "critical")]
    assert not serious, (page.url, serious)


async def _grant(h: AuthHarness, client: Any, label: str) -> str:
    """A grant of USER to ``client`` on the device ``label``: an access token of it."""
    sub = (await h.auth.store.get_user(USER))["sub"]
    grant = await h.auth.issuer.new_grant(client, username=USER, sub=sub,
                                          scope="anaplan:read", grant_type=client.grant_type,
                                          label=label)
    body = await h.auth.issuer.issue(client, grant, scope="anaplan:read",
                                     grant_type=client.grant_type)
    return str(body["access_token"])


async def test_a_person_revokes_a_lost_device_on_their_account_page(
        make_auth_gateway: AuthGatewayFactory, browser: Browser, axe: Path) -> None:
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="test")
    cli, _ = await h.auth.create_client(name="Build CLI", grant="device_code",
                                        redirect_uris=[], scopes=["anaplan:read"], actor="t")
    app, _ = await h.auth.create_client(
        name="Budget Planner", grant="authorization_code", scopes=["anaplan:read"],
        redirect_uris=["https://app.example/cb"], actor="t")
    lost = await _grant(h, cli, "Work laptop")
    kept = await _grant(h, app, "Chrome on Linux")
    # the pages allow no script: axe-core is let in by the test browser alone
    context = await browser.new_context(bypass_csp=True)
    page = await context.new_page()
    try:
        await page.goto(h.issuer + "/account/")
        assert page.url == h.issuer + "/oauth/login?next=/account/"
        await assert_accessible(page, axe)
        await page.fill("input[name=username]", USER)
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[name=login]")
        await page.wait_for_url(h.issuer + "/account/")
        assert await page.inner_text("h1") == "Your account"
        assert sorted(await page.locator("section.grant h3").all_inner_texts()) == [
            "Budget Planner", "Build CLI"]
        await assert_accessible(page, axe)

        await page.get_by_role("button", name="Revoke access of Build CLI on Work laptop"
                               ).click()
        status = page.get_by_role("status")
        await status.wait_for()
        assert "Build CLI on Work laptop can no longer use your account" in \
            await status.inner_text()
        assert await page.locator("section.grant h3").all_inner_texts() == ["Budget Planner"]
        ACCOUNT_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(ACCOUNT_SCREENSHOT), full_page=True)
        await assert_accessible(page, axe)
    finally:
        await context.close()
    started = time.monotonic()
    while (await h.client.get("/2/0/ws", headers={"Authorization": f"Bearer {lost}"})
           ).status != 401:
        assert time.monotonic() - started < 1.0, "the lost device's token still works"
        await asyncio.sleep(0.05)
    assert (await h.client.get("/2/0/ws", headers={"Authorization": f"Bearer {kept}"})
            ).status == 200


# --- the service's name and logo ----------------------------------------------------------

SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
LOGO_URL = "https://cdn.acme.example/brand/logo.svg"
LOGO_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40" '
            'viewBox="0 0 120 40"><rect width="40" height="40" rx="8" fill="#0f766e"/>'
            '<path d="M8 30 L20 8 L32 30 Z" fill="#fff"/><text x="48" y="27" '
            'font-family="sans-serif" font-size="18" font-weight="700" '
            'fill="#0f766e">ACME</text></svg>')


async def test_sign_in_and_consent_name_the_service_in_chromium(scene: Scene) -> None:
    """With a display name and a logo: the sign-in page says whose service and for
    which app, the logo loads under the pages' CSP, and the consent page names both;
    screenshots of the two pages in build/screenshots/."""
    s = scene
    await s.h.auth.update_settings({"display_name": "Acme Planning", "logo_url": LOGO_URL},
                                   actor="test")
    served: list[str] = []

    async def logo(route: Any) -> None:
        served.append(route.request.url)
        await route.fulfill(body=LOGO_SVG, content_type="image/svg+xml")

    await s.page.context.route("https://cdn.acme.example/**", logo)
    url, _ = s.oauth.create_authorization_url(s.h.issuer + "/oauth/authorize",
                                              code_verifier=generate_token(48))
    await s.page.goto(url)
    assert await s.page.inner_text("h1") == "Sign in to Acme Planning"
    assert "to use Budget Planner" in await s.page.inner_text("main")
    assert await s.page.title() == "Sign in · Acme Planning"
    loaded = "img => img.complete && img.naturalWidth > 0"
    assert await s.page.eval_on_selector(".service img", loaded)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await s.page.screenshot(path=str(SCREENSHOTS / "signin-branded.png"), full_page=True)
    await s.page.fill("input[name=username]", USER)
    await s.page.fill("input[name=password]", PASSWORD)
    await s.page.click("button[type=submit]")
    await s.page.wait_for_selector("button[name=approve]")
    main = await s.page.inner_text("main")
    assert "Acme Planning" in main and "you go back to Budget Planner" in main
    assert await s.page.eval_on_selector(".service img", loaded)
    await s.page.screenshot(path=str(SCREENSHOTS / "consent-branded.png"), full_page=True)
    assert served and all(u == LOGO_URL for u in served)
