"""The app factory: every component built here, from settings, and handed in typed.

Two aiohttp applications share one :class:`Gateway`:

- the proxy app (``GATEWAY_LISTEN``): client traffic, all paths go to the pipeline;
- the admin app (``GATEWAY_ADMIN_LISTEN``): ``/metrics``, ``/healthz``, ``/readyz``.

Resources (Redis pool, upstream connection pool, background tasks) are owned by the
proxy app's ``cleanup_ctx``: set up before ``yield``, torn down after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TextIO

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.appkeys import GATEWAY
from gateway.authn.cache import TokenCache
from gateway.authn.validators.base import TokenValidator
from gateway.authserver import BuiltinServer, DeviceFlowTiming
from gateway.config.policy import PolicyError, RoutePolicy, load_policy
from gateway.config.rates import optional_rate
from gateway.config.settings import Settings
from gateway.forward.credentials.anaplan_oauth import AnaplanOAuth
from gateway.forward.credentials.service import service_modes
from gateway.forward.credentials.user import PeopleTokens, user_modes
from gateway.forward.forwarder import UpstreamForwarder
from gateway.forward.upstream import UpstreamPool
from gateway.observe.accesslog import AccessLog
from gateway.observe.metrics import GatewayMetrics
from gateway.observe.usage import UsageTracker
from gateway.pipeline.govern import ClientRegistry
from gateway.pipeline.handler import ProxyPipeline
from gateway.pipeline.paths import ReservedPaths
from gateway.pipeline.people import UserRegistry
from gateway.pipeline.ratelimit import RateLimiter
from gateway.protocol.tokens import TokenDigester
from gateway.runtime.fleet import EventSubscriber
from gateway.runtime.health import RedisWatch, redis_outage_middleware
from gateway.state import connection as store
from gateway.state import durability
from gateway.state.keys import Keys
from gateway.state.sealing import parse_secret_keys
from gateway.state.signins import SignInStore

log = logging.getLogger(__name__)


class ConfigurationError(RuntimeError):
    """The gateway cannot start with these settings; the message says why."""


@dataclass(frozen=True, slots=True)
class Services:
    """What a started gateway runs on: built once, when Redis answers, by the proxy app's
    lifespan, and dropped when it stops."""

    redis: Redis
    cache: TokenCache
    registry: ClientRegistry
    users: UserRegistry
    usage: UsageTracker
    pipeline: ProxyPipeline
    events: EventSubscriber
    watch: RedisWatch


class Gateway:
    """Everything one gateway process holds. Built by :func:`create_apps`.

    What needs no connection is built with it; what needs Redis is :attr:`services`,
    present while the proxy app runs (:meth:`running`).
    """

    def __init__(self, settings: Settings, policy: RoutePolicy, metrics: GatewayMetrics,
                 access_log: AccessLog, *, authserver: BuiltinServer | None = None,
                 redis: Redis | None = None, validator: TokenValidator | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self.metrics = metrics
        self.access_log = access_log
        #: the built-in authorization server, when ``GATEWAY_ISSUER`` is set
        self.authserver = authserver
        #: a Redis client or a validator handed in (tests, embedding), else built from settings
        self.given_redis = redis
        self.given_validator = validator
        self.services: Services | None = None
        #: set on SIGTERM: /readyz answers 503 so load balancers stop sending
        self.draining = False

    def running(self) -> Services:
        """The started gateway's services; raises if the proxy app has not started."""
        if self.services is None:
            raise RuntimeError("the gateway has not started")
        return self.services

    def reload_policy(self) -> bool:
        """Re-read the policies (SIGHUP). A bad file keeps the old policy in force."""
        try:
            policy = load_policy(self.settings.policies)
        except PolicyError as exc:
            log.error("policy reload refused, keeping the previous policy: %s", exc)
            self.metrics.policy_reloads.labels("error").inc()
            return False
        self.policy = policy
        self.metrics.bind_routes(policy.route_names)
        if self.services is not None:
            self.services.pipeline.policy = policy
        self.metrics.policy_reloads.labels("ok").inc()
        log.info("policy reloaded: %d routes from %s", len(policy.routes),
                 ", ".join(policy.sources))
        return True


def build_validator(settings: Settings, session: aiohttp.ClientSession,
                    builtin: BuiltinServer | None = None) -> TokenValidator:
    """The validator ``GATEWAY_VALIDATOR`` names (or ``auto`` resolves to)."""
    kind = settings.resolved_validator
    if kind == "introspection":
        if not settings.introspection_url:
            raise ConfigurationError("GATEWAY_VALIDATOR=introspection needs "
                                     "GATEWAY_INTROSPECTION_URL")
        from gateway.authn.validators.introspection import IntrospectionClient
        return IntrospectionClient(
            session, settings.introspection_url,
            client_id=settings.introspection_client_id,
            client_secret=settings.introspection_client_secret,
            timeout=settings.introspection_timeout, retries=settings.introspection_retries)
    if kind == "jwt":
        if not settings.jwks_url or not settings.jwt_issuer:
            raise ConfigurationError("GATEWAY_VALIDATOR=jwt needs GATEWAY_JWKS_URL and "
                                     "GATEWAY_JWT_ISSUER")
        from gateway.authn.validators.jwt import JWTValidator
        return JWTValidator(
            session, settings.jwks_url, issuer=settings.jwt_issuer,
            audience=settings.jwt_audience, algorithms=settings.jwt_algorithms.split(),
            leeway=settings.jwt_leeway)
    if kind == "anaplan":
        if not settings.anaplan_validate_url:
            raise ConfigurationError("GATEWAY_VALIDATOR=anaplan needs "
                                     "GATEWAY_ANAPLAN_VALIDATE_URL")
        from gateway.authn.validators.anaplan import AnaplanValidator
        return AnaplanValidator(session, settings.anaplan_validate_url,
                                timeout=settings.introspection_timeout,
                                retries=settings.introspection_retries)
    if kind == "builtin" and builtin is not None:
        return builtin.validator()
    if kind == "builtin":
        raise ConfigurationError("GATEWAY_VALIDATOR=builtin needs GATEWAY_ISSUER (the built-in "
                                 "authorization server)")
    raise ConfigurationError(
        "No token validator is configured: set GATEWAY_ISSUER (the built-in authorization "
        "server), GATEWAY_INTROSPECTION_URL (RFC 7662), "
        "GATEWAY_JWKS_URL with GATEWAY_JWT_ISSUER (local JWT) or "
        "GATEWAY_ANAPLAN_VALIDATE_URL (Anaplan token-validate).")


def _secret_keys(settings: Settings, policy: RoutePolicy) -> list[bytes]:
    """``GATEWAY_SECRET_KEYS``, required when an upstream has ``credentials: service`` or
    ``user``."""
    users = sorted((u.name, u.credentials) for u in policy.upstreams.values()
                   if u.credentials in ("service", "user"))
    if not users:
        return []
    if not settings.secret_keys.strip():
        name, mode = users[0]
        raise ConfigurationError(
            f"Upstream {name!r} has credentials: {mode}, which needs GATEWAY_SECRET_KEYS "
            "(comma-separated base64 32-byte keys) to encrypt its tokens in Redis.")
    try:
        return parse_secret_keys(settings.secret_keys)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _people_tokens(gw: Gateway, redis: Redis, session: aiohttp.ClientSession,
                   secret_keys: list[bytes]) -> PeopleTokens | None:
    """People's Anaplan tokens for ``credentials: user`` upstreams (None without keys).
    A person whose Anaplan sign-in ends has their built-in server's grants ended."""
    if not secret_keys:
        return None
    s = gw.settings
    oauth = AnaplanOAuth(session, oauth_url=s.anaplan_oauth_url, auth_url=s.anaplan_auth_url,
                         client_id=s.anaplan_client_id, client_secret=s.anaplan_client_secret)
    builtin = gw.authserver

    async def end_grants(subject: str, username: str) -> None:
        if builtin is not None:
            ended = await builtin.end_grants_of(username, reason="anaplan_signin_ended")
            log.info("Anaplan refused a person's refresh token: %d grants ended", ended)

    return PeopleTokens(SignInStore(redis, Keys(s.key_prefix), secret_keys), oauth,
                        gw.metrics, end_grants)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """The proxy app's lifespan: Redis, the upstream pool, the services, background tasks."""
    gw = app[GATEWAY]
    s = gw.settings
    redis = gw.given_redis if gw.given_redis is not None else store.connect(s.redis_url)
    upstream_pool = UpstreamPool(limit=s.upstream_pool_size,
                                 connect_timeout=s.upstream_connect_timeout)
    auth_session = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
    tasks: list[asyncio.Task[None]] = []
    try:
        try:
            await store.wait_for_redis(redis, within=30.0)
            await store.claim_schema(redis, Keys(s.key_prefix))
            key = await store.digest_key(redis, s.key_prefix, s.token_digest_key)
            kept = await durability.inspect(redis)
        except RedisError as exc:
            raise ConfigurationError(f"Redis at GATEWAY_REDIS_URL cannot be reached: {exc}"
                                     ) from None
        warnings, refusal = kept.assess(builtin=gw.authserver is not None,
                                        allow_eviction=s.redis_allow_eviction)
        for line in warnings:
            log.warning("%s", line)
        if refusal is not None:
            raise ConfigurationError(refusal)
        digester = TokenDigester(key)
        if gw.authserver is not None:
            await gw.authserver.start(redis, digester)
        validator = gw.given_validator or build_validator(s, auth_session, gw.authserver)
        cache = TokenCache(
            redis=redis, validator=validator, digester=digester, metrics=gw.metrics,
            key_prefix=s.key_prefix, local_ttl=s.local_cache_ttl,
            local_size=s.local_cache_size, max_ttl=s.cache_max_ttl,
            negative_ttl=s.negative_cache_ttl)
        registry = ClientRegistry(redis, key_prefix=s.key_prefix, metrics=gw.metrics,
                                  refresh_interval=s.client_refresh_interval)
        users = UserRegistry(redis, key_prefix=s.key_prefix, metrics=gw.metrics,
                             refresh_interval=s.client_refresh_interval)
        usage = UsageTracker(redis, key_prefix=s.key_prefix, metrics=gw.metrics,
                             window=s.usage_window, flush_interval=s.usage_flush_interval)
        try:
            secret_keys = _secret_keys(s, gw.policy)
            credentials = service_modes(
                gw.policy, redis=redis, session=auth_session, keys=Keys(s.key_prefix),
                secret_keys=secret_keys, metrics=gw.metrics)
            credentials.update(user_modes(gw.policy, _people_tokens(
                gw, redis, auth_session, secret_keys)))
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        forwarder = UpstreamForwarder(
            upstream_pool, upstream_timeout=s.upstream_timeout, max_body_size=s.max_body_size,
            trusted_proxies=s.trusted_proxies, client_body_timeout=s.client_body_timeout,
            credentials=credentials)
        limiter = RateLimiter(redis, key_prefix=s.key_prefix, metrics=gw.metrics)
        pipeline = ProxyPipeline(
            policy=gw.policy, cache=cache, registry=registry, users=users, forwarder=forwarder,
            metrics=gw.metrics, access_log=gw.access_log, usage=usage,
            require_client_record=s.require_client_record, max_auth_header=s.max_auth_header,
            limiter=limiter, default_rate=optional_rate(s.default_rate_limit),
            reserved=ReservedPaths.of_router(app.router) if gw.authserver is not None else None)
        events = EventSubscriber(redis, key_prefix=s.key_prefix, registry=registry,
                                 users=users, cache=cache, metrics=gw.metrics,
                                 keyspace=s.keyspace_notifications)
        watch = RedisWatch(redis, gw.metrics, on_up=events.wake, on_moved=events.moved)
        gw.services = Services(redis=redis, cache=cache, registry=registry, users=users,
                               usage=usage, pipeline=pipeline, events=events, watch=watch)
        for coro, name in ((events.run(), "events"), (registry.run_refresher(), "client-refresh"),
                           (watch.run(), "redis-watch"),
                           (users.run_refresher(), "user-refresh"),
                           (usage.run(), "usage"), (gw.access_log.run(), "access-log"),
                           (limiter.run(), "rate-limit")):
            tasks.append(asyncio.create_task(coro, name=name))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(events.connected.wait(), timeout=2.0)
        yield
        with contextlib.suppress(RedisError):
            await usage.flush()
            await limiter.sync()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        gw.services = None
        gw.metrics.redis_up.set(0)
        if gw.authserver is not None:
            await gw.authserver.stop()
        await upstream_pool.close()
        await auth_session.close()
        if gw.given_redis is None:
            await redis.aclose()


#: the name of the proxy app's catch-all route: the proxy's own (the rest is the built-in
#: server's)
PROXY_ROUTE = "proxy"


async def _proxy_handler(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].running().pipeline.handle(request)


async def _metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return web.Response(body=generate_latest(gw.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    checks: dict[str, str] = {"policies": f"{len(gw.policy.routes)} routes"}
    services = gw.services
    ready = services is not None and not gw.draining
    if gw.draining:
        checks["lifecycle"] = "draining"
    if services is None:
        checks["redis"], ready = "not connected", False
    elif await services.watch.check():
        checks["redis"] = "ok"
    elif gw.settings.ready_requires_redis:
        checks["redis"], ready = services.watch.reason, False
    else:  # degraded, still serving: one Redis outage must not empty the Service
        checks["redis"] = f"{services.watch.reason}; serving degraded"
    if not gw.policy.routes:
        checks["policies"], ready = "no routes loaded", False
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


def create_apps(settings: Settings, *, redis: Redis | None = None,
                validator: TokenValidator | None = None,
                log_stream: TextIO | None = None,
                device: DeviceFlowTiming | None = None,
                ) -> tuple[web.Application, web.Application]:
    """Build the proxy app and the admin app. Raises :class:`PolicyError` on bad policies.

    ``redis`` and ``validator`` may be passed in (tests, embedding); otherwise they are
    built from ``settings`` when the proxy app starts. ``device`` sets the built-in
    server's device-code lifetime and polling interval (RFC 8628 section 3.2).
    """
    policy = load_policy(settings.policies)
    _secret_keys(settings, policy)  # refused now, not at the first request
    metrics = GatewayMetrics()
    metrics.bind_routes(policy.route_names)
    access_log = AccessLog(fmt=settings.log_format, stream=log_stream or sys.stdout,
                           enabled=settings.access_log)
    authserver = None
    if settings.issuer:
        authserver = BuiltinServer(
            settings, registry=metrics.registry, device=device,
            scopes_supported={scope for route in policy.routes for scope in route.scopes})
    gw = Gateway(settings, policy, metrics, access_log, authserver=authserver, redis=redis,
                 validator=validator)
    proxy = web.Application(
        client_max_size=settings.max_body_size,
        middlewares=[redis_outage_middleware(metrics)] if authserver is not None else [])
    proxy[GATEWAY] = gw
    proxy.cleanup_ctx.append(_resources)
    if authserver is not None:
        authserver.install(proxy)
    proxy.router.add_route("*", "/{tail:.*}", _proxy_handler, name=PROXY_ROUTE)
    admin = web.Application()
    admin[GATEWAY] = gw
    admin.router.add_get("/metrics", _metrics)
    admin.router.add_get("/healthz", _healthz)
    admin.router.add_get("/readyz", _readyz)
    return proxy, admin
