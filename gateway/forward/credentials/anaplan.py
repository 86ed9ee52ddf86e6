"""Signing in to Anaplan's token service as a policy identity.

``anaplan-certificate`` posts ``Authorization: CACertificate <base64 of the PEM file>``
with ``{"encodedData", "encodedSignedData"}``: 100 random bytes and their RSA PKCS#1
v1.5 SHA-512 signature (the ``v2`` form prefixes the data with 8 bytes of big-endian Unix
seconds and says ``"encodedDataFormat": "v2"``). ``anaplan-basic`` posts
``Authorization: Basic``. Both answer ``tokenInfo.tokenValue`` and ``expiresAt`` (epoch
milliseconds); ``/token/refresh`` takes ``AnaplanAuthToken`` and answers the same.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.config.policy import Identity

_TIMEOUT = aiohttp.ClientTimeout(total=10.0)


class SignInRefused(Exception):
    """The token service refused the credentials (or the token, on refresh)."""


class TokenServiceDown(Exception):
    """The token service could not be reached, or failed (5xx, garbage)."""


@dataclass(frozen=True, slots=True)
class AnaplanToken:
    """A token of the identity's and when it expires (Unix seconds)."""

    value: str
    expires_at: float


class AnaplanSignIn:
    """Signs ``identity`` in and refreshes its token. Reads its certificate, key or
    environment variables when built, so a missing one fails at start, not at sign-in."""

    def __init__(self, identity: Identity, session: aiohttp.ClientSession, *,
                 v2: bool = False, environ: Mapping[str, str] | None = None) -> None:
        self.identity = identity
        self.session = session
        self.v2 = v2
        self._authorization = ""
        self._key: rsa.RSAPrivateKey | None = None
        if identity.kind == "anaplan-certificate":
            pem = self._read(identity.certificate_file, "certificate_file")
            key = serialization.load_pem_private_key(
                self._read(identity.private_key_file, "private_key_file"), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"identity {identity.name!r}: key private_key_file: "
                                 "not an RSA private key")
            self._key = key
            self._authorization = "CACertificate " + base64.b64encode(pem).decode()
        else:
            env = os.environ if environ is None else environ
            user = env.get(identity.username_env, "")
            password = env.get(identity.password_env, "")
            if not user or not password:
                raise ValueError(
                    f"identity {identity.name!r}: environment variables "
                    f"{identity.username_env} and {identity.password_env} must both be set")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._authorization = "Basic " + basic

    def _read(self, path: str, key: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"identity {self.identity.name!r}: key {key}: cannot read "
                             f"{path}: {exc.strerror}") from None

    def _payload(self) -> bytes | None:
        if self._key is None:
            return None
        data = secrets.token_bytes(100)
        body: dict[str, str] = {}
        if self.v2:
            data = int(time.time()).to_bytes(8, "big") + data
            body["encodedDataFormat"] = "v2"
        signature = self._key.sign(data, padding.PKCS1v15(), hashes.SHA512())
        body["encodedData"] = base64.b64encode(data).decode()
        body["encodedSignedData"] = base64.b64encode(signature).decode()
        return json.dumps(body).encode()

    async def authenticate(self) -> AnaplanToken:
        """Sign in; raise :class:`SignInRefused` or :class:`TokenServiceDown`."""
        body = self._payload()
        headers = {"Authorization": self._authorization}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return await self._post("/token/authenticate", headers, body)

    async def refresh(self, token: str) -> AnaplanToken:
        """A later expiry for ``token`` (the value may change)."""
        return await self._post("/token/refresh", {"Authorization": f"AnaplanAuthToken {token}"},
                                None)

    async def _post(self, path: str, headers: dict[str, str], body: bytes | None
                    ) -> AnaplanToken:
        try:
            async with self.session.post(self.identity.auth_url + path, headers=headers,
                                         data=body, timeout=_TIMEOUT) as resp:
                if resp.status in (400, 401, 403):
                    raise SignInRefused(f"{path} answered {resp.status}")
                if resp.status not in (200, 201):
                    raise TokenServiceDown(f"{path} answered {resp.status}")
                answer: Any = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenServiceDown(f"{path}: {type(exc).__name__}: {exc}") from None
        try:
            info = answer["tokenInfo"]
            return AnaplanToken(str(info["tokenValue"]), float(info["expiresAt"]) / 1000)
        except (KeyError, TypeError, ValueError):
            raise TokenServiceDown(f"{path} answered without tokenInfo") from None
