"""``oauth-gateway`` against a server's admin API (``--server URL`` or ``GATEWAY_SERVER``):
an admin signs in with ``oauth-gateway login --admin``, a browser approving the code, then
governs clients, grants, users and reads the audit stream with no Redis reachable from the
admin's machine (``GATEWAY_REDIS_URL`` names a dead port)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.authserver import DeviceFlowTiming
from gateway.cli import commands as cli
from gateway.cli.login import token_file
from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.redis_server import RedisServer, free_port
from tests.test_admin_api import ADMIN, USER, device_token, sign_in
from tests.test_flow_device import Browser

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d, (just now|\d+ (s|min|h|d) ago)"


@pytest.fixture
async def h(make_auth_gateway: AuthGatewayFactory, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> AuthHarness:
    """A running server with an admin (alice) and a person (bob); this machine has a
    config directory of its own and no Redis (a dead port)."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("GATEWAY_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    harness = await make_auth_gateway(device=DeviceFlowTiming(expires_in=60, interval=1))
    await harness.auth.add_user(*ADMIN, actor="test", admin=True)
    await harness.auth.add_user(*USER, actor="test")
    return harness


async def cli_run(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = ""
                  ) -> tuple[int, str, str]:
    """``oauth-gateway ARGV`` in a thread: (exit code, stdout, stderr)."""
    capsys.readouterr()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = await asyncio.to_thread(cli.main, list(argv))
    finally:
        sys.stdin = saved
    out, err = capsys.readouterr()
    return code, out, err


async def login(h: AuthHarness, capsys: pytest.CaptureFixture[str],
                person: tuple[str, str] = ADMIN, *, issuer: bool = True) -> tuple[int, str]:
    """``oauth-gateway login --admin --issuer URL`` (without ``issuer``: the URL from
    ``GATEWAY_SERVER``); ``person`` approves the code shown."""
    capsys.readouterr()
    running = asyncio.create_task(asyncio.to_thread(
        cli.main, ["login", "--admin", *(["--issuer", h.issuer] if issuer else [])]))
    said = ""
    for _ in range(200):
        said += capsys.readouterr().err
        found = re.search(r"confirm the code (\S+)", said)
        if found:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no code shown: {said!r}")
    browser = Browser(h.issuer)
    try:
        page = await sign_in(browser, person)
        consent = await browser.submit(page, user_code=found.group(1))
        assert consent.status == 200, consent.text
        done = await browser.submit(consent, "approve")
        assert done.status == 200
    finally:
        await browser.http.close()
    code = await asyncio.wait_for(running, 30)
    return code, said + capsys.readouterr().err


async def test_an_admin_governs_a_server_without_redis(
        h: AuthHarness, capsys: pytest.CaptureFixture[str], redis: Redis,
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    S = h.issuer
    # not signed in yet: told what to run
    code, out, err = await cli_run(capsys, "clients", "list", "--server", S)
    assert code == 1 and not out
    assert f"not logged in to {S}: run oauth-gateway login --admin --issuer {S}" in err

    code, said = await login(h, capsys)
    assert code == 0, said
    assert "Logged in" in said
    path = token_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())[f"{S}|oauth-gateway-cli|admin"]
    assert saved["refresh_token"] and "gateway:admin" in saved["scope"].split()

    # create a device client; listed and shown
    code, out, err = await cli_run(capsys, "clients", "create", "--server", S, "--name",
                                   "Build CLI", "--grant", "device_code", "--scope",
                                   "anaplan:read", "--json")
    assert code == 0, err
    made = json.loads(out)
    cid = made["client_id"]
    assert (made["flow"], made["scopes"], made["name"]) == (
        "device_code", ["anaplan:read"], "Build CLI")
    assert "client_secret" not in made

    code, out, err = await cli_run(capsys, "clients", "list", "--server", S)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith(cid))
    assert "Build CLI" in row and "device_code" in row and "enabled" in row
    assert "oauth-gateway-cli" in out

    # the same fields and values as read from Redis
    code, remote_show, err = await cli_run(capsys, "clients", "show", cid, "--server", S,
                                           "--json")
    assert code == 0, err
    code, remote_list, err = await cli_run(capsys, "clients", "list", "--server", S, "--json")
    assert code == 0, err
    with monkeypatch.context() as m:
        m.setenv("GATEWAY_REDIS_URL", redis_server.url)
        code, local_show, err = await cli_run(capsys, "clients", "show", cid, "--json")
        assert code == 0, err
        code, local_list, err = await cli_run(capsys, "clients", "list", "--json")
    assert json.loads(remote_show) == json.loads(local_show)
    assert json.loads(remote_list) == json.loads(local_list)
    code, out, err = await cli_run(capsys, "clients", "show", cid, "--server", S)
    assert code == 0, err
    assert re.search(rf"^created_at +{STAMP}$", out, re.M), out
    assert re.search(r"^name +Build CLI$", out, re.M)

    # update and a rate limit
    code, out, err = await cli_run(capsys, "clients", "update", cid, "--server", S, "--name",
                                   "Build CLI 2", "--rate-limit", "600/60s")
    assert code == 0, err
    assert out.startswith(f"client {cid} updated; rate limit 600/60s across the fleet")
    assert (await h.auth.get(cid)).name == "Build CLI 2"

    # a person's token of that client works at the gateway, until it is disabled (through
    # GATEWAY_SERVER this time): refused within a second
    tokens = await device_token(h, USER, client_id=cid, scope="anaplan:read")
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await h.client.get("/2/0/workspaces", headers=bearer)).status == 200
    monkeypatch.setenv("GATEWAY_SERVER", S)
    code, out, err = await cli_run(capsys, "clients", "disable", cid, "--reason", "leaked",
                                   "--json")
    assert code == 0, err
    view = json.loads(out)
    assert view == {"client_id": cid, "disabled": True, "reason": "leaked",
                    "updated_by": "api:alice", "updated_at": view["updated_at"]}
    assert view["updated_at"].isdigit()  # as Redis mode prints the fields it wrote
    t0 = time.monotonic()
    while (await h.client.get("/2/0/workspaces", headers=bearer)).status != 401:
        assert time.monotonic() - t0 < 1.0, "the disabled client's token still works"
        await asyncio.sleep(0.05)
    code, out, err = await cli_run(capsys, "clients", "enable", cid)
    assert code == 0, err
    assert out.startswith(f"client {cid} enabled; every gateway replica enforces it")

    # grants: listed (human and JSON), one revoked
    code, out, err = await cli_run(capsys, "grants", "list", "--client", cid, "--json")
    assert code == 0, err
    grants = json.loads(out)
    assert [(g["client_id"], g["user"], g["scope"], g["revoked"]) for g in grants] == [
        (cid, "bob", "anaplan:read", False)]
    code, out, err = await cli_run(capsys, "grants", "list", "--client", cid)
    assert code == 0, err
    assert grants[0]["grant_id"] in out and "bob" in out and "active" in out
    assert re.search(STAMP, out)
    code, remote_users, err = await cli_run(capsys, "users", "list", "--json")
    assert code == 0, err
    monkeypatch.delenv("GATEWAY_SERVER")
    with monkeypatch.context() as m:  # the same as read from Redis
        m.setenv("GATEWAY_REDIS_URL", redis_server.url)
        code, local_grants, err = await cli_run(capsys, "grants", "list", "--client", cid,
                                                "--json")
        assert code == 0, err
        code, local_users, err = await cli_run(capsys, "users", "list", "--json")
        assert code == 0, err
    assert json.loads(local_grants) == grants
    assert json.loads(local_users) == json.loads(remote_users)
    monkeypatch.setenv("GATEWAY_SERVER", S)
    code, out, err = await cli_run(capsys, "grants", "revoke", grants[0]["grant_id"])
    assert code == 0, err
    assert "revoked" in out
    assert (await h.auth.list_grants(client_id=cid))[0].revoked

    # users: listed, added (password on standard input), disabled, enabled, made admin
    code, out, err = await cli_run(capsys, "users", "list", "--json")
    assert code == 0, err
    users = {u["username"]: u for u in json.loads(out)}
    assert users["alice"]["admin"] is True and users["bob"]["admin"] is False
    code, out, err = await cli_run(capsys, "users", "add", "carol", stdin="carol-password-1\n")
    assert code == 0, err
    assert out.strip() == "user carol saved"
    code, out, err = await cli_run(capsys, "users", "list")
    assert code == 0, err
    assert re.search(r"^alice +local +yes +enabled ", out, re.M), out
    assert re.search(r"^carol +local +- +enabled ", out, re.M), out
    code, out, err = await cli_run(capsys, "users", "disable", "bob", "--reason", "left",
                                   "--json")
    assert code == 0, err
    person = json.loads(out)
    assert (person["username"], person["disabled"], person["reason"],
            person["updated_by"]) == ("bob", True, "left", "api:alice")
    code, out, err = await cli_run(capsys, "users", "enable", "bob")
    assert code == 0, err
    assert out.startswith("user bob (subject ") and "enabled" in out
    code, out, err = await cli_run(capsys, "users", "update", "carol", "--admin", "--json")
    assert code == 0, err
    assert json.loads(out)["admin"] is True

    # a confidential client: a new secret, then deleted
    code, out, err = await cli_run(capsys, "clients", "create", "--name", "Batch",
                                   "--grant", "client_credentials", "--json")
    assert code == 0, err
    batch = json.loads(out)
    assert batch["client_secret"]
    code, out, err = await cli_run(capsys, "clients", "rotate-secret", batch["client_id"],
                                   "--grace", "60", "--json")
    assert code == 0, err
    rotated = json.loads(out)
    assert rotated["client_secret"] not in ("", batch["client_secret"])
    assert rotated["grace"] == 60
    code, out, err = await cli_run(capsys, "clients", "delete", batch["client_id"])
    assert code == 0, err
    assert out.strip() == f"client {batch['client_id']} deleted; 0 grants ended"

    # the audit stream names the admin
    code, out, err = await cli_run(capsys, "audit", "tail", "-n", "50", "--json")
    assert code == 0, err
    entries = json.loads(out)
    assert {"client.disabled", "client.enabled", "grant.revoked", "user.disabled"} <= {
        e["action"] for e in entries if e.get("actor") == "api:alice"}
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)  # oldest first
    code, out, err = await cli_run(capsys, "audit", "tail", "-n", "5")
    assert code == 0, err
    assert len(out.splitlines()) == 5 and "actor=api:alice" in out
    assert re.match(STAMP, out)

    # the API's refusals: one line on standard error, a non-zero exit
    refusals: list[tuple[tuple[str, ...], str]] = [
        (("clients", "show", "nope"), "no record for client 'nope'"),
        (("clients", "update", "nope", "--name", "x"), "not found: "),
        (("users", "add", "alice"), "conflict: "),
        (("clients", "create", "--name", "W", "--grant", "authorization_code"),
         "refused: "),
    ]
    for argv, said in refusals:
        code, out, err = await cli_run(capsys, *argv, stdin="some-password-123\n")
        assert code == 1 and not out, (argv, out)
        assert err.startswith(f"oauth-gateway: error: {said}"), (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    code, out, err = await cli_run(capsys, "clients", "create", "--name", "W", "--grant",
                                   "authorization_code")
    assert "redirect" in err.lower()  # the field at fault is named

    # what the API cannot do needs Redis, and says so
    for argv in (("export", "-"), ("tokens", "revoke", "x"), ("secret-keys", "reseal")):
        code, out, err = await cli_run(capsys, *argv)
        assert code == 2 and not out, argv
        assert "needs direct access to Redis" in err and S in err


async def test_the_access_token_is_refreshed_and_the_rotated_refresh_token_kept(
        h: AuthHarness, capsys: pytest.CaptureFixture[str]) -> None:
    code, said = await login(h, capsys)
    assert code == 0, said
    path = token_file()
    key = f"{h.issuer}|oauth-gateway-cli|admin"
    data = json.loads(path.read_text())
    before = data[key]
    data[key]["obtained_at"] = 0  # long expired
    path.write_text(json.dumps(data))
    code, out, err = await cli_run(capsys, "clients", "list", "--server", h.issuer)
    assert code == 0, err
    after = json.loads(path.read_text())[key]
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]  # rotated, and saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # a refused access token (revoked grant): refreshed once, then the login is over
    grant = (await h.auth.list_grants(client_id="oauth-gateway-cli"))[0]
    await h.auth.revoke_grant(grant.grant_id, actor="test")
    code, out, err = await cli_run(capsys, "users", "list", "--server", h.issuer)
    assert code == 1 and not out
    assert f"run oauth-gateway login --admin --issuer {h.issuer}" in err
    assert len(err.strip().splitlines()) == 1


async def test_a_user_without_the_admin_role_is_told_so(
        h: AuthHarness, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SERVER", h.issuer)
    code, said = await login(h, capsys, issuer=False)  # the server's URL is the issuer
    assert code == 0, said
    code, out, err = await cli_run(capsys, "users", "list", "--json")
    assert code == 0, err
    await h.auth.set_admin("alice", False, actor="test")  # taken away after the login
    code, out, err = await cli_run(capsys, "clients", "list")
    assert code == 1 and not out
    assert err.startswith("oauth-gateway: error: forbidden: ")
    assert "admin role" in err and len(err.strip().splitlines()) == 1


async def test_login_admin_needs_no_client_id(
        h: AuthHarness, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await cli_run(capsys, "login", "--admin", "--issuer", h.issuer,
                                   "--client-id", "another")
    assert code == 2 and not out and "drop --client-id" in err
    code, out, err = await cli_run(capsys, "users", "list", "--server", h.issuer + "/",
                                   "--json")
    assert code == 1 and not out and "not logged in" in err

