"""The built-in server's pages are Jinja2 templates with autoescaping on: markup in
anything a page shows (a client's name, the ``next`` URL, a typed username, a user
code) reaches the browser as text, never as markup."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jinja2
import pytest
from aiohttp import web
from jinja2 import meta

from gateway.authserver.pages import PAGES_ENV, setup_templates
from gateway.authserver.rfc7636 import s256
from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.forms import find_form, submit

USER, PASSWORD = "alice", "correct horse battery"
CB = "http://127.0.0.1:8765/callback"
MARKUP = """<script>alert(1)</script><img src=x onerror="alert(2)" title='x'>&"""
ESCAPED = ("&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=&#34;alert(2)&#34; "
           "title=&#39;x&#39;&gt;&amp;")


#: what the console's layout reads besides each page's own variables
CONSOLE_LAYOUT = ("section", "admin_name", "notice", "error", "service_name", "logo_url")
#: what every page's layout reads (the tenant's name and logo)
LAYOUT = ("service_name", "logo_url")


class Anything(str):
    """MARKUP that is also each of its attributes and items, and the one element of
    itself: a console template rendered with it shows markup in every nested value."""

    def __getattr__(self, name: str) -> Anything:
        if name.startswith("_"):  # never __html__: that would mark it safe
            raise AttributeError(name)
        return Anything(MARKUP)

    def __getitem__(self, key: Any) -> Anything:
        return Anything(MARKUP)

    def __iter__(self) -> Any:
        return iter([Anything(MARKUP)])


def assert_inert(html: str) -> None:
    """No markup of MARKUP survived: only the escaped text is on the page (the layout's
    logo is an image of the escaped URL)."""
    html = html.replace(f'<img src="{ESCAPED}" alt="">', "")
    assert "<script" not in html and "<img" not in html
    assert ESCAPED in html


@pytest.fixture
async def h(make_auth_gateway: AuthGatewayFactory) -> AuthHarness:
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="test")
    return h


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def sign_in(h: AuthHarness, browser: aiohttp.ClientSession) -> None:
    page = await browser.get(h.issuer + "/oauth/login")
    resp = await submit(browser, str(page.url), await page.text(),
                        values={"username": USER, "password": PASSWORD})
    assert resp.status == 200 and "You are signed in as" in await resp.text()


async def test_every_variable_of_every_template_is_escaped() -> None:
    """Each page template rendered with markup in every variable it reads."""
    app = web.Application()
    setup_templates(app)
    env = app[PAGES_ENV]
    assert env.autoescape is True
    names = [n for n in env.list_templates() if not n.startswith(("_", "base"))]
    assert {"login.html", "consent.html", "device_consent.html", "console_clients.html",
            "console_client.html", "console_settings.html"} <= set(names)
    for name in names:
        source = env.loader.get_source(env, name)[0]  # type: ignore[union-attr]
        assert "|safe" not in source.replace(" ", "") and "autoescape" not in source
        variables = meta.find_undeclared_variables(env.parse(source))
        context: dict[str, Any] = dict.fromkeys({*variables, *LAYOUT}, MARKUP)
        if name.startswith("console_"):  # nested data: markup at every depth
            context = dict.fromkeys({*variables, *CONSOLE_LAYOUT}, Anything(MARKUP))
            context["csrf_token"] = lambda: MARKUP
            html = env.get_template(name).render(context)
            assert_inert(html)
            assert "<script" not in html
            continue
        context.update(scopes=[(MARKUP, MARKUP)], csrf_token=lambda: MARKUP)
        moment = {"text": MARKUP, "iso": MARKUP}
        context.update(ended={"client_name": MARKUP, "device": MARKUP}, grants=[{
            "grant_id": MARKUP, "client_name": MARKUP, "device": MARKUP, "granted": moment,
            "last_used": moment, "scopes": [(MARKUP, MARKUP)]}])
        html = env.get_template(name).render(context)
        if variables:  # pages with fixed texts only (e.g. "Signed out") show nothing given
            assert_inert(html)
        assert "<script" not in html
    with pytest.raises(jinja2.UndefinedError):  # a misspelt variable fails, not blank
        env.get_template("consent.html").render({})


async def test_login_page_escapes_the_next_url_and_the_typed_username(
        h: AuthHarness, browser: aiohttp.ClientSession) -> None:
    next_url = "/oauth/" + MARKUP  # passes the check for a local destination
    page = await browser.get(h.issuer + "/oauth/login?next=" + quote(next_url, safe=""))
    html = await page.text()
    assert_inert(html)
    form = find_form(html, field_name="username")
    assert form.fields["next"] == next_url
    resp = await submit(browser, str(page.url), html,
                        values={"username": MARKUP, "password": "wrong password"})
    assert resp.status == 401
    html = await resp.text()
    assert_inert(html)
    assert find_form(html, field_name="username").fields["username"] == MARKUP


async def test_consent_page_escapes_the_client_name(
        h: AuthHarness, browser: aiohttp.ClientSession) -> None:
    client, _ = await h.auth.create_client(
        name=MARKUP, grant="authorization_code", scopes=["anaplan:read"],
        redirect_uris=[CB], actor="test")
    await sign_in(h, browser)
    resp = await browser.get(h.issuer + "/oauth/authorize?" + urlencode({
        "response_type": "code", "client_id": client.client_id, "redirect_uri": CB,
        "scope": "anaplan:read", "state": "s", "code_challenge": s256("v" * 43),
        "code_challenge_method": "S256"}))
    assert resp.status == 200
    html = await resp.text()
    assert_inert(html)
    assert f"<title>Allow {ESCAPED}? · oauth-gateway</title>" in html
    assert f"<h1>Allow {ESCAPED} to use your account?</h1>" in html
    assert find_form(html, button="approve").buttons == {"approve": "1", "deny": "1"}


async def test_device_pages_escape_the_client_name_and_the_typed_code(
        h: AuthHarness, browser: aiohttp.ClientSession) -> None:
    client, _ = await h.auth.create_client(
        name=MARKUP, grant="device_code", scopes=["anaplan:read"], redirect_uris=[],
        actor="test")
    started = await h.client.post("/oauth/device_authorization", data={
        "client_id": client.client_id, "scope": "anaplan:read"})
    user_code = (await started.json())["user_code"]
    await sign_in(h, browser)
    entry = await browser.get(h.issuer + "/oauth/device")
    # an invalid code is refused, its page still safe
    refused = await submit(browser, str(entry.url), await entry.text(),
                           values={"user_code": MARKUP})
    assert refused.status == 400 and "<script" not in await refused.text()
    consent = await submit(browser, str(entry.url), await entry.text(),
                           values={"user_code": user_code})
    html = await consent.text()
    assert consent.status == 200
    assert_inert(html)
    assert f"<h1>Allow {ESCAPED} on your device?</h1>" in html
    done = await submit(browser, str(consent.url), html, button="approve",
                        values={"device_name": MARKUP})
    assert done.status == 200
    html = await done.text()
    assert_inert(html)
    assert f"<p>{ESCAPED} can now use your account from your device.</p>" in html
    # the account page names the app and the device as typed, as text
    started_body = await started.json()
    token = await h.client.post("/oauth/token", data={
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": started_body["device_code"], "client_id": client.client_id})
    assert token.status == 200, await token.text()
    account = await browser.get(h.issuer + "/account/")
    html = await account.text()
    assert_inert(html)
    assert f"<h3 id=\"grant-1\">{ESCAPED}</h3>" in html
    assert f"<dd>{ESCAPED}</dd>" in html
