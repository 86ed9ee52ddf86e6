"""The device authorization grant (RFC 8628) end to end: a CLI-like poller on one side,
a cookie-keeping browser on the verification pages on the other, the gateway behind."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, cast

import aiohttp
from multidict import CIMultiDictProxy
from redis.asyncio import Redis
from yarl import URL

from gateway.authserver import DeviceFlowTiming, rfc8628
from gateway.authserver.hashing import USER_CODE_ALPHABET
from gateway.authserver.models import GRANT_DEVICE
from tests.conftest import AuthGatewayFactory, AuthHarness, Upstream
from tests.tools import find

USER = ("alice", "correct horse battery")
CODE_RE = re.compile(f"^[{USER_CODE_ALPHABET}]{{4}}-[{USER_CODE_ALPHABET}]{{4}}$")
AGENT = "TestBrowser/1.0"


# -- the device: what a CLI does -------------------------------------------------------

class DeviceFlowError(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass
class DevicePoller:
    """Discovers the endpoints, asks for a code, then polls honouring ``interval`` and
    ``slow_down`` (RFC 8628 section 3.5), as a command-line tool would."""

    http: aiohttp.ClientSession
    issuer: str
    client_id: str
    seen: list[str] = field(default_factory=list)

    async def endpoints(self) -> dict[str, Any]:
        async with self.http.get(self.issuer + "/.well-known/oauth-authorization-server"
                                 ) as resp:
            return dict(await resp.json())

    async def start(self, scope: str | None = None) -> tuple[int, dict[str, Any]]:
        data = {"client_id": self.client_id, **({"scope": scope} if scope else {})}
        url = (await self.endpoints())["device_authorization_endpoint"]
        async with self.http.post(url, data=data) as resp:
            return resp.status, dict(await resp.json())

    async def poll(self, device_code: str) -> tuple[int, dict[str, Any]]:
        async with self.http.post((await self.endpoints())["token_endpoint"], data={
                "grant_type": GRANT_DEVICE, "device_code": device_code,
                "client_id": self.client_id}) as resp:
            body = dict(await resp.json())
            if resp.status != 200:
                assert resp.headers["Cache-Control"] == "no-store"
                self.seen.append(body["error"])
            return resp.status, body

    async def wait_for_token(self, auth: dict[str, Any]) -> dict[str, Any]:
        interval = int(auth["interval"])
        deadline = time.monotonic() + int(auth["expires_in"])
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            status, body = await self.poll(auth["device_code"])
            if status == 200:
                return body
            if body["error"] == "slow_down":
                interval += 5
            elif body["error"] != "authorization_pending":
                raise DeviceFlowError(body["error"])
        raise DeviceFlowError("expired_token")


# -- the person: a browser on the verification pages -----------------------------------

@dataclass
class Form:
    action: str
    fields: dict[str, str] = field(default_factory=dict)
    buttons: list[str] = field(default_factory=list)


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", "")))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1].fields[a["name"]] = a.get("value", "")
        elif tag == "button" and self.forms and a.get("name"):
            self.forms[-1].buttons.append(a["name"])


@dataclass
class Page:
    status: int
    text: str
    url: str
    headers: CIMultiDictProxy[str]

    def form(self) -> Form:
        parser = _FormParser()
        parser.feed(self.text)
        assert parser.forms, self.text
        return parser.forms[0]


class Browser:
    """A person with a browser: cookies kept, forms submitted as rendered."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                          headers={"User-Agent": AGENT})

    async def _page(self, resp: aiohttp.ClientResponse) -> Page:
        return Page(resp.status, await resp.text(), str(resp.url), resp.headers)

    async def get(self, url: str) -> Page:
        async with self.http.get(url if "://" in url else self.issuer + url) as resp:
            return await self._page(resp)

    async def submit(self, page: Page, button: str | None = None, **values: str) -> Page:
        form = page.form()
        data = {**form.fields, **values}
        if button:
            assert button in form.buttons, form.buttons
            data[button] = "1"
        async with self.http.post(self.issuer + form.action, data=data) as resp:
            return await self._page(resp)

    async def sign_in(self, page: Page) -> Page:
        assert "/oauth/login" in page.url
        return await self.submit(page, username=USER[0], password=USER[1])

    async def enter_code(self, user_code: str) -> Page:
        """Signs in if need be; types the code without its dash and in lower case."""
        page = await self.get("/oauth/device")
        if "/oauth/login" in page.url:
            page = await self.sign_in(page)
        return await self.submit(page, user_code=user_code.replace("-", "").lower())


@asynccontextmanager
async def device_and_browser(h: AuthHarness, client_id: str
                             ) -> AsyncIterator[tuple[DevicePoller, Browser]]:
    async with aiohttp.ClientSession() as http:
        browser = Browser(h.issuer)
        try:
            yield DevicePoller(http, h.issuer, client_id), browser
        finally:
            await browser.http.close()


async def setup(make_auth_gateway: AuthGatewayFactory, *, interval: int = 1,
                expires_in: int = 60, scopes: str = "anaplan:read anaplan:write"
                ) -> tuple[AuthHarness, str]:
    """A gateway whose device codes poll every ``interval`` s, a device client, a user."""
    h = await make_auth_gateway(device=DeviceFlowTiming(expires_in=expires_in,
                                                        interval=interval))
    client, secret = await h.auth.create_client(
        name="Anaplan CLI", grant="device_code", redirect_uris=[], scopes=[scopes],
        actor="test")
    assert secret is None  # device clients are public
    await h.auth.add_user(*USER, actor="test")
    return h, client.client_id


def count(metrics: str, outcome: str) -> float:
    found = re.search(rf'^gateway_as_device_flow_total{{outcome="{outcome}"}} (\S+)$',
                      metrics, re.M)
    return float(found.group(1)) if found else 0.0


async def audit_actions(redis: Redis) -> list[str]:
    entries = cast(list[tuple[str, dict[str, str]]], await redis.xrange("gw:audit"))
    return [fields["action"] for _, fields in entries]


# -- the whole flow ----------------------------------------------------------------------

async def test_device_flow_end_to_end(make_auth_gateway: AuthGatewayFactory,
                                      upstream: Upstream, redis: Redis) -> None:
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, browser):
        status, auth = await device.start(scope="anaplan:read")
        assert status == 200
        assert auth["verification_uri"] == h.issuer + "/oauth/device"
        assert auth["verification_uri_complete"] == (
            f"{h.issuer}/oauth/device?user_code={auth['user_code']}")
        assert CODE_RE.match(auth["user_code"])
        assert (auth["expires_in"], auth["interval"]) == (60, 1)
        assert auth["device_code"].startswith("gwdc_")
        waiting = asyncio.create_task(device.wait_for_token(auth))

        # the user opens the complete URI: sign in first, then the code is prefilled
        page = await browser.get(auth["verification_uri_complete"])
        assert "/oauth/login" in page.url
        page = await browser.sign_in(page)
        assert page.url == auth["verification_uri_complete"]
        assert page.form().fields["user_code"] == auth["user_code"]
        # typed by hand instead: no dash, lower case
        consent = await browser.submit(page, user_code=auth["user_code"].replace("-", "")
                                       .lower())
        assert consent.status == 200
        assert "Anaplan CLI" in consent.text and "anaplan:read" in consent.text
        assert "anaplan:write" not in consent.text
        assert auth["user_code"] in consent.text
        assert "frame-ancestors 'none'" in consent.headers["Content-Security-Policy"]
        assert {"approve", "deny"} <= set(consent.form().buttons)
        # a tampered form cannot widen what the user sees and approves
        done = await browser.submit(consent, "approve", device_name="alice's laptop",
                                    scope="anaplan:read anaplan:write", client_id="other")
        assert done.status == 200 and "return to your device" in done.text

        tokens = await asyncio.wait_for(waiting, 10)
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == "anaplan:read"
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    resp = await h.client.get("/2/0/workspaces", headers=bearer)
    assert resp.status == 200
    assert upstream.received[-1].raw_path == "/2/0/workspaces"
    assert (await h.client.post("/2/0/workspaces", data=b"{}", headers=bearer)).status == 403

    resp = await h.client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": client_id})
    assert resp.status == 200
    refreshed = await resp.json()
    resp = await h.client.get("/2/0/models", headers={
        "Authorization": f"Bearer {refreshed['access_token']}"})
    assert resp.status == 200 and upstream.received[-1].raw_path == "/2/0/models"

    [grant] = await h.auth.list_grants(client_id=client_id)
    assert (grant.label, grant.username, grant.scope) == ("alice's laptop", "alice",
                                                          "anaplan:read")
    assert grant.grant_type == GRANT_DEVICE
    metrics = await h.metrics()
    assert count(metrics, "approved") == count(metrics, "issued") == 1
    assert "device.approved" in await audit_actions(redis)
    # nothing of the finished authorization stays behind; no device code in clear
    assert await redis.keys("gw:as:device*") == [] and await redis.keys("gw:as:user_code*") == []
    for key in await redis.keys("*"):
        assert auth["device_code"] not in key


async def test_code_reused_after_issuance_and_default_label(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        consent = await browser.enter_code(auth["user_code"])
        await browser.submit(consent, "approve")
        status, tokens = await device.poll(auth["device_code"])
        assert status == 200 and tokens["scope"] == "anaplan:read anaplan:write"
        status, again = await device.poll(auth["device_code"])
        assert (status, again["error"]) == (400, "invalid_grant")
    [grant] = await h.auth.list_grants(client_id=client_id)
    assert grant.label == f"Anaplan CLI ({AGENT})"


# -- what the device hears while it waits --------------------------------------------------

async def test_pending_then_slow_down_grows_the_interval(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h, client_id = await setup(make_auth_gateway, interval=1)
    async with device_and_browser(h, client_id) as (device, _):
        _, auth = await device.start()
        assert await device.poll(auth["device_code"]) == (400, {
            "error": "authorization_pending",
            "error_description": "The user has not approved the request yet."})
        status, body = await device.poll(auth["device_code"])
        assert (status, body["error"]) == (400, "slow_down")
        assert "wait 6 seconds" in body["error_description"]
        state = await redis.hgetall(f"gw:as:device_poll:{h.auth.store.digest(auth['device_code'])}")
        assert state["interval"] == "6"
        # waiting the first interval is no longer enough: it grew by 5 s (section 3.5)
        await asyncio.sleep(1.1)
        status, body = await device.poll(auth["device_code"])
        assert (status, body["error"]) == (400, "slow_down")
        assert "wait 11 seconds" in body["error_description"]
    metrics = await h.metrics()
    assert (count(metrics, "pending"), count(metrics, "slow_down")) == (1, 2)


async def test_expired_token(make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway, expires_in=1)
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        await asyncio.sleep(1.1)
        for _ in range(2):
            status, body = await device.poll(auth["device_code"])
            assert (status, body["error"]) == (400, "expired_token")
        page = await browser.enter_code(auth["user_code"])
        assert page.status == 400 and "not valid" in page.text
    metrics = await h.metrics()
    assert count(metrics, "expired") == 1  # one flow, counted once
    assert count(metrics, "invalid_user_code") == 1


async def test_access_denied(make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        consent = await browser.enter_code(auth["user_code"])
        done = await browser.submit(consent, "deny")
        assert done.status == 200 and "denied" in done.text
        # the decision is final: approving the same code afterwards does nothing
        late = await browser.submit(consent, "approve")
        assert late.status == 400
        status, body = await device.poll(auth["device_code"])
        assert (status, body["error"]) == (400, "access_denied")
        status, body = await device.poll(auth["device_code"])
        assert (status, body["error"]) == (400, "invalid_grant")
    assert await h.auth.list_grants(client_id=client_id) == []
    assert count(await h.metrics(), "denied") == 1
    assert "device.denied" in await audit_actions(redis)


# -- refusals at the endpoints ----------------------------------------------------------------

async def test_device_code_of_another_client(make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway)
    other, _ = await h.auth.create_client(name="Other", grant="device_code",
                                          redirect_uris=[], scopes=["anaplan:read"],
                                          actor="test")
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        await browser.submit(await browser.enter_code(auth["user_code"]), "approve")
        thief = DevicePoller(device.http, h.issuer, other.client_id)
        status, body = await thief.poll(auth["device_code"])
        assert (status, body["error"]) == (400, "invalid_grant")
        # the rightful device still gets its tokens
        status, _ = await device.poll(auth["device_code"])
        assert status == 200


async def test_code_flow_client_refused(make_auth_gateway: AuthGatewayFactory) -> None:
    h, _ = await setup(make_auth_gateway)
    web_app, secret = await h.auth.create_client(
        name="Web", grant="authorization_code", redirect_uris=["https://app.example.com/cb"],
        scopes=["anaplan:read"], actor="test")
    assert secret
    basic = {"Authorization": aiohttp.encode_basic_auth(web_app.client_id, secret)}
    resp = await h.client.post("/oauth/device_authorization", data={}, headers=basic)
    assert (resp.status, (await resp.json())["error"]) == (400, "unauthorized_client")
    resp = await h.client.post("/oauth/token", headers=basic, data={
        "grant_type": GRANT_DEVICE, "device_code": "gwdc_x"})
    assert (resp.status, (await resp.json())["error"]) == (400, "unauthorized_client")


async def test_bad_requests_at_the_device_endpoint(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway, scopes="anaplan:read")
    resp = await h.client.post("/oauth/device_authorization", data={
        "client_id": client_id, "scope": "anaplan:write"})
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_scope")
    resp = await h.client.post("/oauth/device_authorization", data={"client_id": "nobody"})
    assert (resp.status, (await resp.json())["error"]) == (401, "invalid_client")
    resp = await h.client.post("/oauth/token", data={"grant_type": GRANT_DEVICE,
                                                     "client_id": client_id})
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_request")
    resp = await h.client.post("/oauth/token", data={
        "grant_type": GRANT_DEVICE, "client_id": client_id, "device_code": "gwdc_guess"})
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")


async def test_disabled_client(make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        await h.auth.set_disabled(client_id, True, actor="test", reason="lost laptop")
        status, body = await device.start()
        assert (status, body["error"]) == (401, "invalid_client")
        status, body = await device.poll(auth["device_code"])
        assert (status, body["error"]) == (401, "invalid_client")
        page = await browser.enter_code(auth["user_code"])
        assert page.status == 400 and "Anaplan CLI" not in page.text


# -- the verification page ------------------------------------------------------------------

async def test_device_page_requires_login(make_auth_gateway: AuthGatewayFactory) -> None:
    h, _ = await setup(make_auth_gateway)
    resp = await h.client.get("/oauth/device?user_code=BCDF-GHJK", allow_redirects=False)
    assert resp.status == 303
    location = URL(resp.headers["Location"])
    assert location.path == "/oauth/login"
    assert location.query["next"] == "/oauth/device?user_code=BCDF-GHJK"  # kept for after
    # the decision cannot be posted without a session either
    resp = await h.client.post("/oauth/device", allow_redirects=False, data={
        "user_code": "BCDF-GHJK", "approve": "1", "csrf_token": "c" * 32},
        cookies={"gw_csrf": "c" * 32})
    assert resp.status == 303 and URL(resp.headers["Location"]).path == "/oauth/login"


async def test_unknown_user_code(make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (_, browser):
        for typed in ("BCDF-GHJK", "hello", ""):
            page = await browser.enter_code(typed)
            assert page.status == 400 and "That code is not valid" in page.text
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
            assert "user_code" in page.form().fields  # the user can try again
    assert count(await h.metrics(), "invalid_user_code") == 3


async def _away_from_window_edge() -> None:
    """The limits count in fixed windows: keep a test inside one."""
    left = rfc8628.ENTRY_WINDOW - time.time() % rfc8628.ENTRY_WINDOW
    if left < 3:
        await asyncio.sleep(left + 0.1)


async def test_code_entry_rate_limited_per_source(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h, client_id = await setup(make_auth_gateway)
    await _away_from_window_edge()
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        guesses = [f"BCDF{c * 4}" for c in USER_CODE_ALPHABET[:rfc8628.ENTRY_LIMIT_SOURCE]]
        for guess in guesses:
            assert (await browser.enter_code(guess)).status == 400
        page = await browser.enter_code("ZZZZ-ZZZZ")
        assert page.status == 429 and page.headers["Retry-After"] == "300"
        # the source is blocked, not only its wrong guesses
        page = await browser.enter_code(auth["user_code"])
        assert page.status == 429 and "Anaplan CLI" not in page.text
    assert count(await h.metrics(), "rate_limited") == 2
    assert "device.code_entry_limited" in await audit_actions(redis)


async def test_code_entry_rate_limited_per_code(make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway)
    await _away_from_window_edge()
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        for _ in range(rfc8628.ENTRY_LIMIT_CODE):
            assert (await browser.enter_code(auth["user_code"])).status == 200
        page = await browser.enter_code(auth["user_code"])
        assert page.status == 429
        # another code from the same source still works
        _, second = await device.start()
        assert (await browser.enter_code(second["user_code"])).status == 200


async def test_csrf_required(make_auth_gateway: AuthGatewayFactory) -> None:
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, browser):
        _, auth = await device.start()
        consent = await browser.enter_code(auth["user_code"])
        assert consent.status == 200
        for token in (None, "forged-token-forged-token"):
            data = {"user_code": auth["user_code"], "approve": "1",
                    "device_ref": consent.form().fields["device_ref"]}
            if token:
                data["csrf_token"] = token
            async with browser.http.post(h.issuer + "/oauth/device", data=data) as resp:
                assert resp.status == 403
            async with browser.http.post(h.issuer + "/oauth/device",
                                         data={k: v for k, v in data.items()
                                               if k != "approve"}) as resp:
                assert resp.status == 403
        status, body = await device.poll(auth["device_code"])
        assert (status, body["error"]) == (400, "authorization_pending")


async def test_approval_bound_to_the_code_shown(make_auth_gateway: AuthGatewayFactory) -> None:
    """A consent form shown for one code cannot approve another."""
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, browser):
        _, first = await device.start()
        _, second = await device.start()
        consent = await browser.enter_code(first["user_code"])
        page = await browser.submit(consent, "approve", user_code=second["user_code"])
        assert page.status == 400
        for auth in (first, second):
            status, body = await device.poll(auth["device_code"])
            assert (status, body["error"]) == (400, "authorization_pending")


async def test_user_codes_use_the_consonant_alphabet(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, _):
        codes = [(await device.start())[1]["user_code"] for _ in range(20)]
    assert all(CODE_RE.match(code) for code in codes), codes
    assert not set("".join(codes)) & set("AEIOUY0123456789")
    assert len(set(codes)) == 20
    stored = [str(key) for key in await redis.keys("gw:as:user_code:*")]
    assert sorted(k.rsplit(":", 1)[1] for k in stored) == sorted(
        c.replace("-", "") for c in codes)
    assert count(await h.metrics(), "started") == 20


# -- the same pages in a real browser -----------------------------------------------------

async def test_device_pages_in_chromium(make_auth_gateway: AuthGatewayFactory,
                                        upstream: Upstream) -> None:
    """A person in headless Chromium signs in, enters the code and approves."""
    chromium = find("chromium", "chromium-browser", install="apt-get install -y chromium")
    from playwright.async_api import async_playwright

    h, client_id = await setup(make_auth_gateway)
    async with device_and_browser(h, client_id) as (device, _), async_playwright() as pw:
        _, auth = await device.start(scope="anaplan:read")
        waiting = asyncio.create_task(device.wait_for_token(auth))
        browser = await pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            tab = await browser.new_page()
            await tab.goto(auth["verification_uri_complete"])
            await tab.fill("input[name=username]", USER[0])
            await tab.fill("input[name=password]", USER[1])
            await tab.click("button[type=submit]")
            await tab.wait_for_url("**/oauth/device?user_code=*")
            assert await tab.input_value("input[name=user_code]") == auth["user_code"]
            await tab.click("button[name=continue]")
            assert "Anaplan CLI" in await tab.inner_text("h1")
            assert auth["user_code"] in await tab.inner_text("main")
            await tab.fill("input[name=device_name]", "build server")
            await tab.click("button[name=approve]")
            assert "return to your device" in await tab.inner_text("main")
        finally:
            await browser.close()
        tokens = await asyncio.wait_for(waiting, 10)
    resp = await h.client.get("/2/0/workspaces", headers={
        "Authorization": f"Bearer {tokens['access_token']}"})
    assert resp.status == 200 and upstream.received[-1].raw_path == "/2/0/workspaces"
    [grant] = await h.auth.list_grants(client_id=client_id)
    assert grant.label == "build server"
