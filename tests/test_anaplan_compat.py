"""Clients written for Anaplan, pointed at the built-in server: JSON token requests, the
device endpoint where Anaplan has it, and Anaplan's token service (validate, refresh,
logout) for the server's own tokens; then ``apapi``, a real Anaplan client library, end
to end through the gateway."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.authserver.models import GRANT_DEVICE
from tests.conftest import AuthGatewayFactory, AuthHarness, Upstream

USER_SUB, USER_NAME = "u_0123456789abcdef0123456789abcdef", "alice@example.com"


async def _device_grant(h: AuthHarness, *, scope: str = "anaplan:read", **policy: object
                        ) -> tuple[str, dict[str, Any]]:
    """A public device client with one grant and its first tokens (as the flow gives)."""
    client, _ = await h.auth.create_client(
        name="Anaplan script", grant="device_code", redirect_uris=[],
        scopes=["anaplan:read anaplan:write"], actor="test", policy=dict(policy))
    grant = await h.auth.issuer.new_grant(client, username=USER_NAME, sub=USER_SUB,
                                          scope=scope, grant_type=GRANT_DEVICE, label="laptop")
    body = await h.auth.issuer.issue(client, grant, scope=scope, grant_type=GRANT_DEVICE)
    return client.client_id, body


def _anaplan(token: str) -> dict[str, str]:
    return {"Authorization": f"AnaplanAuthToken {token}"}


async def test_token_endpoint_takes_a_json_body(make_auth_gateway: AuthGatewayFactory
                                                ) -> None:
    h = await make_auth_gateway()
    client_id, body = await _device_grant(h)
    resp = await h.client.post("/oauth/token", json={
        "grant_type": "refresh_token", "client_id": client_id,
        "refresh_token": body["refresh_token"]})
    assert resp.status == 200, await resp.text()
    fresh = await resp.json()
    assert fresh["token_type"] == "Bearer" and fresh["refresh_token"] != body["refresh_token"]
    assert (await h.client.get("/2/0/workspaces", headers=_anaplan(fresh["access_token"]))
            ).status == 200

    for bad, why in ((b"{not json", "not valid JSON"), (b'["a"]', "JSON object"),
                     (b'{"grant_type": 3}', "must be a string")):
        resp = await h.client.post("/oauth/token", data=bad,
                                   headers={"Content-Type": "application/json"})
        assert resp.status == 400
        answer = await resp.json()
        assert answer["error"] == "invalid_request" and why in answer["error_description"]
    # the other endpoints keep RFC 7009 / 7662's form bodies
    resp = await h.client.post("/oauth/revoke", json={"token": "x", "client_id": client_id})
    assert resp.status == 400


async def test_device_code_endpoint_where_anaplan_has_it(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    client, _ = await h.auth.create_client(
        name="cli", grant="device_code", redirect_uris=[], scopes=["anaplan:read"],
        actor="test")
    resp = await h.client.post("/oauth/device/code",
                               json={"client_id": client.client_id, "scope": "anaplan:read"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) >= {"device_code", "user_code", "verification_uri",
                         "verification_uri_complete", "expires_in", "interval"}
    assert body["verification_uri"] == h.issuer + "/oauth/device"
    resp = await h.client.post("/oauth/device/code", data={"client_id": client.client_id})
    assert resp.status == 200  # a form body too


async def test_validate_answers_in_anaplans_shape(make_auth_gateway: AuthGatewayFactory
                                                  ) -> None:
    h = await make_auth_gateway()
    _, body = await _device_grant(h)
    token = body["access_token"]
    resp = await h.client.get("/token/validate", headers=_anaplan(token))
    assert resp.status == 200
    answer = await resp.json()
    assert (answer["status"], answer["statusMessage"]) == ("SUCCESS", "Token validated")
    assert answer["userInfo"]["userGuid"] == USER_SUB
    assert answer["userInfo"]["userId"] == USER_NAME
    expires = answer["tokenInfo"]["expiresAt"] / 1000
    assert abs(expires - (time.time() + body["expires_in"])) < 5
    assert len(answer["tokenInfo"]["tokenId"]) == 32
    assert token not in await resp.text()

    for headers, status in (({}, 400), ({"Authorization": f"Bearer {token}"}, 400),
                            ({"Authorization": "AnaplanAuthToken"}, 400),
                            (_anaplan("gwat_not-a-token"), 401),
                            (_anaplan(body["refresh_token"]), 401)):
        resp = await h.client.get("/token/validate", headers=headers)
        assert resp.status == status, headers
        assert (await resp.json())["status"].startswith("FAILURE_")


async def test_refresh_extends_the_same_token_within_its_grant(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    _, body = await _device_grant(h, access_token_ttl=120, grant_max_lifetime=3600)
    token = body["access_token"]
    first = (await (await h.client.get("/token/validate", headers=_anaplan(token))).json())
    await asyncio.sleep(1.1)
    resp = await h.client.post("/token/refresh", headers=_anaplan(token))
    assert resp.status == 200
    answer = await resp.json()
    assert (answer["status"], answer["statusMessage"]) == ("SUCCESS", "Token refreshed")
    info = answer["tokenInfo"]
    assert info["tokenValue"] == token
    assert info["expiresAt"] > first["tokenInfo"]["expiresAt"]
    assert info["expiresAt"] / 1000 <= time.time() + 121
    again = await (await h.client.get("/token/validate", headers=_anaplan(token))).json()
    assert again["tokenInfo"]["expiresAt"] == info["expiresAt"]
    assert (await h.client.get("/2/0/workspaces", headers=_anaplan(token))).status == 200

    # never past the grant's end
    _, short = await _device_grant(h, access_token_ttl=120, grant_max_lifetime=130)
    resp = await h.client.post("/token/refresh", headers=_anaplan(short["access_token"]))
    grant_end = time.time() + 130
    assert (await resp.json())["tokenInfo"]["expiresAt"] / 1000 <= grant_end + 1


async def test_logout_ends_the_token_not_its_grant(make_auth_gateway: AuthGatewayFactory
                                                   ) -> None:
    h = await make_auth_gateway()
    client_id, body = await _device_grant(h)
    token = body["access_token"]
    assert (await h.client.get("/2/0/workspaces", headers=_anaplan(token))).status == 200
    resp = await h.client.post("/token/logout", headers=_anaplan(token))
    assert resp.status == 204 and await resp.read() == b""
    assert (await h.client.get("/2/0/workspaces", headers=_anaplan(token))).status == 401
    assert (await h.client.get("/token/validate", headers=_anaplan(token))).status == 401
    assert (await h.client.post("/token/logout", headers=_anaplan(token))).status == 401
    assert (await h.client.post("/token/logout")).status == 401
    resp = await h.client.post("/oauth/token", json={
        "grant_type": "refresh_token", "client_id": client_id,
        "refresh_token": body["refresh_token"]})
    assert resp.status == 200  # the grant lives on


async def test_a_revoked_grant_is_refused_by_the_token_service(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    _, body = await _device_grant(h)
    grants = await h.auth.list_grants()
    await h.auth.revoke_grant(grants[0].grant_id, actor="test")
    for method, path in (("GET", "/token/validate"), ("POST", "/token/refresh")):
        resp = await h.client.request(method, path, headers=_anaplan(body["access_token"]))
        assert resp.status == 401, path


async def test_apapi_oauth_rotatable_through_the_gateway(
        make_auth_gateway: AuthGatewayFactory, upstream: Upstream) -> None:
    """apapi, unchanged, with its OAuth and auth URLs at the issuer and its API URL at the
    gateway (here both on the gateway's listener)."""
    from apapi import TransactionalConnection
    from apapi.authentication import OAuth2Rotatable
    from apapi.utils import get_generic_session

    h = await make_auth_gateway()
    client_id, body = await _device_grant(h)
    saved = {"refresh_token": body["refresh_token"]}

    def script() -> tuple[int, bool, int, bool]:
        auth = OAuth2Rotatable(
            client_id, lambda: saved["refresh_token"],
            lambda token: saved.__setitem__("refresh_token", token),
            oauth2_url=h.issuer, auth_url=h.issuer, session=get_generic_session(0))
        try:
            conn = TransactionalConnection(auth, api_url=h.issuer)
            listed = conn.get_workspaces().status_code
            valid = auth.validate_token()
            auth.refresh_token()
            again = conn.get_workspaces().status_code
        finally:
            auth.close()
        return listed, valid, again, auth.validate_token()

    listed, valid, again, valid_after_close = await asyncio.to_thread(script)
    assert (listed, valid, again, valid_after_close) == (200, True, 200, False)
    assert saved["refresh_token"] != body["refresh_token"]  # rotated, and kept by apapi
    seen = [r for r in upstream.received if r.raw_path.startswith("/2/0/workspaces")]
    assert len(seen) == 2
    # forwarded in the scheme this (non-Anaplan) test upstream expects
    assert all(r.headers["Authorization"].startswith("Bearer gwat_") for r in seen)


async def test_openid_scopes_anaplan_clients_send_are_accepted_and_ignored(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway()
    client, _ = await h.auth.create_client(
        name="cli", grant="device_code", redirect_uris=[], scopes=["anaplan:read"],
        actor="test")
    oidc = "openid profile email offline_access"
    resp = await h.client.post("/oauth/device/code",
                               json={"client_id": client.client_id, "scope": oidc})
    assert resp.status == 200, await resp.text()  # neither refused nor narrowed to nothing
    resp = await h.client.post("/oauth/device/code", json={
        "client_id": client.client_id, "scope": f"{oidc} anaplan:write"})
    assert (await resp.json())["error"] == "invalid_scope"  # nor widened
    client_id, body = await _device_grant(h)
    resp = await h.client.post("/oauth/token", json={
        "grant_type": "refresh_token", "client_id": client_id, "scope": oidc,
        "refresh_token": body["refresh_token"]})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["scope"] == body["scope"]
