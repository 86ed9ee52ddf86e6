"""A grant's state decides its tokens, at the gateway and at introspection alike.

A revoked grant (even by a revocation racing a refresh), a grant past its idle timeout
or its maximum lifetime: every token of it is refused by the gateway and inactive at
the introspection endpoint, at once. A spent rotated refresh token is inactive too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp
from redis.asyncio import Redis

from tests.conftest import AuthGatewayFactory, AuthHarness
from tests.test_authserver_core import _grant, _refresh, basic


class _Introspector:
    """A resource server that introspects over HTTP (RFC 7662)."""

    def __init__(self, h: AuthHarness, client_id: str, secret: str) -> None:
        self.h, self.auth = h, basic(client_id, secret)

    @classmethod
    async def create(cls, h: AuthHarness) -> _Introspector:
        rs, secret = await h.auth.create_client(
            name="resource server", grant="authorization_code",
            redirect_uris=["https://rs.example.com/cb"], scopes=[], actor="t", introspect=True)
        assert secret
        return cls(h, rs.client_id, secret)

    async def __call__(self, token: str, hint: str | None = None) -> dict[str, Any]:
        data = {"token": token, **({"token_type_hint": hint} if hint else {})}
        resp = await self.h.client.post("/oauth/introspect", data=data,
                                        headers={"Authorization": self.auth})
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


async def _at_gateway(h: AuthHarness, token: str) -> int:
    resp = await h.client.get("/2/0/x", headers={"Authorization": f"Bearer {token}"})
    return resp.status


async def test_a_refresh_racing_a_revocation_leaves_no_live_token(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    """Refresh and revoke the same refresh token at the same moment, many times: whoever
    wins, the grant ends revoked, and the gateway and introspection both refuse every
    token of it, the ones the refresh issued included."""
    h = await make_auth_gateway()
    introspect = await _Introspector.create(h)
    refreshed = 0
    for trial in range(40):
        client_id, _, body = await _grant(h)
        rt = str(body["refresh_token"])
        def revoking(rt: str = rt, client_id: str = client_id
                     ) -> Awaitable[aiohttp.ClientResponse]:
            return h.client.post("/oauth/revoke", data={
                "token": rt, "client_id": client_id, "token_type_hint": "refresh_token"})

        if trial % 4 == 0:  # each order for sure, then both at once (who wins varies)
            refresh = await _refresh(h, client_id, rt)
            revoke = await revoking()
        elif trial % 4 == 1:
            revoke = await revoking()
            refresh = await _refresh(h, client_id, rt)
        else:
            refresh, revoke = await asyncio.gather(_refresh(h, client_id, rt), revoking())
        assert revoke.status == 200
        tokens = [str(body["access_token"])]
        if refresh.status == 200:
            refreshed += 1
            new = await refresh.json()
            tokens += [new["access_token"], new["refresh_token"]]
        else:
            assert (await refresh.json())["error"] == "invalid_grant"
        [grant] = await h.auth.list_grants(client_id=client_id)
        assert grant.revoked, trial
        # no record of any token of it is left, not even of those the refresh made
        store = h.auth.store
        members = await store.grant_tokens(grant.grant_id)
        assert not await redis.exists(*map(store.keys.as_token_of_member, members)), trial
        for token in tokens:
            answer = await introspect(token)
            status = await _at_gateway(h, token)
            assert (answer, status) == ({"active": False}, 401), (trial, token[:5])
    assert refreshed > 0  # the race was run both ways


async def test_a_revoked_grant_is_refused_even_while_its_record_outlives_it(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    """The gateway checks the grant, not only the access token's record: a token whose
    record survived its grant's revocation is refused, as introspection says."""
    h = await make_auth_gateway()
    introspect = await _Introspector.create(h)
    client_id, _, body = await _grant(h)
    [grant] = await h.auth.list_grants(client_id=client_id)
    await h.auth.store.mark_grant_revoked(grant.grant_id, "test")  # the record is left
    token = str(body["access_token"])
    assert await introspect(token) == {"active": False}
    assert await _at_gateway(h, token) == 401


async def _sleep_past_idle(h: AuthHarness, client_id: str, idle: int) -> None:
    [grant] = await h.auth.list_grants(client_id=client_id)
    await asyncio.sleep(max(0.0, grant.last_used_at + idle + 0.1 - time.time()))


async def test_an_idle_grant_ends_its_access_tokens_at_the_gateway(
        make_auth_gateway: AuthGatewayFactory) -> None:
    """Idle timeout: no refresh for that long ends the grant. Its access token, cached as
    active by the gateway a moment before, is refused once the grant is idle, though the
    token's own ``exp`` is far away."""
    h = await make_auth_gateway()
    introspect = await _Introspector.create(h)
    # 3 s: long enough that a loaded machine still checks the token before the deadline
    client_id, _, body = await _grant(h, idle_timeout=3)
    token = str(body["access_token"])
    assert await _at_gateway(h, token) == 200  # cached now
    assert (await introspect(token))["active"] is True
    await _sleep_past_idle(h, client_id, 3)
    assert await introspect(token) == {"active": False}
    assert await _at_gateway(h, token) == 401
    resp = await _refresh(h, client_id, str(body["refresh_token"]))
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")


async def test_a_refresh_keeps_a_grant_from_going_idle(
        make_auth_gateway: AuthGatewayFactory) -> None:
    """A refresh is a use of the grant: it restarts the idle clock for every token of the
    grant, at the gateway as at introspection. Using an access token is not: the
    gateway's validations do not move the clock, and neither do introspections."""
    h = await make_auth_gateway()
    introspect = await _Introspector.create(h)
    client_id, _, first = await _grant(h, idle_timeout=2)
    old = str(first["access_token"])
    assert await _at_gateway(h, old) == 200  # cached until the idle deadline
    [before] = await h.auth.list_grants(client_id=client_id)
    await asyncio.sleep(max(0.0, before.last_used_at + 1.05 - time.time()))
    resp = await _refresh(h, client_id, str(first["refresh_token"]))
    assert resp.status == 200
    new = str((await resp.json())["access_token"])
    [after] = await h.auth.list_grants(client_id=client_id)
    assert after.last_used_at > before.last_used_at
    # past the first idle deadline, within the second: both tokens live, everywhere
    await asyncio.sleep(max(0.0, before.last_used_at + 2.2 - time.time()))
    assert time.time() < after.last_used_at + 2
    for token in (old, new):
        assert (await introspect(token))["active"] is True
        assert await _at_gateway(h, token) == 200
    [still] = await h.auth.list_grants(client_id=client_id)
    assert still.last_used_at == after.last_used_at  # validations did not touch it
    await _sleep_past_idle(h, client_id, 2)
    for token in (old, new):
        assert await introspect(token) == {"active": False}
        assert await _at_gateway(h, token) == 401


async def test_a_grant_past_its_maximum_lifetime_ends_its_tokens(
        make_auth_gateway: AuthGatewayFactory, redis: Redis) -> None:
    h = await make_auth_gateway()
    introspect = await _Introspector.create(h)
    client_id, _, body = await _grant(h)
    [grant] = await h.auth.list_grants(client_id=client_id)
    # the grant's end, as stored, is now: tokens never outlive it
    await redis.hset(h.auth.store.keys.as_grant(grant.grant_id), "expires_at",
                     str(int(time.time())))
    token = str(body["access_token"])
    assert await introspect(token) == {"active": False}
    assert await _at_gateway(h, token) == 401


async def test_a_spent_rotated_refresh_token_is_inactive(
        make_auth_gateway: AuthGatewayFactory) -> None:
    """RFC 7662: a rotated refresh token, once used, is no longer active (presenting it
    again is a replay that ends the grant); its successor is."""
    h = await make_auth_gateway()
    introspect = await _Introspector.create(h)
    client_id, _, first = await _grant(h)
    resp = await _refresh(h, client_id, str(first["refresh_token"]))
    assert resp.status == 200
    second = await resp.json()
    for hint in (None, "refresh_token", "access_token"):
        assert await introspect(str(first["refresh_token"]), hint) == {"active": False}
    answer = await introspect(second["refresh_token"])
    assert (answer["active"], answer["token_type"]) == (True, "refresh_token")
    # a non-rotatable refresh token stays active through its refreshes
    client_id, _, fixed = await _grant(h, refresh_mode="non_rotatable")
    assert (await _refresh(h, client_id, str(fixed["refresh_token"]))).status == 200
    assert (await introspect(str(fixed["refresh_token"])))["active"] is True


async def test_a_refused_refresh_does_not_spend_the_refresh_token(
        make_auth_gateway: AuthGatewayFactory) -> None:
    """A refresh asking for more scope is refused before the rotated token is spent: the
    same token then refreshes normally, and its grant is not taken for a replayed one."""
    h = await make_auth_gateway()
    client_id, _, body = await _grant(h)
    rt = str(body["refresh_token"])
    wider = await h.client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": rt, "client_id": client_id,
        "scope": "anaplan:read anaplan:write"})
    assert wider.status == 400 and (await wider.json())["error"] == "invalid_scope"
    again = await _refresh(h, client_id, rt)
    assert again.status == 200, await again.text()
    new = await again.json()
    assert await _at_gateway(h, str(new["access_token"])) == 200
    [grant] = await h.auth.list_grants(client_id=client_id)
    assert not grant.revoked
