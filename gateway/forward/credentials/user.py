"""``credentials: user``: the person's own Anaplan sign-in, never the client's token.

A person who signed in with Anaplan on the built-in server has their Anaplan tokens kept
sealed in Redis under their subject (:mod:`gateway.state.signins`). A request whose
token speaks for such a person reaches the upstream with ``Authorization:
AnaplanAuthToken <their Anaplan access token>``; a token that speaks for nobody, or for
someone with no Anaplan sign-in, gets 401 ``invalid_token``.

Freshness: past three quarters of its life the access token is refreshed with the
person's refresh token at Anaplan's ``/oauth/token``. One replica of the fleet refreshes
at a time (a Redis lock per person; the others wait for its result), and the new tokens
replace the old ones by compare-and-set: a rotatable refresh token is used once, so two
replicas refreshing together never make Anaplan see it twice (which ends the family).
When Anaplan refuses the refresh token, the person's sign-in is removed and their grants
end (``end_grants``): the app's next call gets 401 and its next login starts over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from gateway.config.policy import RoutePolicy
from gateway.forward.credentials.anaplan_oauth import AnaplanOAuth, OAuthDown, OAuthRefused
from gateway.forward.credentials.base import CredentialMode, Credentials
from gateway.observe.metrics import GatewayMetrics
from gateway.protocol.errors import InvalidToken, ServiceUnavailable
from gateway.protocol.tokens import PresentedToken
from gateway.state.events import append_audit, audit_entry
from gateway.state.signins import AnaplanSignIn, SignInStore, StoredSignIn

log = logging.getLogger(__name__)

LOCK_SECONDS = 15.0  # a refresh's time limit: the OAuth client's timeout, and some
RETRY_AFTER = 5
_POLL = 0.05  # seconds between looks at Redis while another replica refreshes
_MEMORY = 10_000  # people whose tokens a replica keeps in memory (then it starts over)

#: ends every grant of a person (subject, username) whose Anaplan sign-in is gone
EndGrants = Callable[[str, str], Awaitable[None]]


def _fresh(signin: AnaplanSignIn | None, now: float) -> bool:
    """Within the first three quarters of its life."""
    if signin is None:
        return False
    return now < signin.obtained_at + 0.75 * (signin.expires_at - signin.obtained_at)


def _usable(signin: AnaplanSignIn | None, now: float) -> bool:
    return signin is not None and signin.expires_at > now + 1.0


def _gone() -> InvalidToken:
    return InvalidToken("The person this token speaks for has no Anaplan sign-in at the "
                        "gateway (or it has ended); sign in with Anaplan again.")


class PeopleTokens:
    """People's Anaplan access tokens for this replica: fresh from memory, else from
    Redis, else refreshed under the fleet's lock for that person."""

    def __init__(self, store: SignInStore, oauth: AnaplanOAuth, metrics: GatewayMetrics,
                 end_grants: EndGrants | None = None) -> None:
        self.store = store
        self.oauth = oauth
        self.metrics = metrics
        self.end_grants = end_grants
        self._current: dict[str, AnaplanSignIn] = {}
        self._busy: dict[str, asyncio.Task[AnaplanSignIn]] = {}

    def _count(self, outcome: str) -> None:
        self.metrics.credential_refreshes.labels("people", "user", outcome).inc()

    def _adopt(self, subject: str, signin: AnaplanSignIn) -> AnaplanSignIn:
        if len(self._current) >= _MEMORY and subject not in self._current:
            self._current.clear()
        self._current[subject] = signin
        return signin

    async def current(self, subject: str) -> str:
        """The person's access token; raise :class:`InvalidToken` when they have none."""
        held = self._current.get(subject)
        if _fresh(held, time.time()):
            assert held is not None
            return held.access_token
        return (await self._renew(subject, stale=None)).access_token

    async def renew(self, subject: str, stale: str) -> None:
        """The upstream refused ``stale``: refresh, unless that is done already."""
        held = self._current.get(subject)
        if held is not None and held.access_token != stale:
            return
        await self._renew(subject, stale)

    async def _renew(self, subject: str, stale: str | None) -> AnaplanSignIn:
        # one renewal per person at a time in this replica, as a task of its own: the
        # requests waiting share its outcome, and a client leaving does not cancel it
        task = self._busy.get(subject)
        if task is None:
            task = self._busy[subject] = asyncio.create_task(self._obtain(subject, stale))
            task.add_done_callback(lambda t: self._done(subject, t))
        return await asyncio.shield(task)

    def _done(self, subject: str, task: asyncio.Task[AnaplanSignIn]) -> None:
        self._busy.pop(subject, None)
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters re-raise it

    def _good(self, stored: StoredSignIn | None, stale: str | None) -> bool:
        return stored is not None and _fresh(stored.signin, time.time()) \
            and stored.signin.access_token != stale

    async def _obtain(self, subject: str, stale: str | None) -> AnaplanSignIn:
        try:
            stored = await self.store.load(subject)
            if stored is None:
                self._current.pop(subject, None)
                raise _gone()
            if self._good(stored, stale):
                return self._adopt(subject, stored.signin)
            deadline = time.time() + LOCK_SECONDS
            while (owner := await self.store.lock(subject, LOCK_SECONDS)) is None:
                # another replica is refreshing: wait for what it stores
                await asyncio.sleep(_POLL)
                stored = await self.store.load(subject)
                if stored is None:
                    self._current.pop(subject, None)
                    raise _gone()
                if self._good(stored, stale):
                    return self._adopt(subject, stored.signin)
                if time.time() > deadline:
                    raise ServiceUnavailable("The person's Anaplan token is being refreshed "
                                             "by another replica.", retry_after=RETRY_AFTER)
            try:
                stored = await self.store.load(subject)  # it may have been done meanwhile
                if stored is None:
                    self._current.pop(subject, None)
                    raise _gone()
                if self._good(stored, stale):
                    return self._adopt(subject, stored.signin)
                return self._adopt(subject, await self._refresh(subject, stored, stale))
            finally:
                await self.store.unlock(subject, owner)
        except RedisError as exc:
            log.warning("Redis unavailable for a person's Anaplan token: %s", exc)
            raise ServiceUnavailable("The gateway cannot read the person's Anaplan sign-in.",
                                     retry_after=RETRY_AFTER) from None

    async def _refresh(self, subject: str, stored: StoredSignIn, stale: str | None
                       ) -> AnaplanSignIn:
        """Refresh at Anaplan (under the lock) and swap the stored tokens atomically."""
        old = stored.signin
        try:
            tokens = await self.oauth.refresh(old.refresh_token)
        except OAuthRefused:
            self._count("refresh_refused")
            self._current.pop(subject, None)
            await self.store.remove(subject, stored)
            await append_audit(self.store.redis, self.store.keys, audit_entry(
                "credential.refresh_refused", subject=subject, user=old.username,
                mode="user", actor="gateway", reason="anaplan_refused_refresh_token"))
            if self.end_grants is not None:
                await self.end_grants(subject, old.username)
            raise _gone() from None
        except OAuthDown as exc:
            self._count("unavailable")
            log.warning("refreshing a person's Anaplan token: %s", exc)
            if stale is None and _usable(old, time.time()):
                return old  # still valid: keep sending it while Anaplan is away
            raise ServiceUnavailable("Anaplan cannot refresh the person's token now.",
                                     retry_after=RETRY_AFTER) from None
        self._count("refreshed")
        new = AnaplanSignIn(old.username, tokens.access_token,
                            tokens.refresh_token or old.refresh_token, tokens.expires_at,
                            time.time())
        if not await self.store.swap(subject, stored, new):
            # the person signed in again meanwhile: theirs is the newer sign-in
            again = await self.store.load(subject)
            if again is None:
                raise _gone()
            return again.signin
        return new


class UserMode(CredentialMode):
    """Sends the person's own Anaplan token; the client's never reaches the upstream."""

    name = "user"
    awaits = True
    renews = True

    def __init__(self, tokens: PeopleTokens) -> None:
        self.tokens = tokens

    async def obtain(self, token: PresentedToken, subject: str | None = None) -> Credentials:
        if not subject:
            raise _gone()
        return (("Authorization", "AnaplanAuthToken " + await self.tokens.current(subject)),)

    async def refused(self, sent: Credentials, subject: str | None = None) -> bool:
        if not subject:
            return False
        await self.tokens.renew(subject, sent[0][1].partition(" ")[2])
        return True


def user_modes(policy: RoutePolicy, tokens: PeopleTokens | None
               ) -> dict[str, CredentialMode]:
    """The ``user`` modes of ``policy``'s upstreams, by upstream name (one store of
    people's tokens for them all)."""
    users = [u.name for u in policy.upstreams.values() if u.credentials == "user"]
    if not users:
        return {}
    if tokens is None:
        raise ValueError(f"upstream {users[0]!r}: credentials: user needs GATEWAY_SECRET_KEYS")
    mode = UserMode(tokens)
    return dict.fromkeys(users, mode)


__all__ = ["EndGrants", "PeopleTokens", "UserMode", "user_modes"]
