"""``python -m bench`` in its smallest form: it runs and prints its table.

The benchmark is not installed: it runs from the repository root, as here. Timings are
the benchmark's business, not the test's: nothing here asserts a figure.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from bench import nginx
from bench.harness import Bench, Report
from bench.load import TokenPlan, Workload, parse_wrk, run_fixed_rate, wrk_script
from bench.processes import ServiceProcess
from bench.services import SMALL_JSON
from gateway.state.embedded import free_port
from tests.tools import find, missing

ROOT = Path(__file__).resolve().parent.parent


def test_bench_prints_the_table_with_a_ratio() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--duration", "1", "--connections", "4",
         "--scenarios", "steady", "--generator", "asyncio"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| scenario | bare req/s |" in out and "gateway/bare req/s" in out
    row = next(line for line in out.splitlines() if line.startswith("| steady |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 11
    assert re.fullmatch(r"\*\*\d+\.\d\d\*\*", cells[9]), row  # the ratio, measured
    assert float(cells[1].replace(",", "")) > 0 and float(cells[5].replace(",", "")) > 0
    assert "in-process layer hits" in out


def test_wrk_script_sends_the_tokens_the_plan_names() -> None:
    plan = TokenPlan("fresh", repeat=4, bad_every=5, base=7, suffix="s")
    assert [plan.token(n) for n in (0, 3, 4, 16)] == ["t7.s", "t7.s", "t8.s", "x11.s"]
    script = wrk_script(Workload("/2/0/x", plan))
    assert 'local kind, count, rep, bad_every, base, suffix = "fresh", 1, 4,' in script
    assert "function request()" in script
    fixed = wrk_script(Workload("/2/0/upload", method="POST", upload=1024))
    assert 'wrk.method = "POST"' in fixed and 'string.rep("x", 1024)' in fixed
    assert "function request()" not in fixed  # one request, built once by wrk


def test_wrk_output_is_read_in_milliseconds() -> None:
    output = """Running 2s test @ http://127.0.0.1:1/2/0/x
  1 threads and 32 connections
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    2.00ms
     99%    1.05s
  12000 requests in 2.00s, 3.1MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   6000.00
"""
    result = parse_wrk(output, 2)
    assert (result.requests, result.seconds, result.errors) == (12000, 2.0, 3)
    assert (result.p50_ms, result.p99_ms) == (0.812, 1050.0)


async def test_open_loop_latency_counts_a_stall_from_when_requests_were_due(
        aiohttp_server: AiohttpServer) -> None:
    # one connection, 100 requests/s; the 50th answer takes 200 ms. A closed loop would
    # send nothing meanwhile and count one slow request; the open loop keeps the
    # schedule, so the ~20 requests due during the stall count their wait as well
    seen = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        assert request.headers["Authorization"].startswith("Bearer t0.")
        if seen == 50:
            await asyncio.sleep(0.2)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/2/0/x", handler)
    server = await aiohttp_server(app)
    result = await run_fixed_rate(str(server.make_url("")).rstrip("/"), Workload("/2/0/x"),
                                  rate=100, seconds=2, connections=1)
    assert (result.requests, result.errors) == (200, 0)
    assert seen == 200
    assert result.p99_ms > 100  # the stall, as every request due during it saw it
    assert result.p50_ms < 50


def test_bench_counts_instructions_per_request_under_callgrind() -> None:
    find("valgrind", install="apt-get install -y valgrind")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--scenarios", "instructions",
         "--instruction-requests", "100", "--generator", "asyncio"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"bare ([\d,]+)k, gateway ([\d,]+)k a request: "
                      r"\*\*gateway/bare (\d+\.\d+)\*\*", done.stdout)
    assert found, done.stdout
    bare, gateway = (int(found.group(i).replace(",", "")) for i in (1, 2))
    assert bare > 0 and gateway > 0
    assert float(found.group(3)) == pytest.approx(gateway / bare, abs=0.01)
    lean = re.search(r"gateway's upstream client ([\d,]+)k: gateway/lean bare (\d+\.\d+)",
                     done.stdout)
    assert lean, done.stdout
    assert 0 < int(lean.group(1).replace(",", "")) < bare  # the lean client does less
    assert float(lean.group(2)) == pytest.approx(
        gateway / int(lean.group(1).replace(",", "")), abs=0.02)


def test_bench_measures_what_a_rate_limit_costs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--duration", "1", "--connections", "4",
         "--scenarios", "rate-limit", "--generator", "asyncio"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert any(line.startswith("| rate-limit on vs off |") for line in out.splitlines())
    note = next(line for line in out.splitlines() if line.startswith("- rate-limit:"))
    assert "(never reached: 0 refused)" in note and "the limit costs" in note


# -- the nginx reference (NGINX's token-introspection design) --------------------------

def _need_nginx() -> None:
    reason = nginx.unavailable()
    if reason is not None:
        missing(reason)


@pytest.fixture
async def nginx_reference(tmp_path: Path) -> AsyncIterator[tuple[nginx.NginxProcess, str]]:
    """nginx in NGINX's design in front of the stand-in upstream and introspection
    endpoint (whose URL comes second)."""
    _need_nginx()
    upstream = ServiceProcess("upstream", tmp_path, port=free_port())
    introspection = ServiceProcess("introspection", tmp_path, port=free_port())
    proxy = nginx.NginxProcess(tmp_path, upstream=upstream.url,
                               introspection=introspection.url, credentials=("gw", "secret"))
    try:
        await upstream.start()
        await introspection.start()
        await proxy.start()
        # its temp paths and cache are its own, not the system nginx's /var/lib/nginx
        assert {"client_body", "proxy", "cache"} <= {p.name for p in proxy.dir.iterdir()}
        yield proxy, introspection.url
    finally:
        proxy.stop()
        introspection.stop()
        upstream.stop()


async def _calls(session: aiohttp.ClientSession, introspection: str) -> int:
    async with session.get(introspection + "/stats") as resp:
        calls: int = (await resp.json())["calls"]
        return calls


async def test_nginx_reference_authorizes_as_the_gateway_does(
        nginx_reference: tuple[nginx.NginxProcess, str]) -> None:
    proxy, _ = nginx_reference
    url = proxy.url + "/2/0/workspaces"
    async with aiohttp.ClientSession() as session:
        async def status(token: str | None, method: str = "GET") -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with session.request(method, url, headers=headers) as resp:
                await resp.read()
                return resp.status

        async with session.get(url, headers={"Authorization": "Bearer t7.ok"}) as resp:
            assert resp.status == 200
            assert await resp.read() == SMALL_JSON  # the upstream's answer
        assert await status("x7.unknown") == 401  # inactive
        assert await status(None) == 401
        assert await status("w7.writer") == 403  # active, without anaplan:read
        assert await status("w7.writer", "POST") == 200  # which a write needs not
        async with session.get(proxy.url + "/elsewhere",
                               headers={"Authorization": "Bearer t7.ok"}) as resp:
            assert resp.status == 403  # no route


async def test_nginx_reference_introspects_a_token_once_per_cache_lifetime(
        nginx_reference: tuple[nginx.NginxProcess, str]) -> None:
    proxy, introspection = nginx_reference
    headers = {"Authorization": "Bearer t42.cached"}
    async with aiohttp.ClientSession() as session:
        before = await _calls(session, introspection)
        for _ in range(20):
            async with session.get(proxy.url + "/2/0/workspaces", headers=headers) as resp:
                assert resp.status == 200
        assert await _calls(session, introspection) == before + 1


async def test_nginx_scenario_says_what_to_install_when_nginx_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    report = Report()
    await nginx.scenario(cast(Bench, None), report)  # touches nothing of the bench
    assert report.rows == []
    assert report.notes == ["nginx: skipped, nginx is not on PATH (apt-get install "
                            "nginx-light libnginx-mod-http-js)"]


def test_bench_sets_the_gateway_against_the_nginx_design() -> None:
    _need_nginx()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--duration", "1", "--connections", "4",
         "--scenarios", "nginx", "--generator", "asyncio"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for label in ("nginx design, 1 worker", "nginx design, 2 workers"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[5].replace(",", "")) > 0
        assert re.fullmatch(r"\*\*\d+\.\d\d\*\*", cells[9]), row
    note = next(line for line in out.splitlines() if line.startswith("- nginx (nginx "))
    assert "gateway/nginx req/s 1 worker **" in note and "2 workers **" in note
    assert re.search(r"njs \d+\.\d+", note), note
    latency = next(line for line in out.splitlines() if line.startswith("- nginx latency"))
    assert re.search(r"\*\*p99 above nginx [+-]\d+\.\d\d ms\*\*", latency), latency
