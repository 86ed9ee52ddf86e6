"""Route policies: the shipped Anaplan policy, matching, and load-time validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config.policy import (
    HTTP_METHODS,
    PolicyError,
    RoutePolicy,
    compile_path,
    load_policy,
    replacement_credential,
)

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "anaplan.yaml"

READ_METHODS = {"GET", "HEAD"}
# POSTs (and DELETEs) Anaplan documents that change nothing: they need a read scope
READS_BY_POST = {"model-status", "view-read-requests", "list-read-requests", "audit-search"}

WS = "8a8b8c8d8e8f8g8i"
MODEL = "75A40874E6B64FA3AE0743278996850F"


@pytest.fixture(scope="module")
def shipped() -> RoutePolicy:
    return load_policy(SHIPPED)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return str(info.value)


# --- the shipped policy ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("method", "path", "route", "scopes", "upstream"),
    [
        # Integration API core
        ("GET", "/2/0/workspaces", "workspaces-read", ("anaplan:read",), "api"),
        ("HEAD", f"/2/0/workspaces/{WS}", "workspaces-read", ("anaplan:read",), "api"),
        ("GET", f"/2/0/workspaces/{WS}/models", "workspaces-read", ("anaplan:read",), "api"),
        ("GET", "/2/0/models", "models-read", ("anaplan:read",), "api"),
        ("GET", f"/2/0/models/{MODEL}/lists/101000000001/items", "models-read",
         ("anaplan:read",), "api"),
        ("GET", f"/2/0/workspaces/{WS}/models/{MODEL}/views/102000000001/data",
         "workspaces-read", ("anaplan:read",), "api"),
        ("POST", f"/2/0/workspaces/{WS}/models/{MODEL}/modules/102000000001/data",
         "workspaces-write", ("anaplan:write",), "api"),
        ("POST", f"/2/0/models/{MODEL}/lists/101000000001/items", "models-write",
         ("anaplan:write",), "api"),
        ("PUT", f"/2/0/models/{MODEL}/currentPeriod", "models-write", ("anaplan:write",), "api"),
        ("POST", f"/2/0/models/{MODEL}/close", "models-write", ("anaplan:write",), "api"),
        ("GET", "/2/0/users", "users-read", ("anaplan:read",), "api"),
        ("GET", "/2/0/users/me", "users-read", ("anaplan:read",), "api"),
        # reads Anaplan documents as POSTs
        ("POST", f"/2/0/workspaces/{WS}/models/{MODEL}/status", "model-status",
         ("anaplan:read",), "api"),
        ("POST", f"/2/0/workspaces/{WS}/models/{MODEL}/views/1/readRequests",
         "view-read-requests", ("anaplan:read",), "api"),
        ("DELETE", f"/2/0/workspaces/{WS}/models/{MODEL}/lists/1/readRequests/R1",
         "list-read-requests", ("anaplan:read",), "api"),
        # bulk, both path forms
        ("POST", f"/2/0/models/{MODEL}/imports/112000000001/tasks", "bulk-imports-write",
         ("anaplan:bulk:write",), "api"),
        ("POST", f"/2/0/workspaces/{WS}/models/{MODEL}/imports/112000000001/tasks",
         "bulk-imports-write", ("anaplan:bulk:write",), "api"),
        ("GET", f"/2/0/workspaces/{WS}/models/{MODEL}/imports/112000000001/tasks/T1",
         "bulk-imports-read", ("anaplan:bulk",), "api"),
        ("GET", f"/2/0/workspaces/{WS}/models/{MODEL}/imports", "bulk-imports-read",
         ("anaplan:bulk",), "api"),
        ("POST", f"/2/0/workspaces/{WS}/models/{MODEL}/exports/116000000001/tasks",
         "bulk-exports-write", ("anaplan:bulk:write",), "api"),
        ("POST", f"/2/0/workspaces/{WS}/models/{MODEL}/processes/118000000001/tasks",
         "bulk-processes-write", ("anaplan:bulk:write",), "api"),
        ("GET", f"/2/0/workspaces/{WS}/models/{MODEL}/processes/118000000001/tasks/T1/dumps/X",
         "bulk-processes-read", ("anaplan:bulk",), "api"),
        ("POST", f"/2/0/workspaces/{WS}/models/{MODEL}/actions/117000000001/tasks",
         "bulk-actions-write", ("anaplan:bulk:write",), "api"),
        ("PUT", f"/2/0/workspaces/{WS}/models/{MODEL}/files/113000000000/chunks/0",
         "bulk-files-write", ("anaplan:bulk:write",), "api"),
        ("GET", f"/2/0/workspaces/{WS}/models/{MODEL}/files/113000000000/chunks/0",
         "bulk-files-read", ("anaplan:bulk",), "api"),
        ("DELETE", f"/2/0/workspaces/{WS}/models/{MODEL}/files/113000000000",
         "bulk-files-write", ("anaplan:bulk:write",), "api"),
        # ALM
        ("GET", f"/2/0/models/{MODEL}/alm/revisions", "alm-read", ("anaplan:alm",), "api"),
        ("GET", f"/2/0/models/{MODEL}/alm/syncTasks/T1", "alm-read", ("anaplan:alm",), "api"),
        ("POST", f"/2/0/models/{MODEL}/alm/syncTasks", "alm-write", ("anaplan:alm:write",),
         "api"),
        ("PUT", f"/2/0/models/{MODEL}/onlineStatus", "alm-online-status",
         ("anaplan:alm:write",), "api"),
        # SCIM
        ("GET", "/scim/1/0/v2/Users", "scim-read", ("anaplan:scim",), "api"),
        ("GET", "/scim/1/0/v2/ServiceProviderConfig", "scim-read", ("anaplan:scim",), "api"),
        ("PUT", "/scim/1/0/v2/Users/8a8196a55b193fa0015b1e57f3da172c", "scim-write",
         ("anaplan:scim:write",), "api"),
        ("PATCH", "/scim/1/0/v2/Users/u1", "scim-write", ("anaplan:scim:write",), "api"),
        ("POST", "/scim/1/0/v2/Users", "scim-write", ("anaplan:scim:write",), "api"),
        # Administration
        ("GET", "/admin/1/0/users/export", "admin-read", ("anaplan:admin",), "api"),
        ("PUT", "/admin/1/0/users/import", "admin-write", ("anaplan:admin:write",), "api"),
        # Audit, its own host
        ("GET", "/audit/api/1/events", "audit-read", ("anaplan:audit",), "audit"),
        ("POST", "/audit/api/1/events/search", "audit-search", ("anaplan:audit",), "audit"),
        # CloudWorks, its own host
        ("GET", "/2/0/integrations", "cloudworks-read", ("anaplan:cloudworks",), "cloudworks"),
        ("GET", "/2/0/integrations/connections", "cloudworks-read", ("anaplan:cloudworks",),
         "cloudworks"),
        ("POST", "/2/0/integrations/I1/run", "cloudworks-write", ("anaplan:cloudworks:write",),
         "cloudworks"),
        ("GET", "/2/0/integrationflows/F1", "cloudworks-flows-read", ("anaplan:cloudworks",),
         "cloudworks"),
        ("POST", "/2/0/integrationflows/F1/run", "cloudworks-flows-write",
         ("anaplan:cloudworks:write",), "cloudworks"),
    ],
)
def test_shipped_policy_routes_real_requests(
    shipped: RoutePolicy, method: str, path: str, route: str, scopes: tuple[str, ...],
    upstream: str,
) -> None:
    match = shipped.match(method, path)
    assert match.route is not None, f"{method} {path} matched no route"
    assert match.route.name == route
    assert match.route.scopes == scopes
    assert match.route.upstream.name == upstream


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/nope",
        "/2/0",
        "/2/0/objects/user",
        "/1/3/workspaces",                # retired Integration API v1
        "/token/authenticate",            # auth.anaplan.com is not routed
        "/scim/1/0/Users",                # not the SCIM v2 prefix
        "/audit/api/2/events",
        "/admin/2/0/users/export",
    ],
)
def test_shipped_policy_denies_unknown_paths(shipped: RoutePolicy, path: str) -> None:
    for method in ("GET", "POST"):
        match = shipped.match(method, path)
        assert match.route is None
        assert match.method_mismatch is False


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/2/0/users"),           # users are read-only: must not fall to a write route
        ("DELETE", "/2/0/users/me"),
        ("OPTIONS", "/2/0/workspaces"),
        ("PUT", "/audit/api/1/events"),   # audit is read only
        ("DELETE", "/audit/api/1/events/search"),
        ("PUT", "/2/0/users/me"),
    ],
)
def test_shipped_policy_reports_method_mismatch(
    shipped: RoutePolicy, method: str, path: str,
) -> None:
    match = shipped.match(method, path)
    assert match.route is None
    assert match.method_mismatch is True


def test_shipped_policy_has_no_catch_all(shipped: RoutePolicy) -> None:
    for route in shipped.routes:
        assert route.pattern.fullmatch("/some/unknown/path") is None, route.name
        assert route.scopes, f"{route.name} requires no scope"


def test_shipped_reads_need_read_scopes_and_writes_write_scopes(shipped: RoutePolicy) -> None:
    for route in shipped.routes:
        writes = route.methods - READ_METHODS
        needs_write = any(s == "anaplan:write" or s.endswith(":write") for s in route.scopes)
        if not writes or route.name in READS_BY_POST:
            assert not needs_write, route.name
        else:
            assert needs_write, route.name
            assert not route.methods & READ_METHODS, f"{route.name} mixes reads and writes"


def test_shipped_route_names_are_short_kebab_case_metric_labels(shipped: RoutePolicy) -> None:
    names = shipped.route_names
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*", name), name
        assert len(name) <= 32, name


def test_shipped_upstreams_are_anaplan_hosts_with_anaplan_scheme(shipped: RoutePolicy) -> None:
    assert {name: u.url for name, u in shipped.upstreams.items()} == {
        "api": "https://api.anaplan.com",
        "audit": "https://audit.anaplan.com",
        "cloudworks": "https://api.cloudworks.anaplan.com",
    }
    for upstream in shipped.upstreams.values():
        assert upstream.scheme == "AnaplanAuthToken"
        assert upstream.credentials == "forward"


# --- matching -------------------------------------------------------------------------

TWO_ROUTES = """
upstreams:
  api: https://api.example.test
routes:
  - {name: first, upstream: api, methods: [GET], path: /a/**, scopes: [s:first]}
  - {name: second, upstream: api, methods: [GET], path: /a/b, scopes: [s:second]}
"""


def test_first_match_wins_even_over_a_more_specific_later_route(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", TWO_ROUTES))
    route = policy.match("GET", "/a/b").route
    assert route is not None
    assert route.name == "first"
    assert route.scopes == ("s:first",)


def test_swapping_route_order_changes_the_winner(tmp_path: Path) -> None:
    lines = TWO_ROUTES.strip().splitlines()
    swapped = "\n".join([*lines[:-2], lines[-1], lines[-2]])
    policy = load_policy(write(tmp_path, "p.yaml", swapped))
    route = policy.match("GET", "/a/b").route
    assert route is not None
    assert route.name == "second"


def test_a_path_match_with_the_wrong_method_falls_through_to_later_routes(
    tmp_path: Path,
) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: reads, upstream: api, methods: [GET], path: /a/**}
  - {name: writes, upstream: api, methods: [POST], path: /a/**}
"""))
    post = policy.match("POST", "/a/x")
    assert post.route is not None and post.route.name == "writes"
    assert post.method_mismatch is False
    put = policy.match("PUT", "/a/x")
    assert put.route is None and put.method_mismatch is True
    other = policy.match("PUT", "/b")
    assert other.route is None and other.method_mismatch is False


def test_methods_default_to_all_and_scopes_to_none(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: open, upstream: api, path: /open}
""")
    route = load_policy(file).routes[0]
    assert route.methods == frozenset(HTTP_METHODS)
    assert route.scopes == ()
    assert route.source == str(file)


@pytest.mark.parametrize(
    ("pattern", "matches", "refuses"),
    [
        ("/a/*", ["/a/b", "/a/b%20c"], ["/a", "/a/", "/a/b/c", "/ab"]),
        ("/a/**", ["/a", "/a/", "/a/b", "/a/b/c/d"], ["/ab", "/b/a", "/"]),
        ("/a/**/z", ["/a/z", "/a/b/z", "/a/b/c/z"], ["/a/b/c", "/a/bz", "/az"]),
        ("/a/*/z", ["/a/b/z"], ["/a/z", "/a/b/c/z"]),
        ("/a/x*", ["/a/xy", "/a/x-1"], ["/a/x/y", "/a/y"]),
        ("/**", ["/", "/a", "/a/b/c"], []),
        ("/", ["/"], ["/a"]),
        ("/a.b", ["/a.b"], ["/axb"]),           # regex characters are literal
        ("/a/(b)+", ["/a/(b)+"], ["/a/bb"]),
        ("/a/b/", ["/a/b/"], ["/a/b"]),          # a trailing slash is significant
    ],
)
def test_star_matches_one_segment_and_double_star_any_number(
    pattern: str, matches: list[str], refuses: list[str],
) -> None:
    regex = compile_path(pattern)
    for path in matches:
        assert regex.fullmatch(path), f"{pattern} should match {path}"
    for path in refuses:
        assert not regex.fullmatch(path), f"{pattern} should not match {path}"


def test_double_star_must_be_a_whole_segment() -> None:
    with pytest.raises(ValueError, match="whole segment"):
        compile_path("/a/b**")


# --- several files --------------------------------------------------------------------

def test_folder_files_are_concatenated_in_name_order(tmp_path: Path) -> None:
    write(tmp_path, "20-b.yaml", """
routes:
  - {name: b, upstream: api, path: /x/**, scopes: [s:b]}
""")
    write(tmp_path, "10-a.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: a, upstream: api, path: /x/a, scopes: [s:a]}
""")
    write(tmp_path, "30-c.yml", """
upstreams: {other: https://other.example.test}
routes:
  - {name: c, upstream: other, path: /x/a, scopes: [s:c]}
""")
    write(tmp_path, "notes.txt", "not a policy: {{{")
    policy = load_policy(tmp_path)
    assert policy.route_names == ["a", "b", "c"]
    assert policy.sources == [str(tmp_path / n) for n in ("10-a.yaml", "20-b.yaml", "30-c.yml")]
    # the earlier file wins for the path both claim
    first = policy.match("GET", "/x/a").route
    assert first is not None and first.name == "a"
    other = policy.match("GET", "/x/z").route
    assert other is not None and other.name == "b"
    # an upstream may be defined in another file than the routes that use it
    assert policy.routes[1].upstream.url == "https://api.example.test"
    assert policy.routes[2].source == str(tmp_path / "30-c.yml")


def test_a_single_file_may_be_named_directly(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", TWO_ROUTES)
    write(tmp_path, "b.yaml", "routes: [{name: z, upstream: api, path: /z}]")
    assert load_policy(tmp_path / "a.yaml").route_names == ["first", "second"]


# --- upstream options -----------------------------------------------------------------

def test_upstream_mapping_form(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", """
upstreams:
  plain: https://api.anaplan.com/
  stripped:
    url: https://files.example.test/base/
    credentials: strip
    timeout: 2.5
  bearer-on-anaplan:
    url: https://audit.anaplan.com
    scheme: Bearer
  replaced:
    url: https://svc.example.test
    credentials: replace
    replace_header: X-Api-Key
    replace_value_env: SVC_KEY
routes: []
"""))
    plain = policy.upstreams["plain"]
    assert plain.url == "https://api.anaplan.com"
    assert (plain.credentials, plain.scheme, plain.timeout) == (
        "forward", "AnaplanAuthToken", None)
    stripped = policy.upstreams["stripped"]
    assert stripped.credentials == "strip"
    assert stripped.timeout == 2.5
    assert stripped.base_path == "/base"
    assert stripped.origin == "https://files.example.test"
    assert stripped.host == "files.example.test"
    assert policy.upstreams["bearer-on-anaplan"].scheme == "Bearer"
    replaced = policy.upstreams["replaced"]
    assert (replaced.credentials, replaced.replace_header, replaced.replace_value_env) == (
        "replace", "X-Api-Key", "SVC_KEY")
    assert replacement_credential(replaced, [("SVC_KEY", "k-123")]) == "k-123"
    with pytest.raises(PolicyError, match="SVC_KEY"):
        replacement_credential(replaced, [])


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("https://api.anaplan.com", "AnaplanAuthToken"),
        ("https://api.cloudworks.anaplan.com", "AnaplanAuthToken"),
        ("https://API.Anaplan.COM", "AnaplanAuthToken"),
        ("https://anaplan.com", "AnaplanAuthToken"),
        ("http://127.0.0.1:8081", "Bearer"),
        ("https://api.example.test", "Bearer"),
        ("https://evilanaplan.com", "Bearer"),
        ("https://api.anaplan.com.evil.test", "Bearer"),
    ],
)
def test_default_scheme_is_anaplan_auth_token_only_for_anaplan_hosts(
    tmp_path: Path, url: str, scheme: str,
) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", f"upstreams: {{up: '{url}'}}\n"))
    assert policy.upstreams["up"].scheme == scheme


def test_credentials_replace_requires_replace_value_env(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams:
  svc: {url: https://svc.example.test, credentials: replace}
""")
    message = load_error(file)
    assert str(file) in message
    assert "upstream 'svc'" in message
    assert "replace_value_env" in message


# --- load-time errors name the file, the route and the key -----------------------------

def test_unknown_route_key_is_named(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: fine, upstream: api, path: /a}
  - {name: typo, upstream: api, path: /b, scope: [x]}
""")
    message = load_error(file)
    assert message.startswith(f"{file}: ")
    assert "route #2 ('typo')" in message
    assert "unknown key" in message and "'scope'" in message


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", "upstreams: {}\nroute: []\n")
    message = load_error(file)
    assert str(file) in message
    assert "unknown key" in message and "'route'" in message


def test_bad_method_is_named(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: a, upstream: api, path: /a, methods: [GET, FETCH]}
""")
    message = load_error(file)
    assert str(file) in message
    assert "route #1 ('a')" in message
    assert "key methods.1" in message
    assert "'FETCH'" in message


def test_lowercase_method_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: a, upstream: api, path: /a, methods: [get]}
""")
    assert "key methods.0" in load_error(file)


def test_missing_path_is_named(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: nopath, upstream: api}
""")
    message = load_error(file)
    assert str(file) in message
    assert "route #1 ('nopath')" in message
    assert "'path'" in message


def test_relative_path_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: rel, upstream: api, path: a/b}
""")
    message = load_error(file)
    assert "route #1 ('rel')" in message and "key path" in message


def test_partial_double_star_is_refused_with_the_route_named(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: ok, upstream: api, path: /ok}
  - {name: glob, upstream: api, path: /a/b**}
""")
    message = load_error(file)
    assert message.startswith(f"{file}: route #2 ('glob'): key path")


def test_bad_scope_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: a, upstream: api, path: /a, scopes: ['two words']}
""")
    message = load_error(file)
    assert "route #1 ('a')" in message and "key scopes.0" in message


@pytest.mark.parametrize(
    "spec",
    ["ftp://files.example.test", "api.anaplan.com", "{url: 'ftp://files.example.test'}"],
)
def test_bad_upstream_url_is_refused_naming_the_upstream(tmp_path: Path, spec: str) -> None:
    file = write(tmp_path, "p.yaml", f"upstreams:\n  files: {spec}\n")
    message = load_error(file)
    assert message.startswith(f"{file}: upstream 'files'")


def test_upstream_url_with_a_query_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", "upstreams: {api: 'https://api.example.test/?k=v'}\n")
    message = load_error(file)
    assert "upstream 'api'" in message and "key url" in message


@pytest.mark.parametrize(("url", "says"), [
    ("https://svc:s3cret@api.example.test", "no user or password"),
    ("https://api.example.test:99999", "port"),
    ("https://api.example.test:http", "port"),
    ("https:///v2", "no host"),
])
def test_upstream_url_that_cannot_be_reached_as_written_is_refused(
        tmp_path: Path, url: str, says: str) -> None:
    file = write(tmp_path, "p.yaml", f"upstreams: {{api: '{url}'}}\n")
    message = load_error(file)
    assert "upstream 'api'" in message and "key url" in message and says in message
    assert "s3cret" not in message


def test_unknown_upstream_key_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams:
  api: {url: https://api.example.test, credential: strip}
""")
    assert load_error(file).startswith(f"{file}: upstream 'api'")


def test_bad_credentials_mode_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams:
  api: {url: https://api.example.test, credentials: forward-and-log}
""")
    assert load_error(file).startswith(f"{file}: upstream 'api'")


def test_unknown_upstream_reference_names_route_and_known_upstreams(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test, audit: https://audit.example.test}
routes:
  - {name: a, upstream: api, path: /a}
  - {name: b, upstream: nope, path: /b}
""")
    message = load_error(file)
    assert message.startswith(f"{file}: route #2 ('b'): key upstream")
    assert "'nope'" in message
    assert "known: api, audit" in message


def test_duplicate_route_name_in_one_file(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: a, upstream: api, path: /a}
  - {name: a, upstream: api, path: /b}
""")
    message = load_error(file)
    assert message.startswith(f"{file}: route #2 ('a'): key name")
    assert "duplicate" in message


def test_duplicate_route_name_across_files_names_the_second_file(tmp_path: Path) -> None:
    write(tmp_path, "1.yaml", """
upstreams: {api: https://api.example.test}
routes:
  - {name: a, upstream: api, path: /a}
  - {name: b, upstream: api, path: /b}
""")
    second = write(tmp_path, "2.yaml", """
routes:
  - {name: b, upstream: api, path: /c}
""")
    message = load_error(tmp_path)
    # the index counts within the file the operator has to open
    assert message.startswith(f"{second}: route #1 ('b'): key name")


def test_duplicate_upstream_across_files(tmp_path: Path) -> None:
    write(tmp_path, "1.yaml", "upstreams: {api: https://api.example.test}\n")
    second = write(tmp_path, "2.yaml", "upstreams: {api: https://other.example.test}\n")
    message = load_error(tmp_path)
    assert message.startswith(f"{second}: upstream 'api'")
    assert "already defined" in message


def test_non_mapping_file(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", "- name: a\n- name: b\n")
    message = load_error(file)
    assert message.startswith(f"{file}: ")
    assert "mapping" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", "routes: [\n  {name: a\n")
    message = load_error(file)
    assert message.startswith(f"{file}: not valid YAML")


def test_routes_must_be_a_list(tmp_path: Path) -> None:
    file = write(tmp_path, "p.yaml", "routes: {name: a}\n")
    message = load_error(file)
    assert str(file) in message and "key routes" in message


def test_empty_folder(tmp_path: Path) -> None:
    write(tmp_path, "README.md", "# not a policy\n")
    message = load_error(tmp_path)
    assert str(tmp_path) in message
    assert "no *.yaml policy files" in message


def test_missing_location(tmp_path: Path) -> None:
    message = load_error(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in message


@pytest.mark.parametrize(
    ("spec", "told"),
    [
        ("ftp://files.example.test", "http:// or https://"),
        ("{url: 'https://files.example.test', credential: strip}", "'credential'"),
        ("{url: 'https://files.example.test', credentials: nope}", "key credentials"),
    ],
)
def test_upstream_errors_say_which_key_and_what_was_expected(
    tmp_path: Path, spec: str, told: str,
) -> None:
    file = write(tmp_path, "p.yaml", f"upstreams:\n  files: {spec}\n")
    assert told in load_error(file)
