"""OAuth errors (RFC 6749 section 5.2, RFC 8628 section 3.5, RFC 7009, RFC 7662).

One hierarchy, one root; each class carries the RFC's ``error`` code and status and is
rendered straight into the RFC's JSON body.
"""

from __future__ import annotations

import json

from aiohttp import web


class OAuthError(Exception):
    """Root of the authorization server's errors."""

    error = "server_error"
    status = 400

    def __init__(self, description: str = "") -> None:
        super().__init__(description or self.error)
        self.description = description

    def response(self) -> web.Response:
        body: dict[str, str] = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="oauth-gateway"'
        return web.Response(status=self.status, body=json.dumps(body).encode(),
                            content_type="application/json", headers=headers)


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    """Client authentication failed (section 5.2: 401 with a challenge)."""

    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class UnsupportedTokenType(OAuthError):
    """RFC 7009 section 2.2.1."""

    error = "unsupported_token_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class AccessDenied(OAuthError):
    error = "access_denied"


class AuthorizationPending(OAuthError):
    """RFC 8628 section 3.5."""

    error = "authorization_pending"


class SlowDown(OAuthError):
    """RFC 8628 section 3.5: poll less often (interval grows by 5 s)."""

    error = "slow_down"


class ExpiredToken(OAuthError):
    """RFC 8628 section 3.5: the device code expired."""

    error = "expired_token"


class TooManyRequests(OAuthError):
    error = "too_many_requests"
    status = 429


class ServerError(OAuthError):
    error = "server_error"
    status = 500
