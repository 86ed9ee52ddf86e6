"""A stand-in for Anaplan's token service (``auth.anaplan.com``) and an API that takes
only the tokens it issued.

It speaks what Anaplan's public documentation and client libraries show:

- ``POST /token/authenticate``: ``Basic`` (user and password), or ``CACertificate``
  with the certificate (base64 of the PEM file's bytes, or of the DER) and a JSON body
  ``{"encodedData", "encodedSignedData"}``: at least 100 random bytes, and their RSA
  PKCS#1 v1.5 SHA-512 signature. With ``"encodedDataFormat": "v2"`` the data starts with
  8 bytes of big-endian Unix seconds, which must be recent. The certificate must be
  issued by the stand-in's CA, valid now, and its key must have made the signature;
- ``POST /token/refresh``, ``GET /token/validate``, ``POST /token/logout`` with
  ``AnaplanAuthToken``;
- ``/2/0/...`` and every other path: the API, which answers 401 to any token it did not
  issue or that expired, was logged out or was made stale (:meth:`stale`).

``calls`` counts the calls per endpoint; ``down`` makes the token service answer 503,
``refuse`` makes it refuse every sign-in and refresh. :func:`make_ca` and
:func:`make_client_certificate` build a test CA and a certificate it issued.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

V2_CLOCK_SKEW = 300.0  # seconds a v2 timestamp may be off


@dataclass
class Issued:
    """A token the stand-in issued."""

    value: str
    token_id: str
    user: str
    expires_at: float  # Unix seconds
    dead: bool = False  # logged out, or made stale


@dataclass
class TokenServiceStandIn:
    """The token service and the API, in memory. ``lifetime``: seconds a token lives."""

    ca: x509.Certificate
    users: dict[str, str] = field(default_factory=dict)  # basic auth: user -> password
    lifetime: float = 2100.0
    calls: Counter[str] = field(default_factory=Counter)
    down: bool = False
    refuse: bool = False
    tokens: dict[str, Issued] = field(default_factory=dict)
    #: the Authorization headers the API received, in order
    api_authorizations: list[str] = field(default_factory=list)

    # -- helpers for tests ---------------------------------------------------------

    def stale(self) -> None:
        """Every token issued so far is refused from now on (as after a logout elsewhere)."""
        for issued in self.tokens.values():
            issued.dead = True

    def live(self, value: str) -> Issued | None:
        issued = self.tokens.get(value)
        if issued is None or issued.dead or issued.expires_at <= time.time():
            return None
        return issued

    def _issue(self, user: str) -> Issued:
        issued = Issued(secrets.token_urlsafe(32), uuid.uuid4().hex, user,
                        time.time() + self.lifetime)
        self.tokens[issued.value] = issued
        return issued

    # -- the token service -----------------------------------------------------------

    @staticmethod
    def _failure(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"status": code, "statusMessage": message}, status=status)

    @staticmethod
    def _envelope(issued: Issued, message: str) -> web.Response:
        return web.json_response({
            "meta": {"validationUrl": "/token/validate"}, "status": "SUCCESS",
            "statusMessage": message,
            "tokenInfo": {"tokenId": issued.token_id, "tokenValue": issued.value,
                          "expiresAt": int(issued.expires_at * 1000),
                          "refreshTokenId": uuid.uuid4().hex}})

    def _unavailable(self) -> web.Response | None:
        if self.down:
            return web.json_response({"status": "FAILURE", "statusMessage": "down"}, status=503)
        return None

    async def authenticate(self, request: web.Request) -> web.Response:
        self.calls["authenticate"] += 1
        if (down := self._unavailable()) is not None:
            return down
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme == "Basic":
            user = self._basic_user(value)
        elif scheme == "CACertificate":
            user = self._certificate_user(value, await request.read())
        else:
            return self._failure(401, "FAILURE_BAD_HEADER", "Unsupported authorization")
        if user is None or self.refuse:
            return self._failure(401, "FAILURE_BAD_CREDENTIAL", "Bad credentials")
        return self._envelope(self._issue(user), "Login successful")

    def _basic_user(self, value: str) -> str | None:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        known = self.users.get(user)
        return user if known is not None and secrets.compare_digest(known, password) else None

    def _certificate_user(self, value: str, body: bytes) -> str | None:
        try:
            raw = base64.b64decode(value, validate=True)
            cert = (x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----")
                    else x509.load_der_x509_certificate(raw))
            payload: dict[str, Any] = json.loads(body)
            data = base64.b64decode(payload["encodedData"], validate=True)
            signature = base64.b64decode(payload["encodedSignedData"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        random = data
        if payload.get("encodedDataFormat") == "v2":
            self.calls["authenticate_v2"] += 1
            stamp = int.from_bytes(data[:8], "big")
            if abs(stamp - time.time()) > V2_CLOCK_SKEW:
                return None
            random = data[8:]
        if len(random) < 100:
            return None
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return None
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            return None
        try:
            cert.verify_directly_issued_by(self.ca)
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA512())
        except (InvalidSignature, ValueError, TypeError):
            return None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else "certificate"

    def _presented(self, request: web.Request) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return value.strip() if scheme == "AnaplanAuthToken" and value.strip() else None

    async def refresh(self, request: web.Request) -> web.Response:
        self.calls["refresh"] += 1
        if (down := self._unavailable()) is not None:
            return down
        value = self._presented(request)
        if value is None:
            return self._failure(400, "FAILURE_BAD_HEADER", "Bad header")
        issued = self.live(value)
        if issued is None or self.refuse:
            return self._failure(401, "FAILURE_BAD_CREDENTIAL", "Token is not valid")
        issued.expires_at = time.time() + self.lifetime  # the value stays the same
        return self._envelope(issued, "Token refreshed")

    async def validate(self, request: web.Request) -> web.Response:
        self.calls["validate"] += 1
        if (down := self._unavailable()) is not None:
            return down
        value = self._presented(request)
        if value is None:
            return self._failure(400, "FAILURE_BAD_HEADER", "Bad header")
        issued = self.live(value)
        if issued is None:
            return self._failure(401, "FAILURE_BAD_CREDENTIAL", "Token is not valid")
        return web.json_response({
            "status": "SUCCESS", "statusMessage": "Token validated",
            "tokenInfo": {"expiresAt": int(issued.expires_at * 1000),
                          "tokenId": issued.token_id},
            "userInfo": {"userGuid": uuid.uuid5(uuid.NAMESPACE_OID, issued.user).hex,
                         "userId": issued.user,
                         "customerGuid": "8a81b09d5e8c6f27015e8d3d4f2b0001"}})

    async def logout(self, request: web.Request) -> web.Response:
        self.calls["logout"] += 1
        if (down := self._unavailable()) is not None:
            return down
        value = self._presented(request)
        issued = self.live(value) if value else None
        if issued is None:
            return self._failure(401, "FAILURE_BAD_HEADER", "Bad header")
        issued.dead = True
        return web.Response(status=204)

    # -- the API -----------------------------------------------------------------------

    async def api(self, request: web.Request) -> web.Response:
        self.calls["api"] += 1
        self.api_authorizations.append(request.headers.get("Authorization", ""))
        value = self._presented(request)
        if value is None or self.live(value) is None:
            return web.json_response({"status": {"code": 401, "message": "Unauthorized"},
                                      "path": request.path}, status=401)
        await request.read()
        return web.json_response({"meta": {"schema": "https://api.anaplan.com/2/0/objects"},
                                  "status": {"code": 200, "message": "Success"},
                                  "path": request.path, "method": request.method})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token/authenticate", self.authenticate)
        app.router.add_post("/token/refresh", self.refresh)
        app.router.add_get("/token/validate", self.validate)
        app.router.add_post("/token/logout", self.logout)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app


def make_ca(name: str = "Stand-in CA") -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed CA certificate and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_client_certificate(ca: x509.Certificate, ca_key: rsa.RSAPrivateKey,
                            user: str = "integration@example.com") -> tuple[bytes, bytes]:
    """A certificate ``ca`` issued for ``user``, and its private key: both PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
