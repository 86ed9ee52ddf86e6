"""What every sign-in through another identity provider shares (company SSO, Anaplan).

RFC 6749 section 10.12: the ``state`` sent to the provider is single use, lives
``STATE_TTL`` seconds, and is bound to the browser that started the sign-in (a cookie whose
digest the state's record holds), so a sign-in response cannot be replayed, nor completed
in another browser. Refusals are counted, audited and shown on one page.
"""

from __future__ import annotations

import hmac
import json
import secrets
from typing import Any

from aiohttp import web

from gateway.authserver import pages
from gateway.authserver.oidc import SSOError
from gateway.authserver.server import server_of

STATE_TTL = 600
BROWSER_COOKIE = "gw_sso_browser"


def _state_key(request: web.Request, flow: str, state: str) -> str:
    store = server_of(request).store
    # prefixed per flow: a state of one flow never completes another's
    return store.keys.as_sso_state(store.digest(flow + state))


async def refuse(request: web.Request, err: SSOError, *, method: str) -> web.Response:
    """Count, audit and show a refused sign-in."""
    server = server_of(request)
    server.metrics.logins.labels(method, err.outcome).inc()
    await server.store.audit("login.failed", method=method, reason=err.outcome,
                             remote=server.source(request))
    return pages.render(request, "sso_failed.html", {"message": err.message},
                        status=err.status)


async def new_state(request: web.Request, record: dict[str, Any], *, flow: str
                    ) -> tuple[str, str]:
    """Keep ``record`` (with the browser's digest and the page to return to) under a new
    state; ``(state, browser cookie value)``."""
    server = server_of(request)
    state = secrets.token_urlsafe(32)
    browser = request.cookies.get(BROWSER_COOKIE, "")
    if len(browser) < 20:
        browser = secrets.token_urlsafe(24)
    record = {**record, "browser": server.store.digest(browser),
              "next": pages.safe_next(request.query.get("next"))}
    await server.store.redis.set(_state_key(request, flow, state), json.dumps(record),
                                 ex=STATE_TTL)
    return state, browser


def to_provider(request: web.Request, location: str, browser: str) -> web.HTTPFound:
    """The redirect to the provider, setting the browser cookie the state is bound to."""
    response = web.HTTPFound(location)
    response.headers["Cache-Control"] = "no-store"
    response.set_cookie(BROWSER_COOKIE, browser, httponly=True, samesite="Lax",
                        secure=server_of(request).issuer_url.startswith("https://"),
                        path="/oauth/sso/", max_age=STATE_TTL)
    return response


async def take_state(request: web.Request, *, flow: str) -> dict[str, Any]:
    """The record of the callback's ``state``: one this server issued, unused, to this
    browser (then it is used up); raises :class:`SSOError` otherwise."""
    state = request.query.get("state", "")
    if not state or len(state) > 256:
        raise SSOError(400, "invalid_state", "This sign-in response carries no valid state. "
                       "Start again from the sign-in page.")
    raw = await server_of(request).store.redis.getdel(_state_key(request, flow, state))
    if not raw:
        raise SSOError(400, "invalid_state", "This sign-in attempt is unknown, expired or "
                       "already used. Start again from the sign-in page.")
    record: dict[str, Any] = json.loads(raw)
    browser = request.cookies.get(BROWSER_COOKIE, "")
    if not hmac.compare_digest(server_of(request).store.digest(browser), record["browser"]):
        raise SSOError(400, "invalid_state", "This sign-in was started in another browser. "
                       "Start again from the sign-in page.")
    return record


async def signed_in(request: web.Request, record: dict[str, Any], *, username: str, sub: str,
                    method: str) -> web.HTTPSeeOther:
    """Count and audit the sign-in, start the session; the redirect back to the page the
    sign-in started from."""
    server = server_of(request)
    server.metrics.logins.labels(method, "success").inc()
    response = web.HTTPSeeOther(record["next"])
    await pages.start_session(request, response, username=username, sub=sub, method=method)
    await server.store.audit("login", user=username, method=method,
                             remote=server.source(request))
    return response
