"""The authorization server object: its collaborators and client authentication.

Built once, frozen, when the gateway starts (:mod:`gateway.authserver.assembly`), and
found by every endpoint through :func:`server_of`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from gateway.appkeys import AUTH_SERVER
from gateway.authserver.errors import InvalidClient, InvalidRequest
from gateway.authserver.hashing import verify_secret, verify_secret_evenly
from gateway.authserver.issuance import TokenIssuer
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.models import OAuthClient, TokenPolicy
from gateway.authserver.storage import AuthStore
from gateway.config.settings import Settings

if TYPE_CHECKING:
    from gateway.authserver.rfc9068 import SigningKeys


def tenant_defaults(settings: Settings) -> TokenPolicy:
    """The token policy a client gets for every value it does not set itself."""
    return TokenPolicy(
        access_token_ttl=settings.as_access_token_ttl, refresh_mode=settings.as_refresh_mode,
        refresh_token_ttl=settings.as_refresh_token_ttl, idle_timeout=settings.as_idle_timeout,
        grant_max_lifetime=settings.as_grant_max_lifetime).validate()


def cache_pin_ttl(settings: Settings) -> int:
    """How long a revoked token's digest stays pinned inactive in the gateway's cache:
    past any cached "active" answer for it, in Redis or in a replica's memory."""
    return int(max(settings.cache_max_ttl, settings.local_cache_ttl)) + 60


GrantHandler = Callable[["AuthorizationServer", web.Request, OAuthClient, MultiDictProxy[str]],
                        Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class GrantTypes:
    """The grant types this server's token endpoint takes, each with its handler.

    Registered on the server instance by the assembly (RFC 6749 section 4 and its
    extensions), so two servers in one process never share a table.
    """

    handlers: dict[str, GrantHandler] = field(default_factory=dict)

    def register(self, grant_type: str, handler: GrantHandler) -> None:
        self.handlers[grant_type] = handler

    def get(self, grant_type: str) -> GrantHandler | None:
        return self.handlers.get(grant_type)


@dataclass(frozen=True, slots=True)
class DeviceFlowTiming:
    """RFC 8628 section 3.2: how long a device code lives, and how often a device polls."""

    expires_in: int = 600
    interval: int = 5


@dataclass(frozen=True)
class AuthorizationServer:
    """Everything the endpoints share, built once."""

    settings: Settings
    store: AuthStore
    issuer: TokenIssuer
    metrics: AuthServerMetrics
    grants: GrantTypes
    #: RFC 8414 ``scopes_supported``: the scopes the policies' routes ask for
    scopes_supported: tuple[str, ...] = ()
    device: DeviceFlowTiming = DeviceFlowTiming()
    #: RFC 9068 signing keys when access tokens are JWTs, else None (opaque tokens)
    signing_keys: SigningKeys | None = None

    @property
    def issuer_url(self) -> str:
        return self.settings.issuer.rstrip("/")

    def url(self, path: str) -> str:
        return self.issuer_url + path

    def source(self, request: web.Request) -> str:
        """The address a request comes from, for rate limits and the audit stream: with
        ``GATEWAY_TRUSTED_PROXIES`` = N, the address the outermost of those N proxies saw
        (the N-th entry of ``X-Forwarded-For`` from its end), else the TCP peer. Behind a
        load balancer the peer is the balancer, which every user shares."""
        peer = request.remote or "?"
        hops = self.settings.trusted_proxies
        if hops <= 0 or "X-Forwarded-For" not in request.headers:
            return peer
        chain = [a.strip() for a in ",".join(request.headers.getall("X-Forwarded-For"))
                 .split(",") if a.strip()]
        # the last proxy's own append is its TCP peer, not in the header it received
        chain.append(peer)
        return chain[-hops - 1] if len(chain) > hops else chain[0]

    async def read_form(self, request: web.Request, *, json_body: bool = False
                        ) -> MultiDictProxy[str]:
        """RFC 6749 section 3.2: POST with ``application/x-www-form-urlencoded``. With
        ``json_body``, a JSON object of strings is taken too, as Anaplan's own token and
        device endpoints take it (clients written for Anaplan send JSON)."""
        if json_body and request.content_type == "application/json":
            return await _json_form(request)
        if request.content_type != "application/x-www-form-urlencoded":
            raise InvalidRequest("Send the parameters as application/x-www-form-urlencoded"
                                 + (" or JSON." if json_body else "."))
        form = await request.post()
        out: dict[str, str] = {}
        for key in form:
            values = form.getall(key)
            if len(values) > 1:  # section 3.2: parameters must not be repeated
                raise InvalidRequest(f"The parameter {key} is repeated.")
            value = values[0]
            if not isinstance(value, str):
                raise InvalidRequest(f"The parameter {key} must be text.")
            out[key] = value
        return MultiDictProxy(MultiDict(out))

    async def authenticate_client(self, request: web.Request, form: MultiDictProxy[str], *,
                                  require_secret: bool = False) -> OAuthClient:
        """RFC 6749 section 2.3: ``client_secret_basic`` (or ``client_secret_post``) for
        confidential clients; public clients identify themselves with ``client_id``."""
        header = request.headers.get("Authorization", "")
        secret: str | None = None
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
                raw_id, _, raw_secret = decoded.partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidClient("Malformed Basic credentials.") from None
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if "client_secret" in form:
                # section 2.3: "MUST NOT use more than one authentication method in each
                # request"; which secret would count is no guess to make
                raise InvalidRequest("Client credentials in both the Authorization header "
                                     "and the body: send them once.")
            if form.get("client_id") not in (None, client_id):
                raise InvalidRequest("client_id differs from the authenticated client.")
        elif "client_secret" in form:
            client_id, secret = form.get("client_id", ""), form["client_secret"]
        else:
            client_id = form.get("client_id", "")
        if not client_id:
            raise InvalidClient("Client authentication is required.")
        client = await self.store.get_client(client_id)
        if client is None:
            if secret is not None:  # as slow as a known client's wrong secret
                await asyncio.to_thread(verify_secret_evenly, secret, None)
            raise InvalidClient("Unknown client or bad credentials.")
        if client.confidential or require_secret:
            if secret is None or not client.confidential:
                raise InvalidClient("This client must authenticate with its secret.")
            if not await self._secret_ok(client, secret):
                raise InvalidClient("Unknown client or bad credentials.")
        elif secret:
            raise InvalidClient("A public client has no secret.")
        if client.disabled:
            raise InvalidClient("This client is disabled.")
        return client

    async def _secret_ok(self, client: OAuthClient, secret: str) -> bool:
        # scrypt takes ~50 ms of CPU: off the event loop
        if await asyncio.to_thread(verify_secret, secret, client.secret_hash):
            return True
        return bool(client.old_secret_hash and client.old_secret_expires_at > time.time()
                    and await asyncio.to_thread(verify_secret, secret, client.old_secret_hash))


async def _json_form(request: web.Request) -> MultiDictProxy[str]:
    """A JSON object whose members are strings, as the parameters of a form."""
    try:
        body = await request.json(loads=json.loads)
    except ValueError:
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    out: dict[str, str] = {}
    for key, value in body.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"The parameter {key} must be a string.")
        out[key] = value
    return MultiDictProxy(MultiDict(out))


def server_of(request: web.Request) -> AuthorizationServer:
    """The authorization server of the app handling ``request``."""
    server = request.app[AUTH_SERVER].server
    if server is None:
        raise web.HTTPServiceUnavailable(text="authorization server not started")
    return server
