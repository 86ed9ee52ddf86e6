"""Request-path hygiene: what could make the gateway and an upstream disagree is a 400."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config.policy import compile_path, load_policy
from gateway.pipeline.paths import safe_path
from gateway.protocol.errors import InvalidRequest
from tests.conftest import AuthGatewayFactory, AuthServer, GatewayFactory, Upstream
from tests.test_gateway_auth import raw_request

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "anaplan.yaml"


def refused(raw_path: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        safe_path(raw_path)
    assert info.value.status == 400
    assert info.value.error == "invalid_request"
    return info.value


@pytest.mark.parametrize(
    "raw_path",
    [
        # dot-segments, plain and percent-encoded (RFC 3986 section 5.2.4)
        "/a/../b",
        "/a/./b",
        "/..",
        "/a/..",
        "/a/.",
        "/%2e%2e/x",
        "/%2E%2E/x",
        "/a/%2E/b",
        "/a/.%2e/b",
        "/a/%2e./b",
        "/2/0/workspaces/W/models/M/%2e%2e/%2e%2e/%2e%2e/%2e%2e/scim/1/0/v2/Users",
        # encoded slash and backslash
        "/a%2fb",
        "/a%2Fb",
        "/a/%2F..%2Fb",
        "/a%5cb",
        "/a%5Cb",
        # raw backslash
        "/a\\b",
        "/a\\..\\b",
        # NUL and other control characters, raw or encoded
        "/a%00b",
        "/a\x00b",
        "/a%0ab",
        "/a%0D%0AHost:%20evil",
        "/a\tb",
        "/a%1fb",
        "/a%7fb",
        # double encoding
        "/%252e%252e/x",
        "/a%252fb",
        "/a%255cb",
        "/a%2500b",
        # not an absolute path
        "a/b",
        "",
        "*",
        "http://evil.test/a",
    ],
)
def test_ambiguous_paths_are_refused_with_400(raw_path: str) -> None:
    refused(raw_path)


def test_the_reason_is_told() -> None:
    assert "dot-segment" in refused("/a/../b").description
    assert "encoded slash" in refused("/a%2fb").description
    assert "control character" in refused("/a%0ab").description


@pytest.mark.parametrize(
    ("raw_path", "decoded"),
    [
        ("/", "/"),
        ("/2/0/workspaces", "/2/0/workspaces"),
        ("/a/b%20c", "/a/b c"),
        ("/a/%41%42", "/a/AB"),
        ("/caf%C3%A9", "/café"),
        ("/a/b/", "/a/b/"),              # a trailing slash is no empty segment
        ("/a/.../b", "/a/.../b"),        # three dots is an ordinary segment
        ("/a/..b/.c", "/a/..b/.c"),
        ("/a/b.", "/a/b."),
        ("/a%25zz", "/a%zz"),            # a literal percent sign, not double encoding
        # the query string (and a fragment) play no part in the path
        ("/a/b?x=1", "/a/b"),
        ("/a?next=/../../etc/passwd", "/a"),
        ("/a?x=%2f%00%252e;y=1", "/a"),
    ],
)
def test_ordinary_paths_are_decoded(raw_path: str, decoded: str) -> None:
    assert safe_path(raw_path) == decoded


def test_traversal_cannot_reach_another_family_of_the_shipped_policy() -> None:
    policy = load_policy(SHIPPED)
    # were it decoded and normalised, this would be a SCIM write on a models-write route
    raw = "/2/0/models/M/%2e%2e/%2e%2e/%2e%2e/scim/1/0/v2/Users"
    refused(raw)
    assert policy.match("POST", safe_path("/scim/1/0/v2/Users")).route is not None


@pytest.mark.parametrize("raw_path", ["/a%ff", "/a%C3", "/%80"])
def test_invalid_utf8_is_refused_with_400(raw_path: str) -> None:
    refused(raw_path)


@pytest.mark.parametrize("raw_path", ["/a/..;/b", "/a/.;x=1/b", "/a/%2e%2e;/b", "/a/..%3b/b"])
def test_dot_segments_with_path_parameters_are_refused(raw_path: str) -> None:
    refused(raw_path)


@pytest.mark.parametrize("raw_path", [
    # an empty segment: merged by some servers, kept by others
    "/a//b", "//a", "/2/0/models//M/imports", "/a/b//",
    # `;params`: dropped from a segment by servlet containers before routing
    "/2/0/models;jsessionid=1/M/imports", "/a;/b", "/a/b;", "/a/b%3bx",
    # a `#` hides what follows from the check, yet is sent on verbatim
    "/a#/../b", "/2/0/models/M/x#/../../imports", "/a/b?q=1#/../c",
])
def test_empty_segments_path_parameters_and_fragments_are_refused(raw_path: str) -> None:
    refused(raw_path)


def test_routes_match_literal_segments_in_any_letter_case() -> None:
    policy = load_policy(SHIPPED)
    lower = policy.match("POST", "/2/0/workspaces/W/models/M/imports/I/tasks").route
    assert lower is not None
    for path in ("/2/0/workspaces/W/models/M/IMPORTS/I/tasks",
                 "/2/0/WORKSPACES/W/Models/M/Imports/I/Tasks"):
        assert policy.match("POST", path).route == lower
    # only A-Z fold: the Kelvin sign is no `k`, a long s no `s`
    kelvin = compile_path("/tasks")
    assert kelvin.fullmatch("/TASKS") and not kelvin.fullmatch("/ta\u017fks")
    assert not compile_path("/k").fullmatch("/\u212a")


# --- at the proxy: what a token with only anaplan:read reaches --------------------------

CONFUSION_POLICY = """
upstreams:
  api: {upstream}
routes:
  - name: imports-write
    upstream: api
    methods: [GET, POST]
    path: /2/0/models/*/imports/**
    scopes: [anaplan:write]
  - name: read
    upstream: api
    methods: [GET, HEAD]
    path: /2/0/**
    scopes: [anaplan:read]
"""
READER = "tok-reader-0123456789abcdef"


async def test_a_read_token_reaches_no_write_route_by_spelling_it_otherwise(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream) -> None:
    auth_server.issue(READER, scope="anaplan:read")
    gw = await make_gateway(CONFUSION_POLICY)
    auth = f"Authorization: Bearer {READER}\r\n"
    for target, status, error in [
            ("/2/0/models/M/IMPORTS/1/tasks", 403, "insufficient_scope"),
            ("/2/0/Models/M/Imports", 403, "insufficient_scope"),
            ("/2/0/models//M/imports", 400, "invalid_request"),
            ("/2/0//models/M/imports", 400, "invalid_request"),
            ("/2/0/models;jsessionid=1/M/imports", 400, "invalid_request"),
            ("/2/0/models/M/x#/../../imports", 400, "invalid_request"),
            ("/2/0/models/M?x=1#/../../imports", 400, "invalid_request")]:
        got, body = await raw_request(gw, f"GET {target} HTTP/1.1\r\n{auth}")
        assert (got, json.loads(body)["error"]) == (status, error), target
    assert upstream.received == []
    # the read route itself still answers, and the path goes on as it was matched
    got, _ = await raw_request(gw, f"GET /2/0/Models/M/lists HTTP/1.1\r\n{auth}")
    assert got == 200
    assert [r.raw_path for r in upstream.received] == ["/2/0/Models/M/lists"]


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method",
                                    "x-method-override"])
async def test_method_override_headers_are_refused(
        make_gateway: GatewayFactory, auth_server: AuthServer, upstream: Upstream,
        header: str) -> None:
    auth_server.issue(READER, scope="anaplan:read")
    gw = await make_gateway(CONFUSION_POLICY)
    resp = await gw.client.get("/2/0/models/M/lists", headers={
        "Authorization": f"Bearer {READER}", header: "DELETE"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid_request"
    assert header.lower() in body["error_description"].lower()
    assert upstream.received == []


CATCH_ALL_POLICY = """
upstreams:
  api: {upstream}
routes:
  - name: everything
    upstream: api
    path: /**
    scopes: []
"""


async def test_the_builtin_servers_paths_win_over_policy_routes(
        make_auth_gateway: AuthGatewayFactory, upstream: Upstream) -> None:
    g = await make_auth_gateway(CATCH_ALL_POLICY)
    for method, path, status, error in [
            ("GET", "/oauth/token", 405, "method_not_allowed"),   # the server's, POST only
            ("POST", "/OAUTH/token", 404, "no_route"),
            ("GET", "/oauth/nothing-here", 404, "no_route"),
            ("GET", "/oauth", 404, "no_route"),
            ("GET", "/.well-known/openid-configuration", 404, "no_route"),
            ("GET", "/.WELL-KNOWN/oauth-authorization-server", 404, "no_route"),
            ("DELETE", "/token/validate", 405, "method_not_allowed"),
            ("GET", "/token/other", 404, "no_route"),
            ("GET", "/console/nothing-here", 404, "no_route"),
            ("GET", "/admin/api/clients", 404, "no_route"),
            ("GET", "/account/apps", 404, "no_route")]:
        resp = await g.client.request(method, path)
        assert resp.status == status, (method, path)
        assert (await resp.json())["error"] == error, (method, path)
    assert upstream.received == []
    # the console is the server's page (sign in first), never the policy's catch-all
    console = await g.client.get("/console/", allow_redirects=False)
    assert console.status == 303 and console.headers["Location"].startswith("/oauth/login")
    # the server's own endpoints still answer, and other paths reach the policy
    meta = await g.client.get("/.well-known/oauth-authorization-server")
    assert meta.status == 200 and (await meta.json())["issuer"] == g.issuer
    assert (await g.client.get("/2/0/x")).status == 401  # matched: a token is now due
    assert (await g.client.get("/oauthx")).status == 401
