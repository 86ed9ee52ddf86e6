"""``oauth-gateway``: what an operator types, what it prints, what it leaves in Redis."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from gateway.cli import commands as cli
from gateway.protocol.tokens import TokenDigester
from tests.redis_server import RedisServer, free_port

POLICIES = Path(__file__).resolve().parent.parent / "policies"
SHIPPED = POLICIES / "anaplan.yaml"
TOKEN = "cli-secret-token-5f3a9c1e7b"
#: a moment as the CLI shows it to people: local time to the minute, then its age
STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d, (just now|\d+ (s|min|h|d) ago|in \d+ (s|min|h|d))"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: no GATEWAY_* setting leaks in from the shell running pytest."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def on_redis(redis_server: RedisServer, redis: Redis,
             monkeypatch: pytest.MonkeyPatch) -> Redis:
    """Point the CLI at the test Redis (flushed by the ``redis`` fixture); return a client."""
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_server.url)
    return redis


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``oauth-gateway ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def arun(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """:func:`run` from a test that already runs an event loop (the CLI starts its own)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def _digest(redis: Redis, token: str) -> str:
    """The keyed digest under which the gateway stores ``token`` (``gw:token:<digest>``)."""
    key = await redis.get("gw:meta:digest_key")
    assert key, "the CLI did not create the fleet's digest key"
    return TokenDigester(bytes.fromhex(str(key))).digest(token)


def console_script() -> str:
    """The installed ``oauth-gateway`` of the environment running the tests."""
    beside = Path(sys.executable).parent / "oauth-gateway"
    if beside.exists():
        return str(beside)
    found = shutil.which("oauth-gateway")
    if found is None:
        pytest.fail("the oauth-gateway console script is not installed (pip install -e .)")
    return found


@pytest.fixture
def script_env() -> Iterator[dict[str, str]]:
    yield {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def run_script(env: dict[str, str], cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([console_script(), *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def write_policy(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


GOOD_POLICY = """
upstreams:
  api: https://api.anaplan.com
routes:
  - name: read
    upstream: api
    methods: [GET]
    path: /2/0/**
    scopes: [anaplan:read]
"""


# --- policy check ----------------------------------------------------------------------

def test_policy_check_accepts_the_shipped_policies(capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    shipped_routes = len(yaml.safe_load(SHIPPED.read_text())["routes"])
    code, out, err = run(capsys, "policy", "check", str(POLICIES))
    assert code == 0, err
    assert out.startswith("OK")
    assert f"{shipped_routes} routes, 3 upstreams" in out
    assert str(SHIPPED) in out
    assert err == ""


def test_policy_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    shipped_routes = len(yaml.safe_load(SHIPPED.read_text())["routes"])
    code, out, _ = run(capsys, "policy", "check", str(POLICIES), "--json")
    assert code == 0
    report = json.loads(out)
    assert report == {"ok": True, "routes": shipped_routes,
                      "upstreams": ["api", "audit", "cloudworks"], "files": [str(SHIPPED)]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(GOOD_POLICY.replace("methods:", "methdos:"),
                     ["route #1 ('read')", "unknown key", "methdos"], id="misspelt-key"),
        pytest.param(GOOD_POLICY.replace("upstream: api", "upstream: apu"),
                     ["route #1 ('read')", "key upstream", "'apu'"], id="unknown-upstream"),
        pytest.param(GOOD_POLICY.replace("[GET]", "[FETCH]"),
                     ["key methods.0", "'FETCH'"], id="bad-method"),
        pytest.param(GOOD_POLICY.replace("https://api.anaplan.com", "ftp://files"),
                     ["upstream 'api'", "ftp://files"], id="bad-url"),
        pytest.param("routes: [name: x\n", ["not valid YAML"], id="broken-yaml"),
    ],
)
def test_policy_check_names_the_file_and_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
        expected: list[str]) -> None:
    write_policy(tmp_path, "10-good.yaml", GOOD_POLICY.replace("api", "other").replace(
        "name: read", "name: other-read"))
    broken = write_policy(tmp_path, "20-broken.yaml", text)
    for target in (broken, tmp_path):  # the file itself, and the folder holding it
        code, out, err = run(capsys, "policy", "check", str(target))
        assert code != 0
        assert out == ""
        assert err.startswith("oauth-gateway: error: ")
        assert str(broken) in err
        for part in expected:
            assert part in err, (part, err)
        assert "Traceback" not in err


def test_policy_check_missing_location(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "policy", "check", str(tmp_path / "nowhere"))
    assert code != 0
    assert "nowhere" in err and "no such policy file" in err


# --- policy explain --------------------------------------------------------------------

def test_policy_explain_names_route_scopes_and_upstream(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "policy", "explain", "GET", "/2/0/workspaces",
                         "--policies", str(POLICIES))
    assert code == 0, err
    lines: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.partition(":")
        lines[name] = value
    assert lines["route"].strip().startswith("workspaces-read")
    assert lines["scopes"].strip() == "anaplan:read"
    assert lines["upstream"].strip() == "api -> https://api.anaplan.com/2/0/workspaces"


def test_policy_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "explain", "post", "/2/0/models/M1/imports/1/tasks",
                       "--policies", str(POLICIES), "--json")
    assert code == 0
    report: dict[str, Any] = json.loads(out)
    assert report["route"] == "bulk-imports-write"
    assert report["scopes"] == ["anaplan:bulk:write"]
    assert report["upstream"] == "api"
    assert report["url"] == "https://api.anaplan.com/2/0/models/M1/imports/1/tasks"


def test_policy_explain_unmatched_path_is_404_no_route(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "explain", "GET", "/3/0/unknown",
                       "--policies", str(POLICIES))
    assert code == 1
    assert "404 no_route" in out
    code, out, _ = run(capsys, "policy", "explain", "GET", "/3/0/unknown",
                       "--policies", str(POLICIES), "--json")
    assert code == 1
    assert json.loads(out)["status"] == 404
    assert json.loads(out)["error"] == "no_route"


def test_policy_explain_wrong_method_is_405(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "explain", "OPTIONS", "/2/0/workspaces",
                       "--policies", str(POLICIES))
    assert code == 1
    assert "405 method_not_allowed" in out


@pytest.mark.parametrize("path", ["/2/0/../admin/1/0/users", "/2/0/workspaces/./x",
                                  "/2/0/%2e%2e/admin", "/2/0/a%2Fb", "/2/0//workspaces",
                                  "/2/0/workspaces;x=1", "/2/0/x#/../../admin"])
def test_policy_explain_refuses_what_the_gateway_refuses(
        capsys: pytest.CaptureFixture[str], path: str) -> None:
    code, out, _ = run(capsys, "policy", "explain", "GET", path, "--policies", str(POLICIES))
    assert code == 1
    assert "400" in out and "refused before matching" in out
    assert "route:" not in out
    code, out, _ = run(capsys, "policy", "explain", "GET", path, "--policies", str(POLICIES),
                       "--json")
    assert code == 1
    assert json.loads(out)["status"] == 400


def test_policy_explain_knows_the_builtin_servers_paths(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    catch_all = tmp_path / "all.yaml"
    catch_all.write_text("upstreams:\n  api: https://api.anaplan.com\nroutes:\n"
                         "  - name: all\n    upstream: api\n    path: /**\n")
    code, out, _ = run(capsys, "policy", "explain", "GET", "/oauth/x", "--policies",
                       str(catch_all))
    assert code == 0 and "route:     all" in out  # no built-in server: the policy's
    monkeypatch.setenv("GATEWAY_ISSUER", "https://gw.example.com")
    code, out, _ = run(capsys, "policy", "explain", "GET", "/OAuth/x", "--policies",
                       str(catch_all), "--json")
    assert code == 1
    assert json.loads(out) == {"status": 404, "error": "no_route", "builtin": True,
                               "path": "/OAuth/x"}
    code, out, _ = run(capsys, "policy", "explain", "GET", "/2/0/x", "--policies",
                       str(catch_all))
    assert code == 0 and "route:     all" in out


# --- clients and audit -----------------------------------------------------------------

async def test_clients_disable_show_list_enable_and_audit(
        on_redis: Redis, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await arun(capsys, "clients", "disable", "app-x", "--reason",
                                "leaked secret", "--actor", "alice")
    assert code == 0, err
    assert "app-x disabled" in out
    assert (await on_redis.hgetall("gw:client:app-x"))["disabled"] == "1"

    code, out, _ = await arun(capsys, "clients", "show", "app-x", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["client_id"] == "app-x"
    assert record["disabled"] is True
    assert record["reason"] == "leaked secret"
    assert record["updated_by"] == "alice"

    code, out, _ = await arun(capsys, "clients", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["CLIENT", "NAME", "FLOW", "STATUS"]
    assert len(rows) == 1
    # a governance-only record (no authorization-server client): no name, no flow
    assert rows[0].split()[:4] == ["app-x", "-", "-", "disabled"]
    assert rows[0].endswith("by alice")

    code, out, _ = await arun(capsys, "clients", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(r["client_id"], r["disabled"]) for r in listed] == [("app-x", True)]

    code, out, _ = await arun(capsys, "clients", "enable", "app-x", "--actor", "bob")
    assert code == 0
    assert "app-x enabled" in out
    code, out, _ = await arun(capsys, "clients", "show", "app-x", "--json")
    assert json.loads(out)["disabled"] is False
    assert json.loads(out)["updated_by"] == "bob"
    code, out, _ = await arun(capsys, "clients", "list")
    assert out.splitlines()[1].split()[:4] == ["app-x", "-", "-", "enabled"]

    code, out, _ = await arun(capsys, "audit", "tail", "--json")
    assert code == 0
    entries = json.loads(out)
    assert [(e["action"], e["client_id"], e["actor"]) for e in entries] == [
        ("client.disabled", "app-x", "alice"), ("client.enabled", "app-x", "bob")]
    assert entries[0]["reason"] == "leaked secret"
    code, out, _ = await arun(capsys, "audit", "tail", "-n", "1", "--json")
    assert [e["action"] for e in json.loads(out)] == ["client.enabled"]
    code, out, _ = await arun(capsys, "audit", "tail")
    assert code == 0
    actions = [re.sub(STAMP, "", line).split()[0] for line in out.splitlines()]
    assert actions == ["client.disabled", "client.enabled"]


async def test_clients_show_missing_fails(on_redis: Redis,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await arun(capsys, "clients", "show", "missing", "--json")
    assert code != 0
    assert out == ""
    assert "missing" in err
    assert await on_redis.exists("gw:client:missing") == 0


async def test_empty_registry_and_audit(on_redis: Redis,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await arun(capsys, "clients", "list", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = await arun(capsys, "audit", "tail", "--json")
    assert code == 0 and json.loads(out) == []


@pytest.mark.parametrize("argv", [
    ["clients", "list"],
    ["clients", "show", "app-x"],
    ["clients", "disable", "app-x", "--reason", "r"],
    ["tokens", "revoke", TOKEN],
    ["audit", "tail", "--json"],
])
async def test_unreachable_redis_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str]) -> None:
    port = free_port()  # bound then released: nothing listens there
    monkeypatch.setenv("GATEWAY_REDIS_URL", f"redis://:hunter2@127.0.0.1:{port}/0")
    code, out, err = await arun(capsys, *argv)
    assert code == 1
    assert out == ""
    assert err.startswith("oauth-gateway: error: Redis at ")
    assert f"127.0.0.1:{port}" in err
    assert "hunter2" not in err  # the password in the URL is not echoed
    assert "Traceback" not in err
    assert TOKEN not in err


# --- tokens revoke ---------------------------------------------------------------------

async def test_tokens_revoke_reads_stdin_and_pins_the_digest(
        on_redis: Redis, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))
    code, out, err = await arun(capsys, "tokens", "revoke", "-")
    assert code == 0, err
    assert TOKEN not in out and TOKEN not in err
    assert "revoked" in out

    digest = await _digest(on_redis, TOKEN)
    assert digest[:12] in out
    pinned = await on_redis.get(f"gw:token:{digest}")
    assert pinned is not None
    assert json.loads(pinned) == {"active": False, "revoked": True}
    assert await on_redis.ttl(f"gw:token:{digest}") > 0

    # nothing in Redis holds the token itself, in a key or a value
    stored: list[Any] = []
    async for name in on_redis.scan_iter():
        kind = await on_redis.type(name)
        stored.append(name)
        if kind == "string":
            stored.append(await on_redis.get(name))
        elif kind == "stream":
            stored.append(await on_redis.xrange(name))
    assert TOKEN not in repr(stored)
    entries: Any = await on_redis.xrange("gw:audit")
    assert entries[-1][1]["action"] == "token.revoked"


async def test_tokens_revoke_json(on_redis: Redis, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN))
    code, out, _ = await arun(capsys, "tokens", "revoke", "-", "--json")
    assert code == 0
    assert TOKEN not in out
    report = json.loads(out)
    assert report["authorization_server"] == "not configured"
    assert len(report["digest_prefix"]) == 12
    assert await on_redis.exists(f"gw:token:{await _digest(on_redis, TOKEN)}") == 1


async def test_tokens_revoke_empty_stdin_is_a_usage_error(
        on_redis: Redis, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, _, err = await arun(capsys, "tokens", "revoke", "-")
    assert code == 2
    assert "no token" in err
    assert [k async for k in on_redis.scan_iter("gw:token:*")] == []


# --- settings --------------------------------------------------------------------------

@pytest.mark.parametrize(("variable", "value"), [
    ("GATEWAY_LOG_FORMAT", "xml"),
    ("GATEWAY_REDIS_URL", "http://127.0.0.1:6379"),
    ("GATEWAY_LOCAL_CACHE_SIZE", "many"),
    ("GATEWAY_REQUIRE_CLIENT_RECORD", "perhaps"),
])
def test_bad_settings_exit_2_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    code, out, err = run(capsys, "policy", "check", str(POLICIES))
    assert code == 2
    assert out == ""
    assert variable in err
    assert "Traceback" not in err


# --- the installed console script ------------------------------------------------------

def test_console_script_policy_check(script_env: dict[str, str], tmp_path: Path) -> None:
    done = run_script(script_env, tmp_path, "policy", "check", str(POLICIES))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK")
    broken = write_policy(tmp_path, "broken.yaml", GOOD_POLICY.replace("methods:", "methdos:"))
    done = run_script(script_env, tmp_path, "policy", "check", str(broken))
    assert done.returncode == 1
    assert str(broken) in done.stderr and "methdos" in done.stderr


def test_console_script_explain_json(script_env: dict[str, str], tmp_path: Path) -> None:
    done = run_script(script_env, tmp_path, "policy", "explain", "GET", "/2/0/workspaces",
                      "--policies", str(POLICIES), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["route"], report["scopes"], report["upstream"]) == (
        "workspaces-read", ["anaplan:read"], "api")


def test_console_script_unreachable_redis_no_traceback(script_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    port = free_port()
    env = {**script_env, "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    done = run_script(env, tmp_path, "clients", "list")
    assert done.returncode == 1
    assert f"127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_console_script_bad_setting(script_env: dict[str, str], tmp_path: Path) -> None:
    env = {**script_env, "GATEWAY_LOG_FORMAT": "xml"}
    done = run_script(env, tmp_path, "policy", "check", str(POLICIES))
    assert done.returncode == 2
    assert "GATEWAY_LOG_FORMAT" in done.stderr
    assert "Traceback" not in done.stderr


async def test_console_script_revoke_from_stdin(script_env: dict[str, str], tmp_path: Path,
                                                redis_server: RedisServer,
                                                redis: Redis) -> None:
    env = {**script_env, "GATEWAY_REDIS_URL": redis_server.url}
    proc = await asyncio.create_subprocess_exec(
        console_script(), "tokens", "revoke", "-", env=env, cwd=tmp_path,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(TOKEN.encode() + b"\n"), 60)
    assert proc.returncode == 0, err
    assert TOKEN.encode() not in out + err
    pinned = await redis.get(f"gw:token:{await _digest(redis, TOKEN)}")
    assert pinned is not None and json.loads(pinned)["revoked"] is True


async def test_clients_introspect_permission_create_show_list_update(
        on_redis: Redis, capsys: pytest.CaptureFixture[str]) -> None:
    """``--introspect`` makes a resource server; the record keeps it, ``clients show`` and
    ``clients list`` say so, ``clients update --no-introspect`` takes it back."""
    code, out, err = await arun(capsys, "clients", "create", "--name", "orders API",
                                "--grant", "client_credentials", "--introspect", "--json")
    assert code == 0, err
    view = json.loads(out)
    assert view["introspect"] is True
    client_id = view["client_id"]
    assert (await on_redis.hgetall(f"gw:client:{client_id}"))["introspect"] == "1"
    code, out, _ = await arun(capsys, "clients", "show", client_id, "--json")
    assert json.loads(out)["introspect"] is True
    code, out, _ = await arun(capsys, "clients", "show", client_id)
    assert any(line.split() == ["introspect", "True"] for line in out.splitlines())
    code, out, _ = await arun(capsys, "clients", "list")
    header, row = out.splitlines()
    assert header.split()[:5] == ["CLIENT", "NAME", "FLOW", "STATUS", "INTROSPECT"]
    assert "any" in row.split()
    code, out, err = await arun(capsys, "clients", "update", client_id, "--no-introspect")
    assert code == 0, err
    assert (await on_redis.hgetall(f"gw:client:{client_id}"))["introspect"] == "0"
    code, out, _ = await arun(capsys, "clients", "list", "--json")
    assert json.loads(out)[0]["introspect"] is False
    # a public client cannot be one: introspection needs a secret
    code, _, err = await arun(capsys, "clients", "create", "--name", "cli", "--grant",
                              "device_code", "--introspect")
    assert code == 1 and "confidential" in err


def _strings(value: Any) -> list[str]:
    """Every string in a JSON value."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


EVIL = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202egnp.exe\x7f\nforged line"
EVIL_SHOWN = "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202egnp.exe\\x7f\\x0aforged line"


async def test_stored_text_reaches_the_terminal_escaped_and_json_as_is(
        on_redis: Redis, make_auth_gateway: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A user name typed at the login page, a device's name, a client's name: kept as
    typed, printed with every control character, line break and bidi mark visible, so
    none of them drives the operator's terminal; ``--json`` keeps the true values."""
    h = await make_auth_gateway()
    page = await h.client.get("/oauth/login")
    csrf = page.cookies["gw_csrf"].value
    resp = await h.client.post("/oauth/login", data={
        "csrf_token": csrf, "username": EVIL, "password": "x", "next": "/oauth/account"})
    assert resp.status == 401
    client, _ = await h.auth.create_client(
        name=EVIL, grant="device_code", redirect_uris=[], scopes=["anaplan:read"], actor="t")
    await h.auth.issuer.new_grant(client, username=EVIL, sub="u1", scope="anaplan:read",
                                  grant_type=client.grant_type, label=EVIL)
    for argv in (["audit", "tail"], ["grants", "list"], ["clients", "list"],
                 ["clients", "show", client.client_id]):
        code, out, err = await arun(capsys, *argv)
        assert code == 0, err
        assert EVIL_SHOWN[:24] in out, (argv, out)  # a list cuts a name at 24
        assert not any(c in out for c in "\x1b\x07\x9b\x7f\u202e"), argv
        assert "\nforged line" not in out, argv
        code, out, _ = await arun(capsys, *argv, "--json")
        assert out.isascii()  # JSON escapes whatever is not plain text itself
        assert EVIL in _strings(json.loads(out)), argv
    assert (await on_redis.hgetall(f"gw:client:{client.client_id}"))["name"] == EVIL


# --- times for people ---------------------------------------------------------------------

@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI's local time zone made known: UTC, then whatever it was."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(("at", "shown"), [
    (1796485532 - 3 * 60, "2026-12-05 15:42, 3 min ago"),
    (1796485532 - 45, "2026-12-05 15:44, 45 s ago"),
    (1796485532 - 2 * 3600 - 59, "2026-12-05 13:44, 2 h ago"),
    (1796485532 - 5 * 86400, "2026-11-30 15:45, 5 d ago"),
    (1796485532 + 5 * 60, "2026-12-05 15:50, in 5 min"),
    (1796485532, "2026-12-05 15:45, just now"),
    (0, "-"), ("", "-"), (None, "-"), ("soon", "-"),
])
def test_a_moment_reads_as_local_time_and_age(zone: None, at: Any, shown: str) -> None:
    from gateway.cli.terminal import when
    assert when(at, now=1796485532) == shown


def test_a_moment_is_in_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli.terminal import when
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        assert when(1796485532, now=1796485532 + 600) == "2026-12-05 16:45, 10 min ago"
    finally:
        monkeypatch.undo()
        time.tzset()


async def test_times_people_read_are_dates_with_an_age_json_keeps_epochs(
        on_redis: Redis, make_auth_gateway: Any, zone: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``clients show``/``list``, ``grants list`` and ``audit tail`` show a moment as
    ``2026-12-05 15:45, 3 min ago``, never epoch seconds; ``--json`` keeps the numbers."""
    h = await make_auth_gateway()
    client, _ = await h.auth.create_client(
        name="Budget CLI", grant="device_code", redirect_uris=[], scopes=["anaplan:read"],
        actor="t")
    await h.auth.issuer.new_grant(client, username="alice", sub="u1", scope="anaplan:read",
                                  grant_type=client.grant_type, label="laptop")
    now = time.time()
    today = time.strftime("%Y-%m-%d %H:%M", time.gmtime(now))[:13]  # to the hour: no race
    epoch = re.compile(r"\b1\d{9}\b")

    code, out, err = await arun(capsys, "clients", "show", client.client_id)
    assert code == 0, err
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines()}
    for name in ("created_at", "updated_at"):
        assert re.match(STAMP, fields[name]), (name, fields[name])
        assert fields[name].startswith(today[:10])
    assert not epoch.search(out), out

    code, out, err = await arun(capsys, "clients", "list")
    assert code == 0, err
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d, (just now|\d+ s ago) by t$",
                     out.splitlines()[1]), out
    assert not epoch.search(out), out

    code, out, err = await arun(capsys, "grants", "list")
    assert code == 0, err
    header, row = out.splitlines()
    assert "GRANTED" in header and "LAST USED" in header
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d, (?:just now|\d+ s ago)", row)) == 2, row
    assert not epoch.search(out), out

    code, out, err = await arun(capsys, "audit", "tail")
    assert code == 0, err
    assert all(re.match(STAMP, line) for line in out.splitlines()), out
    assert not epoch.search(out), out

    # machines keep epoch seconds
    code, out, _ = await arun(capsys, "clients", "show", client.client_id, "--json")
    assert str(json.loads(out)["created_at"]).isdigit()
    code, out, _ = await arun(capsys, "grants", "list", "--json")
    assert isinstance(json.loads(out)[0]["created_at"], int)
    code, out, _ = await arun(capsys, "audit", "tail", "--json")
    assert all(e["at"].isdigit() for e in json.loads(out))
