"""The gateway on Redis Sentinel (found through the sentinels, followed to the master) and
on Redis Cluster (a real three-master cluster: keys spread by hash slot)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.authserver.models import GRANT_DEVICE
from gateway.cli import commands as cli
from gateway.config.settings import SettingsError, load_settings
from gateway.pipeline.govern import ClientAdmin
from gateway.state.connection import connect, is_cluster
from tests.conftest import AuthGatewayFactory, AuthServer, GatewayFactory
from tests.redis_server import RedisServer, free_port, server_binary
from tests.test_authserver_core import _grant, _refresh
from tests.test_jwt_access_tokens import _grant as _jwt_grant


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


# -- Redis Cluster --------------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    url: str
    ports: list[int]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held together while chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _cluster_cli() -> str:
    server = Path(server_binary())
    for name in ("valkey-cli", "redis-cli"):
        if (server.parent / name).exists():
            return str(server.parent / name)
    for name in ("valkey-cli", "redis-cli"):
        if found := shutil.which(name):
            return found
    raise FileNotFoundError("no valkey-cli or redis-cli to form the test cluster")


CLUSTER_PASSWORD = "cluster p@ss"


def _node(port: int) -> SyncRedis:
    """A plain client of one cluster node, as ``redis-cli -p PORT`` would be."""
    return SyncRedis(port=port, password=CLUSTER_PASSWORD, decode_responses=True)


def _every_node(ports: list[int], check: Callable[[SyncRedis], bool]) -> bool:
    for port in ports:
        with _node(port) as node:
            if not check(node):
                return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real Redis Cluster on loopback: three masters, no replicas, a password; for
    this module."""
    workdir = tmp_path_factory.mktemp("cluster")
    ports = _free_ports(6)
    data, bus = ports[:3], ports[3:]  # bus ports given: port + 10000 may not exist
    procs = [subprocess.Popen(
        [server_binary(), "--port", str(port), "--cluster-port", str(bus_port),
         "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
         "--requirepass", CLUSTER_PASSWORD, "--masterauth", CLUSTER_PASSWORD,
         "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
         "--bind", "127.0.0.1", "--dir", str(workdir),
         "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port, bus_port in zip(data, bus, strict=True)]
    try:
        _wait(lambda: _every_node(data, lambda n: bool(n.ping())), "the nodes to start")
        subprocess.run([_cluster_cli(), "-a", CLUSTER_PASSWORD, "--no-auth-warning",
                        "--cluster", "create", *[f"127.0.0.1:{p}" for p in data],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        _wait(lambda: _every_node(data, lambda n: n.cluster("INFO")["cluster_state"] == "ok"),
              "cluster_state:ok on every node")
        password = quote(CLUSTER_PASSWORD, safe="")
        yield Cluster(f"redis+cluster://:{password}@127.0.0.1:{data[0]},127.0.0.1:{data[1]}",
                      data)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(5)


def _wait(ready: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if ready():
                return
        except RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
async def cluster_redis(cluster: Cluster) -> AsyncIterator[Redis]:
    """A gateway-made client of the cluster, emptied first (every primary)."""
    client = connect(cluster.url)
    await client.flushall()
    yield client
    await client.aclose()


TOKEN = "tok-cluster-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def test_settings_accept_cluster_urls() -> None:
    for url in ("redis+cluster://10.0.0.1:6379,10.0.0.2:6379", "rediss+cluster://:pw@n1:6380"):
        assert load_settings(environ={"GATEWAY_REDIS_URL": url}).redis_url == url
    with pytest.raises(SettingsError, match="redis\\+cluster://"):
        load_settings(environ={"GATEWAY_REDIS_URL": "cluster://n1:6379"})


@pytest.mark.parametrize(("url", "message"), [
    ("redis+cluster://127.0.0.1:7000/1", "no database"),
    ("redis+cluster://127.0.0.1:7000?ssl_cert_reqs=none", "no query"),
    ("redis+cluster:///", "at least one host"),
])
def test_cluster_url_mistakes_are_named(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        connect(url)


def test_cli_on_an_unreachable_cluster_fails_cleanly(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_URL", f"redis+cluster://127.0.0.1:{free_port()}")
    assert cli.main(["clients", "list"]) == 1
    assert "failed: Redis Cluster cannot be connected" in capsys.readouterr().err


async def test_cluster_url_spreads_keys_over_every_node(cluster: Cluster,
                                                        cluster_redis: Redis) -> None:
    assert is_cluster(cluster_redis)
    for i in range(30):
        await cluster_redis.hset(f"gw:client:spread{i}", "disabled", "0")
    for port in cluster.ports:
        with _node(port) as node:
            assert int(node.dbsize()) > 0
    admin = ClientAdmin(cluster_redis, key_prefix="gw:")
    assert len(await admin.list()) == 30  # SCAN walked every primary


async def test_gateway_on_a_cluster_validates_and_caches_tokens(
        cluster: Cluster, cluster_redis: Redis, make_gateway: GatewayFactory,
        auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN, client_id="app1")
    one, two = [await make_gateway(redis_url=cluster.url) for _ in range(2)]
    for gw in (one, one, two):
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    assert auth_server.calls == 1  # the second replica found it in the cluster
    assert 'gateway_token_cache_requests_total{layer="redis",result="hit"} 1.0' in \
        await two.metrics()
    assert [k async for k in cluster_redis.scan_iter("gw:token:*")]
    ready = await one.admin.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"]["redis"] == "ok"


async def test_cluster_cli_disable_reaches_two_replicas_within_100ms(
        cluster: Cluster, cluster_redis: Redis, make_gateway: GatewayFactory,
        auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    auth_server.issue(TOKEN, client_id="app1")
    # polling slowed right down: only the published event can meet the bound
    replicas = [await make_gateway(redis_url=cluster.url, client_refresh_interval=30)
                for _ in range(2)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    monkeypatch.setenv("GATEWAY_REDIS_URL", cluster.url)
    code = await asyncio.to_thread(cli.main, ["clients", "disable", "app1", "--reason",
                                              "leaked secret", "--actor", "alice"])
    assert code == 0
    delays = await asyncio.gather(*[gw.until_status(401, 1.0, HEADERS) for gw in replicas])
    assert max(delays) < 0.1, delays
    assert (await cluster_redis.hgetall("gw:client:app1"))["reason"] == "leaked secret"
    entries: Any = await cluster_redis.xrange("gw:audit")
    assert entries[-1][1]["action"] == "client.disabled"
    assert await asyncio.to_thread(cli.main, ["clients", "enable", "app1"]) == 0
    await asyncio.gather(*[gw.until_status(200, 1.0, HEADERS) for gw in replicas])


async def test_cluster_redis_cli_hset_reaches_replicas_within_1s(
        cluster: Cluster, cluster_redis: Redis, make_gateway: GatewayFactory,
        auth_server: AuthServer) -> None:
    auth_server.issue(TOKEN, client_id="app2")
    replicas = [await make_gateway(redis_url=cluster.url) for _ in range(2)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    await cluster_redis.hset("gw:client:app2", "disabled", "1")  # no event published
    delays = await asyncio.gather(*[gw.until_status(401, 2.0, HEADERS) for gw in replicas])
    assert max(delays) < 1.0, delays
    for port in cluster.ports:  # no CONFIG SET on a cluster: polling did it
        with _node(port) as node:
            assert node.config_get("notify-keyspace-events") == {"notify-keyspace-events": ""}


async def test_cluster_usage_window_is_fleet_wide(
        cluster: Cluster, cluster_redis: Redis, make_gateway: GatewayFactory,
        auth_server: AuthServer) -> None:
    one, two = [await make_gateway(redis_url=cluster.url) for _ in range(2)]
    a1, a2, a3 = (auth_server.issue(f"tok-cluster-a{i}-Z", client_id="appA") for i in (1, 2, 3))
    b1 = auth_server.issue("tok-cluster-b1-Z", client_id="appB")
    for gw, token in ((one, a1), (one, a1), (one, a2), (two, a2), (two, a3), (one, b1)):
        resp = await gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
    for gw in (one, two):
        await gw.gw.running().pipeline.usage.flush()
    await one.gw.running().pipeline.usage.report()
    text = await one.metrics()
    assert 'gateway_client_window_requests{client_id="appA"} 5.0' in text
    assert 'gateway_client_window_distinct_tokens{client_id="appA"} 3.0' in text
    assert 'gateway_client_window_requests{client_id="appB"} 1.0' in text
    assert 'gateway_client_window_distinct_tokens{client_id="appB"} 1.0' in text
    keys = [k async for k in cluster_redis.scan_iter("gw:usage:*:{appA}:*")]
    assert {k.split(":")[2] for k in keys} == {"req", "tok", "hour"}


async def test_cluster_tokens_revoke_refuses_a_cached_token_everywhere(
        cluster: Cluster, cluster_redis: Redis, make_gateway: GatewayFactory,
        auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    auth_server.issue(TOKEN, client_id="app3")
    replicas = [await make_gateway(redis_url=cluster.url) for _ in range(2)]
    for gw in replicas:
        assert (await gw.client.get("/2/0/x", headers=HEADERS)).status == 200
    monkeypatch.setenv("GATEWAY_REDIS_URL", cluster.url)
    assert await asyncio.to_thread(cli.main, ["tokens", "revoke", TOKEN]) == 0
    delays = await asyncio.gather(*[gw.until_status(401, 1.0, HEADERS) for gw in replicas])
    assert max(delays) < 0.1, delays
    assert auth_server.calls == 1  # pinned as revoked in the cluster: not re-validated
    entries: Any = await cluster_redis.xrange("gw:audit")
    assert entries[-1][1]["action"] == "token.revoked"


async def test_authorization_server_on_a_cluster_rotates_and_detects_reuse(
        cluster: Cluster, cluster_redis: Redis, make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway(redis_url=cluster.url)
    client_id, _, first = await _grant(h)
    bearer = {"Authorization": f"Bearer {first['access_token']}"}
    assert (await h.client.get("/2/0/x", headers=bearer)).status == 200
    resp = await _refresh(h, client_id, str(first["refresh_token"]))
    assert resp.status == 200
    second = await resp.json()
    assert second["refresh_token"] != first["refresh_token"]
    bearer = {"Authorization": f"Bearer {second['access_token']}"}
    assert (await h.client.get("/2/0/x", headers=bearer)).status == 200
    # replaying the spent refresh token revokes the whole family
    resp = await _refresh(h, client_id, str(first["refresh_token"]))
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")
    resp = await _refresh(h, client_id, second["refresh_token"])
    assert resp.status == 400
    assert (await h.client.get("/2/0/x", headers=bearer)).status == 401
    stream: Any = await cluster_redis.xrange("gw:audit")
    actions = [e[1]["action"] for e in stream]
    assert "refresh.reuse_detected" in actions and "grant.revoked" in actions
    [grant] = await h.auth.list_grants(client_id=client_id)
    assert grant.revoked


async def test_jwt_access_tokens_and_device_polling_on_a_cluster(
        cluster: Cluster, cluster_redis: Redis, make_auth_gateway: AuthGatewayFactory) -> None:
    h = await make_auth_gateway(redis_url=cluster.url, as_access_token_format="jwt")
    _, body = await _jwt_grant(h)  # its signing key was made with WATCH/MULTI on the cluster
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    assert (await h.client.get("/2/0/x", headers=bearer)).status == 200
    [key] = (await (await h.client.get("/oauth/jwks")).json())["keys"]
    assert jwt.get_unverified_header(str(body["access_token"]))["kid"] == key["kid"]
    device, _ = await h.auth.create_client(name="cli", grant="device_code", redirect_uris=[],
                                           scopes=["anaplan:read"], actor="test")
    resp = await h.client.post("/oauth/device_authorization",
                               data={"client_id": device.client_id})
    assert resp.status == 200
    poll = {"grant_type": GRANT_DEVICE, "client_id": device.client_id,
            "device_code": (await resp.json())["device_code"]}
    answers = []
    for _ in range(2):  # the second comes sooner than the interval: the Lua script says so
        resp = await h.client.post("/oauth/token", data=poll)
        answers.append((resp.status, (await resp.json())["error"]))
    assert answers == [(400, "authorization_pending"), (400, "slow_down")]
    # rate limits (logins, user-code entry) count in a MULTI on one key: fine on a cluster
    assert [await h.auth.store.hit("cluster-check", 60) for _ in range(2)] == [1, 2]


async def test_cluster_concurrent_new_tokens(
        cluster: Cluster, cluster_redis: Redis, make_gateway: GatewayFactory,
        auth_server: AuthServer) -> None:
    tokens = [auth_server.issue(f"tok-cluster-burst-{i}-Z") for i in range(20)]
    gw = await make_gateway(redis_url=cluster.url)
    responses = await asyncio.gather(*[
        gw.client.get("/2/0/x", headers={"Authorization": f"Bearer {t}"}) for t in tokens])
    assert [r.status for r in responses] == [200] * len(tokens)


async def test_the_eviction_check_asks_every_primary(cluster: Cluster,
                                                     cluster_redis: Redis) -> None:
    """One primary of three evicting is enough to be told (and, with the built-in server,
    refused)."""
    from gateway.state import durability

    assert (await durability.inspect(cluster_redis)).policy == "noeviction"
    with _node(cluster.ports[2]) as node:
        node.config_set("maxmemory-policy", "allkeys-lru")
    try:
        found = await durability.inspect(cluster_redis)
        assert found.policy == "allkeys-lru" and not found.refused
        assert found.assess(builtin=True, allow_eviction=False)[1] is not None
    finally:
        with _node(cluster.ports[2]) as node:
            node.config_set("maxmemory-policy", "noeviction")


async def test_a_backup_is_refused_on_a_cluster(cluster_redis: Redis) -> None:
    from gateway.state import backup
    from gateway.state.keys import Keys

    with pytest.raises(backup.BackupError, match="Redis Cluster"):
        await backup.export(cluster_redis, Keys(), secret_keys=[], configured_digest_key=None)
