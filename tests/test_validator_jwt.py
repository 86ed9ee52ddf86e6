"""Local JWT validation against a real loopback JWKS endpoint, with real keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pytest_aiohttp import AiohttpServer

from gateway.authn.validators.base import ValidatorUnavailable
from gateway.authn.validators.jwt import JWTValidator

ISSUER = "https://as.example.test"
AUDIENCE = "https://gateway.example.test"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_NEXT = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: PrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", **extra}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now, "nbf": now,
        "sub": "user-1", "client_id": "client-1", "scope": "anaplan:read anaplan:write",
        "preferred_username": "alice", "jti": "j-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: PrivateKey, alg: str = "RS256", kid: str | None = "rsa-1",
         payload: dict[str, Any] | None = None, **headers: Any) -> str:
    hdr: dict[str, Any] = {"typ": "at+jwt", **headers}
    if kid is not None:
        hdr["kid"] = kid
    return jwt.encode(payload if payload is not None else claims(), key, algorithm=alg,
                      headers=hdr)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWS built by hand, as an attacker would: PyJWT refuses to forge these."""
    signing_input = (b64url(json.dumps(header).encode()) + "."
                     + b64url(json.dumps(payload).encode()))
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


class JWKSServer:
    """A JWKS endpoint whose keys and health the test changes as it goes."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.status = 200
        self.fetches = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        await asyncio.sleep(0.01)  # a real network round trip, so misses can pile up
        if self.status != 200:
            return web.json_response({"error": "down"}, status=self.status)
        return web.json_response({"keys": self.keys})


async def start_jwks(aiohttp_server: AiohttpServer, keys: list[dict[str, Any]]) -> JWKSServer:
    jwks = JWKSServer(keys)
    app = web.Application()
    app.router.add_get("/jwks.json", jwks.handle)
    server = await aiohttp_server(app)
    jwks.url = str(server.make_url("/jwks.json"))
    return jwks


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def jwks(aiohttp_server: AiohttpServer) -> JWKSServer:
    return await start_jwks(aiohttp_server, [
        public_jwk(RSA_KEY, "rsa-1"),
        public_jwk(EC_KEY, "ec-1"),
        public_jwk(ED_KEY, "ed-1"),
    ])


def validator(session: aiohttp.ClientSession, jwks: JWKSServer, **kw: Any) -> JWTValidator:
    kw.setdefault("issuer", ISSUER)
    kw.setdefault("audience", AUDIENCE)
    return JWTValidator(session, jwks.url, **kw)


@pytest.mark.parametrize(("key", "alg", "kid"), [
    (RSA_KEY, "RS256", "rsa-1"),
    (RSA_KEY, "PS256", "rsa-1"),
    (EC_KEY, "ES256", "ec-1"),
    (ED_KEY, "EdDSA", "ed-1"),
])
async def test_valid_token_is_active_with_its_claims(
        session: aiohttp.ClientSession, jwks: JWKSServer,
        key: PrivateKey, alg: str, kid: str) -> None:
    payload = claims()
    info = await validator(session, jwks).validate(sign(key, alg, kid, payload))
    assert info.active
    assert info.client_id == "client-1"
    assert info.scopes == {"anaplan:read", "anaplan:write"}
    assert info.exp == payload["exp"]
    assert (info.sub, info.username) == ("user-1", "alice")
    assert jwks.fetches == 1


async def test_scp_list_and_azp_are_mapped(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    token = sign(RSA_KEY, payload=claims(client_id=None, scope=None, azp="client-azp",
                                         scp=["anaplan:read"], username="bob"))
    info = await validator(session, jwks).validate(token)
    assert info.active
    assert (info.client_id, info.scopes, info.username) == (
        "client-azp", frozenset({"anaplan:read"}), "bob")


async def test_first_fetch_is_lazy(session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks)
    assert jwks.fetches == 0
    await v.validate(sign(RSA_KEY))
    await v.validate(sign(EC_KEY, "ES256", "ec-1"))
    assert jwks.fetches == 1


async def test_alg_none_is_refused(session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    token = handmade({"alg": "none", "kid": "rsa-1", "typ": "at+jwt"}, claims(), None)
    assert not (await validator(session, jwks).validate(token)).active


async def test_hs256_signed_with_the_rsa_public_key_is_refused(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    pem = RSA_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    forged = handmade({"alg": "HS256", "kid": "rsa-1", "typ": "at+jwt"}, claims(), pem)
    # the forgery is sound HMAC: a verifier that let the header pick HS256 would accept it
    signing_input, _, sig = forged.rpartition(".")
    assert hmac.compare_digest(
        b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()), sig)
    assert not (await validator(session, jwks).validate(forged)).active


@pytest.mark.parametrize("algorithms", [["RS256", "HS256"], ["none"], ["hs512"], ["XS999"], []])
def test_constructor_refuses_unsafe_algorithms(algorithms: list[str]) -> None:
    with pytest.raises(ValueError, match="algorithm"):
        JWTValidator(None, "http://127.0.0.1/jwks",  # type: ignore[arg-type]
                     issuer=ISSUER, algorithms=algorithms)


async def test_algorithm_must_match_the_key_type(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    # an ES256 token naming the RSA key's kid, signed with the EC key
    token = sign(EC_KEY, "ES256", "rsa-1")
    assert not (await validator(session, jwks).validate(token)).active


async def test_algorithm_must_match_the_jwk_alg(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    pinned = await start_jwks(aiohttp_server, [public_jwk(RSA_KEY, "rsa-1", alg="RS256")])
    v = validator(session, pinned)
    assert (await v.validate(sign(RSA_KEY, "RS256"))).active
    assert not (await v.validate(sign(RSA_KEY, "PS256"))).active


async def test_algorithm_outside_the_allow_list_is_refused(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks, algorithms=["ES256"])
    assert not (await v.validate(sign(RSA_KEY, "RS256"))).active
    assert (await v.validate(sign(EC_KEY, "ES256", "ec-1"))).active


@pytest.mark.parametrize("bad", [
    {"iss": "https://evil.example.test"},
    {"iss": ISSUER + "/"},
    {"aud": "https://other-api.example.test"},
    {"exp": int(time.time()) - 3600},
    {"nbf": int(time.time()) + 3600},
    {"iat": int(time.time()) + 3600},
    {"exp": None},
    {"iss": None},
])
async def test_claims_are_checked(
        session: aiohttp.ClientSession, jwks: JWKSServer, bad: dict[str, Any]) -> None:
    v = validator(session, jwks)
    assert (await v.validate(sign(RSA_KEY))).active
    assert not (await v.validate(sign(RSA_KEY, payload=claims(**bad)))).active


async def test_audience_is_required_when_configured(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    token = sign(RSA_KEY, payload=claims(aud=None))
    assert not (await validator(session, jwks).validate(token)).active
    assert (await validator(session, jwks, audience="").validate(token)).active


async def test_audience_list_containing_ours_is_accepted(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    token = sign(RSA_KEY, payload=claims(aud=["https://other.test", AUDIENCE]))
    assert (await validator(session, jwks).validate(token)).active


async def test_leeway_is_honoured(session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    now = int(time.time())
    v = validator(session, jwks, leeway=30)
    assert (await v.validate(sign(RSA_KEY, payload=claims(exp=now - 10)))).active
    assert (await v.validate(sign(RSA_KEY, payload=claims(nbf=now + 10)))).active
    assert not (await v.validate(sign(RSA_KEY, payload=claims(exp=now - 40)))).active
    assert not (await v.validate(sign(RSA_KEY, payload=claims(nbf=now + 40)))).active
    strict = validator(session, jwks, leeway=0)
    assert not (await strict.validate(sign(RSA_KEY, payload=claims(exp=now - 10)))).active


@pytest.mark.parametrize(("typ", "active"), [
    ("at+jwt", True), ("application/at+JWT", True), ("JWT", True),
    ("secevent+jwt", False), ("dpop+jwt", False),
])
async def test_typ_header(session: aiohttp.ClientSession, jwks: JWKSServer,
                          typ: str, active: bool) -> None:
    token = sign(RSA_KEY, typ=typ)
    assert (await validator(session, jwks).validate(token)).active is active


async def test_critical_extension_is_refused(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    token = sign(RSA_KEY, crit=["exp_policy"], exp_policy="strict")
    assert not (await validator(session, jwks).validate(token)).active


async def test_bad_signature_and_garbage_are_inactive(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks)
    head, body, _ = sign(RSA_KEY).split(".")
    other_sig = sign(RSA_KEY_NEXT).split(".")[2]
    assert not (await v.validate(f"{head}.{body}.{other_sig}")).active
    assert not (await v.validate("not-a-jwt")).active
    assert not (await v.validate("")).active


async def test_kid_rotation_validates_after_one_refetch(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks, jwks_min_refetch_interval=0.0)
    assert (await v.validate(sign(RSA_KEY, kid="rsa-1"))).active
    jwks.keys = [public_jwk(RSA_KEY_NEXT, "rsa-2")]  # the issuer rotates

    assert (await v.validate(sign(RSA_KEY_NEXT, kid="rsa-2"))).active
    assert jwks.fetches == 2
    assert (await v.validate(sign(RSA_KEY_NEXT, kid="rsa-2"))).active
    assert jwks.fetches == 2


async def test_unknown_kid_refetch_is_rate_limited_and_shared(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks, jwks_min_refetch_interval=0.5)
    assert (await v.validate(sign(RSA_KEY))).active
    assert jwks.fetches == 1

    # within the interval: made-up kids cause no fetch at all
    made_up = [sign(RSA_KEY, kid=f"nope-{i}") for i in range(20)]
    results = await asyncio.gather(*(v.validate(t) for t in made_up))
    assert not any(r.active for r in results)
    assert jwks.fetches == 1

    jwks.keys = [*jwks.keys, public_jwk(RSA_KEY_NEXT, "rsa-2")]
    await asyncio.sleep(0.6)
    rotated = [sign(RSA_KEY_NEXT, kid="rsa-2") for _ in range(20)]
    results = await asyncio.gather(*(v.validate(t) for t in rotated))
    assert all(r.active for r in results)
    assert jwks.fetches == 2  # twenty concurrent misses, one shared fetch


async def test_burst_of_unknown_kids_shares_one_fetch(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks, jwks_min_refetch_interval=0.0)
    assert (await v.validate(sign(RSA_KEY))).active
    made_up = [sign(RSA_KEY, kid=f"nope-{i}") for i in range(20)]
    results = await asyncio.gather(*(v.validate(t) for t in made_up))
    assert not any(r.active for r in results)
    assert jwks.fetches <= 2


async def test_token_supplied_key_locations_are_never_used(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession,
        jwks: JWKSServer) -> None:
    attacker = await start_jwks(aiohttp_server, [public_jwk(ATTACKER_KEY, "evil")])
    v = validator(session, jwks)
    embedded = public_jwk(ATTACKER_KEY, "evil")
    for kid in ("evil", "rsa-1"):
        token = sign(ATTACKER_KEY, kid=kid, jku=attacker.url, x5u=attacker.url,
                     jwk=embedded)
        assert not (await v.validate(token)).active
    assert attacker.fetches == 0


async def test_jwks_down_at_first_use_is_unavailable_then_recovers(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    jwks.status = 503
    v = validator(session, jwks)
    with pytest.raises(ValidatorUnavailable):
        await v.validate(sign(RSA_KEY))
    jwks.status = 200
    assert (await v.validate(sign(RSA_KEY))).active


async def test_jwks_unreachable_is_unavailable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    v = JWTValidator(session, f"http://127.0.0.1:{port}/jwks.json", issuer=ISSUER,
                     fetch_timeout=0.5)
    with pytest.raises(ValidatorUnavailable, match="unreachable"):
        await v.validate(sign(RSA_KEY))


async def test_jwks_with_only_symmetric_keys_is_unusable(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    secret = b"shared-secret-that-must-not-work"
    sym = await start_jwks(aiohttp_server, [{"kty": "oct", "kid": "sym", "k": b64url(secret)}])
    with pytest.raises(ValidatorUnavailable, match="no key usable"):
        await validator(session, sym).validate(sign(RSA_KEY, kid="sym"))


async def test_known_keys_survive_a_failed_refetch(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks, jwks_min_refetch_interval=0.0)
    assert (await v.validate(sign(RSA_KEY))).active
    jwks.status = 500
    # an unknown kid cannot be decided while the JWKS is down
    with pytest.raises(ValidatorUnavailable):
        await v.validate(sign(RSA_KEY_NEXT, kid="rsa-2"))
    assert (await v.validate(sign(RSA_KEY))).active


async def test_withdrawn_key_stops_validating_after_max_age(
        session: aiohttp.ClientSession, jwks: JWKSServer) -> None:
    v = validator(session, jwks, jwks_min_refetch_interval=0.0, jwks_max_age=0.2)
    assert (await v.validate(sign(RSA_KEY))).active
    jwks.keys = [public_jwk(RSA_KEY_NEXT, "rsa-2")]
    await asyncio.sleep(0.3)
    assert not (await v.validate(sign(RSA_KEY))).active
