"""People governance: ``gw:user:{subject}`` refuses every token of one person, on every
replica, through the CLI (100 ms) or plain ``redis-cli`` (1 s)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.cli import commands as cli
from gateway.state import events
from gateway.state.keys import Keys
from tests.conftest import AuthGatewayFactory, AuthServer, GatewayFactory

TOKEN = "tok-person-0123456789"
OTHER = "tok-other-person-0123"
NO_SUBJECT = "tok-no-subject-012345"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_key_and_event_names() -> None:
    keys = Keys("gw:")
    assert keys.user("8a81b09e") == "gw:user:8a81b09e"
    assert keys.user_notifications(0) == "__keyspace@0__:gw:user:*"
    assert keys.as_user("ann") != keys.user("ann")  # the built-in server's users differ
    event = events.UserChanged("8a81b09e")
    assert json.loads(event.encode()) == {"type": "user", "subject": "8a81b09e"}
    assert events.parse(event.encode()) == event
    assert events.parse('{"type": "user"}') is None


async def test_cli_disable_reaches_every_replica_within_100ms(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    auth_server.issue(TOKEN, client_id="app-p1", sub="person-1")
    auth_server.issue(OTHER, client_id="app-p1", sub="person-2")
    # polling slowed right down: only the published event can meet the bound
    replicas = [await make_gateway(client_refresh_interval=30, keyspace_notifications=False)
                for _ in range(2)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    monkeypatch.setenv("GATEWAY_REDIS_URL", replicas[0].gw.settings.redis_url)
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["users", "disable", "person-1", "--reason",
                                              "left the company", "--actor", "alice"])
    assert code == 0
    delays = await asyncio.gather(*[gw.until_status(401, 1.0, HEADERS) for gw in replicas])
    assert max(delays) < 0.1, delays
    assert "subject person-1 disabled" in capsys.readouterr().out

    resp = await replicas[1].client.get("/2/0/x", headers=HEADERS)
    assert resp.status == 401
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert (await resp.json())["error"] == "invalid_token"
    # another person's token of the same client is untouched
    assert (await replicas[1].client.get("/2/0/x", headers=bearer(OTHER))).status == 200

    record = await redis.hgetall("gw:user:person-1")
    assert record["disabled"] == "1"
    assert record["reason"] == "left the company" and record["updated_by"] == "alice"
    entries: Any = await redis.xrange("gw:audit")
    entry = entries[-1][1]
    assert (entry["action"], entry["subject"], entry["actor"], entry["reason"]) == (
        "user.disabled", "person-1", "alice", "left the company")
    metrics = await replicas[0].metrics()
    assert 'gateway_auth_decisions_total{client_id="app-p1",decision="user_disabled"}' \
        in metrics
    assert any(line["decision"] == "user_disabled" for line in replicas[0].log_lines())

    assert await asyncio.to_thread(cli.main, ["users", "enable", "person-1"]) == 0
    await asyncio.gather(*[gw.until_status(200, 1.0, HEADERS) for gw in replicas])
    entries = await redis.xrange("gw:audit")
    assert entries[-1][1]["action"] == "user.enabled"


@pytest.mark.parametrize("keyspace", [True, False], ids=["keyspace-events", "polling-only"])
async def test_redis_cli_hset_reaches_replicas_within_1s(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        keyspace: bool) -> None:
    auth_server.issue(TOKEN, client_id="app-p2", sub="person-3")
    if not keyspace:
        await redis.config_set("notify-keyspace-events", "")
    replicas = [await make_gateway(keyspace_notifications=keyspace) for _ in range(2)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    # what security staff type: HSET gw:user:person-3 disabled 1 (no event published)
    await redis.hset("gw:user:person-3", "disabled", "1")
    delays = await asyncio.gather(*[gw.until_status(401, 2.0, HEADERS) for gw in replicas])
    assert max(delays) < 1.0, delays
    if keyspace:
        assert max(delays) < 0.1, delays
    await redis.hset("gw:user:person-3", "disabled", "0")
    await asyncio.gather(*[gw.until_status(200, 2.0, HEADERS) for gw in replicas])
    await redis.config_set("notify-keyspace-events", "")


@pytest.mark.parametrize("keyspace", [True, False], ids=["complete", "per-subject"])
async def test_a_record_made_before_the_first_request_is_enforced(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        keyspace: bool) -> None:
    auth_server.issue(TOKEN, client_id="app-p3", sub="person-4")
    await redis.hset("gw:user:person-4", "disabled", "1")
    gw = await make_gateway(keyspace_notifications=keyspace)
    assert gw.gw.running().users.complete is keyspace
    assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 401
    await redis.delete("gw:user:person-4")
    await redis.config_set("notify-keyspace-events", "")


@pytest.mark.parametrize("keyspace", [True, False], ids=["complete", "per-subject"])
async def test_the_hot_path_reads_nothing_for_people_without_a_record(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis,
        keyspace: bool) -> None:
    auth_server.issue(NO_SUBJECT, client_id="app-p4", sub=None)
    auth_server.issue(TOKEN, client_id="app-p4", sub="person-5")
    await redis.hset("gw:user:None", "disabled", "1")  # no stray "None" subject either
    await redis.hset("gw:user:", "disabled", "1")
    gw = await make_gateway(keyspace_notifications=keyspace)
    users = gw.gw.running().users
    for _ in range(3):
        assert (await gw.client.get("/2/0/x", headers=bearer(NO_SUBJECT))).status == 200
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    if keyspace:  # complete: the records alone are mirrored, no subject was read
        assert users.disabled == {"None": True, "": True}
    else:  # per subject: read once, then mirrored as having no record
        assert users.disabled == {"person-5": False}
    await redis.delete("gw:user:None", "gw:user:")
    await redis.config_set("notify-keyspace-events", "")


async def test_notifications_turned_off_fall_back_to_reading_per_subject(
        make_gateway: GatewayFactory, auth_server: AuthServer, redis: Redis) -> None:
    auth_server.issue(TOKEN, client_id="app-p5", sub="person-6")
    gw = await make_gateway()
    users = gw.gw.running().users
    assert users.complete
    await redis.config_set("notify-keyspace-events", "")  # say, by another tool
    deadline = time.monotonic() + 2
    while users.complete:
        assert time.monotonic() < deadline, "the mirror still believes it is complete"
        await asyncio.sleep(0.05)
    await redis.hset("gw:user:person-6", "disabled", "1")  # no notification of this
    assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 401
    await redis.delete("gw:user:person-6")


async def _builtin_token(h: Any, username: str) -> tuple[str, str]:
    """A local user of the built-in server and an access token issued to them:
    ``(the user's subject, the token)``."""
    await h.auth.add_user(username, "correct horse battery", actor="test")
    subject = (await h.auth.store.get_user(username))["sub"]
    client, _ = await h.auth.create_client(
        name="people", grant="device_code", redirect_uris=[],
        scopes=["anaplan:read anaplan:write"], actor="test")
    grant = await h.auth.issuer.new_grant(client, username=username, sub=subject,
                                          scope="anaplan:read",
                                          grant_type=client.grant_type, label="laptop")
    body = await h.auth.issuer.issue(client, grant, scope="anaplan:read",
                                     grant_type=client.grant_type)
    return subject, str(body["access_token"])


async def test_builtin_users_by_username_with_json(
        make_auth_gateway: AuthGatewayFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    replicas = [await make_auth_gateway(client_refresh_interval=30,
                                        keyspace_notifications=False) for _ in range(2)]
    subject, token = await _builtin_token(replicas[0], "carol")
    assert subject.startswith("u_")
    for h in replicas:
        assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 200
    monkeypatch.setenv("GATEWAY_REDIS_URL", replicas[0].gw.settings.redis_url)
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["users", "disable", "carol", "--json",
                                              "--reason", "on leave", "--actor", "bob"])
    assert code == 0
    delays = await asyncio.gather(*[h.until_status(401, 1.0, bearer(token))
                                    for h in replicas])
    assert max(delays) < 0.1, delays
    answer = json.loads(capsys.readouterr().out)
    assert answer["subject"] == subject and answer["username"] == "carol"
    assert answer["disabled"] is True and answer["reason"] == "on leave"
    assert answer["updated_by"] == "bob"
    record = await redis.hgetall(f"gw:user:{subject}")
    assert record["disabled"] == "1" and record["username"] == "carol"
    entries: Any = await redis.xrange("gw:audit")
    entry = entries[-1][1]
    assert (entry["action"], entry["subject"], entry["user"], entry["actor"]) == (
        "user.disabled", subject, "carol", "bob")
    # named by the subject itself, as an external server's person would be
    code = await asyncio.to_thread(cli.main, ["users", "enable", subject, "--json"])
    assert code == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["subject"] == subject and answer["username"] is None
    assert answer["disabled"] is False
    await asyncio.gather(*[h.until_status(200, 1.0, bearer(token)) for h in replicas])


async def test_builtin_user_by_raw_hset_within_1s(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h = await make_auth_gateway()
    subject, token = await _builtin_token(h, "dave")
    assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 200
    await redis.hset(f"gw:user:{subject}", "disabled", "1")
    assert await h.until_status(401, 2.0, bearer(token)) < 1.0
    await redis.hset(f"gw:user:{subject}", "disabled", "0")
    await h.until_status(200, 2.0, bearer(token))


async def test_cli_failures_exit_non_zero(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        redis: Redis) -> None:
    from tests.redis_server import free_port

    monkeypatch.setenv("GATEWAY_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    assert await asyncio.to_thread(cli.main, ["users", "disable", "someone"]) == 1
    assert "Redis" in capsys.readouterr().err
    assert time.monotonic() - started < 30
    url = redis.connection_pool.connection_kwargs
    monkeypatch.setenv("GATEWAY_REDIS_URL", f"redis://{url['host']}:{url['port']}/0")
    assert await asyncio.to_thread(cli.main, ["users", "disable", ""]) == 1
    assert "subject" in capsys.readouterr().err


async def test_a_disabled_builtin_person_gets_nothing_from_the_server_either(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    """The server answers as the gateway does: no session, no new token, introspection
    inactive; enabled again, all of it works."""
    from tests.test_authserver_core import _refresh
    from tests.test_flow_code import Forms

    h = await make_auth_gateway()
    await h.auth.add_user("erin", "erin-password-1", actor="test")
    subject = (await h.auth.store.get_user("erin"))["sub"]
    client, _ = await h.auth.create_client(name="erin's app", grant="device_code",
                                           redirect_uris=[], scopes=["anaplan:read"],
                                           actor="test")
    grant = await h.auth.issuer.new_grant(client, username="erin", sub=subject,
                                          scope="anaplan:read", grant_type=client.grant_type,
                                          label="laptop")
    body = await h.auth.issuer.issue(client, grant, scope="anaplan:read",
                                     grant_type=client.grant_type)
    access, refresh = str(body["access_token"]), str(body["refresh_token"])

    async def sign_in() -> tuple[int, str]:
        page = Forms(await (await h.client.get("/oauth/login")).text()).one()
        resp = await h.client.post("/oauth/login", allow_redirects=False, data={
            **page["fields"], "username": "erin", "password": "erin-password-1"})
        return resp.status, await resp.text()

    await h.auth.set_user_disabled("erin", True, actor="test", reason="left")
    assert await h.until_status(401, 1.0, bearer(access)) < 1.0
    assert await h.auth.issuer.introspect(access) == {"active": False}
    assert await h.auth.issuer.introspect(refresh) == {"active": False}
    resp = await _refresh(h, client.client_id, refresh)
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_grant"
    status, text = await sign_in()
    assert status == 403 and "This account is disabled" in text
    assert "gw_session" not in {c.key for c in h.client.session.cookie_jar}
    stream: Any = await redis.xrange("gw:audit")
    assert (stream[-1][1]["action"], stream[-1][1]["reason"]) == ("login.failed",
                                                                  "user_disabled")

    await h.auth.set_user_disabled("erin", False, actor="test")
    await h.until_status(200, 1.0, bearer(access))
    assert (await h.auth.issuer.introspect(access))["active"] is True
    assert (await _refresh(h, client.client_id, refresh)).status == 200
    assert (await sign_in())[0] == 303
