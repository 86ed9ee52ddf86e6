"""``credentials: service``: the gateway's own Anaplan sign-in, never the client's token.

The upstream receives ``Authorization: AnaplanAuthToken <token>`` of the upstream's
policy identity. Each replica keeps the token in memory and the fleet shares it in
Redis (:mod:`gateway.forward.credentials.sharing`): a replica that needs one reads it
there first, and only the holder of the sign-in lock talks to the token service, so
replicas starting together cause one sign-in.

Freshness: past three quarters of its life the token is refreshed
(``/token/refresh``); a refused refresh signs in again. A 401 from the upstream renews
it once (:meth:`ServiceMode.refused`). With no valid token and the token service down,
requests get 503 with ``Retry-After``: a request is never sent without credentials. After
a failed sign-in a replica waits :data:`RETRY_BACKOFF` before the next attempt, so a
broken certificate or a down service is not hammered by every request.

Every sign-in and every refusal is written to the audit stream (refreshes, routine
every three quarters of a token's life, only counted).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config.policy import RoutePolicy
from gateway.forward.credentials.anaplan import (
    AnaplanSignIn,
    AnaplanToken,
    SignInRefused,
    TokenServiceDown,
)
from gateway.forward.credentials.base import CredentialMode, Credentials
from gateway.forward.credentials.sharing import Shared, SharedToken
from gateway.observe.metrics import GatewayMetrics
from gateway.protocol.errors import ServiceUnavailable
from gateway.protocol.tokens import PresentedToken
from gateway.state.events import append_audit, audit_entry
from gateway.state.keys import Keys

log = logging.getLogger(__name__)

LOCK_SECONDS = 15.0  # a sign-in's time limit: the token service's timeout, and some
RETRY_AFTER = 5  # seconds a client is told to wait when there is no token to send
RETRY_BACKOFF = 1.0  # seconds a replica waits after a failed sign-in before another
_POLL = 0.05  # seconds between looks at Redis while another replica signs in


def _fresh(shared: Shared | None, now: float) -> bool:
    """Within the first three quarters of its life."""
    if shared is None:
        return False
    life = shared.token.expires_at - shared.obtained_at
    return now < shared.obtained_at + 0.75 * life


def _usable(shared: Shared | None, now: float) -> bool:
    return shared is not None and shared.token.expires_at > now + 1.0


class IdentityTokens:
    """One identity's token for this replica: fresh from memory, else from the fleet,
    else signed in (or refreshed) under the fleet's lock."""

    def __init__(self, name: str, signin: AnaplanSignIn, shared: SharedToken,
                 metrics: GatewayMetrics) -> None:
        self.name = name
        self.signin = signin
        self.shared = shared
        self.metrics = metrics
        self._current: Shared | None = None
        self._busy: asyncio.Task[Shared] | None = None
        self._failed_until = 0.0  # no new sign-in attempt before this time
        self._gauged = False

    def _seconds_left(self) -> float:
        return self._current.token.expires_at - time.time() if self._current else 0.0

    def _count(self, outcome: str) -> None:
        self.metrics.credential_refreshes.labels(self.name, "service", outcome).inc()

    def _adopt(self, shared: Shared) -> Shared:
        self._current = shared
        if not self._gauged:  # from the first token on: time left, computed when scraped
            self.metrics.credential_expiry.labels(self.name).set_function(self._seconds_left)
            self._gauged = True
        return shared

    async def _audit(self, action: str, reason: str | None = None) -> None:
        try:
            await append_audit(self.shared.redis, self.shared.keys, audit_entry(
                action, identity=self.name, mode="service", actor="gateway", reason=reason))
        except RedisError as exc:
            log.warning("audit entry %s for %r not written: %s", action, self.name, exc)

    async def current(self) -> str:
        """The token to send; raise :class:`ServiceUnavailable` when there is none."""
        now = time.time()
        if _fresh(self._current, now):
            assert self._current is not None
            return self._current.token.value
        return (await self._renew(stale=None)).token.value

    async def renew(self, stale: str) -> None:
        """The upstream refused ``stale``: get another, unless that is done already."""
        if self._current is not None and self._current.token.value != stale:
            return
        await self._renew(stale=stale)

    async def _renew(self, stale: str | None) -> Shared:
        if time.time() < self._failed_until:
            held = self._current
            if stale is None and _usable(held, time.time()) and held is not None:
                return held
            raise ServiceUnavailable(
                f"The gateway cannot sign in to the upstream as {self.name!r}.",
                retry_after=RETRY_AFTER)
        # one renewal at a time in this replica, as a task of its own: the requests
        # waiting for it share its outcome, and a client that leaves (its handler
        # cancelled) neither cancels it nor leaves the fleet's lock held
        task = self._busy
        if task is None:
            task = self._busy = asyncio.create_task(self._obtain(stale))
            task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[Shared]) -> None:
        self._busy = None
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters re-raise it

    async def _obtain(self, stale: str | None) -> Shared:
        now = time.time()
        try:
            shared = await self.shared.read()
            if _fresh(shared, now) and shared is not None and shared.token.value != stale:
                return self._adopt(shared)
            deadline = now + LOCK_SECONDS
            while True:
                fence = await self.shared.lock(LOCK_SECONDS)
                if fence is not None:
                    break
                # another replica is signing in: use what we hold meanwhile, if it works
                held = self._current
                if stale is None and _usable(held, time.time()) and held is not None:
                    return held
                await asyncio.sleep(_POLL)
                shared = await self.shared.read()
                if _fresh(shared, time.time()) and shared is not None \
                        and shared.token.value != stale:
                    return self._adopt(shared)
                if time.time() > deadline:
                    raise ServiceUnavailable(
                        f"No upstream credential for identity {self.name!r} yet (another "
                        "replica is signing in).", retry_after=RETRY_AFTER)
            try:
                shared = await self.shared.read()  # someone may have finished meanwhile
                if _fresh(shared, time.time()) and shared is not None \
                        and shared.token.value != stale:
                    return self._adopt(shared)
                held = shared if _usable(shared, time.time()) else self._current
                got = await self._sign_in(held, stale)
                await self.shared.write(got, fence, time.time())
                return self._adopt(got)
            finally:
                await self.shared.unlock(fence)
        except RedisError as exc:
            # no fleet to share with: this replica signs in on its own rather than fail
            log.warning("Redis unavailable for upstream credential of %r: %s", self.name, exc)
            return self._adopt(await self._sign_in(self._current, stale))

    async def _sign_in(self, held: Shared | None, stale: str | None) -> Shared:
        """Refresh ``held`` when it is still alive, else sign in."""
        now = time.time()
        try:
            if _usable(held, now) and held is not None:
                try:
                    token = await self.signin.refresh(held.token.value)
                    self._count("refreshed")
                    return Shared(token, now)
                except SignInRefused:
                    self._count("refresh_refused")
                    await self._audit("credential.refresh_refused")
            try:
                token = await self.signin.authenticate()
            except SignInRefused as exc:
                self._count("sign_in_refused")
                await self._audit("credential.sign_in_refused", reason=str(exc)[:200])
                raise
            self._count("signed_in")
            await self._audit("credential.signed_in")
            return Shared(token, now)
        except (TokenServiceDown, SignInRefused) as exc:
            if isinstance(exc, TokenServiceDown):
                self._count("unavailable")
            self._failed_until = time.time() + RETRY_BACKOFF
            log.warning("upstream credential of %r: %s", self.name, exc)
            if stale is None and _usable(held, time.time()) and held is not None:
                return held  # still valid: keep sending it while the service is away
            raise ServiceUnavailable(
                f"The gateway cannot sign in to the upstream as {self.name!r}.",
                retry_after=RETRY_AFTER) from None


class ServiceMode(CredentialMode):
    """Sends the identity's own token; the client's never reaches the upstream."""

    name = "service"
    awaits = True
    renews = True

    def __init__(self, tokens: IdentityTokens) -> None:
        self.tokens = tokens

    async def obtain(self, token: PresentedToken, subject: str | None = None) -> Credentials:
        return (("Authorization", "AnaplanAuthToken " + await self.tokens.current()),)

    async def refused(self, sent: Credentials, subject: str | None = None) -> bool:
        stale = sent[0][1].partition(" ")[2]
        await self.tokens.renew(stale)
        return True


def service_modes(policy: RoutePolicy, *, redis: Redis, session: aiohttp.ClientSession,
                  keys: Keys, secret_keys: list[bytes], metrics: GatewayMetrics
                  ) -> dict[str, CredentialMode]:
    """The ``service`` modes of ``policy``'s upstreams, by upstream name (one token per
    identity, whichever upstreams use it). Raise ValueError on an unreadable identity."""
    tokens: dict[str, IdentityTokens] = {}
    modes: dict[str, CredentialMode] = {}
    for upstream in policy.upstreams.values():
        if upstream.credentials != "service":
            continue
        name = upstream.identity
        if name not in tokens:
            identity = policy.identities[name]
            tokens[name] = IdentityTokens(
                name, AnaplanSignIn(identity, session, v2=identity.certificate_payload == "v2"),
                SharedToken(redis, keys, name, secret_keys), metrics)
        modes[upstream.name] = ServiceMode(tokens[name])
    return modes


__all__ = ["AnaplanToken", "IdentityTokens", "ServiceMode", "service_modes"]
