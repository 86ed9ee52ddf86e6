"""A fleet on one machine: three `oauth-gateway serve` processes sharing one Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DEFAULT_POLICY, AuthServer, Upstream
from tests.redis_server import RedisServer, free_port

CLI = str(Path(sys.executable).with_name("oauth-gateway"))
TOKEN = "tok-fleet-0123456789abc"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def fleet(redis_server: RedisServer, auth_server: AuthServer, upstream: Upstream,
                tmp_path: Path) -> AsyncIterator[list[str]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.format(upstream=upstream.url))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_POLICIES": str(policy),
                "GATEWAY_INTROSPECTION_URL": auth_server.url, "GATEWAY_ACCESS_LOG": "false",
                "GATEWAY_SHUTDOWN_TIMEOUT": "2"})
    procs, urls, admins = [], [], []
    for _ in range(3):
        port, admin_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [CLI, "serve"], env={**env, "GATEWAY_LISTEN": f"127.0.0.1:{port}",
                                 "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")
        admins.append(f"http://127.0.0.1:{admin_port}")
    async with aiohttp.ClientSession() as session:
        for admin, proc in zip(admins, procs, strict=True):
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, "a gateway process exited"
                try:
                    async with session.get(admin + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "gateway not ready"
                await asyncio.sleep(0.1)
    yield urls
    for proc in procs:
        proc.terminate()
    slow = []
    for proc in procs:
        try:  # a stop waits for its connections and tasks: slow on a loaded machine
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            slow.append(proc.pid)
    assert not slow, f"gateway processes {slow} took over 30 s to stop on SIGTERM"


async def _all_refuse(session: aiohttp.ClientSession, urls: list[str], limit: float) -> float:
    started = time.perf_counter()
    pending = set(urls)
    while pending:
        assert time.perf_counter() - started < limit, f"still allowed by {pending}"
        for url in list(pending):
            async with session.get(url + "/2/0/x", headers=HEADERS) as resp:
                if resp.status == 401:
                    pending.discard(url)
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def _cli(*args: str, env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait()


async def test_disable_and_revoke_reach_every_process(
        fleet: list[str], auth_server: AuthServer, redis_server: RedisServer) -> None:
    auth_server.issue(TOKEN, client_id="fleet-app")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_REDIS_URL"] = redis_server.url
    async with aiohttp.ClientSession() as session:
        for url in fleet:
            async with session.get(url + "/2/0/x", headers=HEADERS) as resp:
                assert resp.status == 200
        # the CLI process itself takes a while to start; time from its exit
        assert await _cli("clients", "disable", "fleet-app", env=env) == 0
        assert await _all_refuse(session, fleet, 1.0) < 0.1
        assert await _cli("clients", "enable", "fleet-app", env=env) == 0
        await asyncio.sleep(0.2)
        for url in fleet:
            async with session.get(url + "/2/0/x", headers=HEADERS) as resp:
                assert resp.status == 200
        # a token revoked through the CLI is refused by every process at once
        assert await _cli("tokens", "revoke", TOKEN, env=env) == 0
        assert await _all_refuse(session, fleet, 1.0) < 0.1
