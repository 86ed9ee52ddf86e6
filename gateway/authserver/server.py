"""The authorization server object: its collaborators and client authentication.

Built by the app factory when ``GATEWAY_ISSUER`` is set and handed to every endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import MultiDictProxy

from gateway.authserver.errors import InvalidClient, InvalidRequest
from gateway.authserver.hashing import verify_secret
from gateway.authserver.issuance import TokenIssuer
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.models import OAuthClient, TokenPolicy
from gateway.authserver.storage import AuthStore
from gateway.config.settings import Settings


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


@dataclass
class AuthorizationServer:
    """Everything the endpoints share."""

    settings: Settings
    store: AuthStore
    issuer: TokenIssuer
    metrics: AuthServerMetrics
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def issuer_url(self) -> str:
        return self.settings.issuer.rstrip("/")

    def url(self, path: str) -> str:
        return self.issuer_url + path

    async def read_form(self, request: web.Request) -> MultiDictProxy[str]:
        """RFC 6749 section 3.2: POST with ``application/x-www-form-urlencoded``."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise InvalidRequest("Send the parameters as application/x-www-form-urlencoded.")
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
        from multidict import MultiDict

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


class ServerSlot:
    """Holds the server once the app has started (its store needs Redis)."""

    server: AuthorizationServer | None = None


AS_SLOT = web.AppKey("auth_server_slot", ServerSlot)


def server_of(request: web.Request) -> AuthorizationServer:
    """The authorization server of the app handling ``request``."""
    server = request.app[AS_SLOT].server
    if server is None:
        raise web.HTTPServiceUnavailable(text="authorization server not started")
    return server
