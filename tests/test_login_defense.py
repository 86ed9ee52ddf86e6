"""The local sign-in against guessing, enumeration and lockout by strangers.

- A wrong password, an unknown user and a user without a password take the same scrypt
  work: the answer's timing names no one.
- Failures are throttled per (user, source address), with a wait that doubles: a
  stranger guessing from elsewhere does not lock the person out of their own address,
  and a browser that signed in as the user before is never held back by others.
- A refusal while throttled is a 429 page that says to wait, the same for any name.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.authserver import throttle
from tests.conftest import AuthGatewayFactory, AuthHarness

USER, PASSWORD = "alice", "correct horse battery"


class _Fields(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "input" and a.get("type") == "hidden":
            self.fields[a["name"]] = a.get("value", "")


class Browser:
    """A browser with cookies, connecting from one loopback source address."""

    def __init__(self, h: AuthHarness, source: str, forwarded_for: str = "") -> None:
        self.h = h
        self.session = aiohttp.ClientSession(
            headers={"X-Forwarded-For": forwarded_for} if forwarded_for else None,
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=True))

    async def sign_in(self, username: str, password: str) -> tuple[int, str, Any]:
        page = await self.session.get(self.h.issuer + "/oauth/login")
        fields = _Fields(await page.text()).fields
        resp = await self.session.post(self.h.issuer + "/oauth/login", data={
            **fields, "username": username, "password": password}, allow_redirects=False)
        return resp.status, await resp.text(), resp.headers


@pytest.fixture
async def browsers() -> AsyncIterator[Callable[[AuthHarness, str], Browser]]:
    made: list[Browser] = []

    def make(h: AuthHarness, source: str) -> Browser:
        made.append(Browser(h, source))
        return made[-1]

    yield make
    for b in made:
        await b.session.close()


def _alert(page: str) -> str:
    found = re.search(r'role="alert"[^>]*>(.*?)<', page, re.S)
    return found.group(1).strip() if found else ""


async def test_unknown_users_cost_as_much_as_wrong_passwords(
        make_auth_gateway: AuthGatewayFactory, redis: Redis,
        browsers: Callable[[AuthHarness, str], Browser]) -> None:
    """Median times of failed sign-ins: an unknown user, or one with no password (signed
    up through SSO), takes at least half as long as a real user's wrong password (scrypt
    work both); without the decoy work it took a twentieth."""
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="t")
    await h.auth.store.save_user("sso-only", {"sub": "u_sso", "sso": "https://idp"})
    b = browsers(h, "127.0.0.1")
    await b.sign_in("warm-up", "x")  # the first page render and the decoy hash: not timed
    times: dict[str, list[float]] = {"known": [], "unknown": [], "no_password": []}
    for i in range(throttle.FREE_FAILURES - 1):
        for kind, name in (("known", USER), ("unknown", f"nobody{i}"),
                           ("no_password", "sso-only")):
            start = time.perf_counter()
            status, page, _ = await b.sign_in(name, "wrong password")
            times[kind].append(time.perf_counter() - start)
            assert status == 401 and _alert(page) == "Wrong username or password."
    known = statistics.median(times["known"])
    assert statistics.median(times["unknown"]) >= 0.5 * known, times
    assert statistics.median(times["no_password"]) >= 0.5 * known, times


async def _backoff_key(redis: Redis) -> str:
    [key] = [k async for k in redis.scan_iter(match="gw:as:login_backoff:*")]
    return str(key)


async def test_a_strangers_failures_do_not_lock_the_user_out(
        make_auth_gateway: AuthGatewayFactory, redis: Redis,
        browsers: Callable[[AuthHarness, str], Browser]) -> None:
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="t")
    stranger, alice = browsers(h, "127.0.0.2"), browsers(h, "127.0.0.1")
    statuses = [(await stranger.sign_in(USER, f"guess {i}"))[0] for i in range(11)]
    assert statuses == [401] * throttle.FREE_FAILURES + [429] * (11 - throttle.FREE_FAILURES)
    # the stranger now waits, the right password included, with a clear message
    status, page, headers = await stranger.sign_in(USER, PASSWORD)
    assert status == 429
    assert _alert(page) == "Too many failed sign-ins from here. Try again in 1 minute."
    assert 0 < int(headers["Retry-After"]) <= throttle.BASE_DELAY
    # ... the same for a name that does not exist: the refusal names no one
    for i in range(throttle.FREE_FAILURES + 1):
        status, other, _ = await stranger.sign_in("nobody", f"guess {i}")
    assert status == 429 and _alert(other) == _alert(page)
    # alice, from her own address, signs in at once
    status, _, headers = await alice.sign_in(USER, PASSWORD)
    assert status == 303, status
    # the start of the wait is audited, the refusals counted (no user name in labels)
    stream: Any = await redis.xrange("gw:audit")
    entries = [f for _, f in stream
               if f.get("action") == "login.throttled"]
    assert {(e["user"], e["remote"], e["reason"]) for e in entries} == {
        (USER, "127.0.0.2", "user_source"), ("nobody", "127.0.0.2", "user_source")}
    metrics = [line for line in (await h.metrics()).splitlines()
               if line.startswith("gateway_as_login_throttled_total")]
    assert metrics == ['gateway_as_login_throttled_total{reason="user_source"} 8.0'], metrics


async def test_the_wait_doubles_with_each_failure_past_the_free_ones(
        make_auth_gateway: AuthGatewayFactory, redis: Redis,
        browsers: Callable[[AuthHarness, str], Browser]) -> None:
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="t")
    stranger = browsers(h, "127.0.0.2")
    for i in range(throttle.FREE_FAILURES):
        await stranger.sign_in(USER, f"guess {i}")
    key = await _backoff_key(redis)
    waits = []
    for _ in range(3):
        status, _, headers = await stranger.sign_in(USER, "again")
        assert status == 429
        waits.append(int(headers["Retry-After"]))
        # the wait passes (moved back in time): one more guess, then a longer wait
        last = float(str(await redis.hget(key, "last")))
        await redis.hset(key, "last", str(last - waits[-1] - 1))
        assert (await stranger.sign_in(USER, "guess"))[0] == 401
    status, _, headers = await stranger.sign_in(USER, "again")
    waits.append(int(headers["Retry-After"]))
    base = throttle.BASE_DELAY
    assert [w > b // 2 for w, b in zip(waits, (base, 2 * base, 4 * base, 8 * base),
                                       strict=True)] == [True] * 4, waits
    assert waits == sorted(waits) and waits[-1] <= 8 * base
    # a success forgets the failures of the pair
    await redis.hset(key, "last", "0")
    assert (await stranger.sign_in(USER, PASSWORD))[0] == 303
    assert not await redis.exists(key)


async def test_a_known_browser_is_not_held_back_by_guessing_from_everywhere(
        make_auth_gateway: AuthGatewayFactory, redis: Redis,
        browsers: Callable[[AuthHarness, str], Browser]) -> None:
    """Guesses from many addresses hold back new browsers (the user-wide limit), never
    a browser the user signed in from before, even one sharing the guessers' address."""
    h = await make_auth_gateway()
    await h.auth.add_user(USER, PASSWORD, actor="t")
    known = browsers(h, "127.0.0.5")
    assert (await known.sign_in(USER, PASSWORD))[0] == 303
    await known.session.post(h.issuer + "/oauth/logout", data={
        "csrf_token": next(c.value for c in known.session.cookie_jar if c.key == "gw_csrf")})
    per_source = throttle.FREE_FAILURES
    # guesses from the known browser's own address (new browsers): that address waits
    for i in range(per_source + 1):
        status, _, _ = await browsers(h, "127.0.0.5").sign_in(USER, f"guess {i}")
    assert status == 429
    # and from many more addresses, up to the user-wide limit
    for n in range(throttle.USER_LIMIT // per_source - 1):
        guesser = browsers(h, f"127.0.0.{10 + n}")
        for i in range(per_source):
            assert (await guesser.sign_in(USER, f"guess {i}"))[0] == 401
    status, page, _ = await browsers(h, "127.0.0.99").sign_in(USER, PASSWORD)
    assert status == 429 and "Too many failed sign-ins" in page
    assert (await known.sign_in(USER, PASSWORD))[0] == 303
    stream: Any = await redis.xrange("gw:audit")
    entries = [f for _, f in stream
               if f.get("action") == "login.throttled" and f.get("reason") == "user"]
    assert len(entries) == 1 and entries[0]["user"] == USER
    assert 'gateway_as_login_throttled_total{reason="user"} 1.0' in await h.metrics()


async def test_an_unknown_client_costs_as_much_as_a_wrong_secret(
        make_auth_gateway: AuthGatewayFactory) -> None:
    """Client authentication: an unknown client id with a secret takes the scrypt work of
    a known client's wrong secret, so the token endpoint's timing lists no clients."""
    h = await make_auth_gateway()
    client, _ = await h.auth.create_client(
        name="m", grant="client_credentials", redirect_uris=[], scopes=[], actor="t")
    times: dict[str, list[float]] = {"known": [], "unknown": []}
    for i in range(6):
        for kind, cid in (("known", client.client_id), ("unknown", f"no-such-client-{i}")):
            start = time.perf_counter()
            resp = await h.client.post("/oauth/token", data={
                "grant_type": "client_credentials"},
                headers={"Authorization": aiohttp.encode_basic_auth(cid, "wrong")})
            times[kind].append(time.perf_counter() - start)
            assert resp.status == 401
    assert statistics.median(times["unknown"][1:]) >= \
        0.5 * statistics.median(times["known"][1:]), times


async def test_behind_a_load_balancer_the_source_is_the_forwarded_address(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    """With ``GATEWAY_TRUSTED_PROXIES=1`` every request comes from the balancer; the
    throttle counts the address it forwarded, so a stranger still slows only themselves."""
    h = await make_auth_gateway(trusted_proxies=1)
    await h.auth.add_user(USER, PASSWORD, actor="t")
    stranger = Browser(h, "127.0.0.1", "10.9.8.7, 203.0.113.9")
    alice = Browser(h, "127.0.0.1", "198.51.100.7")
    try:
        statuses = [(await stranger.sign_in(USER, f"guess {i}"))[0]
                    for i in range(throttle.FREE_FAILURES + 1)]
        assert statuses[-2:] == [401, 429]
        assert (await alice.sign_in(USER, PASSWORD))[0] == 303
    finally:
        await stranger.session.close()
        await alice.session.close()
    stream: Any = await redis.xrange("gw:audit")
    remotes = {f["remote"] for _, f in stream if f.get("action") in (
        "login.throttled", "login")}
    assert remotes == {"203.0.113.9", "198.51.100.7"}
