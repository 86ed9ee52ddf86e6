"""The request pipeline, stage by stage (Oathkeeper's shape):

    path hygiene -> match a route -> find the token -> authenticate (cache, validator)
    -> govern the client -> authorize scopes -> forward -> observe

Every refusal is a :class:`~gateway.errors.GatewayError` rendered once, at the end,
with its RFC status, ``WWW-Authenticate`` and JSON body, and a refused request never
reaches an upstream.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from .accesslog import AccessLog
from .cache import TokenCache
from .clients import ClientRegistry
from .errors import (
    ClientDisabled,
    ClientUnknown,
    GatewayError,
    InsufficientScope,
    InvalidToken,
    MethodNotAllowed,
    NoRoute,
    error_response,
    json_error,
)
from .metrics import NO_ROUTE, GatewayMetrics
from .paths import safe_path
from .policy import Route, RoutePolicy
from .proxy import UpstreamForwarder
from .tokens import PresentedToken, extract_token
from .usage import UsageTracker

log = logging.getLogger(__name__)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(slots=True)
class Decision:
    """What the authentication and authorization stages concluded."""

    route: Route
    client_id: str | None
    digest: str
    token: PresentedToken


@dataclass(slots=True)
class RequestState:
    """What is known about a request so far, for metrics and the access log."""

    route: str = NO_ROUTE
    client_id: str | None = None


class ProxyPipeline:
    """The proxy listener's one handler. ``policy`` may be swapped at any time (SIGHUP):
    a request keeps the route it matched."""

    def __init__(self, *, policy: RoutePolicy, cache: TokenCache, registry: ClientRegistry,
                 forwarder: UpstreamForwarder, metrics: GatewayMetrics, access_log: AccessLog,
                 usage: UsageTracker, require_client_record: bool, max_auth_header: int
                 ) -> None:
        self.policy = policy
        self.cache = cache
        self.registry = registry
        self.forwarder = forwarder
        self.metrics = metrics
        self.access_log = access_log
        self.usage = usage
        self.require_client_record = require_client_record
        self.max_auth_header = max_auth_header

    async def authorize(self, request: web.Request, state: RequestState) -> Decision:
        """Run every stage before forwarding; raise a GatewayError to refuse."""
        path = safe_path(request.raw_path)
        match = self.policy.match(request.method, path)
        route = match.route
        if route is None:
            if match.method_mismatch:
                raise MethodNotAllowed(f"No route allows {request.method} on this path.")
            raise NoRoute("No route of the gateway's policy matches this request.")
        state.route = route.name
        token = extract_token(request.headers, request.query, max_header=self.max_auth_header)
        digest, info = await self.cache.lookup(token.value)
        if not info.active or info.expired():
            raise InvalidToken("The access token is invalid, expired or revoked.")
        client_id = state.client_id = info.client_id
        scopes = info.scopes
        if client_id:
            record = self.registry.cached(client_id) or await self.registry.get(client_id)
            if record.disabled:
                raise ClientDisabled("The client this token was issued to is disabled.")
            if self.require_client_record and not record.exists:
                raise ClientUnknown("The client this token was issued to is not registered.")
            if record.scopes is not None:
                scopes = scopes & record.scopes
        elif self.require_client_record:
            raise ClientUnknown("The token names no client, and a registered client is "
                                "required.")
        missing = [s for s in route.scopes if s not in scopes]
        if missing:
            raise InsufficientScope(
                "The access token lacks a scope this route requires.",
                required=list(route.scopes))
        return Decision(route, client_id, digest, token)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        sent_id = request.headers.get("X-Request-Id", "")
        request_id = sent_id if _SANE_REQUEST_ID.fullmatch(sent_id) else uuid.uuid4().hex
        state = RequestState()
        decision = "allowed"
        upstream_seconds = 0.0

        def observe_upstream(seconds: float) -> None:
            nonlocal upstream_seconds
            upstream_seconds = seconds
            self.metrics.observe_upstream(state.route, seconds)

        response: web.StreamResponse
        try:
            try:
                auth = await self.authorize(request, state)
            except GatewayError as exc:
                decision = exc.decision or "refused"
                if exc.decision and exc.decision != "no_route":
                    self.metrics.decision(state.client_id, exc.decision)
                raise
            self.metrics.decision(auth.client_id, "allowed")
            self.usage.record(auth.client_id or "unknown", auth.digest)
            response = await self.forwarder.forward(
                request, auth.route, auth.token, request_id, observe_upstream)
        except GatewayError as exc:
            response = error_response(exc, {"X-Request-Id": request_id})
        except Exception:
            log.exception("unexpected error handling request %s", request_id)
            decision = "error"
            response = json_error(500, "server_error", "The gateway failed unexpectedly.",
                                  {"X-Request-Id": request_id})
        elapsed = time.perf_counter() - started
        route = state.route
        self.metrics.observe_request(route, request.method, response.status, elapsed)
        self.access_log.record(
            request_id=request_id, method=request.method, route=route,
            client_id=state.client_id or "unknown", status=response.status, decision=decision,
            duration_ms=round(elapsed * 1000, 3),
            upstream_ms=round(upstream_seconds * 1000, 3),
            remote=request.remote,
        )
        return response
