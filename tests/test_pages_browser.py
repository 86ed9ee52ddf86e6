"""The login and consent pages in a real browser: headless Chromium driven by Playwright.

The gateway listens on a real loopback port (its issuer URL); a small client application
on another port receives the redirect. The browser types the credentials into the
``username``/``password`` fields and presses ``approve`` or ``deny`` (stable names), as a
person would; the test then plays the client's back end with Authlib.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); Playwright's own browser
downloads are not used.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]
from playwright.async_api import Browser, Page, async_playwright
from pytest_aiohttp import AiohttpServer

from tests.conftest import AuthGatewayFactory, AuthHarness, Upstream
from tests.tools import missing

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
