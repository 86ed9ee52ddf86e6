"""The gateway on Redis Sentinel: found through the sentinels, followed to the master."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from gateway.store import connect
from tests.conftest import AuthServer, GatewayFactory
from tests.redis_server import RedisServer, free_port, server_binary


@pytest.fixture
def sentinel(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    """One sentinel monitoring the session's Redis as service ``gwmaster``."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor gwmaster 127.0.0.1 {redis_server.port} 1\n"
                    "sentinel down-after-milliseconds gwmaster 5000\n")
    proc = subprocess.Popen([server_binary(), str(conf), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with SyncRedis(port=port) as probe:
                    if probe.sentinel_get_master_addr_by_name("gwmaster"):
                        break
            except RedisError:
                pass
            time.sleep(0.1)
        yield f"redis+sentinel://127.0.0.1:{port}/gwmaster/0"
    finally:
        proc.terminate()
        proc.wait(5)


async def test_sentinel_url_reaches_the_master(sentinel: str) -> None:
    client = connect(sentinel)
    try:
        await client.set("gw:topology-check", "ok")
        assert await client.get("gw:topology-check") == "ok"
    finally:
        await client.aclose()


async def test_gateway_runs_on_a_sentinel_url(sentinel: str, make_gateway: GatewayFactory,
                                              auth_server: AuthServer) -> None:
    auth_server.issue("tok-sentinel-123456", client_id="app1")
    gw = await make_gateway(redis_url=sentinel)
    resp = await gw.client.get("/2/0/x", headers={"Authorization": "Bearer tok-sentinel-123456"})
    assert resp.status == 200
    assert (await gw.admin.get("/readyz")).status == 200


def test_sentinel_url_needs_a_service_name() -> None:
    with pytest.raises(ValueError, match="service name"):
        connect("redis+sentinel://127.0.0.1:26379")
