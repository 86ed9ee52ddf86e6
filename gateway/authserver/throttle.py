"""Sign-in throttling that no stranger can turn into a lockout.

Failed local sign-ins are counted per (user name, source address) together. Up to
:data:`FREE_FAILURES` of them cost nothing; each one after that makes the pair wait, twice
as long each time (:data:`BASE_DELAY` up to :data:`MAX_DELAY`). A stranger guessing from
elsewhere so slows only themselves: the person signing in from their own address is not
held up, and neither is a browser that signed in as that user before (its *known device*
cookie, ``gw_device``, or a live session of that user), whose failures are counted per
browser instead of per address.

Two wider limits remain, neither a lock on a known browser: every attempt from one
address (:data:`SOURCE_LIMIT` per :data:`SOURCE_WINDOW`, against spraying many names), and
a user's failures from everywhere (:data:`USER_LIMIT` in the current and the previous
:data:`USER_WINDOW`, against
guessing from many addresses), which then holds back only browsers the user never signed
in from.

Counters are kept for any typed name, existing or not, and a refused attempt checks no
password: the refusal says nothing about who exists. A lock's start is audited
(``login.throttled``); every refused attempt is counted in
``gateway_as_login_throttled_total{reason}`` (``user_source``, ``source``, ``user``).
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from gateway.authserver.server import AuthorizationServer

FREE_FAILURES = 5
BASE_DELAY = 30
MAX_DELAY = 3600
BACKOFF_MEMORY = 24 * 3600
SOURCE_LIMIT, SOURCE_WINDOW = 30, 300
USER_LIMIT, USER_WINDOW = 50, 900
DEVICE_COOKIE = "gw_device"
DEVICE_TTL = 180 * 24 * 3600


def backoff(failures: int) -> int:
    """Seconds a (user, source) pair waits after ``failures`` failures in a row."""
    if failures < FREE_FAILURES:
        return 0
    return int(min(MAX_DELAY, BASE_DELAY * 2 ** (failures - FREE_FAILURES)))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an attempt is refused before its password is checked, and for how long."""

    reason: str
    retry_after: int


class LoginThrottle:
    """The throttle of one sign-in attempt: :meth:`check` before the password is
    checked, then :meth:`failed` or :meth:`succeeded`."""

    def __init__(self, server: AuthorizationServer, request: web.Request,
                 username: str, *, session: str = "") -> None:
        """``session``: the session cookie, when its session is this user's."""
        self.server, self.request, self.username = server, request, username
        self.session = session
        self.store = server.store
        self.peer = server.source(request)
        self.user_digest = self.store.digest("login-user\0" + username)
        self.device = ""  # the known browser's nonce, when it is one for this user

    def _known_device(self) -> str:
        """The nonce of this browser's ``gw_device`` cookie if it signed in as this user
        before (or the session's, if signed in as this user now); else empty."""
        nonce, _, mac = self.request.cookies.get(DEVICE_COOKIE, "").partition(".")
        if nonce and mac and hmac.compare_digest(mac, self._device_mac(nonce)):
            return nonce
        return "session:" + self.store.digest(self.session) if self.session else ""

    def _device_mac(self, nonce: str) -> str:
        return self.store.digest(f"known-device\0{self.username}\0{nonce}")

    def _backoff_key(self) -> str:
        where = f"device\0{self.device}" if self.device else f"source\0{self.peer}"
        return self.store.keys.as_login_backoff(
            self.store.digest(f"login\0{self.username}\0{where}"))

    async def check(self) -> Refusal | None:
        """A refusal if this attempt must wait (its password then goes unchecked)."""
        self.device = self._known_device()
        if not self.device and await self.store.hit(f"login:{self.peer}",
                                                    SOURCE_WINDOW) > SOURCE_LIMIT:
            return await self._refuse("source", SOURCE_WINDOW)
        state = cast(dict[str, str], await self.store.redis.hgetall(self._backoff_key()))
        failures, last = int(state.get("failures") or 0), float(state.get("last") or 0)
        wait = int(last + backoff(failures) - time.time())
        if wait > 0:
            return await self._refuse("user_source", wait)
        if not self.device and await self._user_failures() >= USER_LIMIT:
            return await self._refuse("user", USER_WINDOW)
        return None

    async def _user_failures(self, *, previous_only: bool = False) -> int:
        """The user's failures in this fixed window and the one before: a count that
        does not drop to nothing when a window turns."""
        window = int(time.time()) // USER_WINDOW
        name = f"login-failed:{self.user_digest}"
        windows = [window - 1] if previous_only else [window - 1, window]
        async with self.store.redis.pipeline(transaction=False) as pipe:  # cluster: 2 slots
            for w in windows:
                pipe.get(self.store.keys.as_rate(name, w))
            raw = await pipe.execute()
        return sum(int(v or 0) for v in raw)

    async def _refuse(self, reason: str, retry_after: int) -> Refusal:
        self.server.metrics.login_throttled.labels(reason).inc()
        return Refusal(reason, max(1, retry_after))

    async def failed(self) -> None:
        """Count a wrong password; audit the start of a wait."""
        key = self._backoff_key()
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "failures", 1)
            pipe.hset(key, "last", str(time.time()))
            pipe.expire(key, BACKOFF_MEMORY)
            failures, _, _ = await pipe.execute()
        wait = backoff(int(failures))
        if wait:
            await self.store.audit("login.throttled", user=self.username, remote=self.peer,
                                   reason="user_source", seconds=str(wait),
                                   known_device="yes" if self.device else "no")
        if not self.device:
            count = await self.store.hit(f"login-failed:{self.user_digest}", USER_WINDOW) \
                + await self._user_failures(previous_only=True)
            if count == USER_LIMIT:
                await self.store.audit("login.throttled", user=self.username,
                                       remote=self.peer, reason="user",
                                       seconds=str(USER_WINDOW), known_device="no")

    async def succeeded(self, response: web.StreamResponse) -> None:
        """Forget this pair's failures; mark the browser as known for this user."""
        await self.store.redis.delete(self._backoff_key())
        nonce = secrets.token_urlsafe(16)
        response.set_cookie(DEVICE_COOKIE, f"{nonce}.{self._device_mac(nonce)}",
                            httponly=True, samesite="Lax", path="/oauth/",
                            secure=self.server.issuer_url.startswith("https://"),
                            max_age=DEVICE_TTL)
