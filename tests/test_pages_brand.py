"""Every page names the service: the tenant's display name and logo (environment,
console, admin API), the CSP allowing the logo's origin only when one is set, and the
sign-in page saying what the sign-in is for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.authserver.admin import AdminError
from gateway.authserver.rfc7636 import s256
from gateway.config.settings import SettingsError, load_settings
from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.test_console import PASSWORD, audit, post, sign_in

LOGO = "https://cdn.acme.example/brand/logo.svg"


@pytest.fixture
async def h(make_auth_gateway: AuthGatewayFactory) -> AuthHarness:
    h = await make_auth_gateway()
    await h.auth.add_user("root", PASSWORD, actor="test", admin=True)
    return h


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def img_src(resp: aiohttp.ClientResponse) -> str:
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    [directive] = [d.strip() for d in csp.split(";") if d.strip().startswith("img-src")]
    return directive


async def test_default_name_and_no_logo(h: AuthHarness, browser: aiohttp.ClientSession
                                        ) -> None:
    resp = await browser.get(h.issuer + "/oauth/login")
    html = await resp.text()
    assert "<h1>Sign in to oauth-gateway</h1>" in html and "<img" not in html
    assert "<title>Sign in · oauth-gateway</title>" in html
    assert img_src(resp) == "img-src 'self' data:"


async def test_the_environment_names_the_service(make_auth_gateway: AuthGatewayFactory,
                                                 browser: aiohttp.ClientSession) -> None:
    h = await make_auth_gateway(display_name="Acme Planning", logo_url=LOGO)
    resp = await browser.get(h.issuer + "/oauth/login")
    html = await resp.text()
    assert "Sign in to Acme Planning" in html and f'<img src="{LOGO}" alt="">' in html
    assert img_src(resp) == "img-src 'self' data: https://cdn.acme.example"
    tenant = await h.auth.tenant_settings()
    assert tenant.sources["display_name"] == tenant.sources["logo_url"] == "environment"
    with pytest.raises(SettingsError, match="GATEWAY_LOGO_URL"):
        load_settings(environ={"GATEWAY_LOGO_URL": "http://cdn.acme.example/logo.svg"})


async def test_console_settings_change_every_page(h: AuthHarness,
                                                  browser: aiohttp.ClientSession,
                                                  redis: Redis) -> None:
    await sign_in(h, browser, "root")
    resp = await post(h, browser, "/console/settings", "/console/settings",
                      {"display_name": "Acme <Planning>", "logo_url": LOGO})
    html = await resp.text()
    assert "Settings saved" in html
    assert "Acme &lt;Planning&gt; console" in html and f'<img src="{LOGO}"' in html
    assert img_src(resp) == "img-src 'self' data: https://cdn.acme.example"
    [entry] = [e for e in await audit(redis) if e["action"] == "tenant.updated"]
    assert {"display_name", "logo_url"} <= set(entry["fields"].split(","))
    assert entry["remote"] == "127.0.0.1"
    account = await browser.get(h.issuer + "/account/")
    assert "Acme &lt;Planning&gt;" in await account.text()
    # a logo that is not an https URL is refused, and nothing changes
    bad = await post(h, browser, "/console/settings", "/console/settings",
                     {"logo_url": "javascript:alert(1)"})
    assert bad.status == 400 and "logo URL: an https:// URL" in await bad.text()
    assert (await h.auth.tenant_settings()).logo_url == LOGO
    # the logo taken away: the CSP allows no other origin again
    resp = await post(h, browser, "/console/settings", "/console/settings", {"logo_url": ""})
    assert "<img" not in await resp.text() and img_src(resp) == "img-src 'self' data:"


@pytest.mark.parametrize("logo", ["http://cdn.acme.example/l.png", "https://a.example/x'; "
                                  "script-src *", "https:///nohost", "data:image/png,xx"])
async def test_only_https_logos(h: AuthHarness, logo: str) -> None:
    with pytest.raises(AdminError, match="logo URL"):
        await h.auth.update_settings({"logo_url": logo}, actor="t")


async def test_sign_in_names_the_app_it_is_for(h: AuthHarness,
                                               browser: aiohttp.ClientSession) -> None:
    await h.auth.update_settings({"display_name": "Acme Planning"}, actor="t")
    client, _ = await h.auth.create_client(
        name="Budget <Planner>", grant="authorization_code", scopes=["anaplan:read"],
        redirect_uris=["https://app.example/cb"], actor="t")
    query: dict[str, Any] = {
        "response_type": "code", "client_id": client.client_id,
        "redirect_uri": "https://app.example/cb", "scope": "anaplan:read", "state": "s",
        "code_challenge": s256("v" * 43), "code_challenge_method": "S256"}
    resp = await browser.get(h.issuer + "/oauth/authorize?" + urlencode(query))
    html = await resp.text()
    assert "Sign in to Acme Planning" in html
    assert "to use <strong>Budget &lt;Planner&gt;</strong>" in html
    console = await browser.get(h.issuer + "/oauth/login?next=" + quote("/console/"))
    assert "to use <strong>the administrators&#39; console</strong>" in await console.text()
    # signed in, the consent page says who asks and where the answer goes
    resp = await browser.post(str(resp.url), data={
        "csrf_token": browser.cookie_jar.filter_cookies(resp.url)["gw_csrf"].value,
        "next": "/oauth/authorize?" + urlencode(query), "username": "root",
        "password": PASSWORD})
    html = await resp.text()
    assert "Allow Budget &lt;Planner&gt; to use your account?" in html
    assert "you go back to Budget &lt;Planner&gt; at app.example" in html


async def test_api_settings_name_and_logo(h: AuthHarness) -> None:
    tenant = await h.auth.update_settings({"display_name": "  Acme   Planning ",
                                           "logo_url": LOGO}, actor="api:x")
    view = tenant.view()
    assert (view["display_name"], view["logo_url"]) == ("Acme Planning", LOGO)
    assert view["sources"]["display_name"] == "console"
    tenant = await h.auth.update_settings({"display_name": None}, actor="api:x")
    assert tenant.display_name == "oauth-gateway"
    assert tenant.sources["display_name"] == "default"
    with pytest.raises(AdminError, match="display name"):
        await h.auth.update_settings({"display_name": "x" * 81}, actor="api:x")
