"""Machine clients: the client credentials grant (RFC 6749 section 4.4) of the built-in
server, and what the gateway lets their tokens reach.

The machine is Authlib's ``AsyncOAuth2Client``; the upstream that serves machines is
the Anaplan stand-in in ``credentials: service`` mode (the gateway signs in itself), and
the one that does not is the recording upstream in ``forward`` mode.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import aiohttp
import jwt
import pytest
from authlib.integrations.base_client import (  # type: ignore[import-untyped]
    OAuthError as AuthlibError,
)
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]
from redis.asyncio import Redis

from gateway.authn.validators.base import TokenInfo
from gateway.authserver.models import GRANT_CLIENT_CREDENTIALS, OAuthClient
from gateway.cli import commands as cli
from tests.conftest import AuthGatewayFactory, AuthHarness, Upstream
from tests.redis_server import RedisServer
from tests.test_service_mode import KEY_A, Anaplan, anaplan, ca  # noqa: F401  (fixtures)

POLICY = """
identities:
  integration:
    kind: anaplan-certificate
    auth_url: {service}
    certificate_file: {cert}
    private_key_file: {key}
upstreams:
  anaplan:
    url: {service}
    credentials: service
    identity: integration
  api:
    url: {upstream}
  people:
    url: {upstream}
    credentials: user
routes:
  - name: service
    upstream: anaplan
    path: /2/0/**
    scopes: [anaplan:read]
  - name: forwarded
    upstream: api
    path: /fwd/**
    scopes: [anaplan:read]
  - name: as-a-person
    upstream: people
    path: /user/**
    scopes: [anaplan:read]
"""

SCOPES = "anaplan:read anaplan:write"


async def start(make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan,  # noqa: F811
                upstream: Upstream, **settings: Any) -> AuthHarness:
    """A gateway with its built-in server, a service-mode route (``/2/0/**``, the
    Anaplan stand-in) and a forward-mode one (``/fwd/**``, the recording upstream)."""
    text = POLICY.format(service=anaplan.url, cert=anaplan.cert, key=anaplan.key,
                         upstream=upstream.url)
    return await make_auth_gateway(text.replace("{", "{{").replace("}", "}}"),
                                   secret_keys=KEY_A, **settings)


async def machine(h: AuthHarness, scopes: str = SCOPES) -> tuple[OAuthClient, str]:
    client, secret = await h.auth.create_client(
        name="Nightly export", grant="client_credentials", redirect_uris=[], scopes=[scopes],
        actor="test")
    assert secret
    return client, secret


async def fetch_token(h: AuthHarness, client_id: str, secret: str, **kwargs: Any
                      ) -> dict[str, Any]:
    """A token as a machine gets it: Authlib, ``client_secret_basic``."""
    async with AsyncOAuth2Client(client_id=client_id, client_secret=secret, trust_env=False,
                                 token_endpoint_auth_method="client_secret_basic") as oauth:
        token = await oauth.fetch_token(h.issuer + "/oauth/token",
                                        grant_type="client_credentials", **kwargs)
    return dict(token)


def bearer(token: dict[str, Any] | str) -> dict[str, str]:
    value = token if isinstance(token, str) else token["access_token"]
    return {"Authorization": f"Bearer {value}"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(client_id, secret)}


# --- the administrator creates one -----------------------------------------------------------

async def test_cli_creates_a_confidential_machine_client(
        redis_server: RedisServer, redis: Redis, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_server.url)
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, [
        "clients", "create", "--name", "Nightly export", "--grant", "client_credentials",
        "--scope", "anaplan:read anaplan:bulk", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    view = json.loads(out)
    assert view["client_secret"] and view["client_id"]
    assert (view["flow"], view["grant_type"]) == ("client_credentials", "client_credentials")
    assert view["confidential"] is True and view["redirect_uris"] == []
    assert view["scopes"] == ["anaplan:read", "anaplan:bulk"]
    stored = await redis.hgetall(f"gw:client:{view['client_id']}")
    assert stored["grant_type"] == "client_credentials"
    assert view["client_secret"] not in json.dumps(stored)
    # a machine has only its secret: no public machine client, no redirect URIs
    for extra in (["--public"], ["--redirect-uri", "https://app.example.com/cb"]):
        code = await asyncio.to_thread(cli.main, [
            "clients", "create", "--name", "x", "--grant", "client_credentials", *extra])
        assert code == 1
    assert "client_credentials" in capsys.readouterr().err


# --- the token endpoint ---------------------------------------------------------------------

async def test_token_has_no_refresh_token_and_no_person(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan,  # noqa: F811
        upstream: Upstream) -> None:
    h = await start(make_auth_gateway, anaplan, upstream)
    meta = await (await h.client.get("/.well-known/oauth-authorization-server")).json()
    assert GRANT_CLIENT_CREDENTIALS in meta["grant_types_supported"]
    client, secret = await machine(h)
    token = await fetch_token(h, client.client_id, secret)
    assert "refresh_token" not in token  # section 4.4.3
    assert token["token_type"].lower() == "bearer" and token["expires_in"] > 0
    assert token["scope"] == SCOPES
    narrowed = await fetch_token(h, client.client_id, secret, scope="anaplan:read")
    assert narrowed["scope"] == "anaplan:read"
    info = await h.gw.running().cache.validator.validate(narrowed["access_token"])
    assert info.active and info.machine and info.sub is None and info.username is None
    assert info.client_id == client.client_id and info.scopes == {"anaplan:read"}
    # both tokens belong to the client's one standing grant, which has no user
    [grant] = await h.auth.list_grants(client_id=client.client_id)
    assert (grant.grant_type, grant.username, grant.sub) == (GRANT_CLIENT_CREDENTIALS, "", "")
    # introspection names no person either
    rs, rs_secret = await h.auth.create_client(
        name="rs", grant="authorization_code", redirect_uris=["https://rs.example.com/cb"],
        scopes=[], actor="t", introspect=True)
    assert rs_secret
    resp = await h.client.post("/oauth/introspect", data={"token": token["access_token"]},
                               headers=basic(rs.client_id, rs_secret))
    answer = await resp.json()
    assert answer["active"] is True and answer["client_id"] == client.client_id
    assert "sub" not in answer and "username" not in answer


async def test_jwt_access_token_names_the_client_as_subject(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan,  # noqa: F811
        upstream: Upstream) -> None:
    """RFC 9068 section 2.2: with no resource owner, ``sub`` identifies the client; the
    gateway still knows the token for a machine's (from its record, not the JWT)."""
    h = await start(make_auth_gateway, anaplan, upstream, as_access_token_format="jwt")
    client, secret = await machine(h)
    token = await fetch_token(h, client.client_id, secret)
    claims = jwt.decode(token["access_token"], options={"verify_signature": False})
    assert claims["sub"] == claims["client_id"] == client.client_id
    info = await h.gw.running().cache.validator.validate(token["access_token"])
    assert info.machine and info.sub is None
    assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 200
    assert (await h.client.get("/fwd/x", headers=bearer(token))).status == 403


async def test_client_secret_post_scope_and_secret_refusals(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    client, secret = await machine(h)
    url = "/oauth/token"
    resp = await h.client.post(url, data={
        "grant_type": "client_credentials", "client_id": client.client_id,
        "client_secret": secret})
    assert resp.status == 200 and "refresh_token" not in await resp.json()
    resp = await h.client.post(url, data={"grant_type": "client_credentials",
                                          "scope": "anaplan:read anaplan:admin"},
                               headers=basic(client.client_id, secret))
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_scope")
    resp = await h.client.post(url, data={"grant_type": "client_credentials"},
                               headers=basic(client.client_id, secret + "x"))
    assert (resp.status, (await resp.json())["error"]) == (401, "invalid_client")
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    with pytest.raises(AuthlibError) as caught:
        await fetch_token(h, client.client_id, "wrong")
    assert caught.value.error == "invalid_client"
    # the client has no refresh token, and no other flow
    resp = await h.client.post(url, data={"grant_type": "refresh_token",
                                          "refresh_token": "gwrt_nothing"},
                               headers=basic(client.client_id, secret))
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")
    resp = await h.client.post("/oauth/device_authorization",
                               data={"client_id": client.client_id},
                               headers=basic(client.client_id, secret))
    assert (resp.status, (await resp.json())["error"]) == (400, "unauthorized_client")
    resp = await h.client.get("/oauth/authorize", params={
        "client_id": client.client_id, "response_type": "code",
        "redirect_uri": "https://app.example.com/cb", "code_challenge": "x" * 43,
        "code_challenge_method": "S256"}, allow_redirects=False)
    assert resp.status == 400 and "client credentials" in await resp.text()


async def test_other_clients_may_not_use_the_grant(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    device, _ = await h.auth.create_client(name="cli", grant="device_code", redirect_uris=[],
                                           scopes=[SCOPES], actor="t")
    resp = await h.client.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": device.client_id})
    body = await resp.json()
    assert (resp.status, body["error"]) == (400, "unauthorized_client")
    assert "device_code" in body["error_description"]
    web, secret = await h.auth.create_client(
        name="web", grant="authorization_code", redirect_uris=["https://app.example.com/cb"],
        scopes=[SCOPES], actor="t")
    assert secret
    with pytest.raises(AuthlibError) as caught:
        await fetch_token(h, web.client_id, secret)
    assert caught.value.error == "unauthorized_client"
    assert await h.auth.list_grants() == []


# --- the gateway ----------------------------------------------------------------------------

async def test_machine_token_reaches_service_upstreams_only(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan,  # noqa: F811
        upstream: Upstream) -> None:
    h = await start(make_auth_gateway, anaplan, upstream)
    client, secret = await machine(h)
    token = await fetch_token(h, client.client_id, secret)
    resp = await h.client.get("/2/0/workspaces", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    [sent] = anaplan.standin.api_authorizations
    [identity_token] = anaplan.standin.tokens
    assert sent == f"AnaplanAuthToken {identity_token}"
    assert token["access_token"] not in sent
    # the client's token forwarded as is: refused, and nothing reaches the upstream
    resp = await h.client.get("/fwd/x", headers=bearer(token))
    assert resp.status == 403
    body = await resp.json()
    assert body["error"] == "access_denied"
    assert "machine client" in body["error_description"]
    assert upstream.received == []
    metrics = await h.metrics()
    assert (f'gateway_auth_decisions_total{{client_id="{client.client_id}",'
            'decision="machine_token_refused"} 1.0') in metrics
    # user mode acts for a person, and a machine token has none
    resp = await h.client.get("/user/x", headers=bearer(token))
    assert resp.status == 403 and (await resp.json())["error"] == "access_denied"
    # a cached answer says the same: the machine mark survives the cache
    assert (await h.client.get("/fwd/x", headers=bearer(token))).status == 403
    assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 200
    assert upstream.received == []


async def test_disabling_the_client_refuses_its_tokens(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan,  # noqa: F811
        upstream: Upstream) -> None:
    h = await start(make_auth_gateway, anaplan, upstream)
    client, secret = await machine(h)
    token = await fetch_token(h, client.client_id, secret)
    assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 200
    await h.auth.set_disabled(client.client_id, True, actor="t", reason="leaked")
    await h.until_status(401, 1.0, bearer(token))
    with pytest.raises(AuthlibError) as caught:
        await fetch_token(h, client.client_id, secret)
    assert caught.value.error == "invalid_client"
    await h.auth.set_disabled(client.client_id, False, actor="t")
    await h.until_status(200, 1.0, bearer(token))


async def test_revoking_the_access_token_refuses_it(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan,  # noqa: F811
        upstream: Upstream) -> None:
    h = await start(make_auth_gateway, anaplan, upstream)
    client, secret = await machine(h)
    token = await fetch_token(h, client.client_id, secret)
    other = await fetch_token(h, client.client_id, secret)
    for t in (token, other):
        assert (await h.client.get("/2/0/x", headers=bearer(t))).status == 200
    resp = await h.client.post("/oauth/revoke", data={"token": token["access_token"]},
                               headers=basic(client.client_id, secret))
    assert resp.status == 200
    assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 401
    assert (await h.client.get("/2/0/x", headers=bearer(other))).status == 200
    # ending the grant ends every token of it; the next request starts a new grant
    [grant] = await h.auth.list_grants(client_id=client.client_id)
    await h.auth.revoke_grant(grant.grant_id, actor="t")
    assert (await h.client.get("/2/0/x", headers=bearer(other))).status == 401
    fresh = await fetch_token(h, client.client_id, secret)
    assert (await h.client.get("/2/0/x", headers=bearer(fresh))).status == 200
    grants = await h.auth.list_grants(client_id=client.client_id)
    assert sorted(g.revoked for g in grants) == [False, True]


async def test_people_governance_leaves_machines_alone(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan,  # noqa: F811
        upstream: Upstream, redis: Redis) -> None:
    h = await start(make_auth_gateway, anaplan, upstream)
    client, secret = await machine(h)
    token = await fetch_token(h, client.client_id, secret)
    # a person record under an empty subject, or the client's id, is no machine's
    await redis.hset("gw:user:", mapping={"disabled": "1"})
    await redis.hset(f"gw:user:{client.client_id}", mapping={"disabled": "1"})
    await asyncio.sleep(0.2)
    assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 200


# --- the cached form ------------------------------------------------------------------------

def test_token_info_json_keeps_the_machine_mark_and_reads_older_entries() -> None:
    machine_info = TokenInfo(active=True, client_id="m", scopes=frozenset({"a"}), exp=5.0,
                             machine=True)
    assert TokenInfo.from_json(machine_info.to_json()) == machine_info
    person = TokenInfo(active=True, client_id="c", scopes=frozenset({"a"}), exp=5.0,
                       sub="u_1", username="alice")
    # a person's entry keeps the form older replicas wrote and read
    assert "machine" not in person.to_json()
    older = ('{"active":true,"client_id":"c","scope":"a","exp":5.0,"sub":"u_1",'
             '"username":"alice"}')
    assert TokenInfo.from_json(older) == person and not TokenInfo.from_json(older).machine
