"""RFC 9068 JWT access tokens: their shape, the JWKS, rotation, and the gateways that
accept them (in-process by digest, and a second gateway validating them locally)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gateway.appkeys import AUTH_SERVER
from gateway.authserver.rfc9068 import (
    PUBLISH_AHEAD,
    RETENTION,
    ROTATION_PERIOD,
    SigningKey,
    SigningKeys,
)
from gateway.authserver.server import AuthorizationServer
from tests.conftest import AuthGatewayFactory, AuthHarness, GatewayFactory, Upstream
from tests.redis_server import RedisServer

KEYS = "gw:as:signing_keys"


def _server(client: TestClient[web.Request, web.Application]) -> AuthorizationServer:
    server = client.app[AUTH_SERVER].server if client.app is not None else None
    assert server is not None
    return server


def _keys(h: AuthHarness) -> SigningKeys:
    keys = _server(h.client).signing_keys
    assert keys is not None
    return keys


async def _grant(h: AuthHarness, *, scope: str = "anaplan:read"
                 ) -> tuple[str, dict[str, Any]]:
    """A device client with one grant and its first tokens, issued by the gateway's own
    authorization server (the one whose issuer signs JWTs)."""
    client, _ = await h.auth.create_client(
        name="t", grant="device_code", redirect_uris=[],
        scopes=["anaplan:read anaplan:write"], actor="test")
    issuer = _server(h.client).issuer
    g = await issuer.new_grant(client, username="alice", sub="u1", scope=scope,
                               grant_type=client.grant_type, label="laptop")
    body = await issuer.issue(client, g, scope=scope, grant_type=client.grant_type)
    return client.client_id, body


async def _jwks(h: AuthHarness) -> dict[str, Any]:
    resp = await h.client.get("/oauth/jwks")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "public, max-age=300"
    body: dict[str, Any] = await resp.json()
    return body


def _verify(token: str, jwks: dict[str, Any], issuer: str) -> dict[str, Any]:
    """What a resource server does: the key named by ``kid``, iss, aud, exp."""
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims: dict[str, Any] = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"],
                                        issuer=issuer, audience=issuer)
    return claims


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _thumbprint(jwk: dict[str, str]) -> str:
    canonical = json.dumps({m: jwk[m] for m in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()
                                    ).rstrip(b"=").decode()


async def test_access_token_is_an_rfc9068_jwt_the_jwks_verifies(
        make_auth_gateway: AuthGatewayFactory, redis: Redis, upstream: Upstream) -> None:
    h = await make_auth_gateway(as_access_token_format="jwt")
    client_id, body = await _grant(h)
    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"

    jwks = await _jwks(h)
    [key] = jwks["keys"]
    assert key["kid"] == header["kid"] == _thumbprint(key)  # RFC 7638
    assert {k: key[k] for k in ("kty", "crv", "alg", "use")} == {
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig"}
    assert "d" not in key
    claims = _verify(token, jwks, h.issuer)
    assert claims["iss"] == claims["aud"] == h.issuer
    assert (claims["sub"], claims["client_id"], claims["scope"]) == ("u1", client_id,
                                                                     "anaplan:read")
    assert claims["exp"] - claims["iat"] == body["expires_in"] == 2100
    assert claims["grant_id"].startswith("g_") and len(claims["jti"]) >= 16
    assert "username" not in claims

    # Redis holds the key encrypted, and the token by digest (as an opaque one)
    stored = json.loads(str(await redis.hget(KEYS, header["kid"])))
    assert stored["encryption"] == "A256GCM"
    assert "PRIVATE KEY" not in str(base64.b64decode(stored["private_key"]))
    assert await redis.exists(f"gw:as:at:{h.auth.store.digest(token)}") == 1

    resp = await h.client.get("/2/0/workspaces", headers=_bearer(token))
    assert resp.status == 200
    assert upstream.received[-1].raw_path == "/2/0/workspaces"
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {token}"
    resp = await h.client.post("/2/0/workspaces", data=b"{}", headers=_bearer(token))
    assert resp.status == 403  # the scope claim is what the gateway enforces

    # the token endpoint signs refreshed tokens too
    resp = await h.client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": body["refresh_token"],
        "client_id": client_id})
    assert resp.status == 200
    refreshed = (await resp.json())["access_token"]
    assert jwt.get_unverified_header(refreshed)["kid"] == header["kid"]
    assert _verify(refreshed, jwks, h.issuer)["jti"] != claims["jti"]


async def test_opaque_tokens_publish_an_empty_jwks(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h = await make_auth_gateway()
    _, body = await _grant(h)
    assert body["access_token"].startswith("gwat_")
    assert await _jwks(h) == {"keys": []}
    assert await redis.exists(KEYS) == 0


async def test_introspection_and_revocation_work_unchanged(
        make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway(as_access_token_format="jwt")
    client_id, body = await _grant(h)
    token = body["access_token"]
    rs, rs_secret = await h.auth.create_client(
        name="rs", grant="authorization_code", redirect_uris=["https://rs.example.com/cb"],
        scopes=[], actor="t", introspect=True)
    assert rs_secret
    rs_auth = {"Authorization": aiohttp.encode_basic_auth(rs.client_id, rs_secret)}
    resp = await h.client.post("/oauth/introspect", data={"token": token}, headers=rs_auth)
    answer = await resp.json()
    assert answer["active"] is True and answer["client_id"] == client_id
    assert answer["username"] == "alice"
    assert (await h.client.get("/2/0/x", headers=_bearer(token))).status == 200

    resp = await h.client.post("/oauth/revoke", data={"token": token, "client_id": client_id})
    assert resp.status == 200
    assert (await h.client.get("/2/0/x", headers=_bearer(token))).status == 401
    resp = await h.client.post("/oauth/introspect", data={"token": token}, headers=rs_auth)
    assert await resp.json() == {"active": False}


async def test_a_resource_server_validates_them_with_the_jwks(
        make_auth_gateway: AuthGatewayFactory, make_gateway: GatewayFactory,
        upstream: Upstream) -> None:
    h = await make_auth_gateway(as_access_token_format="jwt")
    client_id, body = await _grant(h)
    token = body["access_token"]
    rs = await make_gateway(validator="jwt", jwks_url=h.issuer + "/oauth/jwks",
                            jwt_issuer=h.issuer, jwt_audience=h.issuer)
    resp = await rs.client.get("/2/0/models", headers=_bearer(token))
    assert resp.status == 200
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {token}"
    assert (await rs.client.put("/2/0/models", data=b"{}", headers=_bearer(token))
            ).status == 403

    # same claims and the real kid, signed by a key the server never published
    real = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(real, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                        headers={"typ": "at+jwt",
                                 "kid": jwt.get_unverified_header(token)["kid"]})
    before = len(upstream.received)
    assert (await rs.client.get("/2/0/models", headers=_bearer(forged))).status == 401
    assert (await h.client.get("/2/0/models", headers=_bearer(forged))).status == 401
    assert len(upstream.received) == before

    # sharing the Redis and digest key, it also honours a revocation before exp
    resp = await h.client.post("/oauth/revoke", data={"token": token, "client_id": client_id})
    assert resp.status == 200
    statuses = []
    for _ in range(20):  # the purge reaches its in-process cache over pub/sub
        statuses.append((await rs.client.get("/2/0/models", headers=_bearer(token))).status)
        if statuses[-1] == 401:
            break
        await asyncio.sleep(0.05)
    assert statuses[-1] == 401


async def test_forced_rotation_keeps_earlier_tokens_valid(
        make_auth_gateway: AuthGatewayFactory, make_gateway: GatewayFactory,
        redis: Redis) -> None:
    h = await make_auth_gateway(as_access_token_format="jwt")
    _, first = await _grant(h)
    old_kid = jwt.get_unverified_header(first["access_token"])["kid"]
    new = await _keys(h).rotate()
    assert new.kid != old_kid
    _, second = await _grant(h)
    assert jwt.get_unverified_header(second["access_token"])["kid"] == new.kid

    jwks = await _jwks(h)
    assert {k["kid"] for k in jwks["keys"]} == {old_kid, new.kid}
    assert await redis.hlen(KEYS) == 2
    for body in (first, second):
        _verify(body["access_token"], jwks, h.issuer)
    rs = await make_gateway(validator="jwt", jwks_url=h.issuer + "/oauth/jwks",
                            jwt_issuer=h.issuer, jwt_audience=h.issuer)
    for body in (first, second):
        assert (await rs.client.get("/2/0/x", headers=_bearer(body["access_token"]))
                ).status == 200


async def test_two_servers_on_one_redis_share_the_active_key(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    a = await make_auth_gateway(as_access_token_format="jwt")
    b = await make_auth_gateway(as_access_token_format="jwt")
    assert await redis.hlen(KEYS) == 1
    assert (await _keys(a).current()).kid == (await _keys(b).current()).kid
    rotated = await _keys(a).rotate()
    await _keys(b).reload()  # what its next periodic re-read does
    assert (await _keys(b).current()).kid == rotated.kid
    _, body = await _grant(b)
    assert jwt.get_unverified_header(body["access_token"])["kid"] == rotated.kid
    # a token of one replica is accepted by the other
    assert (await a.client.get("/2/0/x", headers=_bearer(body["access_token"]))).status == 200


async def test_scheduled_rotation_publishes_ahead_and_retires_after_retention(
        redis: Redis) -> None:
    now = [1_700_000_000.0]
    cipher = AESGCM(AESGCM.generate_key(256))
    replicas = [SigningKeys(redis, key_prefix="gw:", cipher=cipher, clock=lambda: now[0])
                for _ in range(4)]
    # several replicas starting together create exactly one key
    kids = {k.kid for k in await asyncio.gather(*(r.current() for r in replicas))}
    assert len(kids) == 1 and await redis.hlen(KEYS) == 1
    [first] = kids

    now[0] += ROTATION_PERIOD - PUBLISH_AHEAD + 1
    published = await asyncio.gather(*(r.published() for r in replicas))
    assert await redis.hlen(KEYS) == 2  # one successor, not four
    [successor] = {k["kid"] for k in published[0]} - {first}
    for r in replicas:
        assert (await r.current()).kid == first  # published, not signing yet
        assert {k["kid"] for k in await r.published()} == {first, successor}

    now[0] += PUBLISH_AHEAD
    assert {(await r.current()).kid for r in replicas} == {successor}
    now[0] += RETENTION - 1
    assert len(await replicas[0].published()) == 2  # tokens of the first may still live
    now[0] += 1
    assert [k["kid"] for k in await replicas[0].published()] == [successor]
    assert await redis.hkeys(KEYS) == [successor]


async def test_a_key_this_replica_cannot_decrypt_never_signs(redis: Redis) -> None:
    clock = time.time
    a = SigningKeys(redis, key_prefix="gw:", cipher=AESGCM(AESGCM.generate_key(256)),
                    clock=clock)
    other = SigningKeys(redis, key_prefix="gw:", cipher=AESGCM(AESGCM.generate_key(256)),
                        clock=clock)
    unreadable = await a.current()
    mine = await other.current()
    assert mine.kid != unreadable.kid and mine.private_key is not None
    assert {k["kid"] for k in await other.published()} == {unreadable.kid, mine.kid}


async def test_a_replica_losing_the_rotation_race_adopts_the_winners_key(
        redis: Redis, redis_server: RedisServer) -> None:
    """Another replica writes its key between this one's read and its write: the WATCH
    transaction fails, this replica re-reads and signs with the winner's key."""
    cipher = AESGCM(AESGCM.generate_key(256))
    winner = SigningKeys(redis, key_prefix="gw:", cipher=cipher)
    winners_key = SigningKey.generate("ES256", now=time.time(), activates_at=time.time())
    other_client = SyncRedis.from_url(redis_server.url)
    calls = []

    def clock() -> float:
        calls.append(1)
        if len(calls) == 2:  # inside the transaction, after the read
            other_client.hset(KEYS, winners_key.kid, winner.record(winners_key))
        return time.time()

    loser = SigningKeys(redis, key_prefix="gw:", cipher=cipher, clock=clock)
    assert (await loser.current()).kid == winners_key.kid
    assert await redis.hkeys(KEYS) == [winners_key.kid]
    other_client.close()
