"""JWT access tokens (RFC 9068), signed with keys this server generates, rotates and
publishes as a JWK Set (RFC 7517 section 5) at ``GET /oauth/jwks``.

Enabled by ``GATEWAY_AS_ACCESS_TOKEN_FORMAT=jwt``. The token is a compact JWS
(RFC 7515) whose header is ``{"typ": "at+jwt", "alg": "ES256", "kid": ...}``
(RFC 9068 section 2.1) and whose claims are those of section 2.2: ``iss`` (the
issuer URL), ``sub``, ``aud``, ``exp``, ``iat``, ``jti``, ``client_id`` and ``scope``
(section 2.2.3), plus the private claim ``grant_id`` (the grant, i.e. device, it
belongs to; an identifier, not a credential).

- ``aud`` is the issuer URL itself: this server issues tokens for the gateway it
  runs in, which is served at the same origin. A resource server validating them
  with ``GATEWAY_VALIDATOR=jwt`` sets ``GATEWAY_JWT_AUDIENCE`` to the issuer URL.
- ``username`` is left out (RFC 9068 section 6, privacy): a JWT is readable by
  whoever holds it (the client, any log that catches it), and ``sub`` already
  names the user. A resource server that
  needs the name asks the introspection endpoint (RFC 7662), which returns it.

The token is still stored by digest like an opaque one (see ``issuance``), so the
gateway's in-process validator, introspection and revocation treat it exactly the
same. Resource servers that only check the signature cannot see a revocation
before ``exp``; those sharing this Redis and digest key (another gateway with
``GATEWAY_VALIDATOR=jwt``) still honour the revocation pin for its lifetime.

Signing keys (ES256 on P-256 by default; RS256 with 2048-bit RSA when built with
``alg="RS256"``) live in the Redis hash ``{prefix}as:signing_keys``: field = ``kid``
(the RFC 7638 JWK thumbprint), value = JSON with the public JWK, ``created_at``,
``activates_at`` and the private key as PKCS#8 PEM encrypted with AES-256-GCM (the
``kid`` as associated data). The encryption key is derived (HKDF-SHA256) from the
gateway's token digest key. When ``GATEWAY_TOKEN_DIGEST_KEY`` is set, a copy of
Redis alone does not yield the private keys; when it is not set, the digest key
itself lives in Redis (``{prefix}meta:digest_key``), so **whoever can read Redis can
read the signing keys** and forge tokens. Every replica must share the digest key
(they already must, for token digests); a key that cannot be decrypted is still
published but never signs, and a new one is made.

Rotation: a new key is created ``PUBLISH_AHEAD`` before the active one turns
``ROTATION_PERIOD`` old and starts signing at that moment, so resource servers that
cache the JWKS (``Cache-Control: max-age=300``) know it before they meet it. A
retired key stays published for ``RETENTION`` after its successor took over, the
longest access-token lifetime a :class:`~.models.TokenPolicy` allows plus a margin,
and is then dropped. :meth:`SigningKeys.rotate` makes a key that signs at once.
Replicas re-read the keys every ``RELOAD_INTERVAL`` seconds; changes go through a
WATCH/MULTI transaction on the hash, so two replicas never both rotate (one key, so one
hash slot: the same transaction on Redis Cluster).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import jwt
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from redis.asyncio import Redis
from redis.exceptions import WatchError

from gateway.authserver.server import server_of
from gateway.authserver.storage import AuthStore
from gateway.state.keys import Keys

log = logging.getLogger(__name__)

ROTATION_PERIOD = 30 * 24 * 3600
PUBLISH_AHEAD = 3600
# TokenPolicy.validate caps access tokens at 24 h; the hour covers validators' leeway
RETENTION = 24 * 3600 + 3600
RELOAD_INTERVAL = 60.0
JWKS_MAX_AGE = 300
# RFC 7638 section 3.2: the required members of each key type, in the thumbprint
_REQUIRED = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 section 3: SHA-256 of the required members as compact, sorted JSON."""
    members = {name: jwk[name] for name in _REQUIRED[jwk["kty"]]}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def key_cipher(store: AuthStore) -> AESGCM:
    """AES-256-GCM keyed from the token digest key (a keyed digest of a fixed label)."""
    secret = bytes.fromhex(store.digest("as:signing_keys:encryption/v1"))
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"oauth-gateway signing keys"
               ).derive(secret)
    return AESGCM(key)


@dataclass(frozen=True)
class SigningKey:
    """One key pair. ``private_key`` is None when this replica cannot decrypt it."""

    kid: str
    alg: str
    created_at: float
    activates_at: float
    public_jwk: dict[str, str]
    private_key: PrivateKey | None

    @classmethod
    def generate(cls, alg: str, *, now: float, activates_at: float) -> SigningKey:
        private: PrivateKey
        if alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
            full = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        elif alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            full = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        else:
            raise ValueError(f"unsupported signing algorithm {alg!r}; use ES256 or RS256")
        jwk = {name: str(full[name]) for name in _REQUIRED[str(full["kty"])]}
        return cls(thumbprint(jwk), alg, now, activates_at, jwk, private)

    def published(self) -> dict[str, str]:
        """The public JWK (RFC 7517 section 4) as the JWKS lists it."""
        return {**self.public_jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


class SigningKeys:
    """The fleet's signing keys: cached here, held in Redis, rotated on schedule.

    ``clock`` is wall-clock seconds (activation times are compared across replicas).
    """

    def __init__(self, redis: Redis, *, key_prefix: str, cipher: AESGCM, alg: str = "ES256",
                 clock: Callable[[], float] = time.time,
                 rotation_period: int = ROTATION_PERIOD, publish_ahead: int = PUBLISH_AHEAD,
                 retention: int = RETENTION, reload_interval: float = RELOAD_INTERVAL) -> None:
        self.redis = redis
        self.key = Keys(key_prefix).as_signing_keys
        self.cipher = cipher
        self.alg = alg
        self.clock = clock
        self.rotation_period = rotation_period
        self.publish_ahead = publish_ahead
        self.retention = retention
        self.reload_interval = reload_interval
        self.keys: list[SigningKey] = []
        self._loaded_at = -float("inf")

    async def current(self) -> SigningKey:
        """The key that signs now (re-read, created or rotated first when due)."""
        await self._refresh()
        active = self._active(self.keys, self.clock())
        if active is None or active.private_key is None:
            # only when replicas keep replacing each other's keys: different digest keys
            raise RuntimeError("no signing key this replica can decrypt; do all replicas "
                               "share GATEWAY_TOKEN_DIGEST_KEY?")
        return active

    async def published(self) -> list[dict[str, str]]:
        """Every public key a valid token may name: pending, active and retained ones."""
        await self._refresh()
        return [k.published() for k in sorted(self.keys, key=lambda k: k.activates_at)]

    async def rotate(self) -> SigningKey:
        """Make a new key that signs from now on; the old ones stay published."""
        await self._maintain(force=True)
        return await self.current()

    async def reload(self) -> None:
        """Read the keys from Redis now, whatever the cache's age."""
        raw = cast(dict[str, str], await self.redis.hgetall(self.key))
        self.keys = self._parse(raw)
        self._loaded_at = time.monotonic()

    async def _refresh(self) -> None:
        if time.monotonic() - self._loaded_at >= self.reload_interval:
            await self.reload()
        create_at, drop = self._plan(self.keys, self.clock(), force=False)
        if create_at is not None or drop:
            await self._maintain(force=False)

    def _active(self, keys: list[SigningKey], now: float) -> SigningKey | None:
        started = [k for k in keys if k.activates_at <= now]
        return max(started, key=lambda k: (k.activates_at, k.created_at), default=None)

    def _plan(self, keys: list[SigningKey], now: float, *, force: bool
              ) -> tuple[float | None, list[str]]:
        """When a new key must start signing (None: no new key), and the kids to drop."""
        active = self._active(keys, now)
        create_at: float | None = None
        if force or active is None or active.private_key is None:
            create_at = now
        else:
            newest = max(keys, key=lambda k: k.activates_at)
            due = newest.activates_at + self.rotation_period
            if due - self.publish_ahead <= now:
                create_at = max(due, now + self.publish_ahead)
        drop = []
        for key in keys:
            took_over = [k.activates_at for k in keys if key.activates_at < k.activates_at <= now]
            if took_over and min(took_over) + self.retention <= now:
                drop.append(key.kid)
        return create_at, drop

    async def _maintain(self, *, force: bool) -> None:
        """Create and drop keys in one WATCH/MULTI transaction; a replica that loses
        the race re-reads and finds the winner's key, so it does not rotate again."""
        for _ in range(5):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.key)
                    keys = self._parse(cast(dict[str, str], await pipe.hgetall(self.key)))
                    now = self.clock()
                    create_at, drop = self._plan(keys, now, force=force)
                    new = (SigningKey.generate(self.alg, now=now, activates_at=create_at)
                           if create_at is not None else None)
                    if new is not None or drop:
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if new is not None:
                            pipe.hset(self.key, new.kid, self.record(new))
                        if drop:
                            pipe.hdel(self.key, *drop)
                        await pipe.execute()
                except WatchError:
                    continue
                self.keys = [k for k in keys if k.kid not in drop] + ([new] if new else [])
                self._loaded_at = time.monotonic()
                if new is not None:
                    log.info("signing key %s created; it signs from %d", new.kid,
                             new.activates_at)
                return
        await self.reload()  # contended five times: another replica is maintaining them

    def record(self, key: SigningKey) -> str:
        """The Redis value of ``key``: public parts in clear, private key sealed."""
        assert key.private_key is not None
        pem = key.private_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        nonce = secrets.token_bytes(12)
        sealed = nonce + self.cipher.encrypt(nonce, pem, key.kid.encode())
        return json.dumps({
            "alg": key.alg, "created_at": key.created_at, "activates_at": key.activates_at,
            "public_jwk": key.public_jwk, "encryption": "A256GCM",
            "private_key": base64.b64encode(sealed).decode()})

    def _parse(self, raw: dict[str, str]) -> list[SigningKey]:
        keys = []
        for kid, value in raw.items():
            try:
                data: dict[str, Any] = json.loads(value)
                sealed = base64.b64decode(data["private_key"])
                public_jwk = {str(k): str(v) for k, v in data["public_jwk"].items()}
                key = SigningKey(kid, str(data["alg"]), float(data["created_at"]),
                                 float(data["activates_at"]), public_jwk, None)
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("signing key %s in Redis is malformed; ignored", kid)
                continue
            try:
                pem = self.cipher.decrypt(sealed[:12], sealed[12:], kid.encode())
                private = serialization.load_pem_private_key(pem, password=None)
            except (InvalidTag, ValueError):
                log.warning("signing key %s cannot be decrypted (another digest key?); "
                            "it is published but will not sign", kid)
                keys.append(key)
                continue
            if isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                keys.append(SigningKey(kid, key.alg, key.created_at, key.activates_at,
                                       public_jwk, private))
        return keys


class JWTAccessTokenSigner:
    """The ``jwt_signer`` of :class:`~.issuance.TokenIssuer`: RFC 9068 section 2."""

    def __init__(self, keys: SigningKeys, *, issuer: str, audience: str) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience

    async def __call__(self, claims: dict[str, Any]) -> str:
        key = await self.keys.current()
        assert key.private_key is not None
        payload = {
            "iss": self.issuer, "sub": claims.get("sub") or claims["client_id"],
            "aud": self.audience, "exp": claims["exp"], "iat": claims["iat"],
            "jti": claims["jti"], "client_id": claims["client_id"],
            "scope": claims["scope"], "grant_id": claims["grant_id"],
        }
        return jwt.encode(payload, key.private_key, algorithm=key.alg,
                          headers={"typ": "at+jwt", "kid": key.kid})


async def load_signing_keys(store: AuthStore) -> SigningKeys:
    """The signing keys (created on first use), complete before the first token is issued."""
    keys = SigningKeys(store.redis, key_prefix=store.keys.prefix, cipher=key_cipher(store))
    await keys.current()
    return keys


def jwt_signer(keys: SigningKeys, issuer_url: str) -> JWTAccessTokenSigner:
    """The signer of access tokens for ``issuer_url`` (audience: the issuer itself)."""
    return JWTAccessTokenSigner(keys, issuer=issuer_url, audience=issuer_url)


async def jwks_endpoint(request: web.Request) -> web.Response:
    """RFC 7517 section 5: ``{"keys": [...]}``; empty while tokens are opaque."""
    keys = server_of(request).signing_keys
    body = {"keys": await keys.published() if keys is not None else []}
    return web.json_response(body, headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"})


def add_routes(app: web.Application) -> None:
    """Register ``GET /oauth/jwks``."""
    app.router.add_get("/oauth/jwks", jwks_endpoint)
