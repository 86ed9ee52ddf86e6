"""Single sign-on against a real OpenID provider: panva's ``oidc-provider`` (Node.js,
``tests/oidc``) on loopback, driven by a cookie-keeping aiohttp "browser"."""

from __future__ import annotations

import html
import json
import re
import secrets
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from redis.asyncio import Redis
from yarl import URL

from tests.conftest import AuthGatewayFactory, AuthHarness, GatewayFactory, Upstream
from tests.redis_server import free_port
from tests.tools import find

OIDC_DIR = Path(__file__).parent / "oidc"
CALLBACK = "/oauth/sso/callback"



@dataclass
class OpenIDTestProvider:
    """The running provider and its RFC 7591 registration endpoint."""

    issuer: str
    registration_token: str

    async def register(self, client_id: str, secret: str, redirect_uri: str,
                       **metadata: Any) -> None:
        body = {"client_id": client_id, "client_secret": secret,
                "redirect_uris": [redirect_uri], **metadata}
        async with aiohttp.ClientSession() as s, s.post(
                self.issuer + "/reg", json=body,
                headers={"Authorization": f"Bearer {self.registration_token}"}) as resp:
            assert resp.status == 201, await resp.text()


@pytest.fixture(scope="session")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIDTestProvider]:
    # Node.js runs the test OpenID provider (tests/oidc, npm package oidc-provider)
    npm = find("npm", install="apt-get install -y nodejs npm")
    node = find("node", install="apt-get install -y nodejs npm")
    if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        done = subprocess.run([npm, "ci", "--prefix", str(OIDC_DIR), "--no-audit",
                               "--no-fund"], timeout=300, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"npm ci --prefix tests/oidc failed:\n{done.stderr}")
    work = tmp_path_factory.mktemp("oidc")
    token = secrets.token_urlsafe(16)
    (work / "config.json").write_text(json.dumps({
        "registration_token": token, "default_user": "alice-0001",
        "accounts": {"alice-0001": {"preferred_username": "alice"}}}))
    port = free_port()
    log = (work / "provider.log").open("wb")
    proc = subprocess.Popen([node, str(OIDC_DIR / "server.mjs"), str(port),
                             str(work / "config.json")], stdout=log, stderr=log)
    issuer = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(issuer + "/.well-known/openid-configuration",
                                        timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the test OpenID provider did not start:\n" +
                                   (work / "provider.log").read_text()) from None
            time.sleep(0.05)
    yield OpenIDTestProvider(issuer, token)
    proc.terminate()
    proc.wait(10)
    log.close()


@dataclass
class Visit:
    """Where a browser navigation ended, and every URL it went through."""

    status: int
    url: URL
    text: str
    hops: list[URL] = field(default_factory=list)
    set_cookies: list[str] = field(default_factory=list)

    @property
    def readable(self) -> str:
        """The page's text as a reader sees it (entities decoded)."""
        return html.unescape(self.text)


@pytest.fixture
async def browser() -> AsyncIterator[Callable[[], aiohttp.ClientSession]]:
    """New browsers (own cookie jars; IP-address hosts allowed, as browsers do)."""
    sessions: list[aiohttp.ClientSession] = []

    def new() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
        return sessions[-1]

    yield new
    for s in sessions:
        await s.close()


async def navigate(session: aiohttp.ClientSession, url: str | URL, *,
                   login: dict[str, str] | None = None, stop_at_callback: bool = False,
                   callback: Callable[[URL], URL] | None = None) -> Visit:
    """Follow redirects as a browser does. ``login`` adds parameters to the provider's
    interaction (``user``, ``preferred_username``, ``deny``); ``callback`` rewrites the
    provider's redirect back to the gateway, ``stop_at_callback`` stops before it."""
    current, hops, cookies = URL(url), list[URL](), list[str]()
    for _ in range(20):
        if current.path.startswith("/interaction/") and login:
            current = current.update_query(login)
        if current.path == CALLBACK:
            if stop_at_callback:
                return Visit(0, current, "", hops, cookies)
            if callback:
                current = callback(current)
        hops.append(current)
        async with session.get(current, allow_redirects=False) as resp:
            cookies += resp.headers.getall("Set-Cookie", [])
            if resp.status in (301, 302, 303, 307):
                current = current.join(URL(resp.headers["Location"]))
                continue
            return Visit(resp.status, current, await resp.text(), hops, cookies)
    raise AssertionError(f"too many redirects: {hops}")


@dataclass
class SSOGateway:
    h: AuthHarness
    client_id: str

    def url(self, path: str) -> str:
        return self.h.issuer + path


async def sso_gateway(make: AuthGatewayFactory, oidc: OpenIDTestProvider, *,
                      register: bool = True, **metadata: Any) -> SSOGateway:
    """A gateway using ``oidc`` for SSO, registered there with its exact callback URI.
    ``metadata`` may say ``{client_id}``, replaced with the gateway's client id."""
    client_id, secret = "gw-" + secrets.token_hex(6), secrets.token_urlsafe(24)
    h = await make(sso_issuer=oidc.issuer, sso_client_id=client_id,
                   sso_client_secret=secret)
    if register:
        filled = json.loads(json.dumps(metadata).replace("{client_id}", client_id))
        await oidc.register(client_id, secret, h.issuer + CALLBACK, **filled)
    return SSOGateway(h, client_id)


async def sso_login(g: SSOGateway, session: aiohttp.ClientSession, **kw: Any) -> Visit:
    """From the login page, through the "company account" link, to wherever it ends."""
    page = await navigate(session, g.url("/oauth/login?next=/account/"))
    assert page.status == 200
    link = re.search(r'href="(/oauth/sso/start\?next=[^"]+)"', page.text)
    assert link, page.text
    return await navigate(session, g.url(link.group(1).replace("&amp;", "&")), **kw)


def logins(metrics: str, outcome: str) -> float:
    found = re.search(rf'gateway_as_logins_total{{method="sso",outcome="{outcome}"}} (\S+)',
                      metrics)
    return float(found.group(1)) if found else 0.0


async def audit_actions(redis: Redis) -> list[dict[str, str]]:
    stream: Any = await redis.xrange("gw:audit")
    return [fields for _, fields in stream]


async def user_record(redis: Redis, username: str) -> dict[str, str]:
    return cast(dict[str, str], await redis.hgetall(f"gw:as:user:{username}"))


async def test_sso_login_lands_signed_in_and_maps_the_user_by_subject(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    visit = await sso_login(g, browser())
    assert visit.status == 200
    assert str(visit.url) == g.url("/account/")
    assert "signed in as <strong>alice</strong>" in visit.text
    auth = next(u for u in visit.hops if u.path == "/auth")
    assert str(auth.origin()) == oidc.issuer
    assert auth.query["response_type"] == "code"
    assert auth.query["client_id"] == g.client_id
    assert auth.query["redirect_uri"] == g.url(CALLBACK)
    assert auth.query["code_challenge_method"] == "S256"
    assert "openid" in auth.query["scope"].split() and auth.query["nonce"]
    user = await user_record(redis, "alice")
    assert user["sso"] == oidc.issuer and user["sso_sub"] == "alice-0001"
    assert "password_hash" not in user and user["sub"].startswith("u_")
    assert await redis.get(f"gw:as:sso:{oidc.issuer}|alice-0001") == "alice"
    assert await redis.keys("gw:as:sso_state:*") == []
    assert logins(await g.h.metrics(), "success") == 1.0
    actions = await audit_actions(redis)
    assert {"action": "login", "method": "sso", "user": "alice"}.items() <= actions[-1].items()
    assert any(a["action"] == "user.added" and a["user"] == "alice" for a in actions)

    # later, in another browser, with a renamed account at the provider: same user
    again = await sso_login(g, browser(), login={"preferred_username": "alice.renamed"})
    assert "signed in as <strong>alice</strong>" in again.text
    assert await redis.exists("gw:as:user:alice.renamed") == 0
    assert (await user_record(redis, "alice"))["sub"] == user["sub"]
    assert logins(await g.h.metrics(), "success") == 2.0


async def test_session_cookie_is_httponly_and_samesite(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession]) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    visit = await sso_login(g, browser())
    assert visit.status == 200
    session = [c for c in visit.set_cookies if c.startswith("gw_session=")]
    assert len(session) == 1
    attrs = [a.strip().lower() for a in session[0].split(";")]
    assert "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
    bound = next(c for c in visit.set_cookies if c.startswith("gw_sso_browser="))
    assert "HttpOnly" in bound and "SameSite=Lax" in bound and "Path=/oauth/sso/" in bound


async def test_first_login_names_the_account_safely(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    bob = await sso_login(g, browser(), login={"user": "bob-0002",
                                               "preferred_username": "Bob Smith!<b>"})
    assert "signed in as <strong>bob-smith-b</strong>" in bob.text
    carol = await sso_login(g, browser(), login={"user": "carol-0003",
                                                 "preferred_username": ""})
    assert "signed in as <strong>carol-0003</strong>" in carol.text  # falls back to sub
    assert await redis.get(f"gw:as:sso:{oidc.issuer}|carol-0003") == "carol-0003"


async def test_existing_local_account_is_not_taken_over(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    await g.h.auth.add_user("alice", "local-password", actor="test")
    before = await user_record(redis, "alice")
    visit = await sso_login(g, browser())
    assert visit.status == 409
    assert "already belongs to another user" in visit.text
    assert "gw_session=" not in " ".join(visit.set_cookies)
    assert await user_record(redis, "alice") == before
    assert await redis.get(f"gw:as:sso:{oidc.issuer}|alice-0001") is None
    assert logins(await g.h.metrics(), "conflict") == 1.0


async def test_missing_unknown_and_replayed_state_are_refused(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    b = browser()
    missing = await navigate(b, g.url(CALLBACK + "?code=abc"))
    assert missing.status == 400 and "no valid state" in missing.text
    forged = await navigate(b, g.url(CALLBACK + "?code=abc&state=" + "x" * 43))
    assert forged.status == 400 and "unknown, expired or already used" in forged.text
    done = await sso_login(g, b)
    assert done.status == 200
    callback = next(u for u in done.hops if u.path == CALLBACK)
    replay = await navigate(b, callback)
    assert replay.status == 400 and "already used" in replay.text
    assert "gw_session=" not in " ".join(replay.set_cookies)
    assert logins(await g.h.metrics(), "invalid_state") == 3.0
    assert (await audit_actions(redis))[-1]["reason"] == "invalid_state"


async def test_state_from_another_browser_is_refused(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession]) -> None:
    """Login CSRF: a victim's browser must not complete the attacker's sign-in."""
    g = await sso_gateway(make_auth_gateway, oidc)
    attacker = await sso_login(g, browser(), stop_at_callback=True)
    victim = await navigate(browser(), attacker.url)
    assert victim.status == 400 and "started in another browser" in victim.text
    assert "gw_session=" not in " ".join(victim.set_cookies)


async def test_nonce_mismatch_is_refused(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    b = browser()
    stopped = await sso_login(g, b, stop_at_callback=True)
    [key] = await redis.keys("gw:as:sso_state:*")
    record = json.loads(await redis.get(key) or "{}")
    await redis.set(key, json.dumps({**record, "nonce": "not-the-one-sent"}), ex=60)
    visit = await navigate(b, stopped.url)
    assert visit.status == 400 and "nonce does not match" in visit.text
    assert "gw_session=" not in " ".join(visit.set_cookies)
    assert logins(await g.h.metrics(), "invalid_id_token") == 1.0


@pytest.mark.parametrize(("metadata", "message"), [
    ({"x_tamper": {"claims": {"iss": "http://127.0.0.1:9/another-provider"}}},
     "issued by another provider (iss)"),
    ({"x_tamper": {"claims": {"aud": "another-app"}}}, "issued for another application"),
    ({"x_tamper": {"claims": {"aud": ["{client_id}", "another-app"]}}},
     "another authorized party (azp)"),
    ({"x_tamper": {"claims": {"exp": 1_000_000_000}}}, "has expired"),
    ({"x_tamper": {"claims": {"iat": None}}}, "lacks the 'iat' claim"),
    ({"x_tamper": {"alg": "none"}}, "signed with 'none'"),
    ({"x_tamper": {"kid": "rotated-away"}}, "key the identity provider does not publish"),
    ({"id_token_signed_response_alg": "HS256"}, "signed with 'HS256'"),
], ids=["other-issuer", "other-audience", "several-audiences-no-azp", "expired",
        "no-iat", "alg-none", "unknown-kid", "hs256-with-client-secret"])
async def test_bad_id_tokens_are_refused(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis,
        metadata: dict[str, Any], message: str) -> None:
    g = await sso_gateway(make_auth_gateway, oidc, **metadata)
    visit = await sso_login(g, browser())
    assert visit.status == 400
    assert message in visit.readable
    assert "eyJ" not in visit.text  # no token material on the page
    assert "gw_session=" not in " ".join(visit.set_cookies)
    assert await redis.keys("gw:as:user:*") == []
    assert logins(await g.h.metrics(), "invalid_id_token") == 1.0


async def test_provider_error_access_denied_shows_a_clear_page(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession]) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    visit = await sso_login(g, browser(), login={"deny": "1"})
    assert visit.status == 400 and visit.url.path == CALLBACK
    assert visit.url.query["error"] == "access_denied"
    assert "cancelled or refused at your company's identity provider" in visit.readable
    assert "(access_denied)" in visit.text
    assert visit.text.count("<script") == 0
    assert logins(await g.h.metrics(), "denied") == 1.0


async def test_code_redeemed_without_its_pkce_verifier_is_refused(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    """The provider checks the verifier the gateway kept (RFC 7636 4.6): a wrong one fails."""
    g = await sso_gateway(make_auth_gateway, oidc)
    b = browser()
    stopped = await sso_login(g, b, stop_at_callback=True)
    [key] = await redis.keys("gw:as:sso_state:*")
    record = json.loads(await redis.get(key) or "{}")
    await redis.set(key, json.dumps({**record, "verifier": "v" * 64}), ex=60)
    visit = await navigate(b, stopped.url)
    assert visit.status == 400
    assert "refused the sign-in code (invalid_grant)" in visit.readable
    assert logins(await g.h.metrics(), "refused") == 1.0


async def test_response_without_code_and_foreign_next_url(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession]) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    no_code = await sso_login(g, browser(), callback=lambda u: u.with_query(
        {k: v for k, v in u.query.items() if k != "code"}))
    assert no_code.status == 400 and "carries no code" in no_code.readable
    # ``next`` pointing off this server is replaced by the account page (no open redirect)
    visit = await navigate(browser(), g.url("/oauth/sso/start?next=https://evil.example/x"))
    assert visit.status == 200 and str(visit.url) == g.url("/account/")


async def test_mixed_up_authorization_response_is_refused(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession]) -> None:
    """RFC 9207: a response claiming to come from another provider is not redeemed."""
    g = await sso_gateway(make_auth_gateway, oidc)
    visit = await sso_login(g, browser(), callback=lambda u: u.update_query(
        iss="http://127.0.0.1:9/evil"))
    assert visit.status == 400 and "names another identity provider" in visit.text


async def test_provider_unreachable_is_a_502_page(
        make_auth_gateway: AuthGatewayFactory, browser: Callable[[], aiohttp.ClientSession],
        redis: Redis) -> None:
    h = await make_auth_gateway(sso_issuer=f"http://127.0.0.1:{free_port()}",
                                sso_client_id="gw", sso_client_secret="top-secret-value")
    visit = await navigate(browser(), h.issuer + "/oauth/sso/start?next=/oauth/account")
    assert visit.status == 502
    assert "identity provider could not be reached" in visit.text
    assert "top-secret-value" not in visit.text
    assert visit.hops == [URL(h.issuer + "/oauth/sso/start?next=/oauth/account")]
    assert await redis.keys("gw:as:sso_state:*") == []
    assert logins(await h.metrics(), "provider_unavailable") == 1.0


async def test_credentials_refused_by_the_provider_are_a_502_page(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession]) -> None:
    g = await sso_gateway(make_auth_gateway, oidc, register=False)
    await oidc.register(g.client_id, "a-different-secret-value", g.url(CALLBACK))
    visit = await sso_login(g, browser())
    assert visit.status == 502 and "(invalid_client)" in visit.text
    assert "a-different-secret-value" not in visit.text


async def test_discovery_naming_another_issuer_is_refused(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession]) -> None:
    """OIDC Discovery 4.3: the document's ``issuer`` must be exactly the configured one."""
    h = await make_auth_gateway(sso_issuer=oidc.issuer + "/", sso_client_id="gw",
                                sso_client_secret="s")
    visit = await navigate(browser(), h.issuer + "/oauth/sso/start")
    assert visit.status == 502 and "names another issuer" in visit.text


async def test_sso_start_is_rate_limited_and_needs_configuration(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    g = await sso_gateway(make_auth_gateway, oidc)
    b = browser()
    if time.time() % 60 > 57:  # the limit counts per minute: stay in one window
        time.sleep(60 - time.time() % 60)
    statuses = []
    for _ in range(62):
        async with b.get(g.url("/oauth/sso/start"), allow_redirects=False) as resp:
            statuses.append(resp.status)
    assert statuses[:60] == [302] * 60 and statuses[-1] == 429
    assert len(await redis.keys("gw:as:sso_state:*")) == 60
    plain = await make_auth_gateway()
    visit = await navigate(b, plain.issuer + "/oauth/sso/start")
    assert visit.status == 404 and "not configured" in visit.text


# --- the same provider as the gateway's RFC 7662 introspection endpoint ----------------

async def test_oidc_provider_refusing_to_introspect_a_jwt_is_401_not_an_outage(
        make_gateway: GatewayFactory, oidc: OpenIDTestProvider, upstream: Upstream) -> None:
    # oidc-provider answers 400 unsupported_token_type for any JWT-shaped token: that is
    # about the token, and must not let any client turn the gateway into 503s
    await oidc.register("gw-introspector", "introspector-secret",
                        "http://127.0.0.1/unused")
    url = oidc.issuer + "/token/introspection"
    gw = await make_gateway(introspection_url=url, introspection_client_id="gw-introspector",
                            introspection_client_secret="introspector-secret")
    jwt_shaped = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl"
    for token in (jwt_shaped, jwt_shaped, "an-opaque-token-it-never-issued"):
        resp = await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401, token
        assert "Retry-After" not in resp.headers
        assert (await resp.json())["error"] == "invalid_token"
    metrics = await gw.metrics()
    # the second JWT answer came from the cache: two calls to the provider, not three
    assert 'gateway_introspection_requests_total{outcome="inactive"} 2.0' in metrics
    assert 'gateway_introspection_requests_total{outcome="error"} 0.0' in metrics
    assert upstream.received == []
    # the gateway's own credentials refused (401 invalid_client) is still an outage
    wrong = await make_gateway(introspection_url=url, introspection_client_id="gw-introspector",
                               introspection_client_secret="not-the-secret")
    resp = await wrong.client.get("/2/0/x", headers={"Authorization": "Bearer other-token"})
    assert resp.status == 503 and "Retry-After" in resp.headers


async def test_sso_sign_in_records_the_admin_role_from_the_groups_claim(
        make_auth_gateway: AuthGatewayFactory, oidc: OpenIDTestProvider,
        browser: Callable[[], aiohttp.ClientSession], redis: Redis) -> None:
    """GATEWAY_ADMIN_GROUPS: a member of a named group gets the admin role at sign-in, and
    loses it at the next sign-in without the group; with no admin groups set, single
    sign-on leaves the role as an operator set it."""
    async def sign_in(groups: list[str] | str, admin_groups: str) -> dict[str, str]:
        client_id, secret = "gw-" + secrets.token_hex(6), secrets.token_urlsafe(24)
        h = await make_auth_gateway(sso_issuer=oidc.issuer, sso_client_id=client_id,
                                    sso_client_secret=secret, admin_groups=admin_groups)
        await oidc.register(client_id, secret, h.issuer + CALLBACK,
                            x_tamper={"claims": {"groups": groups}})
        visit = await sso_login(SSOGateway(h, client_id), browser())
        assert visit.status == 200, visit.text
        return await user_record(redis, "alice")

    assert (await sign_in(["staff", "gw-admins"], " gw-admins , ops"))["admin"] == "1"
    assert (await sign_in(["staff"], "gw-admins,ops"))["admin"] == "0"
    assert (await sign_in("ops", "gw-admins,ops"))["admin"] == "1"  # one string: one group
    changes = [e for e in await audit_actions(redis) if e["action"] == "user.role_changed"]
    assert [(e["admin"], e["actor"]) for e in changes] == [("1", "sso"), ("0", "sso"),
                                                           ("1", "sso")]
    await redis.hset("gw:as:user:alice", "admin", "0")  # set by an operator
    assert (await sign_in(["gw-admins"], ""))["admin"] == "0"  # no admin groups: unchanged
