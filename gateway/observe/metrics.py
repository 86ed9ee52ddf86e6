"""Prometheus metrics, one ``CollectorRegistry`` per app (the names are part of the
stable interface, docs/COMPATIBILITY.md).

Label children are bound once and kept: ``prometheus_client``'s ``.labels()`` lookup
per request is costly. The families updated on every request are
:class:`LoopCounter` / :class:`LoopHistogram`: plain numbers without
``prometheus_client``'s per-update lock (docs/PERFORMANCE.md has what each costs).
Every label value is bounded: routes come from the policy,
methods from a fixed list, statuses are integers, and client ids are capped
(:data:`MAX_CLIENT_LABELS`, then ``other``). No label ever carries a token or a raw path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.config.policy import HTTP_METHODS

# `_created` series double the exposition for no operational value here
disable_created_metrics()  # type: ignore[no-untyped-call]

MAX_CLIENT_LABELS = 2000
DECISIONS = (
    "allowed", "missing_token", "invalid_token", "client_disabled", "insufficient_scope",
    "introspection_unavailable", "unknown_client", "invalid_request", "no_route",
    "registry_unavailable", "user_disabled", "rate_limited",
)
NO_ROUTE = "(none)"
#: why a request could not be parsed (``gateway_bad_requests_total{reason}``)
BAD_REQUEST_REASONS = ("bad_header", "bad_request_line", "too_large", "bad_chunking", "other")
_LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class CounterChild:
    """One labelled counter: a plain float."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    """One labelled histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: bound >= value
        self.sum += value


class LoopCounter(Collector):
    """A counter family for the event loop's thread.

    Updated only from the event loop, and read by ``/metrics`` on that same loop, so it
    needs no lock: an update is one addition.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 registry: CollectorRegistry) -> None:
        # the attribute names of prometheus_client's own metrics, for tools that read them
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], CounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = CounterChild()
        return child

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogram(Collector):
    """A histogram family for the event loop's thread (see :class:`LoopCounter`)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self.bounds = tuple(buckets)
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self.bounds)
        return child

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, child.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class GatewayMetrics:
    """The gateway's metric families and their pre-bound children."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # updated on every request: lock-free
        self.requests = LoopCounter(
            "gateway_requests", "Requests answered by the proxy listener.",
            ["route", "method", "status"], registry=r)
        self.request_duration = LoopHistogram(
            "gateway_request_duration_seconds", "Time from request to response headers.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_duration = LoopHistogram(
            "gateway_upstream_duration_seconds", "Time the upstream took to answer headers.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_responses = LoopCounter(
            "gateway_upstream_responses", "Responses from upstreams, by status class "
            "(the upstream's own answers, not the gateway's 502/504).",
            ["route", "status_class"], registry=r)
        self.auth_decisions = LoopCounter(
            "gateway_auth_decisions", "Authentication and authorization decisions.",
            ["client_id", "decision"], registry=r)
        self.cache_requests = LoopCounter(
            "gateway_token_cache_requests", "Token cache look-ups by layer and result.",
            ["layer", "result"], registry=r)
        self.introspections = Counter(
            "gateway_introspection_requests", "Calls to the token validator's authority.",
            ["outcome"], registry=r)
        self.introspection_duration = Histogram(
            "gateway_introspection_duration_seconds", "Duration of validator calls.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.client_disable_events = Counter(
            "gateway_client_record_invalidations", "Client-record invalidations received.",
            ["source"], registry=r)
        self.redis_errors = Counter(
            "gateway_redis_errors", "Redis operations that failed.", ["operation"], registry=r)
        self.client_window_requests = Gauge(
            "gateway_client_window_requests",
            "Requests per client over the usage window, fleet-wide.", ["client_id"], registry=r)
        self.client_window_tokens = Gauge(
            "gateway_client_window_distinct_tokens",
            "Distinct tokens seen per client over the usage window, fleet-wide (HyperLogLog).",
            ["client_id"], registry=r)
        self.credential_refreshes = Counter(
            "gateway_upstream_credential_refreshes",
            "Sign-ins and refreshes of the gateway's own upstream credentials.",
            ["identity", "mode", "outcome"], registry=r)
        self.credential_expiry = Gauge(
            "gateway_upstream_credential_expiry_seconds",
            "Seconds left on the gateway's current upstream credential of an identity "
            "(negative: expired).",
            ["identity"], registry=r)
        self.rate_limited = LoopCounter(
            "gateway_rate_limited", "Requests refused with 429: the client was over its rate "
            "limit.", ["client_id"], registry=r)
        self.policy_reloads = Counter(
            "gateway_policy_reloads", "Policy reloads by outcome.", ["outcome"], registry=r)
        # the proxy listener's connections (gateway.runtime.listener keeps them)
        self.open_connections = Gauge(
            "gateway_open_connections", "Client connections open on the proxy listener.",
            registry=r)
        self.connections_refused = Counter(
            "gateway_connections_refused",
            "Client connections refused at GATEWAY_MAX_CONNECTIONS (answered 503, closed).",
            registry=r)
        self.accept_errors = Counter(
            "gateway_accept_errors",
            "Connections the listener could not accept (out of file descriptors or memory).",
            registry=r)
        self.bad_requests = Counter(
            "gateway_bad_requests", "Malformed requests answered 400 before any handling.",
            ["reason"], registry=r)
        for reason in BAD_REQUEST_REASONS:
            self.bad_requests.labels(reason)
        self.redis_up = Gauge(
            "gateway_redis_up", "1 while this replica reaches Redis, 0 while it serves "
            "without it (degraded: cached tokens and external validators only).", registry=r)
        self.cache_local_hit = self.cache_requests.labels("local", "hit")
        self.cache_local_miss = self.cache_requests.labels("local", "miss")
        self.cache_redis_hit = self.cache_requests.labels("redis", "hit")
        self.cache_redis_miss = self.cache_requests.labels("redis", "miss")
        self.introspection_outcome = {o: self.introspections.labels(o)
                                      for o in ("active", "inactive", "error")}
        #: families other parts register once in this registry (e.g. the built-in server)
        self._route_children: dict[str, tuple[HistogramChild, HistogramChild]] = {}
        self._request_children: dict[tuple[str, str, int], CounterChild] = {}
        self._decision_children: dict[tuple[str, str], CounterChild] = {}
        #: decisions since the usage tracker's last flush (fleet-wide counts in Redis)
        self.decision_tally: dict[str, int] = {}
        self._upstream_children: dict[tuple[str, int], CounterChild] = {}
        self._limited_children: dict[str, CounterChild] = {}
        self.bind_routes([NO_ROUTE])

    def bind_routes(self, routes: list[str]) -> None:
        """Create the per-route children up front so dashboards see zeros, not gaps."""
        for route in routes:
            if route not in self._route_children:
                self._route_children[route] = (self.request_duration.labels(route),
                                               self.upstream_duration.labels(route))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            m = method if method in HTTP_METHODS else "OTHER"
            child = self._request_children[key] = self.requests.labels(route, m, str(status))
        child.inc()
        pair = self._route_children.get(route)
        if pair is None:
            self.bind_routes([route])
            pair = self._route_children[route]
        pair[0].observe(seconds)

    def observe_upstream(self, route: str, seconds: float, status: int) -> None:
        pair = self._route_children.get(route)
        if pair is None:
            self.bind_routes([route])
            pair = self._route_children[route]
        pair[1].observe(seconds)
        key = (route, status // 100)
        child = self._upstream_children.get(key)
        if child is None:
            child = self._upstream_children[key] = self.upstream_responses.labels(
                route, f"{key[1]}xx")
        child.inc()

    def decision(self, client_id: str | None, decision: str) -> None:
        self.decision_tally[decision] = self.decision_tally.get(decision, 0) + 1
        key = (client_id or "unknown", decision)
        child = self._decision_children.get(key)
        if child is None:
            if len(self._decision_children) >= MAX_CLIENT_LABELS * 4:
                key = ("other", decision)  # bounded labels, and a bounded cache too
                child = self._decision_children.get(key)
            if child is None:
                child = self._decision_children[key] = self.auth_decisions.labels(*key)
        child.inc()

    def limited(self, client_id: str) -> None:
        """A request refused for its client's rate limit (client labels capped)."""
        child = self._limited_children.get(client_id)
        if child is None:
            if len(self._limited_children) >= MAX_CLIENT_LABELS:
                client_id = "other"
                child = self._limited_children.get(client_id)
            if child is None:
                child = self._limited_children[client_id] = self.rate_limited.labels(client_id)
        child.inc()
