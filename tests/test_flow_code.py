"""The authorization code grant with PKCE, driven by Authlib's OAuth client.

The user's browser is an aiohttp session that keeps cookies and posts the login and
consent forms it finds in the HTML; the client application is Authlib's
``AsyncOAuth2Client`` (it makes the PKCE verifier and challenge, the authorization URL,
and exchanges and refreshes the tokens). Every refusal of RFC 6749 section 4.1,
RFC 7636 and RFC 9207 has a test below.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import aiohttp
import pytest
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.integrations.base_client import (  # type: ignore[import-untyped]
    OAuthError as AuthlibError,
)
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]
from redis.asyncio import Redis
from yarl import URL

from gateway.authserver.models import OAuthClient
from gateway.authserver.rfc7636 import s256
from tests.conftest import AuthGatewayFactory, AuthHarness, Upstream

CB = "http://127.0.0.1:8765/callback"
CB2 = "http://localhost:8765/other"
USER, PASSWORD = "alice", "correct horse battery"
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) TestBrowser/1.0"


class Forms(HTMLParser):
    """The forms of a page: action, fields (hidden and text inputs) and button names."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "fields": {}, "buttons": []})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")
        elif tag == "button" and self.forms and a.get("name"):
            self.forms[-1]["buttons"].append(a["name"])

    def one(self) -> dict[str, Any]:
        assert len(self.forms) == 1, self.forms
        return self.forms[0]


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class Flow:
    """A gateway with its authorization server, a signed-up user and their browser."""

    h: AuthHarness
    browser: aiohttp.ClientSession
    redis: Redis
    upstream: Upstream
    oauth_clients: list[Any] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.h.issuer + path

    async def client(self, *, confidential: bool = True, redirect_uris: list[str] | None = None,
                     scopes: str = "anaplan:read anaplan:write", grant: str =
                     "authorization_code", name: str = "Budget Planner"
                     ) -> tuple[OAuthClient, str | None]:
        return await self.h.auth.create_client(
            name=name, grant=grant, scopes=[scopes], actor="test", confidential=confidential,
            redirect_uris=[CB] if redirect_uris is None else redirect_uris)

    def oauth(self, client: OAuthClient, secret: str | None, **kwargs: Any) -> Any:
        """Authlib's client application for ``client``."""
        session = AsyncOAuth2Client(
            client_id=client.client_id, client_secret=secret, code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic" if secret else "none",
            redirect_uri=kwargs.pop("redirect_uri", CB), scope=kwargs.pop(
                "scope", "anaplan:read"), trust_env=False, **kwargs)
        self.oauth_clients.append(session)
        return session

    def start(self, oauth: Any, **extra: str) -> tuple[str, str, str]:
        """The authorization URL, its PKCE verifier and its state."""
        verifier = generate_token(48)
        url, state = oauth.create_authorization_url(self.url("/oauth/authorize"),
                                                    code_verifier=verifier, **extra)
        return str(url), verifier, str(state)

    async def sign_in(self, next_url: str = "") -> aiohttp.ClientResponse:
        page = await self.browser.get(self.url("/oauth/login?next=" + quote(next_url, safe="")))
        form = Forms(await page.text()).one()
        return await self.browser.post(self.url(form["action"]), data={
            **form["fields"], "username": USER, "password": PASSWORD},
            allow_redirects=False)

    async def consent(self, url: str) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
        """Open the authorization URL signed in; the consent page and its form."""
        resp = await self.browser.get(url, allow_redirects=False)
        if resp.status == 303 and resp.headers["Location"].startswith("/oauth/login"):
            login = await self.sign_in(query_of(resp.headers["Location"])["next"])
            assert login.status == 303
            resp = await self.browser.get(self.url(login.headers["Location"]),
                                          allow_redirects=False)
        assert resp.status == 200, await resp.text()
        return resp, Forms(await resp.text()).one()

    async def decide(self, form: dict[str, Any], button: str = "approve",
                     **override: str) -> aiohttp.ClientResponse:
        return await self.browser.post(
            self.url(form["action"]), data={**form["fields"], button: "1", **override},
            headers={"User-Agent": BROWSER_UA}, allow_redirects=False)

    async def approve(self, url: str) -> str:
        """The whole user part: sign in, consent; returns where the browser is sent."""
        _, form = await self.consent(url)
        resp = await self.decide(form)
        assert resp.status == 303, await resp.text()
        return resp.headers["Location"]

    async def api(self, token: str, path: str = "/2/0/workspaces") -> int:
        resp = await self.h.client.get(path, headers={"Authorization": f"Bearer {token}"})
        return resp.status

    async def audit(self) -> list[dict[str, str]]:
        entries = cast(list[tuple[str, dict[str, str]]], await self.redis.xrange("gw:audit"))
        return [entry for _, entry in entries]


@pytest.fixture(name="f")
async def flow(make_auth_gateway: AuthGatewayFactory, redis: Redis, upstream: Upstream
               ) -> AsyncIterator[Flow]:
    """A gateway with its authorization server, the user alice and her browser."""
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="test")
    browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    f = Flow(h, browser, redis, upstream)
    yield f
    await browser.close()
    for session in f.oauth_clients:
        await session.aclose()


def basic(client_id: str, secret: str | None) -> dict[str, str]:
    """``client_secret_basic`` (RFC 6749 section 2.3.1)."""
    return {"Authorization": aiohttp.encode_basic_auth(client_id, str(secret))}


async def token_error(f: Flow, data: dict[str, str], auth: dict[str, str] | None = None
                      ) -> tuple[int, str]:
    resp = await f.h.client.post("/oauth/token", data=data, headers=auth)
    return resp.status, (await resp.json())["error"]


# -- the flow end to end ---------------------------------------------------------------

async def test_code_flow_end_to_end_with_authlib(f: Flow) -> None:
    client, secret = await f.client()
    oauth = f.oauth(client, secret)
    url, verifier, state = f.start(oauth)
    assert "code_challenge_method=S256" in url and "code_challenge=" + s256(verifier) in url
    # not signed in: to the login page, coming back to this very request afterwards
    resp = await f.browser.get(url, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/oauth/login?next=")
    callback = await f.approve(url)
    assert callback.startswith(CB + "?")
    params = query_of(callback)
    assert params["state"] == state and params["iss"] == f.h.issuer
    assert params["code"].startswith("gwac_")
    assert len(await f.redis.keys("gw:as:code:*")) == 1
    token = await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                    code_verifier=verifier, state=state)
    assert token["token_type"] == "Bearer" and token["scope"] == "anaplan:read"
    assert token["expires_in"] == 2100 and token["refresh_token"]
    assert await f.redis.keys("gw:as:code:*") == []       # single use: GETDEL
    # the API through the gateway with that token: reaches the upstream
    before = len(f.upstream.received)
    assert await f.api(token["access_token"]) == 200
    assert f.upstream.received[before].raw_path == "/2/0/workspaces"
    resp = await f.h.client.post("/2/0/workspaces", data=b"{}", headers={
        "Authorization": f"Bearer {token['access_token']}"})
    assert resp.status == 403                              # anaplan:write not granted
    # the grant is a device: the browser's user agent names it
    [grant] = await f.h.auth.list_grants(client_id=client.client_id)
    assert (grant.username, grant.label, grant.scope) == (USER, BROWSER_UA, "anaplan:read")
    # refresh with Authlib: a new pair; the old refresh token replayed kills the grant
    first_refresh = token["refresh_token"]
    refreshed = await oauth.refresh_token(f.url("/oauth/token"), refresh_token=first_refresh)
    assert refreshed["refresh_token"] != first_refresh
    assert await f.api(refreshed["access_token"]) == 200
    with pytest.raises(AuthlibError) as err:
        await oauth.refresh_token(f.url("/oauth/token"), refresh_token=first_refresh)
    assert err.value.error == "invalid_grant"
    assert await f.api(refreshed["access_token"]) == 401
    with pytest.raises(AuthlibError):
        await oauth.refresh_token(f.url("/oauth/token"),
                                  refresh_token=refreshed["refresh_token"])
    [grant] = await f.h.auth.list_grants(client_id=client.client_id)
    assert grant.revoked and grant.revoked_reason == "refresh_token_reuse"
    actions = [e["action"] for e in await f.audit()]
    assert {"login", "code.issued", "code.redeemed", "refresh.reuse_detected"} <= set(actions)
    metrics = await f.h.metrics()
    assert (f'gateway_as_tokens_issued_total{{client_id="{client.client_id}",'
            'grant_type="authorization_code"} 1.0') in metrics


async def test_public_client_uses_pkce_without_a_secret(f: Flow) -> None:
    client, secret = await f.client(confidential=False)
    assert secret is None
    oauth = f.oauth(client, None, scope="anaplan:read anaplan:write")
    url, verifier, state = f.start(oauth)
    callback = await f.approve(url)
    token = await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                    code_verifier=verifier, state=state)
    assert token["scope"] == "anaplan:read anaplan:write"
    resp = await f.h.client.post("/2/0/workspaces", data=b"{}", headers={
        "Authorization": f"Bearer {token['access_token']}"})
    assert resp.status == 200


async def test_consent_page_names_the_client_and_scopes_and_refuses_framing(f: Flow) -> None:
    client, secret = await f.client(name="Budget <Planner> & Co")
    url, _, _ = f.start(f.oauth(client, secret, scope="anaplan:read anaplan:write"))
    resp, form = await f.consent(url)
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"
    text = await resp.text()
    assert "Budget &lt;Planner&gt; &amp; Co" in text and "<Planner>" not in text
    assert client.client_id in text and "signed in as <strong>alice</strong>" in text.lower()
    assert "Read your Anaplan data" in text and "Change your Anaplan data" in text
    assert "anaplan:read" in text and "anaplan:write" in text
    assert form["action"] == "/oauth/authorize" and form["buttons"] == ["approve", "deny"]
    assert form["fields"]["csrf_token"] and form["fields"]["request_id"]
    # the hidden fields carry no client, redirect URI or scope: Redis holds the request
    assert set(form["fields"]) == {"csrf_token", "request_id"}
    [key] = await f.redis.keys("gw:as:authz:*")
    assert 0 < await f.redis.ttl(key) <= 600
    assert form["fields"]["request_id"] not in key       # stored under a digest


async def test_iss_parameter_is_the_issuer_of_the_metadata(f: Flow) -> None:
    meta = await (await f.h.client.get("/.well-known/oauth-authorization-server")).json()
    client, secret = await f.client()
    url, _, _ = f.start(f.oauth(client, secret))
    assert query_of(await f.approve(url))["iss"] == meta["issuer"] == f.h.issuer
    url, _, _ = f.start(f.oauth(client, secret, scope="anaplan:nope"))
    assert query_of((await f.browser.get(url, allow_redirects=False)).headers["Location"]
                    )["iss"] == meta["issuer"]


async def test_redirect_uri_may_be_omitted_when_the_client_has_one(f: Flow) -> None:
    client, _ = await f.client(confidential=False, redirect_uris=[CB + "?tenant=7"])
    oauth = f.oauth(client, None, redirect_uri=None)
    url, verifier, state = f.start(oauth)
    assert "redirect_uri" not in url
    callback = await f.approve(url)
    assert callback.startswith(CB + "?tenant=7&code=")      # its own query is kept
    token = await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                    code_verifier=verifier, state=state)
    assert await f.api(token["access_token"]) == 200


# -- refusals at the authorization endpoint --------------------------------------------

async def _authorize_redirect(f: Flow, params: dict[str, str]) -> dict[str, str]:
    """Signed in, request ``params``; the error the client gets back."""
    resp = await f.sign_in()
    assert resp.status == 303
    resp = await f.browser.get(f.url("/oauth/authorize?" + urlencode(params)),
                               allow_redirects=False)
    assert resp.status == 303, await resp.text()
    location = resp.headers["Location"]
    assert location.startswith(CB + "?")
    return query_of(location)


def _params(client: OAuthClient, **extra: str) -> dict[str, str]:
    params = {"response_type": "code", "client_id": client.client_id, "redirect_uri": CB,
              "state": "st-1", "code_challenge": s256("v" * 43),
              "code_challenge_method": "S256"}
    params.update(extra)
    return {k: v for k, v in params.items() if v != "-"}


async def test_missing_pkce_is_refused(f: Flow) -> None:
    client, _ = await f.client()
    got = await _authorize_redirect(f, _params(client, code_challenge="-",
                                                  code_challenge_method="-"))
    assert got["error"] == "invalid_request" and "code_challenge" in got["error_description"]
    assert (got["state"], got["iss"]) == ("st-1", f.h.issuer) and "code" not in got
    assert await f.redis.keys("gw:as:authz:*") == []


async def test_plain_pkce_method_is_refused(f: Flow) -> None:
    client, _ = await f.client()
    for method in ("plain", "-"):        # no method means plain (RFC 7636 section 4.3)
        got = await _authorize_redirect(f, _params(client, code_challenge="v" * 43,
                                                      code_challenge_method=method))
        assert got["error"] == "invalid_request" and "S256" in got["error_description"]
    got = await _authorize_redirect(f, _params(client, code_challenge="too-short"))
    assert got["error"] == "invalid_request"


async def test_scope_not_allowed_is_invalid_scope(f: Flow) -> None:
    client, _ = await f.client(scopes="anaplan:read")
    got = await _authorize_redirect(f, _params(client, scope="anaplan:read anaplan:write"))
    assert (got["error"], got["state"], got["iss"]) == ("invalid_scope", "st-1", f.h.issuer)


async def test_only_response_type_code(f: Flow) -> None:
    client, _ = await f.client()
    got = await _authorize_redirect(f, _params(client, response_type="token"))
    assert got["error"] == "unsupported_response_type"


async def _error_page(f: Flow, query: str) -> str:
    resp = await f.browser.get(f.url("/oauth/authorize?" + query), allow_redirects=False)
    assert resp.status == 400 and "Location" not in resp.headers
    assert resp.content_type == "text/html"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    return await resp.text()


async def test_unregistered_redirect_uri_shows_an_error_and_never_redirects(f: Flow) -> None:
    client, _ = await f.client()
    await f.sign_in()
    text = await _error_page(f, urlencode(_params(client, redirect_uri="https://evil.example/cb")))
    assert "not registered" in text and "evil.example" not in text
    text = await _error_page(f, urlencode(_params(client, client_id="no-such-client")))
    assert "No application" in text
    text = await _error_page(f, urlencode(_params(client, client_id="-")))
    assert "client_id" in text
    assert await f.redis.keys("gw:as:authz:*") == []


async def test_redirect_uri_must_match_exactly_at_authorize(f: Flow) -> None:
    client, _ = await f.client(redirect_uris=[CB, CB2])
    await f.sign_in()
    for near_miss in (CB + "/", CB + "?x=1", CB.upper(), CB.replace("8765", "8766"),
                      CB + "#frag", CB + "/../evil"):
        text = await _error_page(f, urlencode(_params(client, redirect_uri=near_miss)))
        assert "not registered" in text
    # with two registered, the request must name one
    text = await _error_page(f, urlencode(_params(client, redirect_uri="-")))
    assert "must name a redirect_uri" in text
    # a repeated redirect_uri is refused before anything is trusted
    text = await _error_page(f, urlencode(_params(client)) + "&redirect_uri=" + quote(CB2))
    assert "repeated" in text


async def test_disabled_client_is_refused(f: Flow) -> None:
    client, secret = await f.client()
    oauth = f.oauth(client, secret)
    url, verifier, state = f.start(oauth)
    _, form = await f.consent(url)
    await f.h.auth.set_disabled(client.client_id, True, actor="test", reason="breach")
    # disabled while the consent page was open: no code, no redirect
    resp = await f.decide(form)
    assert resp.status == 400 and "Location" not in resp.headers
    assert "disabled" in await resp.text()
    text = await _error_page(f, urlsplit(url).query)
    assert "disabled" in text and "unauthorized_client" in text
    # a code issued before the client was disabled cannot be redeemed
    await f.h.auth.set_disabled(client.client_id, False, actor="test")
    callback = await f.approve(url)
    await f.h.auth.set_disabled(client.client_id, True, actor="test")
    with pytest.raises(AuthlibError) as err:
        await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                code_verifier=verifier, state=state)
    assert err.value.error == "invalid_client"
    assert await f.redis.keys("gw:as:at:*") == []


async def test_device_client_cannot_use_the_code_flow(f: Flow) -> None:
    device, _ = await f.client(grant="device_code", confidential=False, redirect_uris=[])
    await f.sign_in()
    text = await _error_page(f, urlencode(_params(device, redirect_uri="-")))
    assert "unauthorized_client" in text and "device flow" in text
    assert await token_error(f, {"grant_type": "authorization_code", "code": "gwac_x",
                                 "code_verifier": "v" * 43, "client_id": device.client_id}
                             ) == (400, "unauthorized_client")


async def test_open_redirect_through_login_next_is_refused(f: Flow) -> None:
    for evil in ("https://evil.example/", "//evil.example/x", "/oauth/..//evil.example",
                 "/\\evil.example", "javascript:alert(1)"):
        resp = await f.sign_in(evil)
        assert resp.status == 303
        assert resp.headers["Location"] == "/account/", evil
    # an authorization request typed by hand (unencoded "https://") still comes back
    client, _ = await f.client()
    f.browser.cookie_jar.clear()
    raw = (f"/oauth/authorize?response_type=code&client_id={client.client_id}"
           f"&redirect_uri={CB}&state=s&code_challenge={s256('v' * 43)}"
           "&code_challenge_method=S256")
    resp = await f.browser.get(f.url(raw), allow_redirects=False)
    login = await f.sign_in(query_of(resp.headers["Location"])["next"])
    assert login.headers["Location"].startswith("/oauth/authorize?")


# -- refusals on the consent form -------------------------------------------------------

async def test_deny_sends_access_denied_with_state_and_iss(f: Flow) -> None:
    client, secret = await f.client()
    url, _, state = f.start(f.oauth(client, secret))
    _, form = await f.consent(url)
    resp = await f.decide(form, "deny")
    assert resp.status == 303
    got = query_of(resp.headers["Location"])
    assert resp.headers["Location"].startswith(CB + "?")
    assert (got["error"], got["state"], got["iss"]) == ("access_denied", state, f.h.issuer)
    assert "code" not in got
    assert await f.h.auth.list_grants(client_id=client.client_id) == []
    assert "authorization.denied" in [e["action"] for e in await f.audit()]


async def test_consent_needs_the_csrf_token(f: Flow) -> None:
    client, secret = await f.client()
    url, _, _ = f.start(f.oauth(client, secret))
    _, form = await f.consent(url)
    fields = dict(form["fields"])
    del fields["csrf_token"]
    resp = await f.browser.post(f.url("/oauth/authorize"), data={**fields, "approve": "1"},
                                allow_redirects=False)
    assert resp.status == 403 and "Location" not in resp.headers
    resp = await f.decide(form, csrf_token="x" * 32)
    assert resp.status == 403 and "Location" not in resp.headers
    assert await f.h.auth.list_grants(client_id=client.client_id) == []
    # the refused posts did not use up the request: the real form still works
    resp = await f.decide(form)
    assert resp.status == 303 and "code" in query_of(resp.headers["Location"])


async def test_expired_or_answered_consent_request_is_refused(f: Flow) -> None:
    client, secret = await f.client()
    url, _, _ = f.start(f.oauth(client, secret))
    _, form = await f.consent(url)
    [key] = await f.redis.keys("gw:as:authz:*")
    await f.redis.delete(key)                    # as its TTL would
    resp = await f.decide(form)
    assert resp.status == 400 and "Location" not in resp.headers
    assert "expired" in await resp.text()
    _, form = await f.consent(url)
    assert (await f.decide(form)).status == 303
    resp = await f.decide(form)                  # the same page posted twice
    assert resp.status == 400 and "Location" not in resp.headers
    assert len(await f.h.auth.list_grants(client_id=client.client_id)) == 1


async def test_consent_request_belongs_to_the_user_who_saw_it(f: Flow) -> None:
    client, secret = await f.client()
    url, _, _ = f.start(f.oauth(client, secret))
    _, form = await f.consent(url)
    await f.h.auth.add_user("mallory", "mallory-password", actor="test")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        page = Forms(await (await other.get(f.url("/oauth/login"))).text()).one()
        await other.post(f.url("/oauth/login"), data={
            **page["fields"], "username": "mallory", "password": "mallory-password"})
        csrf = other.cookie_jar.filter_cookies(URL(f.url("/")))["gw_csrf"].value
        resp = await other.post(f.url("/oauth/authorize"), data={
            "csrf_token": csrf, "request_id": form["fields"]["request_id"], "approve": "1"},
            allow_redirects=False)
    assert resp.status == 403 and "Location" not in resp.headers
    assert await f.h.auth.list_grants(client_id=client.client_id) == []


# -- refusals at the token endpoint -------------------------------------------------------

async def _code(f: Flow, client: OAuthClient, secret: str | None, **kw: Any
                ) -> tuple[Any, str, str, str]:
    """Authlib's client, the callback URL with a fresh code, the verifier and state."""
    oauth = f.oauth(client, secret, **kw)
    url, verifier, state = f.start(oauth)
    return oauth, await f.approve(url), verifier, state


async def test_wrong_verifier_is_refused_and_spends_the_code(f: Flow) -> None:
    client, secret = await f.client()
    oauth, callback, verifier, state = await _code(f, client, secret)
    with pytest.raises(AuthlibError) as err:
        await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                code_verifier=generate_token(48), state=state)
    assert err.value.error == "invalid_grant"
    with pytest.raises(AuthlibError) as err:
        await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                code_verifier=verifier, state=state)
    assert err.value.error == "invalid_grant"
    [grant] = await f.h.auth.list_grants(client_id=client.client_id)
    assert grant.revoked and await f.h.auth.store.grant_tokens(grant.grant_id) == set()
    # a missing or malformed verifier is a malformed request, and spends nothing
    oauth, callback, verifier, state = await _code(f, client, secret)
    code = query_of(callback)["code"]
    auth = basic(client.client_id, secret)
    for bad in ({}, {"code_verifier": "short"}, {"code_verifier": "v" * 42 + "!"}):
        assert await token_error(f, {"grant_type": "authorization_code", "code": code,
                                     "redirect_uri": CB, **bad}, auth) == (400,
                                                                           "invalid_request")
    token = await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                    code_verifier=verifier, state=state)
    assert await f.api(token["access_token"]) == 200


async def test_code_replay_revokes_what_the_first_redemption_issued(f: Flow) -> None:
    client, secret = await f.client()
    oauth, callback, verifier, state = await _code(f, client, secret)
    token = await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                    code_verifier=verifier, state=state)
    assert await f.api(token["access_token"]) == 200
    with pytest.raises(AuthlibError) as err:
        await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                code_verifier=verifier, state=state)
    assert err.value.error == "invalid_grant"
    assert await f.api(token["access_token"]) == 401
    with pytest.raises(AuthlibError):
        await oauth.refresh_token(f.url("/oauth/token"), refresh_token=token["refresh_token"])
    [grant] = await f.h.auth.list_grants(client_id=client.client_id)
    assert grant.revoked and grant.revoked_reason == "code_replay"
    audit = await f.audit()
    assert [e for e in audit if e["action"] == "code.replay_detected"
            and e["grant_id"] == grant.grant_id]
    assert 'gateway_as_grants_revoked_total{reason="code_replay"} 1.0' in await f.h.metrics()


async def test_code_of_another_client_is_refused(f: Flow) -> None:
    client, secret = await f.client()
    thief, _ = await f.client(confidential=False, name="Other app")
    _, callback, verifier, _ = await _code(f, client, secret)
    assert await token_error(f, {
        "grant_type": "authorization_code", "code": query_of(callback)["code"],
        "redirect_uri": CB, "code_verifier": verifier, "client_id": thief.client_id}
    ) == (400, "invalid_grant")
    assert await f.h.auth.list_grants(client_id=thief.client_id) == []
    [grant] = await f.h.auth.list_grants(client_id=client.client_id)
    assert grant.revoked and await f.h.auth.store.grant_tokens(grant.grant_id) == set()


async def test_redirect_uri_must_match_at_the_token_endpoint(f: Flow) -> None:
    client, secret = await f.client(redirect_uris=[CB, CB2])
    auth = basic(client.client_id, secret)
    for sent in ({"redirect_uri": CB2}, {}):   # different, or left out though it was named
        _, callback, verifier, _ = await _code(f, client, secret)
        assert await token_error(f, {"grant_type": "authorization_code", "code": query_of(
            callback)["code"], "code_verifier": verifier, **sent}, auth
        ) == (400, "invalid_grant")
    assert all(g.revoked for g in await f.h.auth.list_grants(client_id=client.client_id))


async def test_wrong_client_secret_is_refused(f: Flow) -> None:
    client, secret = await f.client()
    _, callback, verifier, _ = await _code(f, client, secret)
    data = {"grant_type": "authorization_code", "code": query_of(callback)["code"],
            "redirect_uri": CB, "code_verifier": verifier}
    resp = await f.h.client.post("/oauth/token", data=data,
                                 headers=basic(client.client_id, "not-the-secret"))
    assert resp.status == 401 and "WWW-Authenticate" in resp.headers
    assert (await resp.json())["error"] == "invalid_client"
    # a confidential client cannot fall back to being public
    assert await token_error(f, {**data, "client_id": client.client_id}) == (401,
                                                                            "invalid_client")
    # the refused attempts did not reach the code: the real client still redeems it
    resp = await f.h.client.post("/oauth/token", data=data,
                                 headers=basic(client.client_id, secret))
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"


async def test_expired_or_unknown_code_is_invalid_grant(f: Flow) -> None:
    client, secret = await f.client()
    oauth, callback, verifier, state = await _code(f, client, secret)
    [key] = await f.redis.keys("gw:as:code:*")
    assert 0 < await f.redis.ttl(key) <= 60
    await f.redis.delete(key)                      # as the 60 s TTL would
    with pytest.raises(AuthlibError) as err:
        await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                code_verifier=verifier, state=state)
    assert err.value.error == "invalid_grant"
    assert await token_error(f, {"grant_type": "authorization_code", "code": "gwac_unknown",
                                 "redirect_uri": CB, "code_verifier": verifier},
                             basic(client.client_id, secret)
                             ) == (400, "invalid_grant")
