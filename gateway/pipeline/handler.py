"""The request pipeline, stage by stage (Oathkeeper's shape):

    path hygiene -> match a route -> find the token -> authenticate (cache, validator)
    -> govern the client, a machine's reach and the person -> authorize scopes
    -> the client's rate limit -> forward -> observe

Every refusal is a :class:`~gateway.errors.GatewayError` rendered once, at the end,
with its RFC status, ``WWW-Authenticate`` and JSON body, and a refused request never
reaches an upstream.

The stages run on every request, so each is kept to the work the request needs
(docs/PERFORMANCE.md measures them): a path is checked and matched once per policy
and remembered (:class:`RouteCache`), request ids come from a counter, and metrics
and the access log only record values that are formatted later.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from aiohttp import web
from redis.exceptions import RedisError

from gateway.authn.cache import TokenCache
from gateway.config.policy import Match, Route, RoutePolicy
from gateway.config.rates import Rate
from gateway.forward.credentials import MACHINE_MODES
from gateway.forward.forwarder import UpstreamForwarder
from gateway.forward.upstream import UpstreamResponse
from gateway.observe.accesslog import AccessLog
from gateway.observe.metrics import NO_ROUTE, GatewayMetrics
from gateway.observe.usage import UsageTracker
from gateway.pipeline.govern import ClientRegistry
from gateway.pipeline.paths import ReservedPaths, safe_path
from gateway.pipeline.people import UserRegistry
from gateway.pipeline.ratelimit import Bucket, RateLimiter
from gateway.protocol.errors import (
    ClientDisabled,
    ClientUnknown,
    GatewayError,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    MachineTokenRefused,
    MethodNotAllowed,
    NoRoute,
    ServiceUnavailable,
    UserDisabled,
    error_response,
    json_error,
)
from gateway.protocol.requests import ClientRequest
from gateway.protocol.tokens import PresentedToken, extract_token

log = logging.getLogger(__name__)
#: the status recorded for a client that left before its answer (nginx's)
CLIENT_GONE = 499
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NO_QUERY: Mapping[str, str] = MappingProxyType({})
#: headers some frameworks take as the request's real method: an upstream honouring one
#: would run a POST as a DELETE the route never allowed, so they are refused outright
METHOD_OVERRIDES = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")


class DirectClient(ClientRequest, Protocol):
    """A request of the proxy listener's own HTTP/1.1 protocol, which the pipeline answers
    by writing to its connection (no aiohttp response object in between)."""

    def answer(self, status: int, reason: str, headers: Iterable[tuple[str, str]],
               body: bytes) -> None:
        """Send a whole answer of the gateway's own (a refusal, an error). Once an
        answer has started, the connection is closed instead: nothing more can be said."""
        ...

    async def relay(self, resp: UpstreamResponse, headers: list[tuple[str, str]]) -> None:
        """Stream the upstream's answer with ``headers`` (framing is the listener's)."""
        ...


@dataclass(slots=True)
class Decision:
    """What the authentication and authorization stages concluded."""

    route: Route
    client_id: str | None
    digest: str
    token: PresentedToken
    subject: str | None = None  # whom the token speaks for (``credentials: user``)
    bucket: Bucket | None = None  # the client's rate-limit window, when it has a limit


class RequestIds:
    """Request ids as unique as ``uuid4().hex`` (32 hex digits) at a fraction of its cost:
    a random 64-bit prefix per process, then a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


class RouteCache:
    """What path hygiene and route matching concluded for recently seen paths.

    Both depend on the method, the path and the policy alone, so a busy path is checked
    and matched once per policy, not on every request. Refused paths are not kept.
    Bounded, least recently used first out (paths with ids in them are many).
    ``reserved`` holds the built-in server's paths, refused before the policy is asked.
    """

    def __init__(self, policy: RoutePolicy, reserved: ReservedPaths | None = None,
                 maxsize: int = 4096) -> None:
        self.policy = policy
        self.reserved = reserved or ReservedPaths()
        # a refusal is an exception, which lru_cache does not keep
        self._lookup = functools.lru_cache(maxsize=maxsize)(self._match)

    def _match(self, method: str, path: str) -> Match:
        decoded = safe_path(path)
        self.reserved.check(method, decoded)
        return self.policy.match(method, decoded)

    def match(self, method: str, raw_path: str) -> Match:
        """The policy's match for the request; raises 400 for a dangerous path."""
        path, _, query = raw_path.partition("?")
        if "#" in query:  # the path's own `#` is safe_path's to refuse
            raise InvalidRequest("The request target contains a `#`.")
        return self._lookup(method, path)


@dataclass(slots=True)
class RequestState:
    """What is known about a request so far, for metrics and the access log."""

    route: str = NO_ROUTE
    client_id: str | None = None
    decision: str = "allowed"
    upstream_seconds: float = 0.0


class ProxyPipeline:
    """The proxy listener's one handler. ``policy`` may be swapped at any time (SIGHUP):
    a request keeps the route it matched."""

    def __init__(self, *, policy: RoutePolicy, cache: TokenCache, registry: ClientRegistry,
                 users: UserRegistry, forwarder: UpstreamForwarder, metrics: GatewayMetrics,
                 access_log: AccessLog, usage: UsageTracker, require_client_record: bool,
                 max_auth_header: int, limiter: RateLimiter | None = None,
                 default_rate: Rate | None = None, reserved: ReservedPaths | None = None
                 ) -> None:
        self.routes = RouteCache(policy, reserved)
        self.request_ids = RequestIds()
        self.cache = cache
        self.registry = registry
        self.users = users
        self.forwarder = forwarder
        self.metrics = metrics
        self.access_log = access_log
        self.usage = usage
        self.require_client_record = require_client_record
        self.max_auth_header = max_auth_header
        self.limiter = limiter
        self.default_rate = default_rate  # for clients whose record sets no limit

    @property
    def policy(self) -> RoutePolicy:
        return self.routes.policy

    @policy.setter
    def policy(self, policy: RoutePolicy) -> None:
        self.routes = RouteCache(policy, self.routes.reserved)

    async def authorize(self, request: ClientRequest, state: RequestState) -> Decision:
        """Run every stage before forwarding; raise a GatewayError to refuse."""
        match = self.routes.match(request.method, request.raw_path)
        headers = request.headers
        for name in METHOD_OVERRIDES:
            if name in headers:
                raise InvalidRequest(f"The {name} header is refused: send the method itself.")
        route = match.route
        if route is None:
            if match.method_mismatch:
                raise MethodNotAllowed(f"No route allows {request.method} on this path.")
            raise NoRoute("No route of the gateway's policy matches this request.")
        state.route = route.name
        # parsing an absent query string still costs a microsecond
        query = request.query if "?" in request.raw_path else _NO_QUERY
        token = extract_token(headers, query, max_header=self.max_auth_header)
        digest, info = self.cache.cached(token.value)  # an expired token: inactive
        if info is None:
            info = await self.cache.fetch(token.value, digest)
        if not info.active:
            raise InvalidToken("The access token is invalid, expired or revoked.")
        client_id = state.client_id = info.client_id
        allowed: frozenset[str] | None = None  # the client record's narrowing, if any
        rate: Rate | None = None
        if client_id:
            record = self.registry.cached(client_id) or await self.registry.get(client_id)
            if record.disabled:
                raise ClientDisabled("The client this token was issued to is disabled.")
            if self.require_client_record and not record.exists:
                raise ClientUnknown("The client this token was issued to is not registered.")
            allowed = record.scopes
            rate = record.rate_limit or self.default_rate
        elif self.require_client_record:
            raise ClientUnknown("The token names no client, and a registered client is "
                                "required.")
        if info.machine and route.upstream.credentials not in MACHINE_MODES:
            raise MachineTokenRefused(
                "A machine client's token reaches only upstreams where the gateway "
                "presents its own credentials.")
        subject = info.sub  # none on a machine client's token: no person to govern
        if subject:  # most people have no record: the mirror says so in one lookup
            users = self.users
            disabled = users.disabled.get(subject, users.absent)
            if disabled is None:
                disabled = await users.fetch(subject)
            if disabled:
                raise UserDisabled("The person this token speaks for is disabled.")
        # effective scopes = the token's, narrowed by the client's (no set built per request)
        for scope in route.scopes:
            if scope not in info.scopes or (allowed is not None and scope not in allowed):
                raise InsufficientScope(
                    "The access token lacks a scope this route requires.",
                    required=list(route.scopes))
        # last: only requests that would be forwarded use the client's limit
        bucket = None
        if rate is not None and client_id and self.limiter is not None:
            bucket = self.limiter.admit(client_id, rate, route.weight)
        return Decision(route, client_id, digest, token, subject, bucket)

    def _request_id(self, request: ClientRequest) -> str:
        sent_id = request.headers.get("X-Request-Id", "")
        return sent_id if sent_id and _SANE_REQUEST_ID.fullmatch(sent_id) \
            else self.request_ids.next()

    async def _admit(self, request: ClientRequest, state: RequestState) -> Decision:
        """:meth:`authorize`, with the decision counted and an allowed request's use noted."""
        try:
            auth = await self.authorize(request, state)
        except GatewayError as exc:
            state.decision = exc.decision or "refused"
            if exc.decision and exc.decision != "no_route":
                self.metrics.decision(state.client_id, exc.decision)
            raise
        self.metrics.decision(auth.client_id, "allowed")
        self.usage.record(auth.client_id or "unknown", auth.digest)
        return auth

    def _observer(self, state: RequestState) -> Callable[[float, int], None]:
        def observe_upstream(seconds: float, status: int) -> None:
            state.upstream_seconds = seconds
            self.metrics.observe_upstream(state.route, seconds, status)

        return observe_upstream

    def _refusal(self, exc: Exception, request: ClientRequest, request_id: str,
                 state: RequestState) -> web.Response | None:
        """The answer to a request whose stages raised ``exc`` (called in the ``except``
        block); ``None`` when the client left before its answer was written."""
        if isinstance(exc, GatewayError):
            return error_response(exc, {"X-Request-Id": request_id})
        if isinstance(exc, RedisError):  # a stage needed Redis and it is down: not our bug
            self.metrics.redis_errors.labels("request").inc()
            log.warning("request %s needs Redis, which failed (%s): 503", request_id,
                        type(exc).__name__)
            state.decision = "error"
            return error_response(ServiceUnavailable(
                "The gateway's store (Redis) cannot be reached, and this request needs it; "
                "retry later."), {"X-Request-Id": request_id})
        if isinstance(exc, ConnectionError) and request.transport is None:
            # the client left before its answer was written: normal traffic, recorded as
            # 499 (as nginx does)
            return None
        log.exception("unexpected error handling request %s", request_id)
        state.decision = "error"
        return json_error(500, "server_error", "The gateway failed unexpectedly.",
                          {"X-Request-Id": request_id})

    async def handle_direct(self, request: DirectClient) -> None:
        """The pipeline for the proxy listener's own protocol: as :meth:`handle`, the
        answer written straight to the client's connection."""
        started = time.perf_counter()
        request_id = self._request_id(request)
        state = RequestState()
        status = CLIENT_GONE
        refusal: web.Response | None = None
        try:
            auth = await self._admit(request, state)
            resp = await self.forwarder.exchange(request, auth.route, auth.token, request_id,
                                                 self._observer(state), auth.subject)
            status = resp.status
            try:
                await request.relay(resp, self.forwarder.answer_headers(
                    resp, request_id,
                    auth.bucket.advice() if auth.bucket is not None else None))
            finally:
                resp.release()
        except asyncio.CancelledError:
            if request.transport is None:  # the client left, and the listener cancelled us
                self._record(request, request_id, state, CLIENT_GONE, started)
            raise
        except Exception as exc:
            status = CLIENT_GONE
            refusal = self._refusal(exc, request, request_id, state)
        if refusal is not None and request.transport is not None:
            status = refusal.status
            body = refusal.body
            request.answer(status, refusal.reason, refusal.headers.items(),
                           body if isinstance(body, bytes) else b"")
        self._record(request, request_id, state, status, started)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = self._request_id(request)
        state = RequestState()
        response: web.StreamResponse
        try:
            auth = await self._admit(request, state)
            response = await self.forwarder.forward(
                request, auth.route, auth.token, request_id, self._observer(state),
                auth.subject, auth.bucket.advice() if auth.bucket is not None else None)
        except asyncio.CancelledError:
            if request.transport is None:  # the client left, and aiohttp cancelled the handler
                self._record(request, request_id, state, CLIENT_GONE, started)
            raise
        except Exception as exc:  # this answer is never sent when the client has left
            response = (self._refusal(exc, request, request_id, state)
                        or web.Response(status=CLIENT_GONE))
        self._record(request, request_id, state, response.status, started)
        return response

    def _record(self, request: ClientRequest, request_id: str, state: RequestState,
                status: int, started: float) -> None:
        """The request's metrics and access-log line."""
        elapsed = time.perf_counter() - started
        route = state.route
        self.metrics.observe_request(route, request.method, status, elapsed)
        self.access_log.record(request_id, request.method, route, state.client_id or "unknown",
                               status, state.decision, elapsed, state.upstream_seconds,
                               request.remote)
