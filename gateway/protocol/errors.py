"""Errors the gateway answers with, rendered as RFC-shaped JSON bodies.

One hierarchy, one root (:class:`GatewayError`). Each class carries the RFC's own
``error`` code and HTTP status; :func:`error_response` renders any of them. RFC 6750
section 3 governs the ``WWW-Authenticate`` header of 401 and 403 answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

REALM = "oauth-gateway"


class GatewayError(Exception):
    """Root of every refusal the gateway sends. Subclasses fix ``status`` and ``error``."""

    status: int = 500
    error: str = "server_error"
    #: the ``decision`` label recorded in ``gateway_auth_decisions_total``, if any
    decision: str | None = None

    def __init__(self, description: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.extra_headers: dict[str, str] = dict(headers or {})

    def headers(self) -> dict[str, str]:
        """Headers sent with the error response."""
        return dict(self.extra_headers)


def _quote(value: str) -> str:
    # RFC 6750 section 3: attribute values are quoted-strings; the characters we put
    # there are restricted to %x20-21 / %x23-5B / %x5D-7E, so drop anything else.
    return "".join(c for c in value if 0x20 <= ord(c) <= 0x7E and c not in '"\\')


class BearerError(GatewayError):
    """A refusal tied to the bearer token (RFC 6750 section 3)."""

    status = 401
    error = "invalid_token"
    decision = "invalid_token"
    #: scopes named in the ``scope`` attribute of ``WWW-Authenticate``
    scope: str | None = None

    def headers(self) -> dict[str, str]:
        parts = [f'Bearer realm="{REALM}"']
        if self.error:
            parts.append(f'error="{self.error}"')
            parts.append(f'error_description="{_quote(self.description)}"')
        if self.scope:
            parts.append(f'scope="{_quote(self.scope)}"')
        headers = super().headers()
        headers["WWW-Authenticate"] = ", ".join(parts)
        return headers


class MissingToken(BearerError):
    """No credentials at all: RFC 6750 section 3.1 says send no error code."""

    error = ""
    decision = "missing_token"

    def body_error(self) -> str:
        return "invalid_request"


class InvalidToken(BearerError):
    """Expired, revoked, malformed or unknown token (RFC 6750 section 3.1)."""


class ClientDisabled(BearerError):
    """The token's client is disabled by security staff; the token is refused as invalid."""

    decision = "client_disabled"


class UserDisabled(BearerError):
    """The person the token speaks for is disabled by security staff; refused as invalid."""

    decision = "user_disabled"


class ClientUnknown(BearerError):
    """``GATEWAY_REQUIRE_CLIENT_RECORD`` is on and the client has no record."""

    decision = "unknown_client"


class InsufficientScope(BearerError):
    """RFC 6750 section 3.1: the token lacks a scope the route requires."""

    status = 403
    error = "insufficient_scope"
    decision = "insufficient_scope"

    def __init__(self, description: str, *, required: list[str]) -> None:
        super().__init__(description)
        self.scope = " ".join(required)


class MachineTokenRefused(GatewayError):
    """A machine client's token (RFC 6749 section 4.4: no person behind it) on a route
    whose upstream would receive the client's own credentials or none of the gateway's:
    only upstreams where the gateway signs in itself serve machines."""

    status = 403
    error = "access_denied"
    decision = "machine_token_refused"


class InvalidRequest(GatewayError):
    """A malformed request (RFC 6750 section 3.1 ``invalid_request``)."""

    status = 400
    error = "invalid_request"
    decision = "invalid_request"


class IntrospectionUnavailable(GatewayError):
    """The authorization server cannot be reached and the token is not cached: fail closed."""

    status = 503
    error = "temporarily_unavailable"
    decision = "introspection_unavailable"

    def __init__(self, description: str, *, retry_after: int = 5) -> None:
        super().__init__(description, headers={"Retry-After": str(retry_after)})


class NoRoute(GatewayError):
    """No policy route matches the method and path: deny by default."""

    status = 404
    error = "no_route"
    decision = "no_route"


class MethodNotAllowed(GatewayError):
    """A route matches the path but not the method."""

    status = 405
    error = "method_not_allowed"
    decision = "no_route"


class PayloadTooLarge(GatewayError):
    """The request body exceeds the configured limit."""

    status = 413
    error = "payload_too_large"


class RequestTimeout(GatewayError):
    """The client paused too long while sending its request body."""

    status = 408
    error = "request_timeout"


class BadGateway(GatewayError):
    """The upstream could not be reached or broke the exchange."""

    status = 502
    error = "bad_gateway"


class GatewayTimeout(GatewayError):
    """The upstream did not answer in time."""

    status = 504
    error = "gateway_timeout"


class ServiceUnavailable(GatewayError):
    """A dependency the decision needs (Redis) is unavailable: fail closed."""

    status = 503
    error = "temporarily_unavailable"

    def __init__(self, description: str, *, retry_after: int = 2) -> None:
        super().__init__(description, headers={"Retry-After": str(retry_after)})


class RateLimited(GatewayError):
    """The client is over its rate limit (the headers say when to come back)."""

    status = 429
    error = "rate_limited"
    decision = "rate_limited"


def json_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Render an RFC 6749-style JSON error body."""
    body = json.dumps({"error": error, "error_description": description})
    return web.Response(
        status=status,
        body=body.encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def error_response(exc: GatewayError, headers: Mapping[str, str] | None = None) -> web.Response:
    """Render ``exc`` as its HTTP response."""
    error = exc.body_error() if isinstance(exc, MissingToken) else exc.error
    return json_error(exc.status, error, exc.description, {**exc.headers(), **(headers or {})})
