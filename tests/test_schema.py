"""The Redis layout operators and older replicas rely on, and the one place that names it.

Key strings are a contract (``redis-cli HSET gw:client:abc disabled 1``; replicas of two
releases sharing one Redis during an upgrade): these tests pin them byte for byte,
through the commands that write them, and guard that no module but
``gateway/state/keys.py`` formats a key.
"""

from __future__ import annotations

import ast
import asyncio
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway.authserver.admin import AuthAdmin
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.models import GRANT_DEVICE
from gateway.cli import commands as cli
from gateway.config.settings import load_settings
from gateway.protocol.tokens import TokenDigester
from gateway.state import events
from gateway.state.connection import claim_schema
from gateway.state.keys import SCHEMA_VERSION, USAGE_KEY_LUA, Keys
from tests.conftest import GatewayFactory
from tests.redis_server import RedisServer

TOKEN = "schema-test-token-8c1d4e"
MARKER = '{"active":false,"revoked":true}'
GATEWAY_SOURCE = Path(__file__).resolve().parent.parent / "gateway"


@pytest.fixture(autouse=True)
def cli_on_test_redis(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sees the test Redis and nothing else from the shell running pytest."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_server.url)


async def oauth_gateway(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``oauth-gateway ARGV`` in this process (it runs its own event loop): its output."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


async def _published(pubsub: PubSub) -> str:
    """The next message heard (the subscription's confirmation read and skipped)."""
    deadline = asyncio.get_running_loop().time() + 2.0
    while asyncio.get_running_loop().time() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            return str(message["data"])
    raise AssertionError("nothing was published")


async def _audit(redis: Redis) -> list[tuple[str, dict[str, str]]]:
    entries: Any = await redis.xrange("gw:audit")
    return [(str(eid), dict(fields)) for eid, fields in entries]


# --- the names ---------------------------------------------------------------------

def test_key_strings_are_unchanged() -> None:
    k = Keys("gw:")
    assert [k.client("abc"), k.client_pattern, k.token("d1"), k.token_pattern, k.audit,
            k.events, k.usage("req", "app1", 29340961), k.usage("tok", "app1", 7),
            k.usage_prefix, k.usage_clients, k.digest_key, k.schema,
            k.client_notifications(3)] == [
        "gw:client:abc", "gw:client:*", "gw:token:d1", "gw:token:*", "gw:audit",
        "gw:events", "gw:usage:req:{app1}:29340961", "gw:usage:tok:{app1}:7",
        "gw:usage:", "gw:usage:clients", "gw:meta:digest_key", "gw:meta:schema",
        "__keyspace@3__:gw:client:*"]
    assert k.client_id_of("gw:client:a:b") == "a:b"
    assert [k.as_clients, k.as_user("ann"), k.as_sso("https://idp", "s1"),
            k.as_sso_state("d"), k.as_session("d"), k.as_authz("d"), k.as_signing_keys,
            k.as_grant("g1"), k.as_grants, k.as_client_grants("c1"), k.as_user_grants("ann"),
            k.as_grant_tokens("g1"), k.as_token("at", "d"), k.as_token("rt", "d"),
            k.as_token_of_member(Keys.grant_token_member("rt", "d")), k.as_rt_spent("d"),
            k.as_code("d"), k.as_code_used("d"), k.as_device("d"), k.as_user_code("ABCD-EFGH"),
            k.as_device_poll("d"), k.as_device_decision("d"), k.as_rate("login:1.2.3.4", 9)
            ] == [
        "gw:as:clients", "gw:as:user:ann", "gw:as:sso:https://idp|s1", "gw:as:sso_state:d",
        "gw:as:session:d", "gw:as:authz:d", "gw:as:signing_keys", "gw:as:grant:g1",
        "gw:as:grants", "gw:as:client_grants:c1", "gw:as:user_grants:ann",
        "gw:as:grant_tokens:g1", "gw:as:at:d", "gw:as:rt:d", "gw:as:rt:d",
        "gw:as:rt_spent:d", "gw:as:code:d", "gw:as:code_used:d", "gw:as:device:d",
        "gw:as:user_code:ABCD-EFGH", "gw:as:device_poll:d", "gw:as:device_decision:d",
        "gw:as:rate:login:1.2.3.4:9"]
    assert Keys("acme/").client("x") == "acme/client:x"


async def test_the_lua_usage_key_is_the_python_one(redis: Redis) -> None:
    script = redis.register_script(
        USAGE_KEY_LUA + "return usage_key(ARGV[1], ARGV[2], ARGV[3], ARGV[4])")
    keys = Keys("gw:")
    for kind, client_id in (("req", "app1"), ("tok", "odd {app} id")):
        assert await script(args=[keys.usage_prefix, kind, client_id, 29340961]) == \
            keys.usage(kind, client_id, 29340961)


def test_events_keep_their_wire_format() -> None:
    assert events.ClientChanged("app1").encode() == '{"type": "client", "client_id": "app1"}'
    assert events.TokenRevoked("d1").encode() == '{"type": "token_revoked", "digest": "d1"}'
    for event in (events.ClientChanged("app1"), events.TokenRevoked("d1")):
        assert events.parse(event.encode()) == event
    # what an older replica hears from a newer one: ignored, not an error
    for unknown in ('{"type": "client_renamed", "client_id": "a"}', '{"type": "client"}',
                    '{"type": "token_revoked", "digest": 5}', "[1]", "not json", "", None):
        assert events.parse(unknown) is None
    # new fields are additive: an older replica still applies what it knows
    assert events.parse('{"type": "client", "client_id": "a", "why": "x"}') == \
        events.ClientChanged("a")


# --- what the commands leave in Redis --------------------------------------------------

async def test_client_record_fields_through_the_cli(
        redis: Redis, capsys: pytest.CaptureFixture[str]) -> None:
    heard = redis.pubsub()
    await heard.subscribe("gw:events")
    await oauth_gateway(capsys, "clients", "disable", "app-s", "--reason", "leak",
                        "--actor", "alice")
    record = await redis.hgetall("gw:client:app-s")
    assert sorted(record) == ["disabled", "reason", "updated_at", "updated_by"]
    assert (record["disabled"], record["reason"], record["updated_by"]) == (
        "1", "leak", "alice")
    assert record["updated_at"].isdigit()
    # what security staff type is read back the same way
    await redis.hset("gw:client:app-s", mapping={"scopes": "anaplan:read", "disabled": "0"})
    shown = await oauth_gateway(capsys, "clients", "show", "app-s", "--json")
    assert '"scopes": "anaplan:read"' in shown and '"disabled": false' in shown
    [(_, entry)] = await _audit(redis)
    assert list(entry) == ["action", "client_id", "actor", "reason", "at"]
    assert (entry["action"], entry["client_id"], entry["actor"]) == (
        "client.disabled", "app-s", "alice")
    assert await _published(heard) == '{"type": "client", "client_id": "app-s"}'
    await heard.aclose()
    assert await redis.get("gw:meta:schema") == str(SCHEMA_VERSION)


async def test_the_prefix_applies_to_every_key(
        redis: Redis, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_KEY_PREFIX", "acme:")
    await oauth_gateway(capsys, "clients", "disable", "app-p", "--actor", "bob")
    await oauth_gateway(capsys, "tokens", "revoke", TOKEN)
    names = sorted(str(name) for name in await redis.keys("*"))
    assert names[:4] == ["acme:audit", "acme:client:app-p", "acme:meta:digest_key",
                         "acme:meta:schema"]
    assert len(names) == 5 and names[4].startswith("acme:token:")


async def test_the_built_in_server_commands_record_the_version(
        redis: Redis, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ISSUER", "http://127.0.0.1:9")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-password\n"))
    await oauth_gateway(capsys, "users", "add", "ann", "--actor", "t")
    assert sorted(await redis.hgetall("gw:as:user:ann")) == [
        "created_at", "password_hash", "sub"]
    assert await redis.get("gw:meta:schema") == str(SCHEMA_VERSION)


async def test_read_only_commands_write_nothing(
        redis: Redis, capsys: pytest.CaptureFixture[str]) -> None:
    await oauth_gateway(capsys, "clients", "list")
    await oauth_gateway(capsys, "audit", "tail")
    assert await redis.keys("*") == []


async def test_revoke_pins_the_token(redis: Redis, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    heard = redis.pubsub()
    await heard.subscribe("gw:events")
    await oauth_gateway(capsys, "tokens", "revoke", TOKEN)
    digest = TokenDigester(bytes.fromhex(str(await redis.get("gw:meta:digest_key")))
                           ).digest(TOKEN)
    assert await redis.get(f"gw:token:{digest}") == MARKER
    assert 0 < await redis.ttl(f"gw:token:{digest}") <= 24 * 3600
    [(_, entry)] = await _audit(redis)
    assert entry == {"action": "token.revoked", "token_digest": digest[:12],
                     "at": entry["at"], "authorization_server": "not configured"}
    assert list(entry) == ["action", "token_digest", "at", "authorization_server"]
    assert await _published(heard) == f'{{"type": "token_revoked", "digest": "{digest}"}}'
    await heard.aclose()
    assert await redis.get("gw:meta:schema") == str(SCHEMA_VERSION)


async def test_ending_a_grant_pins_its_access_tokens(redis_server: RedisServer,
                                                     redis: Redis) -> None:
    settings = load_settings(environ={}, redis_url=redis_server.url,
                             issuer="http://127.0.0.1:9")
    admin = AuthAdmin(redis, settings, TokenDigester(b"k" * 32),
                      AuthServerMetrics(CollectorRegistry()))
    client, _ = await admin.create_client(name="c", grant="device_code", redirect_uris=[],
                                          scopes=["anaplan:read"], actor="t")
    grant = await admin.issuer.new_grant(client, username="ann", sub="u1",
                                         scope="anaplan:read", grant_type=GRANT_DEVICE)
    body = await admin.issuer.issue(client, grant, scope="anaplan:read",
                                    grant_type=GRANT_DEVICE)
    digest = admin.store.digest(body["access_token"])
    assert await redis.smembers(f"gw:as:grant_tokens:{grant.grant_id}") == {
        f"at:{digest}", f"rt:{admin.store.digest(body['refresh_token'])}"}
    await admin.revoke_grant(grant.grant_id, actor="t")
    assert await redis.get(f"gw:token:{digest}") == MARKER
    assert await redis.exists(f"gw:as:at:{digest}") == 0


# --- the schema version ------------------------------------------------------------------

async def test_the_gateway_records_the_schema_version(
        make_gateway: GatewayFactory, redis: Redis) -> None:
    await make_gateway()
    assert await redis.get("gw:meta:schema") == str(SCHEMA_VERSION)


async def test_a_newer_schema_is_warned_about_and_kept(
        make_gateway: GatewayFactory, redis: Redis, caplog: pytest.LogCaptureFixture) -> None:
    newer = str(SCHEMA_VERSION + 1)
    await redis.set("gw:meta:schema", newer)
    with caplog.at_level(logging.WARNING, logger="gateway.state.connection"):
        gw = await make_gateway()
    assert f"knows schema version {SCHEMA_VERSION} only" in caplog.text
    assert await redis.get("gw:meta:schema") == newer
    assert (await gw.admin.get("/readyz")).status == 200  # warned, still serving


async def test_an_older_schema_is_left_as_is(redis: Redis,
                                            caplog: pytest.LogCaptureFixture) -> None:
    await redis.set("gw:meta:schema", "0")
    with caplog.at_level(logging.WARNING):
        assert await claim_schema(redis, Keys("gw:")) == 0
    assert await redis.get("gw:meta:schema") == "0"
    assert caplog.text == ""


# --- nobody else formats a key -------------------------------------------------------------

_PREFIX_NAMES = {"prefix", "key_prefix", "_prefix", "p"}
_KEY_START = re.compile(r"(client|user|token|audit|events|usage|meta|as):[\w{*]")
_LUA_KEY = re.compile(r"\.\.\s*'\w+:")
# a string that looks like a key but is none: the label the signing keys' cipher is
# derived from (a digest input, never stored)
_NOT_KEYS = {"as:signing_keys:encryption/v1"}


def _is_prefix(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in _PREFIX_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr in _PREFIX_NAMES)


def _text(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) \
        else None


def _offences(source: str) -> list[str]:
    """Where ``source`` builds a Redis key itself (line: what)."""
    found: list[str] = []
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr)}
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.JoinedStr):  # f"{prefix}client:{id}"
            for a, b in zip(node.values, node.values[1:], strict=False):
                after = _text(b)
                if isinstance(a, ast.FormattedValue) and _is_prefix(a.value) and after \
                        and after[:1].isalpha():
                    found.append(f"{line}: f-string of the key prefix and {after!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and (  # prefix + "x"
                (_is_prefix(node.left) and _text(node.right) is not None)
                or (_is_prefix(node.right) and _text(node.left) is not None)):
            found.append(f"{line}: the key prefix concatenated with a string")
        text = _text(node) if isinstance(node, ast.expr) else None
        if text is None or text in _NOT_KEYS or id(node) in docstrings:
            continue
        if text.startswith("gw:") and len(text) > 3:
            found.append(f"{line}: a literal key {text[:40]!r}")
        elif _KEY_START.match(text) or "__keyspace@" in text:
            found.append(f"{line}: a key fragment {text[:40]!r}")
        elif "redis.call" in text and _LUA_KEY.search(text):
            found.append(f"{line}: a Lua script building a key")
    return found


def test_the_guard_catches_what_it_should() -> None:
    for bad in ('f"{self.prefix}client:{cid}"', 'f"{settings.key_prefix}audit"',
                'f"{self.store.p}as:session:{d}"', 'key_prefix + "token:"',
                'k = "gw:client:x"', 'f"__keyspace@{db}__:{k}"', 'x = "usage:clients"',
                'lua = "redis.call(\'GET\', prefix .. \'req:{\' .. cid)"'):
        assert _offences(bad), bad
    for fine in ('f"{self._prefix}{next(counter):016x}"', 'prefix + secrets.token_hex()',
                 '"""Keys live under ``{prefix}client:{id}``."""', 'default = "gw:"',
                 '"""``__keyspace@{db}__:{prefix}client:*`` tells of changes."""',
                 'f"token:     {creds}"', 'store.digest("as:signing_keys:encryption/v1")'):
        assert not _offences(fine), fine


def test_no_module_but_keys_formats_a_key() -> None:
    offences: dict[str, Any] = {}
    for path in sorted(GATEWAY_SOURCE.rglob("*.py")):
        if path == GATEWAY_SOURCE / "state" / "keys.py":
            continue
        found = _offences(path.read_text())
        if found:
            offences[str(path.relative_to(GATEWAY_SOURCE.parent))] = found
    assert offences == {}, "name Redis keys through gateway.state.keys.Keys"
