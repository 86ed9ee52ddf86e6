"""``oauth-gateway serve`` as a real process: start, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DEFAULT_POLICY, AuthServer, Upstream
from tests.redis_server import RedisServer, free_port

TOKEN = "tok-lifecycle-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
CLI = str(Path(sys.executable).with_name("oauth-gateway"))


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin_port: int,
                 policy: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.policy = policy


def _env(redis_server: RedisServer, auth_server: AuthServer, policy: Path, port: int,
         admin_port: int) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_POLICIES": str(policy),
        "GATEWAY_INTROSPECTION_URL": auth_server.url,
        "GATEWAY_SHUTDOWN_TIMEOUT": "10", "GATEWAY_ACCESS_LOG": "false",
    }


@pytest.fixture
async def serve(redis_server: RedisServer, auth_server: AuthServer, upstream: Upstream,
                tmp_path: Path) -> AsyncIterator[Callable[[], Served]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> Served:
        policy = tmp_path / "policy.yaml"
        policy.write_text(DEFAULT_POLICY.format(upstream=upstream.url))
        port, admin_port = free_port(), free_port()
        proc = subprocess.Popen([CLI, "serve"], env=_env(
            redis_server, auth_server, policy, port, admin_port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        return Served(proc, port, admin_port, policy)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _wait_ready(served: Served, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert served.proc.poll() is None, served.proc.stderr.read().decode() \
            if served.proc.stderr else "exited"
        try:
            async with session.get(served.admin + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("gateway did not become ready")


async def test_serve_reload_and_drain(serve: Callable[[], Served], auth_server: AuthServer,
                                      upstream: Upstream) -> None:
    auth_server.issue(TOKEN, scope="anaplan:read")
    served = serve()
    async with aiohttp.ClientSession() as session:
        await _wait_ready(served, session)
        async with session.get(served.admin + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(served.url + "/2/0/workspaces", headers=HEADERS) as resp:
            assert resp.status == 200
        async with session.get(served.url + "/v9/new", headers=HEADERS) as resp:
            assert resp.status == 404

        # SIGHUP: a new route appears without a restart
        served.policy.write_text(served.policy.read_text() + """
  - name: added
    upstream: api
    methods: [GET]
    path: /v9/**
    scopes: [anaplan:read]
""")
        served.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while True:
            async with session.get(served.url + "/v9/new", headers=HEADERS) as resp:
                if resp.status == 200:
                    break
            assert time.monotonic() < deadline, "reload not applied"
            await asyncio.sleep(0.05)

        # SIGHUP with a broken file: refused, the previous policy stays in force
        served.policy.write_text("routes: [{name: x}]\n")
        served.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        async with session.get(served.url + "/v9/new", headers=HEADERS) as resp:
            assert resp.status == 200
        async with session.get(served.admin + "/metrics") as resp:
            text = await resp.text()
            assert 'gateway_policy_reloads_total{outcome="ok"} 1.0' in text
            assert 'gateway_policy_reloads_total{outcome="error"} 1.0' in text

        # SIGTERM while a request is in flight: it finishes, then the process exits 0
        slow = asyncio.create_task(session.get(served.url + "/slow?s=1", headers=HEADERS))
        await asyncio.sleep(0.3)
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with session.get(served.admin + "/readyz") as resp:
            assert resp.status == 503  # draining: load balancers stop sending
        resp = await slow
        assert resp.status == 200
        resp.release()
    code = await asyncio.to_thread(served.proc.wait, 15)
    assert code == 0
    assert served.proc.stderr is not None
    stderr = served.proc.stderr.read().decode()
    assert "policy reload refused" in stderr
    assert TOKEN not in stderr


async def test_serve_without_validator_exits_with_clear_error(
        redis_server: RedisServer, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(DEFAULT_POLICY.format(upstream="http://127.0.0.1:9"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_POLICIES": str(policy),
                "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
                "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"})
    result = await asyncio.to_thread(subprocess.run, [CLI, "serve"], env=env,
                                     capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"GATEWAY_INTROSPECTION_URL" in result.stderr


async def test_serve_with_bad_policy_exits_naming_the_file(tmp_path: Path) -> None:
    policy = tmp_path / "broken.yaml"
    policy.write_text("routes:\n  - name: r\n    upstream: nowhere\n    path: /x\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_POLICIES"] = str(policy)
    result = await asyncio.to_thread(subprocess.run, [CLI, "serve"], env=env,
                                     capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"broken.yaml" in result.stderr and b"upstream" in result.stderr
