"""What every scenario shares: the options, the servers, and a row of the table.

:class:`Bench` starts Redis, the stand-in upstream, the introspection endpoint and the
reference bare proxy once, and a fresh gateway per scenario (:meth:`Bench.gateway`, on
an emptied Redis). :meth:`Bench.pair` loads the bare proxy and the gateway with the same
workload in alternating runs of :data:`ROUND` seconds, so that a burst of outside load
hits both alike and their ratio comes from one stretch of time; besides requests/s and
latency, each :class:`Side` records the CPU time its processes used (``/proc``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import statistics
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from bench.load import LoadResult, Workload, run_asyncio, run_load
from bench.processes import (
    GatewayProcess,
    ServiceProcess,
    cpu_seconds,
    make_workdir,
    process_tree,
    set_affinity,
)
from bench.services import SCOPES
from gateway.state.embedded import EmbeddedRedis, free_port
from gateway.state.keys import Keys

CLIENTS = 300
DIGEST_KEY = "bench-digest-key-0123456789abcdef"
SMALL = "/2/0/workspaces"
ROUND = 1.0  # seconds of one load run; a row alternates bare and gateway runs
POLICY = """\
upstreams:
  api: {upstream}
routes:
  - name: read
    upstream: api
    methods: [GET, HEAD]
    path: /2/0/**
    scopes: [anaplan:read]
  - name: write
    upstream: api
    methods: [POST, PUT, PATCH, DELETE]
    path: /2/0/**
    scopes: [anaplan:write]
"""


@dataclass(frozen=True, slots=True)
class Options:
    """What to run and how: the command line, parsed (see ``bench/__main__.py``)."""

    duration: float = 8.0
    connections: int = 32
    generator: str = "wrk"
    scenarios: tuple[str, ...] = ("steady", "many-tokens", "cold", "bodies", "scaling",
                                  "latency", "memory", "rate-limit", "nginx")
    bodies: tuple[str, ...] = ("1 KiB down", "1 MiB down", "1 KiB up", "1 MiB up")
    #: the proxy under test alone on one CPU, everything else on the others
    pin: bool = True
    #: requests counted per proxy by the instructions scenario
    instruction_requests: int = 2000




class Proxy(Protocol):
    """What :meth:`Bench.pair` loads: a server at ``url`` whose CPU time is that of
    process ``pid`` and its children (a gateway's or nginx's workers)."""

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int: ...


@dataclass(slots=True)
class Side:
    """One proxy's share of a row: its load runs, and the CPU time it used meanwhile."""

    runs: list[LoadResult] = field(default_factory=list)
    cpu_seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def rps(self) -> float:
        seconds = sum(r.seconds for r in self.runs)
        return self.requests / seconds if seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def cpu_us(self) -> float:
        """CPU time of the proxy's processes per request, in microseconds."""
        return self.cpu_seconds / self.requests * 1e6 if self.requests else 0.0


@dataclass(slots=True)
class Row:
    """One line of the table: the same load on the bare proxy and on the gateway."""

    scenario: str
    bare: Side
    gateway: Side

    @property
    def ratio(self) -> float:
        return self.gateway.rps / self.bare.rps if self.bare.rps else 0.0

    @property
    def cpu_ratio(self) -> float:
        return self.gateway.cpu_us / self.bare.cpu_us if self.bare.cpu_us else 0.0


@dataclass(slots=True)
class Report:
    """The rows of the table, the notes printed under it, and the scenarios that failed."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Bench:
    """The servers every scenario shares: Redis, the upstream, the introspection
    endpoint and the bare proxy. Gateways are started per scenario."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.workdir = make_workdir()
        self.all_cpus = os.sched_getaffinity(0)
        self.proxy_cpus: set[int] | None = None
        if options.pin and len(self.all_cpus) >= 2:
            self.proxy_cpus = {max(self.all_cpus)}
        self.redis_server = EmbeddedRedis()
        self.upstream = ServiceProcess("upstream", self.workdir, port=free_port())
        self.introspection = ServiceProcess("introspection", self.workdir, port=free_port(),
                                            args=("--clients", str(CLIENTS)))
        self.bare = ServiceProcess("bare", self.workdir, port=free_port(),
                                   args=("--upstream", self.upstream.url),
                                   cpus=self.proxy_cpus)
        self.policy = self.workdir / "policy.yaml"
        self.redis: Redis | None = None
        self._fresh = 0
        self._positions: dict[str, int] = {}  # per proxy: where round-robin plans go on
        self._started: list[ServiceProcess] = []

    async def __aenter__(self) -> Bench:
        if self.proxy_cpus:  # this process, the load generator and every server but the
            os.sched_setaffinity(0, self.all_cpus - self.proxy_cpus)  # proxy under test
        try:
            self.redis_server.start()
            for service in (self.upstream, self.introspection, self.bare):
                await service.start()
                self._started.append(service)
        except BaseException:
            self.close()
            raise
        self.policy.write_text(POLICY.format(upstream=self.upstream.url))
        self.redis = Redis.from_url(self.redis_server.url, decode_responses=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        self.close()

    def close(self) -> None:
        for proc in reversed(self._started):
            proc.stop()
        self._started.clear()
        self.redis_server.stop()  # idempotent, like the services' stop()
        os.sched_setaffinity(0, self.all_cpus)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def unpinned(self) -> Iterator[None]:
        """Every process free to run on every CPU (for the scaling scenario)."""
        if not self.proxy_cpus:
            yield
            return
        pids = [0] + [p.pid for p in self._started]
        if self.redis_server.proc is not None:
            pids.append(self.redis_server.proc.pid)
        for pid in pids:
            set_affinity(pid or os.getpid(), self.all_cpus)
        saved, self.proxy_cpus = self.proxy_cpus, None
        try:
            yield
        finally:
            self.proxy_cpus = saved
            for pid in pids:
                set_affinity(pid or os.getpid(), self.all_cpus - saved)

    def gateway_settings(self, **overrides: str) -> dict[str, str]:
        return {
            "redis_url": self.redis_server.url, "policies": str(self.policy),
            "introspection_url": self.introspection.url + "/introspect",
            "introspection_client_id": "gateway", "introspection_client_secret": "bench",
            "token_digest_key": DIGEST_KEY, "log_level": "WARNING", **overrides,
        }

    @contextlib.asynccontextmanager
    async def gateway(self, wrapper: tuple[str, ...] = (), ready_within: float = 30.0,
                      **overrides: str) -> AsyncIterator[GatewayProcess]:
        """A fresh gateway on an emptied Redis holding the 300 client records."""
        assert self.redis is not None
        await self.redis.flushall()
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in range(CLIENTS):
                pipe.hset(Keys("gw:").client(f"client{n}"),
                          mapping={"disabled": "0", "scopes": SCOPES})
            await pipe.execute()
        gw = GatewayProcess(self.workdir, self.gateway_settings(**overrides),
                            cpus=self.proxy_cpus, wrapper=wrapper, ready_within=ready_within)
        try:
            await gw.start()
            yield gw
        finally:
            gw.stop(timeout=30)

    async def load(self, url: str, workload: Workload, seconds: float | None = None
                   ) -> LoadResult:
        return await run_load(self.options.generator, url, workload,
                              connections=self.options.connections,
                              seconds=seconds or self.options.duration)

    async def warm(self, url: str, workload: Workload, requests: int = 1000) -> None:
        """Open the pools and fill the caches: a bounded burst, not measured."""
        result = await run_asyncio(url, self._next(url, workload),
                                   connections=min(8, self.options.connections), seconds=10,
                                   max_requests=requests)
        self._advance(url, workload, result)

    def _next(self, url: str, workload: Workload) -> Workload:
        """The workload for the next run on ``url``: round-robin tokens go on where its
        last run stopped (so an LRU layer smaller than the cycle always misses), and
        fresh tokens are new again."""
        plan = workload.tokens
        if plan.kind == "cycle":
            plan = dataclasses.replace(plan, start=self._positions.get(url, 0))
        elif plan.kind == "fresh":
            plan = dataclasses.replace(plan, base=self.fresh_base())
        return dataclasses.replace(workload, tokens=plan)

    def _advance(self, url: str, workload: Workload, result: LoadResult) -> None:
        if workload.tokens.kind == "cycle":
            self._positions[url] = (self._positions.get(url, 0) + result.requests) \
                % workload.tokens.count

    async def pair(self, name: str, gw: GatewayProcess, workload: Workload, *,
                   bare: Sequence[Proxy] | None = None,
                   seconds: float | None = None,
                   warm: bool = True) -> Row:
        """Bare proxy and gateway with the same workload, in alternating rounds of
        :data:`ROUND` seconds, so a burst of outside load hits both alike. ``bare`` may
        name another gateway, to set two gateways against each other, or nginx."""
        bare = bare or [self.bare]
        if warm:
            await self.warm(bare[0].url, workload)
            await self.warm(gw.url, workload)
        total = seconds or self.options.duration
        rounds = max(1, round(total / ROUND))
        row = Row(name, Side(), Side())
        for _ in range(rounds):
            bare_pids = [pid for b in bare for pid in process_tree(b.pid)]
            for side, url, pids in ((row.bare, bare[0].url, bare_pids),
                                    (row.gateway, gw.url, process_tree(gw.pid))):
                cpu = cpu_seconds(pids)
                result = await self.load(url, self._next(url, workload), total / rounds)
                side.cpu_seconds += cpu_seconds(pids) - cpu
                side.runs.append(result)
                self._advance(url, workload, result)
        return row

    def fresh_base(self) -> int:
        """Token numbers no earlier call handed out."""
        self._fresh += 1
        return self._fresh * 10**11

