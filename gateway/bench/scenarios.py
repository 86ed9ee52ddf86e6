"""The scenarios, and the table they print.

Each scenario starts its own gateway (with the settings the scenario needs, on an
emptied Redis), warms both proxies up, then loads the bare proxy and the gateway with
the same workload in alternating runs of :data:`ROUND` seconds, so that a burst of
outside load hits both alike and their ratio comes from one stretch of time. Besides
requests/s and latency, each side reports the CPU time its processes used per request
(``/proc``). ``steady``, ``many-tokens`` and ``cold`` request the small JSON answer.

- ``steady``: 300 clients, one token each, round-robin; every token is cached in
  process after the warm-up (the common case).
- ``many-tokens``: 10,000 tokens round-robin, already in Redis (written in the format
  the gateway writes), with ``GATEWAY_LOCAL_CACHE_SIZE=1000``: the least recently used
  token is always the next one asked for, so every look-up misses the in-process layer
  and Redis answers.
- ``cold``: a never-seen token every 4 requests (so concurrent requests share one
  introspection: single-flight), one in 5 of them unknown to the authorization server
  (401, then cached as inactive: negative caching). Introspection calls are counted at
  the endpoint and set against the requests and distinct tokens.
- ``bodies``: 1 KiB and 1 MiB downloads and uploads, each run for half the duration;
  the gateway's RSS before and after shows that bodies stream rather than buffer.
- ``scaling``: one process against two (``GATEWAY_WORKERS=2``; two bare-proxy processes
  on one port with ``SO_REUSEPORT``).
- ``memory``: RSS growth of 100,000 tokens in the in-process layer
  (:mod:`gateway.bench.memory`, in a process of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from redis.asyncio import Redis

from gateway.authn.validators.base import TokenInfo
from gateway.bench.load import (
    LoadResult,
    TokenPlan,
    Workload,
    run_asyncio,
    run_fixed_rate,
    run_load,
)
from gateway.bench.processes import (
    GatewayProcess,
    RedisProcess,
    ServiceProcess,
    cpu_seconds,
    free_port,
    make_workdir,
    process_tree,
    rss_bytes,
    set_affinity,
)
from gateway.bench.services import SCOPES
from gateway.protocol.tokens import TokenDigester
from gateway.state.keys import Keys

CLIENTS = 300
MANY_TOKENS = 10_000
MANY_TOKENS_LOCAL_SIZE = 1_000
DIGEST_KEY = "bench-digest-key-0123456789abcdef"
KEYS = Keys("gw:")  # the benchmarked gateway runs with the default GATEWAY_KEY_PREFIX
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
    duration: float = 8.0
    connections: int = 32
    generator: str = "wrk"
    scenarios: tuple[str, ...] = ("steady", "many-tokens", "cold", "bodies", "scaling",
                                  "latency", "memory")
    bodies: tuple[str, ...] = ("1 KiB down", "1 MiB down", "1 KiB up", "1 MiB up")
    #: the proxy under test alone on one CPU, everything else on the others
    pin: bool = True
    #: requests counted per proxy by the instructions scenario
    instruction_requests: int = 2000


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
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


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
        self.redis_server = RedisProcess(self.workdir)
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
        self._started: list[ServiceProcess | RedisProcess] = []

    async def __aenter__(self) -> Bench:
        if self.proxy_cpus:  # this process, the load generator and every server but the
            os.sched_setaffinity(0, self.all_cpus - self.proxy_cpus)  # proxy under test
        try:
            self.redis_server.start()
            self._started.append(self.redis_server)
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
        os.sched_setaffinity(0, self.all_cpus)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def unpinned(self) -> Iterator[None]:
        """Every process free to run on every CPU (for the scaling scenario)."""
        if not self.proxy_cpus:
            yield
            return
        pids = [0] + [p.pid for p in self._started]
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
                pipe.hset(KEYS.client(f"client{n}"), mapping={"disabled": "0", "scopes": SCOPES})
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
                   bare: list[ServiceProcess] | None = None, seconds: float | None = None,
                   warm: bool = True) -> Row:
        """Bare proxy and gateway with the same workload, in alternating rounds of
        :data:`ROUND` seconds, so a burst of outside load hits both alike."""
        bare = bare or [self.bare]
        if warm:
            await self.warm(bare[0].url, workload)
            await self.warm(gw.url, workload)
        total = seconds or self.options.duration
        rounds = max(1, round(total / ROUND))
        row = Row(name, Side(), Side())
        for _ in range(rounds):
            for side, url, pids in ((row.bare, bare[0].url, [b.pid for b in bare]),
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


# -- the scenarios -------------------------------------------------------------------

def _cache_note(metrics: dict[str, float]) -> str:
    def count(layer: str, result: str) -> float:
        return metrics.get(
            f'gateway_token_cache_requests_total{{layer="{layer}",result="{result}"}}', 0.0)

    local_hit, local_miss = count("local", "hit"), count("local", "miss")
    total = local_hit + local_miss
    redis_hit = count("redis", "hit")
    return (f"in-process layer hits {100 * local_hit / total if total else 0:.1f}% of "
            f"{total:,.0f} look-ups, Redis hits {redis_hit:,.0f}")


async def steady(bench: Bench, report: Report) -> None:
    workload = Workload(SMALL, TokenPlan("cycle", count=CLIENTS))
    async with bench.gateway() as gw:
        report.rows.append(await bench.pair("steady", gw, workload))
        report.notes.append(f"steady: {CLIENTS} tokens of {CLIENTS} clients; "
                            + _cache_note(await gw.metrics()))


async def many_tokens(bench: Bench, report: Report) -> None:
    assert bench.redis is not None
    digester = TokenDigester(DIGEST_KEY.encode())
    plan = TokenPlan("cycle", count=MANY_TOKENS)
    async with bench.gateway(local_cache_size=str(MANY_TOKENS_LOCAL_SIZE)) as gw:
        # what the gateway itself writes after an introspection, for every token
        async with bench.redis.pipeline(transaction=False) as pipe:
            for n in range(MANY_TOKENS):
                info = TokenInfo(active=True, client_id=f"client{n % CLIENTS}",
                                 scopes=frozenset(SCOPES.split()), exp=time.time() + 3600,
                                 sub=f"user{n}")
                pipe.set(KEYS.token(digester.digest(plan.token(n))), info.to_json(),
                         px=300_000)
            await pipe.execute()
        report.rows.append(await bench.pair("many-tokens", gw, Workload(SMALL, plan)))
        report.notes.append(
            f"many-tokens: {MANY_TOKENS:,} tokens round-robin, GATEWAY_LOCAL_CACHE_SIZE="
            f"{MANY_TOKENS_LOCAL_SIZE:,}; " + _cache_note(await gw.metrics()))


async def _introspection_calls(bench: Bench) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(
            bench.introspection.url + "/stats") as resp:
        calls: int = (await resp.json())["calls"]
        return calls


async def cold(bench: Bench, report: Report) -> None:
    repeat, bad_every = 4, 5
    workload = Workload(SMALL, TokenPlan("fresh", repeat=repeat, bad_every=bad_every))
    async with bench.gateway() as gw:
        before = await _introspection_calls(bench)
        row = await bench.pair("cold", gw, workload)
        calls = await _introspection_calls(bench) - before
    report.rows.append(row)
    warm = 1000  # the warm-up's requests (single-flight and negative caching apply alike)
    requests = row.gateway.requests + warm
    distinct = sum(-(-r.requests // repeat) for r in row.gateway.runs) + warm // repeat
    report.notes.append(
        f"cold: {requests:,} requests carried ~{distinct:,} never-seen tokens "
        f"(each sent {repeat} times back to back, 1 in {bad_every} unknown to the AS, "
        f"{row.gateway.errors:,} answered 401): {calls:,} introspection calls, "
        f"{calls / distinct if distinct else 0:.2f} per distinct token (requests still in "
        "flight when a run stops reach the AS but are not counted)")


BODIES = {
    "1 KiB down": Workload("/2/0/bytes/1024"),
    "1 MiB down": Workload("/2/0/bytes/1048576"),
    "1 KiB up": Workload("/2/0/upload", method="POST", upload=1024),
    "1 MiB up": Workload("/2/0/upload", method="POST", upload=1024 * 1024),
}


async def bodies(bench: Bench, report: Report) -> None:
    async with bench.gateway() as gw:
        await bench.warm(gw.url, Workload(SMALL), requests=200)
        start, bare_start = rss_bytes(gw.pid), rss_bytes(bench.bare.pid)
        sizes = []
        for name in bench.options.bodies:
            workload = BODIES[name]
            report.rows.append(await bench.pair(
                f"bodies: {name}", gw, workload, seconds=max(1.0, bench.options.duration / 2),
                warm=False))
            sizes.append(f"{name} {_mb(rss_bytes(gw.pid))}")
        peak = _peak_rss(gw.pid)
    report.notes.append(
        f"bodies ({bench.options.connections} connections at once, so "
        f"{bench.options.connections} MiB if 1 MiB bodies were held whole): gateway RSS "
        f"{_mb(start)} before, after each: {', '.join(sizes)}; peak {_mb(peak)} (the bare "
        f"proxy: {_mb(bare_start)} before, {_mb(rss_bytes(bench.bare.pid))} after, peak "
        f"{_mb(_peak_rss(bench.bare.pid))})")


def _peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def scaling(bench: Bench, report: Report) -> None:
    workload = Workload(SMALL, TokenPlan("cycle", count=CLIENTS))
    rows = []
    with bench.unpinned():
        rows = [await _scaling_pair(bench, workload, workers) for workers in (1, 2)]
    report.rows.extend(rows)
    one, two = rows
    report.notes.append(
        f"scaling: 2 processes against 1: bare x{two.bare.rps / one.bare.rps:.2f}, "
        f"gateway x{two.gateway.rps / one.gateway.rps:.2f} (every process on all "
        f"{len(bench.all_cpus)} CPUs, which the load generator, the upstream and Redis share)")


async def _scaling_pair(bench: Bench, workload: Workload, workers: int) -> Row:
    port = free_port()
    bares = [ServiceProcess("bare", bench.workdir, port=port, name=f"bare-{workers}-{i}",
                            args=("--upstream", bench.upstream.url))
             for i in range(workers)]
    try:
        for bare in bares:
            await bare.start()
        async with bench.gateway(workers=str(workers)) as gw:
            label = "1 process" if workers == 1 else f"{workers} processes"
            return await bench.pair(f"scaling: {label}", gw, workload, bare=bares)
    finally:
        for bare in bares:
            bare.stop()


async def memory(bench: Bench, report: Report) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.bench.memory", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("the memory check failed")
    result = json.loads(out)
    report.notes.append(
        f"memory: {result['tokens']:,} tokens in the in-process layer: RSS "
        f"+{_mb(result['growth'])} ({result['per_token']:.0f} bytes a token; target < 100 MB)")


async def latency(bench: Bench, report: Report) -> None:
    """Added latency where it matters: at half the bare proxy's saturation rate (its best
    of three closed-loop runs), open loop (requests are due on a fixed schedule; latency
    counts from when each was due)."""
    workload = Workload(SMALL, TokenPlan("cycle", count=CLIENTS))
    async with bench.gateway() as gw:
        bare_url = bench.bare.url
        await bench.warm(bare_url, workload)
        await bench.warm(gw.url, workload)
        # the best of three 1-second closed-loop runs: on a shared machine a single run
        # often reads low, and half of a low reading is no test at all
        saturation = max([(await bench.load(bare_url, bench._next(bare_url, workload), 1.0)).rps
                          for _ in range(3)])
        rate = max(100.0, saturation / 2)
        seconds = max(2.0, bench.options.duration / 2)
        runs: dict[str, list[LoadResult]] = {"bare": [], "gateway": []}
        for _ in range(2):  # alternate, so outside load hits both alike
            for name, url in (("bare", bare_url), ("gateway", gw.url)):
                runs[name].append(await run_fixed_rate(
                    url, bench._next(url, workload), rate=rate, seconds=seconds / 2))
    p50 = {k: statistics.median(r.p50_ms for r in v) for k, v in runs.items()}
    p99 = {k: statistics.median(r.p99_ms for r in v) for k, v in runs.items()}
    errors = sum(r.errors for v in runs.values() for r in v)
    report.notes.append(
        f"latency at half the bare proxy's saturation ({rate:,.0f} req/s of {saturation:,.0f}, "
        f"open loop): bare p50 {p50['bare']:.2f} / p99 {p99['bare']:.2f} ms, gateway p50 "
        f"{p50['gateway']:.2f} / p99 {p99['gateway']:.2f} ms: **p99 added "
        f"{p99['gateway'] - p99['bare']:.2f} ms** (target < 1 ms)"
        + (f"; {errors} errors" if errors else ""))


async def instructions(bench: Bench, report: Report) -> None:
    """Instructions per request under callgrind (:mod:`gateway.bench.instructions`)."""
    from gateway.bench import instructions as counting

    if not counting.available():
        report.notes.append("instructions: skipped, valgrind is not on PATH "
                            "(Debian: apt-get install valgrind)")
        return
    requests = bench.options.instruction_requests
    bare, lean, gateway = await counting.measure(bench, requests)
    report.notes.append(
        f"instructions (callgrind, user space, {requests:,} steady requests each, "
        f"the gateway's timers off): bare {bare / 1000:,.0f}k, gateway {gateway / 1000:,.0f}k "
        f"a request: **gateway/bare {gateway / bare:.3f}**; the bare proxy on the "
        f"gateway's upstream client {lean / 1000:,.0f}k: gateway/lean bare "
        f"{gateway / lean:.3f} (what auth, policy, metrics, logs and headers add)")


SCENARIOS: dict[str, Callable[[Bench, Report], Awaitable[None]]] = {
    "steady": steady, "many-tokens": many_tokens, "cold": cold, "bodies": bodies,
    "scaling": scaling, "latency": latency, "memory": memory, "instructions": instructions,
}


# -- the report ----------------------------------------------------------------------

def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio's default loop"
    return (f"{_cpus()} CPUs ({model}), Python {sys.version.split()[0]}, {loop}")


def render(report: Report, out: TextIO) -> None:
    print("| scenario | bare req/s | p50 ms | p99 ms | CPU µs/req | gateway req/s | p50 ms "
          "| p99 ms | CPU µs/req | gateway/bare req/s | gateway/bare CPU/req |", file=out)
    print("|---|" + "---:|" * 10, file=out)
    for r in report.rows:
        b, g = r.bare, r.gateway
        print(f"| {r.scenario} | {b.rps:,.0f} | {b.p50_ms:.2f} | {b.p99_ms:.2f} | "
              f"{b.cpu_us:.0f} | {g.rps:,.0f} | {g.p50_ms:.2f} | {g.p99_ms:.2f} | "
              f"{g.cpu_us:.0f} | **{r.ratio:.2f}** | {r.cpu_ratio:.2f} |", file=out)
    print(file=out)
    for note in report.notes:
        print(f"- {note}", file=out)
    failed = [f"{r.scenario} ({where} {side.errors:,})" for r in report.rows
              for where, side in (("bare", r.bare), ("gateway", r.gateway))
              if side.errors and r.scenario != "cold"]
    if failed:
        print(f"- non-2xx answers or socket errors: {', '.join(failed)}", file=out)
    for failure in report.failed:
        print(f"- FAILED {failure}", file=out)


async def run(options: Options, out: TextIO) -> Report:
    """Run the chosen scenarios and print the table to ``out``."""
    print(f"oauth-gateway benchmark on {machine()}", file=out)
    print(f"load: {options.generator}, {options.connections} connections, "
          f"{options.duration:g} s per row (bodies: half) in {ROUND:g}-second runs, bare "
          "proxy and gateway alternating\n", file=out, flush=True)
    report = Report()
    async with Bench(options) as bench:
        for name in options.scenarios:
            started = time.monotonic()
            try:
                await SCENARIOS[name](bench, report)
            except Exception as exc:  # the other scenarios still run and report
                report.failed.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  {name} failed: {exc}", file=sys.stderr, flush=True)
                continue
            print(f"  {name} done in {time.monotonic() - started:.1f} s", file=sys.stderr,
                  flush=True)
    print(file=out)
    render(report, out)
    return report
