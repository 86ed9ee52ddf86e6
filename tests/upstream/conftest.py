"""Fixtures of the upstream client's tests: raw peers and pools, closed after each test."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import pytest

from gateway.forward.upstream import UpstreamPool
from tests.upstream.peers import PoolFactory, RawFactory, RawServer, Serve


@pytest.fixture
async def raw_server() -> AsyncIterator[RawFactory]:
    servers: list[RawServer] = []

    async def start(serve: Serve) -> RawServer:
        server = RawServer(serve)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    """Pools built in the test's loop, closed after it."""
    pools: list[UpstreamPool] = []

    def make(**kwargs: float | int | ssl.SSLContext) -> UpstreamPool:
        settings: dict[str, float | int | ssl.SSLContext] = {
            "limit": 8, "connect_timeout": 0.5, "idle_timeout": 5.0}
        settings.update(kwargs)
        pool = UpstreamPool(**settings)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()
