"""How fast a client disable reaches every replica, by mechanism.

    python -m bench.propagation [--replicas 3] [--trials 40]

Starts a real Redis (:mod:`gateway.state.embedded`, as the tests do) and N client
registries with their event subscribers (what each gateway replica runs), then times,
per trial, from the write to the moment every replica's mirror shows the change:

- ``cli``: ``oauth-gateway clients disable`` (HSET + PUBLISH on ``gw:events``);
- ``redis-cli, keyspace``: a plain HSET, keyspace notifications on;
- ``redis-cli, polling``: a plain HSET, keyspace notifications off (0.5 s poll only).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from redis.asyncio import Redis

from gateway.observe.metrics import GatewayMetrics
from gateway.pipeline.govern import ClientAdmin, ClientRegistry
from gateway.runtime.fleet import EventSubscriber
from gateway.state.embedded import EmbeddedRedis
from gateway.state.keys import Keys


async def _replicas(url: str, n: int, keyspace: bool
                    ) -> tuple[list[ClientRegistry], list[asyncio.Task[None]], list[Redis]]:
    registries, tasks, conns = [], [], []
    for _ in range(n):
        redis = Redis.from_url(url, decode_responses=True)
        registry = ClientRegistry(redis, key_prefix="gw:", metrics=GatewayMetrics(),
                                  refresh_interval=0.5)
        events = EventSubscriber(redis, key_prefix="gw:", registry=registry, cache=None,
                                 metrics=registry.metrics, keyspace=keyspace)
        tasks += [asyncio.create_task(events.run()), asyncio.create_task(
            registry.run_refresher())]
        await asyncio.wait_for(events.connected.wait(), 5)
        registries.append(registry)
        conns.append(redis)
    return registries, tasks, conns


async def _trial(admin: Redis, registries: list[ClientRegistry], how: str, cid: str,
                 disabled: bool) -> float:
    # start from the opposite state, mirrored by every replica
    key = Keys("gw:").client(cid)  # what an operator types: HSET gw:client:{cid} ...
    await admin.hset(key, "disabled", "0" if disabled else "1")
    for r in registries:
        await r.refresh([cid])
    started = time.perf_counter()
    if how == "cli":
        await ClientAdmin(admin, key_prefix="gw:").set_disabled(cid, disabled, actor="bench")
    else:
        await admin.hset(key, "disabled", "1" if disabled else "0")
    while True:
        states = [r.cached(cid) for r in registries]
        if all(s is not None and s.disabled == disabled for s in states):
            return time.perf_counter() - started
        await asyncio.sleep(0.0005)


async def main(replicas: int, trials: int) -> None:
    server = EmbeddedRedis()
    server.start()
    try:
        admin = Redis.from_url(server.url, decode_responses=True)
        print(f"{replicas} replicas, {trials} trials each; ms from write to all replicas\n")
        print(f"{'mechanism':<24} {'p50':>8} {'p90':>8} {'max':>8}")
        for how, keyspace in (("cli", False), ("redis-cli, keyspace", True),
                              ("redis-cli, polling", False)):
            await admin.flushall()
            await admin.config_set("notify-keyspace-events", "")
            registries, tasks, conns = await _replicas(server.url, replicas, keyspace)
            samples = [await asyncio.wait_for(_trial(
                admin, registries, how.split(",")[0], f"c{i}", i % 2 == 0), 5)
                for i in range(trials)]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in conns:
                await c.aclose()
            ms = sorted(s * 1000 for s in samples)
            print(f"{how:<24} {statistics.median(ms):8.1f} {ms[int(len(ms) * .9)]:8.1f} "
                  f"{ms[-1]:8.1f}")
        await admin.aclose()
    finally:
        server.stop()


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.propagation",
        description="How fast a client disable reaches every replica, by mechanism.")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--trials", type=int, default=40)
    ns = parser.parse_args(argv)
    asyncio.run(main(ns.replicas, ns.trials))


if __name__ == "__main__":
    cli()
