"""The built-in server's core: metadata, refresh rotation and reuse, introspection,
revocation, grants, and the gateway validating its tokens in-process."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.authserver.models import GRANT_DEVICE
from tests.conftest import AuthGatewayFactory, AuthHarness


async def _grant(h: AuthHarness, *, grant: str = "device_code", scope: str = "anaplan:read",
                 **policy: object) -> tuple[str, str | None, dict[str, object]]:
    """A client with one grant and its first tokens (issued directly, as a flow would)."""
    client, secret = await h.auth.create_client(
        name="t", grant=grant, redirect_uris=["http://127.0.0.1/cb"] if grant != "device_code"
        else [], scopes=["anaplan:read anaplan:write"], actor="test", policy=dict(policy))
    g = await h.auth.issuer.new_grant(client, username="alice", sub="u1", scope=scope,
                                      grant_type=client.grant_type, label="laptop")
    body = await h.auth.issuer.issue(client, g, scope=scope, grant_type=client.grant_type)
    return client.client_id, secret, body


async def _refresh(h: AuthHarness, client_id: str, refresh: str,
                   secret: str | None = None) -> aiohttp.ClientResponse:
    headers = {"Authorization": basic(client_id, secret)} if secret else {}
    data = {"grant_type": "refresh_token", "refresh_token": refresh}
    if not secret:
        data["client_id"] = client_id
    return await h.client.post("/oauth/token", data=data, headers=headers)


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


async def test_metadata_names_every_endpoint(make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    resp = await h.client.get("/.well-known/oauth-authorization-server")
    assert resp.status == 200
    meta = await resp.json()
    assert meta["issuer"] == h.issuer
    for name in ("authorization_endpoint", "token_endpoint", "device_authorization_endpoint",
                 "introspection_endpoint", "revocation_endpoint"):
        assert meta[name].startswith(h.issuer + "/oauth/")
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert GRANT_DEVICE in meta["grant_types_supported"]
    assert meta["authorization_response_iss_parameter_supported"] is True


async def test_gateway_accepts_builtin_tokens_in_process(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    _, _, body = await _grant(h)
    resp = await h.client.get("/2/0/workspaces",
                              headers={"Authorization": f"Bearer {body['access_token']}"})
    assert resp.status == 200
    resp = await h.client.post("/2/0/workspaces", data=b"{}",
                               headers={"Authorization": f"Bearer {body['access_token']}"})
    assert resp.status == 403
    assert body["expires_in"] == 2100


async def test_rotating_refresh_and_reuse_kills_the_grant(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h = await make_auth_gateway()
    client_id, _, first = await _grant(h)
    resp = await _refresh(h, client_id, str(first["refresh_token"]))
    assert resp.status == 200
    second = await resp.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert resp.headers["Cache-Control"] == "no-store"
    new_at = second["access_token"]
    assert (await h.client.get("/2/0/x", headers={"Authorization": f"Bearer {new_at}"})
            ).status == 200
    # replaying the spent refresh token revokes the whole family
    resp = await _refresh(h, client_id, str(first["refresh_token"]))
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_grant"
    resp = await _refresh(h, client_id, second["refresh_token"])
    assert resp.status == 400
    assert (await h.client.get("/2/0/x", headers={"Authorization": f"Bearer {new_at}"})
            ).status == 401
    stream: Any = await redis.xrange("gw:audit")
    entries = [e[1]["action"] for e in stream]
    assert "refresh.reuse_detected" in entries and "grant.revoked" in entries
    assert 'gateway_as_refresh_reuse_detected_total{client_id="' + client_id in await h.metrics()


async def test_non_rotatable_refresh_returns_the_same_token(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    client_id, _, first = await _grant(h, refresh_mode="non_rotatable", refresh_token_ttl=86400)
    for _ in range(2):
        resp = await _refresh(h, client_id, str(first["refresh_token"]))
        assert resp.status == 200
        assert (await resp.json())["refresh_token"] == first["refresh_token"]


async def test_refresh_bound_to_client_and_scope(make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    client_id, _, first = await _grant(h)
    other, _, _ = await _grant(h)
    resp = await _refresh(h, other, str(first["refresh_token"]))
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")
    resp = await h.client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": first["refresh_token"],
        "client_id": client_id, "scope": "anaplan:write"})
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_scope")


async def test_introspection_requires_a_confidential_client(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    device_client, _, body = await _grant(h)
    rs, rs_secret = await h.auth.create_client(
        name="resource server", grant="authorization_code",
        redirect_uris=["https://rs.example.com/cb"], scopes=[], actor="t", introspect=True)
    assert rs_secret
    token = body["access_token"]
    resp = await h.client.post("/oauth/introspect", data={"token": token})
    assert resp.status == 401
    resp = await h.client.post("/oauth/introspect", data={"token": token, "client_id":
                                                            device_client})
    assert resp.status == 401
    resp = await h.client.post("/oauth/introspect", data={"token": token},
                               headers={"Authorization": basic(rs.client_id, "wrong")})
    assert resp.status == 401
    resp = await h.client.post("/oauth/introspect", data={"token": token},
                               headers={"Authorization": basic(rs.client_id, rs_secret)})
    answer = await resp.json()
    assert answer["active"] is True and answer["client_id"] == device_client
    assert answer["scope"] == "anaplan:read" and answer["iss"] == h.issuer
    resp = await h.client.post("/oauth/introspect", data={"token": "nope"},
                               headers={"Authorization": basic(rs.client_id, rs_secret)})
    assert await resp.json() == {"active": False}
    # a disabled client's token is inactive at introspection and refused at the gateway
    await h.auth.set_disabled(device_client, True, actor="t")
    resp = await h.client.post("/oauth/introspect", data={"token": token},
                               headers={"Authorization": basic(rs.client_id, rs_secret)})
    assert await resp.json() == {"active": False}


async def _introspect(h: AuthHarness, client_id: str, secret: str, token: object
                      ) -> dict[str, object]:
    resp = await h.client.post("/oauth/introspect", data={"token": str(token)},
                               headers={"Authorization": basic(client_id, secret)})
    assert resp.status == 200
    answer: dict[str, object] = await resp.json()
    return answer


async def test_a_plain_confidential_client_introspects_only_its_own_tokens(
        make_auth_gateway: AuthGatewayFactory) -> None:
    """RFC 7662 section 2.1: only a client made a resource server (``--introspect``)
    learns about any token; another confidential client learns only about its own, and
    another client's token is ``{"active": false}`` to it (no subject, no scope)."""
    h = await make_auth_gateway()
    _, _, theirs = await _grant(h)
    mine_id, mine_secret, mine = await _grant(h, grant="authorization_code")
    assert mine_secret
    assert await _introspect(h, mine_id, mine_secret, theirs["access_token"]) \
        == {"active": False}
    assert await _introspect(h, mine_id, mine_secret, theirs["refresh_token"]) \
        == {"active": False}
    own = await _introspect(h, mine_id, mine_secret, mine["access_token"])
    assert own["active"] is True and own["client_id"] == mine_id and own["sub"] == "u1"
    # made a resource server, it learns about every token; and back
    await h.auth.update_client(mine_id, actor="t", introspect=True)
    assert (await _introspect(h, mine_id, mine_secret, theirs["access_token"]))["active"]
    await h.auth.update_client(mine_id, actor="t", introspect=False)
    assert await _introspect(h, mine_id, mine_secret, theirs["access_token"]) \
        == {"active": False}


async def test_open_introspection_restores_the_older_rule(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway(as_open_introspection=True)
    _, _, theirs = await _grant(h)
    mine_id, mine_secret, _ = await _grant(h, grant="authorization_code")
    assert mine_secret
    answer = await _introspect(h, mine_id, mine_secret, theirs["access_token"])
    assert answer["active"] is True and answer["sub"] == "u1"


async def test_only_a_confidential_client_may_be_a_resource_server(
        make_auth_gateway: AuthGatewayFactory) -> None:
    from gateway.authserver import AdminError

    h = await make_auth_gateway()
    with pytest.raises(AdminError, match="confidential"):
        await h.auth.create_client(name="x", grant="device_code", redirect_uris=[],
                                   scopes=[], actor="t", introspect=True)


async def test_credentials_in_header_and_body_are_refused(
        make_auth_gateway: AuthGatewayFactory) -> None:
    """RFC 6749 section 2.3: one authentication method per request. A secret in the body
    beside a Basic header is refused (400 invalid_request) at every endpoint that
    authenticates clients, whichever of the two secrets is right."""
    h = await make_auth_gateway()
    client_id, secret, body = await _grant(h, grant="authorization_code")
    device_id, _, _ = await _grant(h)
    assert secret
    cases = [
        ("/oauth/token", {"grant_type": "refresh_token",
                          "refresh_token": str(body["refresh_token"])}, client_id),
        ("/oauth/introspect", {"token": str(body["access_token"])}, client_id),
        ("/oauth/revoke", {"token": str(body["access_token"])}, client_id),
        ("/oauth/device_authorization", {}, device_id),
        ("/oauth/device/code", {}, device_id),
    ]
    for path, data, cid in cases:
        for extra in ({"client_secret": secret}, {"client_id": cid, "client_secret": secret},
                      {"client_secret": "wrong"}):
            resp = await h.client.post(path, data={**data, **extra},
                                       headers={"Authorization": basic(cid, secret)})
            assert resp.status == 400, (path, extra)
            answer = await resp.json()
            assert answer["error"] == "invalid_request", (path, answer)
    # nothing was revoked or used along the way
    assert (await _introspect(h, client_id, secret, body["access_token"]))["active"]
    resp = await _refresh(h, client_id, str(body["refresh_token"]), secret)
    assert resp.status == 200


async def test_revoking_a_refresh_token_kills_the_grants_access_tokens(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    client_id, _, body = await _grant(h)
    at = body["access_token"]
    assert (await h.client.get("/2/0/x", headers={"Authorization": f"Bearer {at}"})
            ).status == 200
    resp = await h.client.post("/oauth/revoke", data={
        "token": body["refresh_token"], "client_id": client_id})
    assert resp.status == 200
    assert (await h.client.get("/2/0/x", headers={"Authorization": f"Bearer {at}"})
            ).status == 401
    resp = await h.client.post("/oauth/revoke", data={"token": "unknown", "client_id":
                                                       client_id})
    assert resp.status == 200


async def test_grants_revoke_one_device_only(make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    client, _ = await h.auth.create_client(name="cli", grant="device_code", redirect_uris=[],
                                           scopes=["anaplan:read"], actor="t")
    tokens = []
    for label in ("laptop", "phone"):
        g = await h.auth.issuer.new_grant(client, username="bob", sub="u2",
                                          scope="anaplan:read", grant_type=client.grant_type,
                                          label=label)
        tokens.append((g.grant_id, (await h.auth.issuer.issue(
            client, g, scope="anaplan:read", grant_type=client.grant_type))["access_token"]))
    grants = await h.auth.list_grants(client_id=client.client_id)
    assert sorted(g.label for g in grants) == ["laptop", "phone"]
    await h.auth.revoke_grant(tokens[0][0], actor="t")
    laptop = await h.client.get("/2/0/x", headers={"Authorization": f"Bearer {tokens[0][1]}"})
    phone = await h.client.get("/2/0/x", headers={"Authorization": f"Bearer {tokens[1][1]}"})
    assert (laptop.status, phone.status) == (401, 200)


async def test_token_endpoint_errors(make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    resp = await h.client.post("/oauth/token", data={"grant_type": "password"})
    assert (resp.status, (await resp.json())["error"]) == (400, "unsupported_grant_type")
    resp = await h.client.post("/oauth/token", data=b"grant_type=refresh_token",
                               headers={"Content-Type": "text/plain"})
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_request")
    # JSON is taken, as Anaplan's token endpoint takes it: then the client is missing
    resp = await h.client.post("/oauth/token", json={"grant_type": "refresh_token"})
    assert (resp.status, (await resp.json())["error"]) == (401, "invalid_client")
    resp = await h.client.post("/oauth/token", data={"grant_type": "refresh_token",
                                                     "refresh_token": "x", "client_id": "nope"})
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"
    assert "WWW-Authenticate" in resp.headers


async def test_redis_holds_no_token_or_secret(make_auth_gateway: AuthGatewayFactory,
                                              redis: Redis) -> None:
    h = await make_auth_gateway()
    client_id, secret, body = await _grant(h, grant="authorization_code")
    assert secret
    await _refresh(h, client_id, str(body["refresh_token"]), secret)
    blob: list[str] = []
    for key in await redis.keys("*"):
        blob.append(str(key))
        kind = await redis.type(key)
        if kind == "string":
            blob.append(str(await redis.get(key)))
        elif kind == "hash":
            blob.append(str(await redis.hgetall(key)))
        elif kind == "set":
            blob.append(str(await redis.smembers(key)))
        elif kind == "stream":
            blob.append(str(await redis.xrange(key)))
    text = "\n".join(blob)
    for value in (secret, body["access_token"], body["refresh_token"]):
        assert str(value) not in text


async def test_cli_tokens_revoke_ends_tokens_at_the_builtin_server(
        make_auth_gateway: AuthGatewayFactory, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import commands as cli

    h = await make_auth_gateway()
    client_id, _, body = await _grant(h)
    rs, rs_secret = await h.auth.create_client(
        name="resource server", grant="authorization_code",
        redirect_uris=["https://rs.example.com/cb"], scopes=[], actor="t", introspect=True)
    assert rs_secret
    monkeypatch.setenv("GATEWAY_REDIS_URL", h.gw.settings.redis_url)
    monkeypatch.setenv("GATEWAY_ISSUER", h.issuer)
    assert await asyncio.to_thread(cli.main, ["tokens", "revoke", str(body["access_token"])]) \
        == 0
    assert "built-in server" in capsys.readouterr().out
    resp = await h.client.post("/oauth/introspect", data={"token": body["access_token"]},
                               headers={"Authorization": basic(rs.client_id, rs_secret)})
    assert await resp.json() == {"active": False}
    assert (await h.client.get("/2/0/x", headers={
        "Authorization": f"Bearer {body['access_token']}"})).status == 401
    # a refresh token ends its grant: no more refreshes
    assert await asyncio.to_thread(cli.main, ["tokens", "revoke", str(body["refresh_token"])]) \
        == 0
    resp = await _refresh(h, client_id, str(body["refresh_token"]))
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")
    grants = await h.auth.list_grants(client_id=client_id)
    assert grants[0].revoked and grants[0].revoked_reason == "revoked_by_admin"
