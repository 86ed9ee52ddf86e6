"""A Sentinel failover under load: real processes (a primary, its replica, a sentinel).

The primary is killed (or demoted by ``SENTINEL FAILOVER``) while clients keep calling;
the sentinel promotes the replica and the gateway follows it. Over every answer: no 500,
no 401 for a valid token (503 with ``Retry-After`` is what a request that needs Redis
gets during the switch), the token of a client disabled just before the failover
refused throughout, and once the gateway is back (``gateway_redis_up`` 1) a new disable
reaches it through the new primary within 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from gateway.cli import commands as cli
from tests.conftest import AuthGatewayFactory, AuthServer, GatewayFactory
from tests.redis_server import server_binary
from tests.test_people import _builtin_token
from tests.test_redis_outage import bearer, redis_up
from tests.test_redis_topologies import _free_ports

SERVICE = "gwfailover"


@dataclass
class Failover:
    """The processes of a Sentinel-managed pair, and the URL the gateway is given."""

    url: str
    primary: int
    replica: int
    sentinel: int
    procs: dict[int, subprocess.Popen[bytes]]

    def kill_primary(self) -> None:
        proc = self.procs[self.primary]
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)

    def master_port(self) -> int | None:
        """The master's port as the sentinel reports it (None: it cannot say)."""
        with SyncRedis(port=self.sentinel, socket_timeout=1) as probe:
            found = probe.sentinel_get_master_addr_by_name(SERVICE)
        return int(found[1]) if found else None


def _until(ready: Callable[[], Any], what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(RedisError, OSError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _replica_known(sentinel: int, replica: int) -> bool:
    """The sentinel lists the replica, up, with its link to the primary up."""
    with SyncRedis(port=sentinel, decode_responses=True, socket_timeout=1) as probe:
        for entry in probe.sentinel_slaves(SERVICE):
            if (int(entry["port"]) == replica and entry["master-link-status"] == "ok"
                    and not ({"s_down", "disconnected"} & set(entry["flags"].split(",")))):
                return True
    return False


def _linked(replica: int) -> bool:
    with SyncRedis(port=replica, socket_timeout=1) as node:
        return bool(node.info("replication")["master_link_status"] == "up")


@pytest.fixture
def failover(tmp_path: Path) -> Iterator[Failover]:
    """A primary, one replica (replicaof), and one sentinel (quorum 1, down after 1 s),
    on free loopback ports; every process stopped at teardown."""
    primary, replica, sentinel = _free_ports(3)
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(args: list[str]) -> None:
        procs[int(args[args.index("--port") + 1])] = subprocess.Popen(
            [server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        for port, extra in ((primary, []), (replica, ["--replicaof", "127.0.0.1",
                                                      str(primary)])):
            data = tmp_path / f"data-{port}"
            data.mkdir()
            start(["--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--maxmemory-policy", "noeviction",
                   "--repl-diskless-sync-delay", "0",  # no wait for more replicas
                   "--dir", str(data), "--loglevel", "warning", *extra])
        # linked first: the sentinel then finds the replica in its first look at the primary
        _until(lambda: _linked(replica), "the replica to sync", 20.0)
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"dir {tmp_path}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 1\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 3000\n"
                        f"sentinel parallel-syncs {SERVICE} 1\n")
        procs[sentinel] = subprocess.Popen(
            [server_binary(), str(conf), "--sentinel", "--port", str(sentinel),
             "--bind", "127.0.0.1", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _until(lambda: _replica_known(sentinel, replica), "the sentinel to see the replica",
               20.0)
        yield Failover(f"redis+sentinel://127.0.0.1:{sentinel}/{SERVICE}/0",
                       primary, replica, sentinel, procs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Answer:
    at: float
    status: int
    retry_after: str | None
    error: str | None


@dataclass
class Loop:
    """Requests with one token, one after the other, until stopped: every answer."""

    h: Any
    tokens: list[str]  # one after the other, the last one again once all have been used
    answers: list[Answer] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> Loop:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        for i in itertools.count():
            token = self.tokens[min(i, len(self.tokens) - 1)]
            resp = await self.h.client.get("/2/0/x", headers=bearer(token))
            error = None
            if resp.status >= 400:
                with contextlib.suppress(ValueError):
                    error = (await resp.json(content_type=None)).get("error")
            await resp.read()
            self.answers.append(Answer(time.monotonic(), resp.status,
                                       resp.headers.get("Retry-After"), error))
            await asyncio.sleep(0.01)

    async def stop(self) -> list[Answer]:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.answers


async def _until_async(ready: Callable[[], Awaitable[bool]], what: str, within: float) -> float:
    started = time.monotonic()
    while True:
        with contextlib.suppress(RedisError, OSError):
            if await ready():
                return time.monotonic() - started
        assert time.monotonic() - started < within, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# the primary killed (a crash), or demoted by SENTINEL FAILOVER (planned: it stays up as
# the new primary's replica, and the gateway's connections to it are refused writes)
@pytest.mark.parametrize("how", ["kill", "demote"])
async def test_a_sentinel_failover_under_load(
        how: str, failover: Failover, make_gateway: GatewayFactory,
        make_auth_gateway: AuthGatewayFactory, auth_server: AuthServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    valid = auth_server.issue("tok-failover-valid-0001", client_id="app-ok", sub="p-ok")
    doomed = auth_server.issue("tok-failover-doomed-0002", client_id="app-dis", sub="p-dis")
    late = auth_server.issue("tok-failover-late-0003", client_id="app-late", sub="p-late")
    # polling slowed right down: only the re-established subscription can meet the bound
    gw = await make_gateway(redis_url=failover.url, local_cache_ttl=60,
                            client_refresh_interval=30)
    builtin = await make_auth_gateway(redis_url=failover.url, local_cache_ttl=60)
    _, own = await _builtin_token(builtin, "fay")
    fresh = await _fresh_tokens(builtin, "gus", 400)
    for h in (gw, builtin):
        await asyncio.wait_for(h.gw.running().events.connected.wait(), 10)
    for h, token in ((gw, valid), (gw, doomed), (gw, late), (builtin, own)):
        assert (await h.client.get("/2/0/x", headers=bearer(token))).status == 200

    monkeypatch.setenv("GATEWAY_REDIS_URL", failover.url)  # for the operator's commands
    assert await _disable("app-dis") == 0
    await gw.until_status(401, 2.0, bearer(doomed))
    with SyncRedis(port=failover.replica, decode_responses=True) as replica:
        await _until_async(lambda: asyncio.to_thread(
            lambda: replica.hget("gw:client:app-dis", "disabled") == "1"),
            "the disable to reach the replica", 5.0)

    loops = [Loop(gw, [valid]).start(), Loop(gw, [doomed]).start(),
             Loop(builtin, [own]).start(), Loop(builtin, fresh).start()]
    try:
        await asyncio.sleep(0.3)
        killed = time.monotonic()
        if how == "kill":
            failover.kill_primary()
            # the gateway notices, the sentinel promotes the replica, the gateway follows
            for h in (gw, builtin):
                await _until_async(partial(_gauge_is, h, 0), "degraded mode", 5.0)
        else:
            with SyncRedis(port=failover.sentinel) as probe:
                probe.execute_command("SENTINEL FAILOVER", SERVICE)
        await _until_async(lambda: asyncio.to_thread(
            lambda: failover.master_port() == failover.replica), "the promotion", 20.0)
        for h in (gw, builtin):
            await _until_async(partial(_gauge_is, h, 1), "Redis up again", 10.0)
            await _until_async(partial(_connected, h), "the subscriber", 10.0)
        await _until_async(partial(_subscribers_on, failover.replica, 2),
                           "both gateways to subscribe on the new primary", 10.0)
        recovered = time.monotonic()
        await asyncio.sleep(0.5)  # load on the new primary

        # a disable made on the new primary reaches the gateway within the bound
        assert await _disable("app-late") == 0
        delay = await gw.until_status(401, 3.0, bearer(late))
        # a planned failover: a connection opened as the master moved may have read the
        # old one, stale; the watch drops it within a second and the records are re-read
        assert delay < (1.0 if how == "kill" else 2.5), delay
        with SyncRedis(port=failover.replica, decode_responses=True) as promoted:
            assert promoted.role()[0] == "master"
            assert promoted.hget("gw:client:app-late", "disabled") == "1"
    finally:
        answers = [await loop.stop() for loop in loops]

    for found in answers:
        assert any(a.at < killed for a in found) and any(a.at > recovered for a in found)
    valid_answers, doomed_answers, own_answers, fresh_answers = answers
    for found in (valid_answers, own_answers, fresh_answers):
        unexpected = [a for a in found if a.status not in (200, 503)]
        assert not unexpected, unexpected  # no 500, no 401 for a valid token
        waits = [a for a in found if a.status == 503]
        assert all(a.retry_after and a.retry_after.isdigit() for a in waits), waits
        assert {a.error for a in waits} <= {"temporarily_unavailable"}, waits
        assert found[-1].status == 200  # served again on the new primary
    assert {(a.status, a.error) for a in doomed_answers} == {(401, "invalid_token")}
    assert (await gw.client.get("/2/0/x", headers=bearer(valid))).status == 200
    assert (await builtin.client.get("/2/0/x", headers=bearer(own))).status == 200
    assert (await gw.client.get("/2/0/x", headers=bearer(doomed))).status == 401
    for h in (gw, builtin):
        assert (await h.admin.get("/readyz")).status == 200


async def _disable(client_id: str) -> int:
    """``oauth-gateway clients disable CLIENT_ID``, run as the operator would."""
    return await asyncio.to_thread(cli.main, ["clients", "disable", client_id, "--reason",
                                              "leaked", "--actor", "alice"])


async def _subscribers_on(port: int, at_least: int) -> bool:
    """Whether ``port`` holds ``at_least`` pub/sub subscribers (CLIENT LIST)."""
    def count() -> int:
        with SyncRedis(port=port, decode_responses=True) as node:
            return sum(1 for c in node.client_list()
                       if int(c.get("sub", 0)) or int(c.get("psub", 0)))
    return await asyncio.to_thread(count) >= at_least


async def _fresh_tokens(h: Any, username: str, n: int) -> list[str]:
    """``n`` access tokens of the built-in server, none yet seen by the gateway: each
    one's validation needs Redis (or, while it is away, gets 503)."""
    await h.auth.add_user(username, "correct horse battery", actor="test")
    subject = (await h.auth.store.get_user(username))["sub"]
    client, _ = await h.auth.create_client(
        name="fresh", grant="device_code", redirect_uris=[], scopes=["anaplan:read"],
        actor="test")
    grant = await h.auth.issuer.new_grant(client, username=username, sub=subject,
                                          scope="anaplan:read", grant_type=client.grant_type)
    return [str((await h.auth.issuer.issue(client, grant, scope="anaplan:read",
                                           grant_type=client.grant_type,
                                           refresh=False))["access_token"]) for _ in range(n)]


async def _gauge_is(h: Any, expected: float) -> bool:
    return await redis_up(h) == expected


async def _connected(h: Any) -> bool:
    return bool(h.gw.running().events.connected.is_set())
