"""The admin role and the JSON admin API, end to end: an admin signs in with the device
flow (client ``oauth-gateway-cli``, scope ``gateway:admin``), then drives
``/admin/api/v1/`` over real HTTP; every answer is checked against the API's own OpenAPI
document."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlencode

import aiohttp
import jsonschema
import pytest
from redis.asyncio import Redis

from gateway.authserver import DeviceFlowTiming
from gateway.authserver.models import GRANT_DEVICE
from gateway.cli import commands
from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.redis_server import RedisServer
from tests.test_flow_device import Browser, Page

ADMIN = ("alice", "alice-password-1")
USER = ("bob", "bob-password-12")
CLI = "oauth-gateway-cli"
API = "/admin/api/v1"


# -- the OpenAPI document as the test's oracle --------------------------------------------

@dataclass
class OpenAPIChecker:
    """Validates each answer's body against the schema the document gives its path,
    method and status (JSON Schema 2020-12, as OpenAPI 3.1 says)."""

    doc: dict[str, Any]
    checked: set[tuple[str, str, int]] = field(default_factory=set)

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
        for template, item in self.doc["paths"].items():
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
            if re.match(pattern, path) and method.lower() in item:
                return template, item[method.lower()]
        raise AssertionError(f"{method} {path} is not in the OpenAPI document")

    def check(self, method: str, path: str, status: int, body: Any) -> None:
        template, op = self.operation(method, path)
        answer = op["responses"].get(str(status))
        assert answer is not None, f"{method} {template}: status {status} undocumented"
        schema = answer["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator(
            {**schema, "components": self.doc["components"]}).validate(body)
        self.checked.add((method, template, status))


@dataclass
class Api:
    """An HTTP client of the admin API with one bearer token."""

    http: aiohttp.ClientSession
    issuer: str
    checker: OpenAPIChecker
    token: str | None

    async def call(self, method: str, path: str, body: Any = None, *,
                   params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        sent = dict(headers or {})
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        async with self.http.request(method, self.issuer + API + path, json=body,
                                     params=params, headers=sent) as resp:
            payload = await resp.json()
            assert resp.headers["Cache-Control"] == "no-store"
            if resp.status in (401, 403):
                assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
            self.checker.check(method, path, resp.status, payload)
            return resp.status, payload


# -- signing in -----------------------------------------------------------------------------

async def device_token(h: AuthHarness, person: tuple[str, str], *, client_id: str = CLI,
                       scope: str = "gateway:admin") -> dict[str, Any]:
    """A person approves a device-flow sign-in in a browser; the device's tokens."""
    async with aiohttp.ClientSession() as http:
        async with http.post(h.issuer + "/oauth/device_authorization",
                             data={"client_id": client_id, "scope": scope}) as resp:
            assert resp.status == 200, await resp.text()
            auth = await resp.json()
        browser = Browser(h.issuer)
        try:
            page = await sign_in(browser, person)
            consent = await browser.submit(page, user_code=auth["user_code"])
            assert consent.status == 200, consent.text
            done = await browser.submit(consent, "approve")
            assert done.status == 200
        finally:
            await browser.http.close()
        async with http.post(h.issuer + "/oauth/token", data={
                "grant_type": GRANT_DEVICE, "device_code": auth["device_code"],
                "client_id": client_id}) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())


async def sign_in(browser: Browser, person: tuple[str, str]) -> Page:
    page = await browser.get("/oauth/device")
    assert "/oauth/login" in page.url
    return await browser.submit(page, username=person[0], password=person[1])


@pytest.fixture
async def h(make_auth_gateway: AuthGatewayFactory) -> AuthHarness:
    harness = await make_auth_gateway(device=DeviceFlowTiming(expires_in=60, interval=1))
    await harness.auth.add_user(*ADMIN, actor="test", admin=True)
    await harness.auth.add_user(*USER, actor="test")
    return harness


@pytest.fixture
async def checker(h: AuthHarness) -> OpenAPIChecker:
    async with aiohttp.ClientSession() as http, \
            http.get(h.issuer + API + "/openapi.json") as resp:
        assert resp.status == 200
        return OpenAPIChecker(dict(await resp.json()))


async def api_as(h: AuthHarness, checker: OpenAPIChecker, http: aiohttp.ClientSession,
                 person: tuple[str, str] = ADMIN, **kw: Any) -> Api:
    tokens = await device_token(h, person, **kw)
    return Api(http, h.issuer, checker, tokens["access_token"])


async def audit(redis: Redis) -> list[dict[str, str]]:
    entries = cast(list[tuple[str, dict[str, str]]], await redis.xrange("gw:audit"))
    return [fields for _, fields in entries]


# -- the whole round --------------------------------------------------------------------

async def test_an_admin_drives_clients_grants_users_and_audit(
        h: AuthHarness, checker: OpenAPIChecker, redis: Redis) -> None:
    async with aiohttp.ClientSession() as http:
        api = await api_as(h, checker, http)

        # create a device client with a non-rotatable one-hour policy
        policy = {"access_token_ttl": 3600, "refresh_mode": "non_rotatable",
                  "refresh_token_ttl": 3600}
        status, made = await api.call("POST", "/clients", {
            "name": "Build CLI", "grant_type": "device_code", "redirect_uris": [],
            "scopes": ["anaplan:read"], "policy": policy})
        assert status == 201, made
        cid = made["client_id"]
        assert "client_secret" not in made  # a device client is public
        assert (made["grant_type"], made["scopes"], made["disabled"]) == (
            "device_code", ["anaplan:read"], False)
        assert {k: made["policy"][k] for k in policy} == policy

        # the same client and policy as the CLI's view of it
        stored = await h.auth.get(cid)
        assert made["policy"] == stored.public_view()["policy"]

        status, listed = await api.call("GET", "/clients")
        assert status == 200
        assert {c["client_id"] for c in listed["clients"]} >= {cid, CLI}
        status, one = await api.call("GET", f"/clients/{cid}")
        assert status == 200 and one["name"] == "Build CLI"

        status, patched = await api.call("PATCH", f"/clients/{cid}", {
            "name": "Build CLI 2", "policy": {"idle_timeout": 1800},
            "rate_limit": "600/60s"})
        assert status == 200, patched
        assert (patched["name"], patched["policy"]["idle_timeout"],
                patched["policy"]["refresh_mode"], patched["rate_limit"]) == (
            "Build CLI 2", 1800, "non_rotatable", "600/60s")
        assert (await h.auth.get(cid)).policy.idle_timeout == 1800

        # a person's token of that client works at the gateway...
        tokens = await device_token(h, USER, client_id=cid, scope="anaplan:read")
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert (await h.client.get("/2/0/workspaces", headers=bearer)).status == 200

        # ...until the client is disabled: refused within a second
        status, off = await api.call("POST", f"/clients/{cid}/disable",
                                     {"reason": "leaked"})
        assert status == 200 and off["disabled"] is True and off["updated_by"] == "api:alice"
        t0 = time.monotonic()
        while (await h.client.get("/2/0/workspaces", headers=bearer)).status != 401:
            assert time.monotonic() - t0 < 1.0, "the disabled client's token still works"
            await asyncio.sleep(0.05)
        status, on = await api.call("POST", f"/clients/{cid}/enable")
        assert status == 200 and on["disabled"] is False
        t0 = time.monotonic()
        while (await h.client.get("/2/0/workspaces", headers=bearer)).status != 200:
            assert time.monotonic() - t0 < 1.0
            await asyncio.sleep(0.05)

        # a public client has no secret to rotate
        status, err = await api.call("POST", f"/clients/{cid}/rotate-secret")
        assert status == 400 and err["error"] == "invalid_request"

        # grants: listed by client and by person (username or subject), then revoked
        status, grants = await api.call("GET", "/grants", params={"client_id": cid})
        assert status == 200
        [grant] = grants["grants"]
        assert (grant["username"], grant["scopes"], grant["revoked"]) == (
            "bob", ["anaplan:read"], False)
        status, by_user = await api.call("GET", "/grants", params={"subject": "bob"})
        assert [g["grant_id"] for g in by_user["grants"]] == [grant["grant_id"]]
        status, by_sub = await api.call("GET", "/grants", params={"subject": grant["subject"]})
        assert [g["grant_id"] for g in by_sub["grants"]] == [grant["grant_id"]]
        status, gone = await api.call("DELETE", f"/grants/{grant['grant_id']}")
        assert status == 200 and gone["revoked"] is True
        assert (await h.client.get("/2/0/workspaces", headers=bearer)).status == 401
        status, err = await api.call("DELETE", "/grants/nope")
        assert status == 404 and err["error"] == "not_found"

        # users: listed; a person disabled then enabled
        status, users = await api.call("GET", "/users")
        assert status == 200
        by_name = {u["username"]: u for u in users["users"]}
        assert by_name["alice"]["admin"] is True and by_name["bob"]["admin"] is False
        assert by_name["bob"]["kind"] == "local"
        tokens = await device_token(h, USER, client_id=cid, scope="anaplan:read")
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        status, person = await api.call("POST", "/users/bob/disable", {"reason": "left"})
        assert status == 200 and person["disabled"] is True and person["username"] == "bob"
        t0 = time.monotonic()
        while (await h.client.get("/2/0/workspaces", headers=bearer)).status != 401:
            assert time.monotonic() - t0 < 1.0
            await asyncio.sleep(0.05)
        status, person = await api.call("POST", f"/users/{person['subject']}/enable")
        assert status == 200 and person["disabled"] is False

        # delete: gone, its grants ended
        status, deleted = await api.call("DELETE", f"/clients/{cid}")
        assert status == 200 and deleted["grants_ended"] == 2
        status, err = await api.call("GET", f"/clients/{cid}")
        assert status == 404 and err["error"] == "not_found"

        # the audit stream, newest first, names the admin
        status, log = await api.call("GET", "/audit", params={"actor": "api:alice"})
        assert status == 200
        actions = [e["action"] for e in log["entries"]]
        assert actions[0] == "client.deleted"
        for action in ("client.created", "client.updated", "client.disabled",
                       "client.enabled", "grant.revoked", "user.disabled", "user.enabled"):
            assert action in actions, actions
        assert all(e["actor"] == "api:alice" for e in log["entries"])
        status, only = await api.call("GET", "/audit", params={"client_id": cid,
                                                               "action": "client.disabled"})
        assert [e["reason"] for e in only["entries"]] == ["leaked"]
        status, newest = await api.call("GET", "/audit", params={"limit": "1"})
        assert len(newest["entries"]) == 1 and "next_page_token" in newest
        status, older = await api.call("GET", "/audit", params={
            "limit": "1", "page_token": newest["next_page_token"]})
        assert older["entries"][0]["id"] < newest["entries"][0]["id"]
    assert any(e.get("actor") == "api:alice" and e["action"] == "client.created"
               for e in await audit(redis))


async def test_a_confidential_client_and_its_secret_rotation(
        h: AuthHarness, checker: OpenAPIChecker) -> None:
    async with aiohttp.ClientSession() as http:
        api = await api_as(h, checker, http)
        status, made = await api.call("POST", "/clients", {
            "name": "Nightly job", "grant_type": "client_credentials", "scopes": []})
        assert status == 201 and made["confidential"] is True
        cid, old = made["client_id"], made["client_secret"]

        async def token_with(secret: str) -> int:
            basic = base64.b64encode(f"{cid}:{secret}".encode()).decode()
            async with http.post(h.issuer + "/oauth/token", data={
                    "grant_type": "client_credentials"},
                    headers={"Authorization": f"Basic {basic}"}) as resp:
                return resp.status

        assert await token_with(old) == 200
        status, rotated = await api.call("POST", f"/clients/{cid}/rotate-secret",
                                         {"grace_seconds": 0})
        assert status == 200 and rotated["client_secret"] != old
        assert await token_with(old) == 401
        assert await token_with(rotated["client_secret"]) == 200


async def test_bad_input_is_400_naming_the_field(h: AuthHarness,
                                                 checker: OpenAPIChecker) -> None:
    async with aiohttp.ClientSession() as http:
        api = await api_as(h, checker, http)
        for body, named in (
                ({"grant_type": "device_code"}, "name"),
                ({"name": "x", "grant_type": "implicit"}, "grant"),
                ({"name": "x", "grant_type": "device_code", "scopes": "a b"}, "scopes"),
                ({"name": "x", "grant_type": "device_code", "policy": {"ttl": 5}},
                 "policy.ttl"),
                ({"name": "x", "grant_type": "device_code",
                  "policy": {"access_token_ttl": "1h"}}, "access_token_ttl"),
                ({"name": "x", "grant_type": "device_code",
                  "policy": {"access_token_ttl": 5}}, "access token lifetime"),
                ({"name": "x", "grant_type": "authorization_code"}, "redirect URI"),
                ({"name": "x", "grant_type": "device_code", "colour": "red"}, "colour")):
            status, err = await api.call("POST", "/clients", body)
            assert status == 400 and err["error"] == "invalid_request", (body, err)
            assert named in err["error_description"], (named, err)
        status, err = await api.call("PATCH", f"/clients/{CLI}", {"rate_limit": "fast"})
        assert status == 400 and "rate_limit" in err["error_description"]
        status, err = await api.call("GET", "/clients", params={"limit": "0"})
        assert status == 400 and "limit" in err["error_description"]
        status, err = await api.call("GET", "/clients", params={"page_token": "%%%"})
        assert status == 400 and "page_token" in err["error_description"]
        status, err = await api.call("POST", "/users", {"username": "bob",
                                                         "password": "another-pass-1"})
        assert status == 409 and err["error"] == "conflict"
        status, err = await api.call("PATCH", "/users/nobody", {"admin": True})
        assert status == 404


async def test_lists_come_in_pages(h: AuthHarness, checker: OpenAPIChecker) -> None:
    for n in range(3):
        await h.auth.create_client(name=f"c{n}", grant="device_code", redirect_uris=[],
                                   scopes=[], actor="test")
    async with aiohttp.ClientSession() as http:
        api = await api_as(h, checker, http)
        seen: list[str] = []
        params = {"limit": "2"}
        while True:
            status, page = await api.call("GET", "/clients", params=params)
            assert status == 200 and len(page["clients"]) <= 2
            seen += [c["client_id"] for c in page["clients"]]
            if "next_page_token" not in page:
                break
            params = {"limit": "2", "page_token": page["next_page_token"]}
        assert len(seen) == 4 and seen == sorted(seen)  # three, and oauth-gateway-cli
        status, made = await api.call("POST", "/users", {
            "username": "carol", "password": "carol-password", "admin": True})
        assert status == 201 and made["admin"] is True and made["kind"] == "local"
        status, page = await api.call("GET", "/users", params={"limit": "2"})
        assert [u["username"] for u in page["users"]] == ["alice", "bob"]
        status, page = await api.call("GET", "/users", params={
            "limit": "2", "page_token": page["next_page_token"]})
        assert [u["username"] for u in page["users"]] == ["carol"]
        assert "next_page_token" not in page


# -- who may use it -------------------------------------------------------------------

async def test_no_token_or_a_bad_one_is_401(h: AuthHarness, checker: OpenAPIChecker) -> None:
    async with aiohttp.ClientSession() as http:
        anonymous = Api(http, h.issuer, checker, None)
        status, err = await anonymous.call("GET", "/clients")
        assert status == 401 and err["error"] == "invalid_request"
        status, err = await Api(http, h.issuer, checker, "gwat_nonsense").call(
            "GET", "/clients")
        assert status == 401 and err["error"] == "invalid_token"


async def test_a_session_cookie_alone_is_refused(h: AuthHarness,
                                                 checker: OpenAPIChecker) -> None:
    """A browser signed in as an admin has a session; the API does not take it."""
    browser = Browser(h.issuer)
    try:
        page = await sign_in(browser, ADMIN)
        assert page.status == 200
        assert any(c.key == "gw_session" or "session" in c.key for c in browser.http.cookie_jar)
        async with browser.http.get(h.issuer + API + "/clients") as resp:
            assert resp.status == 401
            checker.check("GET", "/clients", 401, await resp.json())
    finally:
        await browser.http.close()


async def test_without_the_scope_or_the_role_it_is_403(h: AuthHarness,
                                                       checker: OpenAPIChecker) -> None:
    async with aiohttp.ClientSession() as http:
        # the admin's own token, without gateway:admin; a non-admin's token
        for person in (ADMIN, USER):
            api = await api_as(h, checker, http, person=person, scope="anaplan:read")
            status, err = await api.call("GET", "/clients")
            assert status == 403 and err["error"] == "insufficient_scope"
            assert "gateway:admin" in err["error_description"]

        # an admin token works until the role is taken away: at once after that
        await h.auth.add_user(*USER, actor="test", admin=True)
        api = await api_as(h, checker, http, person=USER)
        status, _ = await api.call("GET", "/users")
        assert status == 200
        await h.auth.set_admin("bob", False, actor="test")
        status, err = await api.call("GET", "/users")
        assert status == 403 and err["error"] == "insufficient_scope"
        assert "admin role" in err["error_description"]


async def test_a_non_admin_cannot_approve_gateway_admin(h: AuthHarness,
                                                        redis: Redis) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(h.issuer + "/oauth/device_authorization",
                             data={"client_id": CLI, "scope": "gateway:admin"}) as resp:
            auth = await resp.json()
        browser = Browser(h.issuer)
        try:
            page = await sign_in(browser, USER)
            refused = await browser.submit(page, user_code=auth["user_code"])
        finally:
            await browser.http.close()
        assert refused.status == 403
        assert "not an administrator" in refused.text and "approve" not in refused.text
        async with http.post(h.issuer + "/oauth/token", data={
                "grant_type": GRANT_DEVICE, "device_code": auth["device_code"],
                "client_id": CLI}) as resp:
            assert resp.status == 400 and (await resp.json())["error"] == "access_denied"
    assert {"action": "device.denied", "reason": "not_admin", "user": "bob"}.items() <= \
        (await audit(redis))[-1].items()


async def test_gateway_admin_is_never_granted_unasked(h: AuthHarness) -> None:
    """The CLI client asked for no scope gets the policies' scopes, not gateway:admin:
    a person without the role can still sign in with it."""
    tokens = await device_token(h, USER, scope="")
    assert set(tokens["scope"].split()) == {"anaplan:read", "anaplan:write"}


async def test_the_cli_client_and_the_scope_exist_at_start(h: AuthHarness,
                                                           make_auth_gateway: AuthGatewayFactory
                                                           ) -> None:
    cli = await h.auth.get(CLI)
    assert (cli.flow, cli.confidential) == ("device_code", False)
    assert "gateway:admin" in cli.scopes
    await h.auth.update_client(CLI, actor="ops", name="our CLI")
    await make_auth_gateway()  # a second replica leaves it as the operator left it
    assert (await h.auth.get(CLI)).name == "our CLI"
    async with aiohttp.ClientSession() as http, \
            http.get(h.issuer + "/.well-known/oauth-authorization-server") as resp:
        assert "gateway:admin" in (await resp.json())["scopes_supported"]


async def test_the_api_paths_win_over_policy_routes(make_auth_gateway: AuthGatewayFactory,
                                                    checker: OpenAPIChecker) -> None:
    greedy = """
upstreams:
  api: {upstream}
routes:
  - name: all
    upstream: api
    path: /**
    scopes: []
"""
    g = await make_auth_gateway(greedy)
    resp = await g.client.get(API + "/clients")
    assert resp.status == 401 and (await resp.json())["error"] == "invalid_request"
    resp = await g.client.get(API + "/nothing-here")
    assert resp.status == 404 and (await resp.json())["error"] == "no_route"


async def test_the_document_describes_every_route(h: AuthHarness,
                                                  checker: OpenAPIChecker) -> None:
    doc = checker.doc
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": h.issuer + API}]
    jsonschema.Draft202012Validator.check_schema(
        {"$defs": doc["components"]["schemas"]})
    routes = {(r.method, r.resource.canonical[len(API):])
              for r in h.client.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith(API + "/")
              and r.method != "HEAD"}
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item
                  if m != "parameters"}
    assert routes - {("GET", "/openapi.json")} == documented


# -- the command line -------------------------------------------------------------------

async def test_the_cli_gives_and_takes_the_role_and_shows_the_same_policy(
        h: AuthHarness, checker: OpenAPIChecker, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_server.url)

    async def cli(*argv: str, stdin: str = "") -> tuple[int, Any]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = await asyncio.to_thread(commands.main, [*argv, "--json"])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip() else None

    assert await cli("users", "add", "dave", "--admin", stdin="dave-password\n") == (
        0, {"username": "dave", "admin": True})
    assert (await h.auth.user_view("dave"))["admin"] is True
    code, view = await cli("users", "update", "dave", "--no-admin")
    assert code == 0 and view["admin"] is False
    code, _ = await cli("users", "add", "dave", "--admin", stdin="dave-password\n")
    assert code == 0 and (await h.auth.user_view("dave"))["admin"] is True
    code, _ = await cli("users", "add", "dave", stdin="dave-password-2\n")  # role kept
    assert code == 0 and (await h.auth.user_view("dave"))["admin"] is True
    code, _ = await cli("users", "update", "nobody", "--admin")
    assert code == 1

    async with aiohttp.ClientSession() as http:
        api = await api_as(h, checker, http, person=("dave", "dave-password-2"))
        status, made = await api.call("POST", "/clients", {
            "name": "Web", "grant_type": "authorization_code",
            "redirect_uris": ["https://app.example/cb"], "scopes": ["anaplan:read"],
            "policy": {"refresh_mode": "non_rotatable", "refresh_token_ttl": 7200}})
        assert status == 201 and made["client_secret"]
    code, shown = await cli("clients", "show", made["client_id"])
    assert code == 0 and shown["policy"] == made["policy"]
    code, listed = await cli("clients", "list")
    assert next(c for c in listed if c["client_id"] == made["client_id"])["policy"] == \
        made["policy"]


async def test_the_consent_page_refuses_gateway_admin_to_a_non_admin(h: AuthHarness) -> None:
    client, _ = await h.auth.create_client(
        name="Console", grant="authorization_code", redirect_uris=["https://app.example/cb"],
        scopes=["anaplan:read gateway:admin"], actor="test")
    query = urlencode({"response_type": "code", "client_id": client.client_id,
                       "redirect_uri": "https://app.example/cb", "state": "s1",
                       "scope": "gateway:admin", "code_challenge": "E9Melhoa2OwvFrEMTJguCHao"
                       "eK1t8URWbuGJSstw-cM", "code_challenge_method": "S256"})
    for person, status in ((USER, 403), (ADMIN, 200)):
        browser = Browser(h.issuer)
        try:
            page = await browser.get("/oauth/authorize?" + query)
            assert "/oauth/login" in page.url
            page = await browser.submit(page, username=person[0], password=person[1])
        finally:
            await browser.http.close()
        assert page.status == status, page.text
        assert ("not an administrator" in page.text) == (status == 403)


def test_the_document_is_valid_openapi() -> None:
    """The document itself against the OpenAPI 3.1 specification (every answer of the
    tests above is checked against its schemas with jsonschema)."""
    import openapi_spec_validator
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    from gateway.authserver.openapi import document

    openapi_spec_validator.validate(document("https://gw.example.com"))
    broken = document("https://gw.example.com")
    broken["paths"]["/clients"]["get"]["responses"] = "none"
    with pytest.raises(OpenAPIValidationError):
        openapi_spec_validator.validate(broken)


async def test_tenant_settings_and_password_reset_through_the_api(
        h: AuthHarness, checker: OpenAPIChecker, redis: Redis) -> None:
    async with aiohttp.ClientSession() as http:
        api = await api_as(h, checker, http)
        status, view = await api.call("GET", "/settings")
        assert status == 200 and view["self_service"] is True
        assert view["sources"]["self_service"] == "default"
        status, view = await api.call("PATCH", "/settings", {
            "self_service": False, "flows": ["device_code"],
            "default_policy": {"access_token_ttl": 600}})
        assert status == 200, view
        assert (view["self_service"], view["flows"]) == (False, ["device_code"])
        assert view["default_policy"]["access_token_ttl"] == 600
        assert view["sources"]["access_token_ttl"] == "console"
        assert await redis.hget("gw:as:tenant", "self_service") == "0"
        status, error = await api.call("PATCH", "/settings", {"flows": ["implicit"]})
        assert status == 400 and error["error"] == "invalid_request"
        status, view = await api.call("PATCH", "/settings", {"self_service": None})
        assert status == 200 and view["sources"]["self_service"] == "default"
        [entry, *_] = [e for e in await audit(redis) if e["action"] == "tenant.updated"]
        assert entry["actor"] == "api:" + ADMIN[0]
        status, view = await api.call("PATCH", "/settings", {
            "display_name": "Acme Planning", "logo_url": "https://cdn.acme.example/l.svg"})
        assert status == 200 and view["display_name"] == "Acme Planning"
        assert view["logo_url"] == "https://cdn.acme.example/l.svg"
        assert view["sources"]["logo_url"] == "console"
        status, error = await api.call("PATCH", "/settings", {"logo_url": "http://x.example"})
        assert status == 400 and "logo URL" in error["error_description"]

        status, user = await api.call("PATCH", f"/users/{USER[0]}",
                                      {"password": "a-new-password"})
        assert status == 200 and user["username"] == USER[0]
        assert "user.password_set" in [e["action"] for e in await audit(redis)]


async def test_api_changes_are_audited_with_the_callers_address(
        h: AuthHarness, checker: OpenAPIChecker, redis: Redis) -> None:
    async with aiohttp.ClientSession() as http:
        api = await api_as(h, checker, http)
        status, created = await api.call("POST", "/clients", {
            "name": "Reporter", "grant_type": "client_credentials",
            "scopes": ["anaplan:read"]})
        assert status == 201
        status, _ = await api.call("POST", f"/clients/{created['client_id']}/disable",
                                   {"reason": "paused"})
        assert status == 200
    entries = {e["action"]: e for e in await audit(redis) if e.get("actor") == "api:alice"}
    assert entries["client.created"]["remote"] == "127.0.0.1"
    assert entries["client.disabled"]["remote"] == "127.0.0.1"
    # the CLI's entries name no address
    await h.auth.rotate_secret(created["client_id"], actor="cli")
    [cli] = [e for e in await audit(redis) if e.get("actor") == "cli"]
    assert "remote" not in cli
