""""Confirm it's you": a recent sign-in before the console's most dangerous changes.

Deleting a client, rotating a secret and changing the tenant settings need a session
whose sign-in (``auth_time``) is at most :data:`REAUTH_SECONDS` old. An older session is
shown a confirmation page instead, and nothing changes:

- a person with a password types it again; the page re-posts the original form with it,
  so the change is made as soon as the password is right. The password is checked as the
  login page checks it (:class:`~gateway.authserver.throttle.LoginThrottle`, and the same
  scrypt work whether or not the account has a password), so the page guesses no faster
  than the login page;
- a person who signed in through SSO (or Sign in with Anaplan) signs in there again and
  comes back to the page the change was made from.

A confirmation renews the session's ``auth_time`` and is audited
(``console.reauthenticated``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.authserver.hashing import verify_secret_evenly
from gateway.authserver.pages import SESSION_COOKIE, render
from gateway.authserver.server import server_of
from gateway.authserver.throttle import LoginThrottle

REAUTH_SECONDS = 300
PASSWORD_FIELD = "reauth_password"
_SIGN_IN_AGAIN = {"sso": "/oauth/sso/start", "anaplan": "/oauth/sso/anaplan/start"}


def is_recent(user: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether the session's sign-in is recent enough for a dangerous change."""
    auth_time = user.get("auth_time")
    return isinstance(auth_time, int) and \
        (now or time.time()) - auth_time <= REAUTH_SECONDS


def confirm_page(request: web.Request, user: Mapping[str, Any], form: Any, back: str, *,
                 error: str = "", status: int = 200,
                 headers: Mapping[str, str] | None = None) -> web.Response:
    """The "Confirm it's you" page: the original form's fields carried along with a
    password field (local users), or a link to sign in again (SSO users)."""
    fields = [(str(k), str(v)) for k, v in form.items()  # every value, repeated ones too
              if k not in ("csrf_token", PASSWORD_FIELD) and isinstance(v, str)]
    start = _SIGN_IN_AGAIN.get(str(user.get("method", "")))
    parts = request.path.split("/")
    return render(request, "console_reauth.html", {
        "section": parts[2] if len(parts) > 2 else "", "notice": "",
        "admin_name": str(user.get("username", "")),
        "username": str(user.get("username", "")), "action": request.path,
        "fields": fields, "back": back, "error": error,
        "minutes": str(REAUTH_SECONDS // 60),
        "sign_in_again": f"{start}?next={quote(back, safe='')}" if start else ""},
        status=status, headers=headers)


async def confirm(request: web.Request, user: Mapping[str, Any], form: Any, back: str
                  ) -> tuple[web.Response | None, LoginThrottle | None]:
    """Check the password posted with ``form``: ``(None, throttle)`` when it is right (the
    session's ``auth_time`` renewed; call ``throttle.succeeded`` on the response), else
    ``(the confirmation page again, None)``."""
    if PASSWORD_FIELD not in form or _SIGN_IN_AGAIN.get(str(user.get("method", ""))):
        return confirm_page(request, user, form, back), None
    server = server_of(request)
    username = str(user["username"])
    throttle = LoginThrottle(server, request, username,
                             session=request.cookies.get(SESSION_COOKIE, ""))
    refusal = await throttle.check()
    if refusal is not None:
        minutes = max(1, -(-refusal.retry_after // 60))
        return confirm_page(
            request, user, form, back, status=429,
            error=f"Too many wrong passwords. Try again in {minutes} "
                  f"minute{'s' if minutes > 1 else ''}.",
            headers={"Retry-After": str(refusal.retry_after)}), None
    password = str(form.get(PASSWORD_FIELD, ""))[:1024]
    record = await server.store.get_user(username)
    ok = await asyncio.to_thread(verify_secret_evenly, password,
                                 record.get("password_hash")) and bool(record)
    if not ok:
        await throttle.failed()
        await server.store.audit("login.failed", user=username, method="local",
                                 reason="reauthentication", remote=server.source(request))
        return confirm_page(request, user, form, back, status=401,
                            error="Wrong password. Nothing was changed."), None
    await _renew(request, user)
    return None, throttle


async def _renew(request: web.Request, user: Mapping[str, Any]) -> None:
    """The session's ``auth_time`` is now (its lifetime unchanged)."""
    store = server_of(request).store
    key = store.keys.as_session(store.digest(request.cookies.get(SESSION_COOKIE, "")))
    await store.redis.set(key, json.dumps({**user, "auth_time": int(time.time())}),
                          keepttl=True, xx=True)
