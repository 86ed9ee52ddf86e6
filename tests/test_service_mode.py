"""``credentials: service``: the gateway's own Anaplan sign-in, against the token-service
stand-in (certificate checked against a test CA), with the token shared in Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from gateway.config.policy import Identity, PolicyError, load_policy
from gateway.config.settings import load_settings
from gateway.demo.tokenservice import TokenServiceStandIn, make_ca, make_client_certificate
from gateway.forward.credentials.anaplan import AnaplanSignIn, SignInRefused
from gateway.forward.credentials.service import RETRY_BACKOFF
from gateway.forward.credentials.sharing import SharedToken, parse_secret_keys
from gateway.runtime.app import ConfigurationError, create_apps
from gateway.state.keys import Keys
from tests.conftest import AuthGatewayFactory, AuthServer, GatewayFactory, Harness

TOKEN = "tok-client-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()

POLICY = """
identities:
  integration:
    kind: anaplan-certificate
    auth_url: {service}
    certificate_file: {cert}
    private_key_file: {key}
upstreams:
  api:
    url: {service}
    credentials: service
    identity: integration
routes:
  - name: all
    upstream: api
    path: /**
    scopes: [anaplan:read]
"""


@dataclass
class Anaplan:
    """The stand-in, its server, and a certificate its CA issued (files on disk)."""

    standin: TokenServiceStandIn
    server: TestServer
    cert: Path
    key: Path
    ca_key: rsa.RSAPrivateKey

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def policy(self) -> str:
        return POLICY.format(service=self.url, cert=self.cert, key=self.key)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey, bytes, bytes]:
    cert, key = make_ca()
    pem, key_pem = make_client_certificate(cert, key)
    return cert, key, pem, key_pem


@pytest.fixture
async def anaplan(aiohttp_server: AiohttpServer, tmp_path: Path,
                  ca: tuple[x509.Certificate, rsa.RSAPrivateKey, bytes, bytes]) -> Anaplan:
    ca_cert, ca_key, pem, key_pem = ca
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "cert.pem").write_bytes(pem)
    (certs / "key.pem").write_bytes(key_pem)
    standin = TokenServiceStandIn(ca_cert, users={"basic@example.com": "pw"})
    server = await aiohttp_server(standin.app())
    return Anaplan(standin, server, certs / "cert.pem", certs / "key.pem", ca_key)


async def start(make_gateway: GatewayFactory, anaplan: Anaplan, keys: str = KEY_A) -> Harness:
    return await make_gateway(anaplan.policy().replace("{", "{{").replace("}", "}}"),
                              secret_keys=keys)


# --- the stand-in speaks what Anaplan documents ------------------------------------------

@pytest.mark.parametrize("v2", [False, True])
async def test_standin_certificate_sign_in_classic_and_v2(anaplan: Anaplan, v2: bool) -> None:
    identity = Identity("i", "anaplan-certificate", anaplan.url, str(anaplan.cert),
                        str(anaplan.key))
    async with aiohttp.ClientSession() as session:
        token = await AnaplanSignIn(identity, session, v2=v2).authenticate()
        assert token.expires_at > time.time() + 2000
        refreshed = await AnaplanSignIn(identity, session).refresh(token.value)
        assert refreshed.value == token.value
        headers = {"Authorization": f"AnaplanAuthToken {token.value}"}
        async with session.get(f"{anaplan.url}/token/validate", headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["userInfo"]["userId"] == "integration@example.com"
            assert len(body["userInfo"]["userGuid"]) == 32
        async with session.post(f"{anaplan.url}/token/logout", headers=headers) as resp:
            assert resp.status == 204
        async with session.get(f"{anaplan.url}/2/0/users/me", headers=headers) as resp:
            assert resp.status == 401
        async with session.get(f"{anaplan.url}/token/validate",
                               headers={"Authorization": "Bearer x"}) as resp:
            assert resp.status == 400


async def test_standin_checks_signature_issuer_and_accepts_der(anaplan: Anaplan) -> None:
    cert = x509.load_pem_x509_certificate(anaplan.cert.read_bytes())
    key = serialization.load_pem_private_key(anaplan.key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    data = os.urandom(100)

    async def post(header: bytes, signed: bytes) -> int:
        body = {"encodedData": base64.b64encode(data).decode(),
                "encodedSignedData": base64.b64encode(signed).decode()}
        async with aiohttp.ClientSession() as s, s.post(
                f"{anaplan.url}/token/authenticate", json=body,
                headers={"Authorization": "CACertificate " + base64.b64encode(header).decode()}
        ) as resp:
            return resp.status

    good = key.sign(data, padding.PKCS1v15(), hashes.SHA512())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert await post(der, good) == 200
    assert await post(anaplan.cert.read_bytes(), good[:-1] + bytes([good[-1] ^ 1])) == 401
    other_ca, other_key = make_ca("Someone else")
    foreign, foreign_key = make_client_certificate(other_ca, other_key)
    fkey = serialization.load_pem_private_key(foreign_key, password=None)
    assert isinstance(fkey, rsa.RSAPrivateKey)
    assert await post(foreign, fkey.sign(data, padding.PKCS1v15(), hashes.SHA512())) == 401


async def test_basic_sign_in(anaplan: Anaplan) -> None:
    identity = Identity("b", "anaplan-basic", anaplan.url, username_env="U", password_env="P")
    async with aiohttp.ClientSession() as session:
        ok = AnaplanSignIn(identity, session, environ={"U": "basic@example.com", "P": "pw"})
        assert (await ok.authenticate()).value in anaplan.standin.tokens
        bad = AnaplanSignIn(identity, session, environ={"U": "basic@example.com", "P": "no"})
        with pytest.raises(SignInRefused):
            await bad.authenticate()


# --- the mode -------------------------------------------------------------------------------

async def test_upstream_never_receives_the_clients_token(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan) -> None:
    auth_server.issue(TOKEN)
    gw = await start(make_gateway, anaplan)
    for _ in range(3):
        resp = await gw.client.get("/2/0/workspaces", headers=AUTH)
        assert resp.status == 200, await resp.text()
    sent = anaplan.standin.api_authorizations
    assert len(sent) == 3 and all(a.startswith("AnaplanAuthToken ") for a in sent)
    assert not any(TOKEN in a for a in sent)
    assert anaplan.standin.calls["authenticate"] == 1
    # the client is still checked: no token, no request upstream
    assert (await gw.client.get("/2/0/workspaces")).status == 401
    assert anaplan.standin.calls["api"] == 3


async def test_the_v2_certificate_payload_is_chosen_in_the_policy(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan) -> None:
    auth_server.issue(TOKEN)
    policy = anaplan.policy().replace(
        f"    private_key_file: {anaplan.key}\n",
        f"    private_key_file: {anaplan.key}\n    certificate_payload: v2\n")
    gw = await make_gateway(policy.replace("{", "{{").replace("}", "}}"), secret_keys=KEY_A)
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    assert anaplan.standin.calls["authenticate_v2"] == 1


async def test_three_replicas_starting_together_sign_in_once(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan) -> None:
    auth_server.issue(TOKEN)
    replicas = [await start(make_gateway, anaplan) for _ in range(3)]
    answers = await asyncio.gather(*[r.client.get("/2/0/x", headers=AUTH)
                                     for r in replicas for _ in range(4)])
    assert [a.status for a in answers] == [200] * 12
    assert anaplan.standin.calls["authenticate"] == 1
    assert len(set(anaplan.standin.api_authorizations)) == 1


async def test_three_replicas_renewing_together_call_the_token_service_once(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan) -> None:
    auth_server.issue(TOKEN)
    replicas = [await start(make_gateway, anaplan) for _ in range(3)]
    for r in replicas:
        assert (await r.client.get("/2/0/x", headers=AUTH)).status == 200
    anaplan.standin.stale()  # every replica's next request is refused upstream at once
    answers = await asyncio.gather(*[r.client.get("/2/0/x", headers=AUTH)
                                     for r in replicas for _ in range(2)])
    assert [a.status for a in answers] == [200] * 6
    # one renewal for the fleet: the refresh (refused: the token is dead), one sign-in
    assert (anaplan.standin.calls["refresh"], anaplan.standin.calls["authenticate"]) == (1, 2)
    assert len(set(anaplan.standin.api_authorizations[3:])) <= 2  # the dead one, the new one


async def test_token_in_redis_is_sealed_and_survives_key_rotation(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan,
        redis: Redis) -> None:
    auth_server.issue(TOKEN)
    gw = await start(make_gateway, anaplan, keys=KEY_A)
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    keys = Keys("gw:")
    stored = str(await redis.get(keys.upstream_credential("integration")))
    [token] = anaplan.standin.tokens
    assert token not in stored
    sealed = stored.partition(":")[2]
    assert SharedToken(redis, keys, "integration", parse_secret_keys(KEY_B)).open(sealed) is None
    rotated = SharedToken(redis, keys, "integration", parse_secret_keys(f"{KEY_B},{KEY_A}"))
    opened = rotated.open(sealed)
    assert opened is not None and opened.token.value == token
    # a replica with the new key first reads the fleet's token: no second sign-in
    after = await start(make_gateway, anaplan, keys=f"{KEY_B},{KEY_A}")
    assert (await after.client.get("/2/0/x", headers=AUTH)).status == 200
    assert anaplan.standin.calls["authenticate"] == 1


async def test_stale_token_is_renewed_once_and_the_request_recovers(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan) -> None:
    auth_server.issue(TOKEN)
    gw = await start(make_gateway, anaplan)
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    anaplan.standin.stale()
    resp = await gw.client.get("/2/0/x", headers=AUTH)
    assert resp.status == 200
    calls = anaplan.standin.calls
    assert (calls["api"], calls["refresh"], calls["authenticate"]) == (3, 1, 2)
    # a request with a body cannot be replayed: 502, and the next one works
    anaplan.standin.stale()
    resp = await gw.client.post("/2/0/x", headers=AUTH, data=b"payload")
    assert resp.status == 502
    assert "credentials" in (await resp.json())["error_description"]
    assert (await gw.client.post("/2/0/x", headers=AUTH, data=b"payload")).status == 200
    metrics = await gw.metrics()
    assert ('gateway_upstream_credential_refreshes_total{identity="integration",'
            'mode="service",outcome="refresh_refused"} 2.0') in metrics


async def test_token_service_down_answers_503_and_sends_nothing(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan) -> None:
    auth_server.issue(TOKEN)
    anaplan.standin.down = True
    gw = await start(make_gateway, anaplan)
    for _ in range(10):
        resp = await gw.client.get("/2/0/x", headers=AUTH)
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) > 0
        assert (await resp.json())["error"] == "temporarily_unavailable"
    assert anaplan.standin.calls["api"] == 0
    # after a failure the replica waits before trying again: the ten requests made one call
    assert anaplan.standin.calls["authenticate"] == 1
    anaplan.standin.down = False
    await asyncio.sleep(RETRY_BACKOFF)
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    assert anaplan.standin.calls["authenticate"] == 2


async def test_every_sign_in_and_refusal_is_audited(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan,
        redis: Redis) -> None:
    auth_server.issue(TOKEN)
    gw = await start(make_gateway, anaplan)
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    anaplan.standin.stale()  # the refresh is refused, the sign-in again works
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    anaplan.standin.stale()
    anaplan.standin.refuse = True  # now the certificate is refused too
    await asyncio.sleep(RETRY_BACKOFF)
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 503
    stream: Any = await redis.xrange(Keys("gw:").audit)
    entries: list[dict[str, str]] = [fields for _, fields in stream]
    actions = [(e["action"], e.get("identity"), e.get("actor")) for e in entries
               if e["action"].startswith("credential.")]
    assert actions == [("credential.signed_in", "integration", "gateway"),
                       ("credential.refresh_refused", "integration", "gateway"),
                       ("credential.signed_in", "integration", "gateway"),
                       ("credential.refresh_refused", "integration", "gateway"),
                       ("credential.sign_in_refused", "integration", "gateway")]
    refused = next(e for e in entries if e["action"] == "credential.sign_in_refused")
    assert "401" in refused["reason"] and all(t not in str(entries)
                                              for t in anaplan.standin.tokens)


async def test_refreshed_before_expiry_and_metrics(
        make_gateway: GatewayFactory, auth_server: AuthServer, anaplan: Anaplan) -> None:
    auth_server.issue(TOKEN)
    anaplan.standin.lifetime = 5.0
    gw = await start(make_gateway, anaplan)
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    await asyncio.sleep(3.9)  # past three quarters of its life, a second before its end
    assert (await gw.client.get("/2/0/x", headers=AUTH)).status == 200
    assert (anaplan.standin.calls["authenticate"], anaplan.standin.calls["refresh"]) == (1, 1)
    metrics = await gw.metrics()
    for outcome in ("signed_in", "refreshed"):
        assert ('gateway_upstream_credential_refreshes_total{identity="integration",'
                f'mode="service",outcome="{outcome}"}} 1.0') in metrics
    [expiry] = [line for line in metrics.splitlines()
                if line.startswith('gateway_upstream_credential_expiry_seconds{identity="integ')]
    # the time left on the token, as the scrape sees it
    assert 0 < float(expiry.split()[-1]) <= anaplan.standin.lifetime


# --- configuration ---------------------------------------------------------------------------

def test_service_without_secret_keys_is_refused_at_start(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(POLICY.format(service="https://auth.anaplan.com", cert="c", key="k"))
    settings = load_settings(environ={}, policies=str(file), redis_url="redis://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="GATEWAY_SECRET_KEYS"):
        create_apps(settings)
    bad = load_settings(environ={}, policies=str(file), redis_url="redis://127.0.0.1:1",
                        secret_keys=base64.b64encode(b"short").decode())
    with pytest.raises(ConfigurationError, match="not 32"):
        create_apps(bad)


@pytest.mark.parametrize(("change", "message"), [
    (("identity: integration", "identity: nobody"),
     "upstream 'api': key identity: unknown identity 'nobody' (known: integration)"),
    (("kind: anaplan-certificate", "kind: anaplan-oauth"),
     "identity 'integration', key kind: expected one of"),
    (("    identity: integration\n", ""), "upstream 'api': key identity: required when"),
    (("    private_key_file: k\n", ""), "identity 'integration': key private_key_file: required"),
    (("    private_key_file: k\n", "    private_key_file: k\n    certificate_payload: v3\n"),
     "identity 'integration', key certificate_payload: expected one of"),
])
def test_policy_refuses_bad_identities(tmp_path: Path, change: tuple[str, str],
                                       message: str) -> None:
    file = tmp_path / "p.yaml"
    text = POLICY.format(service="https://auth.anaplan.com", cert="c", key="k")
    file.write_text(text.replace(*change))
    with pytest.raises(PolicyError) as caught:
        load_policy(file)
    assert str(caught.value).startswith(f"{file}: ")
    assert message in str(caught.value)


def test_policy_reads_identities(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(POLICY.format(service="https://auth.anaplan.com/", cert="c", key="k"))
    policy = load_policy(file)
    assert policy.upstreams["api"].identity == "integration"
    assert policy.identities["integration"] == Identity(
        "integration", "anaplan-certificate", "https://auth.anaplan.com", "c", "k")
    assert json.dumps(sorted(policy.identities)) == '["integration"]'


async def test_an_apapi_script_reaches_anaplan_with_only_a_gateway_client_id(
        make_auth_gateway: AuthGatewayFactory, anaplan: Anaplan) -> None:
    """What an admin promises app developers: a script written with apapi's OAuth classes,
    its URLs changed, holds a gateway refresh token only; the gateway signs in to
    Anaplan (the stand-in accepts nothing else) with its service certificate."""
    from apapi import TransactionalConnection
    from apapi.authentication import OAuth2Rotatable
    from apapi.utils import get_generic_session

    from tests.test_anaplan_compat import _device_grant

    policy = anaplan.policy().replace("    path: /**", "    path: /2/0/**")
    h = await make_auth_gateway(policy.replace("{", "{{").replace("}", "}}"),
                                secret_keys=KEY_A)
    client_id, body = await _device_grant(h)
    saved = {"refresh_token": body["refresh_token"]}

    def script() -> list[int]:
        auth = OAuth2Rotatable(
            client_id, lambda: saved["refresh_token"],
            lambda token: saved.__setitem__("refresh_token", token),
            oauth2_url=h.issuer, auth_url=h.issuer, session=get_generic_session(0))
        try:
            conn = TransactionalConnection(auth, api_url=h.issuer)
            first = conn.get_workspaces().status_code
            auth.refresh_token()
            return [first, conn.get_workspaces().status_code]
        finally:
            auth.close()

    assert await asyncio.to_thread(script) == [200, 200]
    assert saved["refresh_token"] != body["refresh_token"]
    sent = anaplan.standin.api_authorizations
    assert len(sent) == 2 and len(set(sent)) == 1
    [token] = anaplan.standin.tokens
    assert sent[0] == f"AnaplanAuthToken {token}"  # the gateway's own, one sign-in
    assert anaplan.standin.calls["authenticate"] == 1
