"""``oauth-gateway export`` and ``import``: a backup of a real server's clients, users and
grants, made through the real endpoints, holds no secret or token in clear, and restored
into an emptied Redis it serves on: the same refresh token refreshes, the client secret
authenticates, the TTLs are kept."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.cli import commands as cli
from gateway.state import backup
from gateway.state.keys import Keys
from tests.conftest import AuthGatewayFactory
from tests.redis_server import RedisServer
from tests.test_flow_code import PASSWORD, USER, Flow, flow, query_of

__all__ = ["flow"]  # the fixture, used by name

SECRET_KEYS = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def cli_on_test_redis(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sees the test Redis and a sealing key, nothing from the shell."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_server.url)
    monkeypatch.setenv("GATEWAY_SECRET_KEYS", SECRET_KEYS)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``oauth-gateway ARGV`` in this process (it runs its own loop): (code, out, err)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def audit_actions(redis: Redis) -> list[dict[str, str]]:
    entries: Any = await redis.xrange("gw:audit")
    return [dict(fields) for _, fields in entries]


async def a_grant(f: Flow) -> tuple[str, str, dict[str, Any], str]:
    """A confidential client, and tokens of alice's grant through /oauth/authorize and
    /oauth/token: (client id, its secret, the token response, the authorization code)."""
    client, secret = await f.client()
    assert secret
    oauth = f.oauth(client, secret)
    url, verifier, state = f.start(oauth)
    callback = await f.approve(url)
    token = await oauth.fetch_token(f.url("/oauth/token"), authorization_response=callback,
                                    code_verifier=verifier, state=state)
    return client.client_id, secret, dict(token), query_of(callback)["code"]


async def refresh(f: Flow, client_id: str, secret: str, refresh_token: str
                  ) -> aiohttp.ClientResponse:
    return await f.h.client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": refresh_token},
        headers={"Authorization": aiohttp.encode_basic_auth(client_id, secret)})


async def test_export_flush_import_and_the_server_serves_on(
        f: Flow, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client_id, secret, token, code = await a_grant(f)
    code_, _, err = await run(capsys, "users", "disable", USER, "--reason", "leave")
    assert code_ == 0, err
    code_, _, err = await run(capsys, "users", "enable", USER)
    assert code_ == 0, err
    r = f.redis
    digest_key = str(await r.get("gw:meta:digest_key"))
    [rt_key] = await r.keys("gw:as:rt:*")
    [at_key] = await r.keys("gw:as:at:*")
    ttl_before = {rt_key: await r.pttl(rt_key), at_key: await r.pttl(at_key)}
    durable_before = sorted(str(k) for k in await r.keys("gw:*") if not str(k).startswith(
        ("gw:audit", "gw:token:", "gw:usage:", "gw:as:session:", "gw:as:rate:", "gw:meta:schema")))

    backup = tmp_path / "backup.jsonl"
    code_, out, err = await run(capsys, "export", str(backup), "--actor", "ops")
    assert code_ == 0, err
    assert f"to {backup}" in out and oct(backup.stat().st_mode & 0o777) == "0o600"
    text = backup.read_text()
    for secret_text in (secret, PASSWORD, token["access_token"], token["refresh_token"], code,
                        digest_key, SECRET_KEYS, "PRIVATE KEY"):
        assert secret_text not in text, f"{secret_text[:8]}… is in the backup in clear"
    lines = [json.loads(line) for line in text.splitlines()]
    header, records = lines[0], lines[1:]
    assert header["format"] == "oauth-gateway-backup" and header["version"] == 1
    assert header["schema"] == 1 and header["keys"] == len(records)
    assert header["digest_key"] == "sealed" and header["time"].endswith("Z")
    names = sorted(rec["key"] for rec in records)
    assert names == sorted(str(k).removeprefix("gw:") for k in durable_before)
    assert not any(n.startswith(("token:", "usage:", "as:session:", "as:rate:", "audit"))
                   for n in names)
    exported = [e for e in await audit_actions(r) if e["action"] == "backup.exported"]
    assert exported and exported[-1]["actor"] == "ops" and \
        exported[-1]["keys"] == str(len(records))

    await r.flushall()
    code_, out, err = await run(capsys, "import", str(backup), "--actor", "ops")
    assert code_ == 0, err
    assert f"imported {len(records)} keys" in out
    for key, before in ttl_before.items():
        after = await r.pttl(key)
        assert before - 10_000 < after <= before, (key, before, after)
    assert await r.get("gw:meta:digest_key") == digest_key
    imported = [e for e in await audit_actions(r) if e["action"] == "backup.imported"]
    assert imported and imported[-1]["keys"] == str(len(records))

    # the restored data serves: the access token, the client secret, the refresh token
    assert await f.api(token["access_token"]) == 200
    bad = await refresh(f, client_id, "not-the-secret", token["refresh_token"])
    assert bad.status == 401
    resp = await refresh(f, client_id, secret, token["refresh_token"])
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert await f.api(body["access_token"]) == 200
    # the grant and its person came back too
    [grant] = await f.h.auth.list_grants(client_id=client_id)
    assert grant.username == USER and not grant.revoked


async def test_import_refuses_existing_keys_unless_replace(
        f: Flow, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client_id, secret, token, _ = await a_grant(f)
    backup = tmp_path / "b.jsonl"
    assert (await run(capsys, "export", str(backup)))[0] == 0
    await f.redis.hset(f"gw:client:{client_id}", "name", "changed since")
    code, _, err = await run(capsys, "import", str(backup))
    assert code == 1 and "exist already" in err and "--replace" in err
    assert await f.redis.hget(f"gw:client:{client_id}", "name") == "changed since"
    code, _, err = await run(capsys, "import", str(backup), "--replace")
    assert code == 0, err
    assert await f.redis.hget(f"gw:client:{client_id}", "name") == "Budget Planner"
    assert (await refresh(f, client_id, secret, token["refresh_token"])).status == 200


def _rewrite(path: Path, header: dict[str, Any] | None = None,
             extra: list[dict[str, Any]] | None = None) -> Path:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0].update(header or {})
    lines.extend(extra or [])
    lines[0]["keys"] = len(lines) - 1
    out = path.with_name("edited-" + path.name)
    out.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return out


@pytest.mark.parametrize(("change", "said"), [
    ({"version": 2}, "format version 2"), ({"schema": 99}, "schema version 99"),
    ({"prefix": "acme:"}, "set GATEWAY_KEY_PREFIX")])
async def test_import_refuses_a_newer_file(
        f: Flow, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        change: dict[str, Any], said: str) -> None:
    await a_grant(f)
    backup = tmp_path / "b.jsonl"
    assert (await run(capsys, "export", str(backup)))[0] == 0
    await f.redis.flushall()
    code, _, err = await run(capsys, "import", str(_rewrite(backup, change)))
    assert code == 1 and said in err and "nothing imported" in err
    assert await f.redis.keys("gw:as:*") == []


async def test_import_refuses_keys_a_backup_does_not_hold(
        f: Flow, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tampered file cannot plant a cached validation (an "active" token)."""
    await a_grant(f)
    backup = tmp_path / "b.jsonl"
    assert (await run(capsys, "export", str(backup)))[0] == 0
    await f.redis.flushall()
    planted = {"key": "token:abc", "type": "string", "pttl": -1, "value": '{"active":true}'}
    code, _, err = await run(capsys, "import", str(_rewrite(backup, extra=[planted])))
    assert code == 1 and "'token:abc' is not a key a backup holds" in err
    assert await f.redis.keys("gw:*") == []
    # a truncated file is refused too
    truncated = tmp_path / "t.jsonl"
    truncated.write_text("\n".join(backup.read_text().splitlines()[:-1]) + "\n")
    code, _, err = await run(capsys, "import", str(truncated))
    assert code == 1 and "truncated" in err


async def test_tokens_expired_since_the_export_are_left_out(
        f: Flow, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, token, _ = await a_grant(f)
    backup = tmp_path / "b.jsonl"
    assert (await run(capsys, "export", str(backup)))[0] == 0
    header = json.loads(backup.read_text().splitlines()[0])
    await f.redis.flushall()
    # as if the backup were an hour old: the access token (35 min) has expired since
    code, out, err = await run(capsys, "import", str(_rewrite(
        backup, {"at": header["at"] - 3600 * 1000})))
    assert code == 0, err
    assert await f.redis.keys("gw:as:at:*") == []
    assert len(await f.redis.keys("gw:as:rt:*")) == 1
    assert "1 expired" in out or "2 expired" in out
    assert await f.api(token["access_token"]) == 401


async def test_export_needs_a_sealing_key_for_the_digest_key(
        make_auth_gateway: AuthGatewayFactory, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    await make_auth_gateway()
    monkeypatch.delenv("GATEWAY_SECRET_KEYS")
    code, _, err = await run(capsys, "export", str(tmp_path / "b.jsonl"))
    assert code == 1 and "GATEWAY_SECRET_KEYS" in err
    assert not (tmp_path / "b.jsonl").exists()
    # with the digest key configured outside Redis, none is needed; the restore checks it
    monkeypatch.setenv("GATEWAY_TOKEN_DIGEST_KEY", "ab" * 32)
    code, _, err = await run(capsys, "export", str(tmp_path / "b.jsonl"))
    assert code == 0, err
    header = json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])
    assert header["digest_key"] == "configured" and "ab" * 32 not in (
        tmp_path / "b.jsonl").read_text()
    monkeypatch.setenv("GATEWAY_TOKEN_DIGEST_KEY", "cd" * 32)
    code, _, err = await run(capsys, "import", str(tmp_path / "b.jsonl"), "--replace")
    assert code == 1 and "GATEWAY_TOKEN_DIGEST_KEY" in err


async def test_export_to_standard_output(
        f: Flow, capsys: pytest.CaptureFixture[str]) -> None:
    await a_grant(f)
    code, out, err = await run(capsys, "export")
    assert code == 0 and "exported" in err
    header = json.loads(out.splitlines()[0])
    assert header["keys"] == len(out.splitlines()) - 1


async def test_the_copy_is_one_moment_while_writes_land(
        redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grants created (record and index together) while the copy is read: every grant
    the index names is in the copy, and no other: the reads were retried, then read by
    one script, never mixed."""
    keys = Keys("gw:")
    scripted = 0
    original = backup._scripted_snapshot

    async def counted(*args: Any) -> Any:
        nonlocal scripted
        scripted += 1
        return await original(*args)

    monkeypatch.setattr(backup, "_scripted_snapshot", counted)
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.as_grant(f"g{n}"), mapping={"user": "u", "n": str(n)})
                pipe.sadd(keys.as_grants, f"g{n}")
                await pipe.execute()
            await asyncio.sleep(0)

    for n in range(200):
        await redis.hset(keys.as_grant(f"seed{n}"), "user", "u")
        await redis.sadd(keys.as_grants, f"seed{n}")
    task = asyncio.create_task(writer())
    try:
        for _ in range(5):
            _, lines = await backup.export(redis, keys, secret_keys=[bytes(32)],
                                           configured_digest_key=None)
            records = {r["key"]: r for r in map(json.loads, lines[1:])}
            index = set(records["as:grants"]["value"])
            grants = {k.removeprefix("as:grant:") for k in records if k.startswith("as:grant:")}
            assert index == grants
    finally:
        stop.set()
        await task
    assert scripted  # the writes overtook the watched reads


async def test_the_script_reads_what_the_watched_reads_read(f: Flow) -> None:
    await a_grant(f)
    await f.redis.zadd("gw:as:user_grants:zz", {"a": 1.5})  # a sorted set and a list too
    await f.redis.rpush("gw:as:grant_tokens:zz", "x", "y")
    keys = Keys("gw:")
    _, watched = await backup._snapshot(f.redis, keys)
    _, scripted = await backup._scripted_snapshot(f.redis, keys)
    assert {r["type"] for r in watched} == {"string", "hash", "set", "zset", "list"}
    for a, b in zip(watched, scripted, strict=True):
        assert abs(a.pop("pttl") - b.pop("pttl")) < 1000
        assert a == b
