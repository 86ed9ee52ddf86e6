"""The scenarios, and the table they print.

Each scenario starts its own gateway (with the settings the scenario needs, on an
emptied Redis), warms both proxies up, then loads the bare proxy and the gateway with
the same workload in alternating runs (:meth:`bench.harness.Bench.pair`). ``steady``,
``many-tokens`` and ``cold`` request the small JSON answer.

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
- ``latency``: added latency at half the bare proxy's saturation rate, open loop.
- ``rate-limit``: ``steady`` twice, on gateways without and with
  ``GATEWAY_DEFAULT_RATE_LIMIT`` (a limit never reached), so each of the 300 clients is
  counted, and synced with Redis every 0.1 s: what a limit costs on the hot path.
- ``memory``: RSS growth of 100,000 tokens in the in-process layer
  (:mod:`bench.memory`, in a process of its own).
- ``instructions``: instructions per request under callgrind (:mod:`bench.instructions`).
- ``nginx``: NGINX's own token-introspection design (auth_request, njs, proxy_cache)
  against the gateway, 1 and 2 workers each, and open-loop latency (:mod:`bench.nginx`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from bench import instructions as counting
from bench import nginx as nginx_reference
from bench.harness import CLIENTS, DIGEST_KEY, ROUND, SMALL, Bench, Options, Report, Row
from bench.load import LoadResult, TokenPlan, Workload, run_fixed_rate
from bench.processes import GatewayProcess, ServiceProcess, python_env, rss_bytes
from bench.services import SCOPES
from gateway.authn.validators.base import TokenInfo
from gateway.protocol.tokens import TokenDigester
from gateway.state.embedded import free_port
from gateway.state.keys import Keys

KEYS = Keys("gw:")  # the benchmarked gateway runs with the default GATEWAY_KEY_PREFIX
MANY_TOKENS = 10_000
MANY_TOKENS_LOCAL_SIZE = 1_000


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


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


UNREACHED_LIMIT = "1000000000/1h"  # a limit every client has and none reaches


async def rate_limit(bench: Bench, report: Report) -> None:
    """Two gateways at once, one without a limit and one with a limit no client reaches,
    loaded in alternating rounds (the row's "bare" columns are the one without)."""
    workload = Workload(SMALL, TokenPlan("cycle", count=CLIENTS))
    async with bench.gateway() as off:
        on = GatewayProcess(bench.workdir, bench.gateway_settings(
            default_rate_limit=UNREACHED_LIMIT), name="gateway-limited", cpus=bench.proxy_cpus)
        try:
            await on.start()
            row = await bench.pair("rate-limit on vs off", on, workload, bare=[off])
            limited = sum(v for k, v in (await on.metrics()).items()
                          if k.startswith("gateway_rate_limited_total"))
        finally:
            on.stop(timeout=30)
    report.rows.append(row)
    report.notes.append(
        f"rate-limit: the row sets a gateway with GATEWAY_DEFAULT_RATE_LIMIT={UNREACHED_LIMIT} "
        f"on {CLIENTS} clients (never reached: {limited:.0f} refused) against the same "
        f"gateway without it (in the bare columns): **the limit costs "
        f"{100 * (1 - row.ratio):.1f}% of throughput, {100 * (row.cpu_ratio - 1):.1f}% more "
        "CPU per request** (target <= 10%)")


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
        sys.executable, "-m", "bench.memory", stdout=asyncio.subprocess.PIPE, env=python_env())
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


SCENARIOS: dict[str, Callable[[Bench, Report], Awaitable[None]]] = {
    "steady": steady, "many-tokens": many_tokens, "cold": cold, "bodies": bodies,
    "scaling": scaling, "latency": latency, "memory": memory, "rate-limit": rate_limit,
    "instructions": counting.scenario, "nginx": nginx_reference.scenario,
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
