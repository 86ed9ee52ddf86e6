"""A person's own page, ``/account/``: the apps and devices holding a grant of theirs,
and a button that ends each.

- Signed-in session required; without one, the login page and back.
- A person sees and ends only their own grants: one of someone else's is answered as if
  it did not exist (404), and nothing changes.
- Ending one goes through the same path as ``oauth-gateway grants revoke``
  (:meth:`TokenIssuer.revoke_grant`): the grant ends, with every token of it, at once on
  every gateway replica; the audit entry names the person as the actor.
- The old ``/oauth/account`` answers with a permanent redirect here.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.authserver.authorize import scope_lines
from gateway.authserver.models import Grant
from gateway.authserver.pages import (
    current_user,
    forbidden_csrf,
    posted_form,
    render,
)
from gateway.authserver.server import server_of

ACCOUNT_PATH = "/account/"
REVOKE_PATH = "/account/revoke"
#: the reason recorded (audit, ``gateway_as_grants_revoked_total``) when a person ends
#: a grant of their own
REASON = "revoked_by_user"


def moment(epoch: int, now: float | None = None) -> dict[str, str]:
    """A moment for the page: ``text`` as ``2026-12-05 15:45 (3 minutes ago)`` in UTC,
    ``iso`` for the ``<time datetime>`` attribute. No moment (0): ``Never``."""
    if not epoch:
        return {"text": "Never", "iso": ""}
    delta = int((time.time() if now is None else now) - epoch)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch))
    return {"text": f"{stamp} ({_ago(delta)})",
            "iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))}


def _ago(delta: int) -> str:
    if abs(delta) < 60:
        return "just now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if abs(delta) >= size:
            n = abs(delta) // size
            amount = f"{n} {unit}{'s' if n != 1 else ''}"
            return f"{amount} ago" if delta > 0 else f"in {amount}"
    return "just now"  # pragma: no cover - the loop always returns


def _own(grant: Grant | None, user: dict[str, Any]) -> bool:
    """Whether ``grant`` is a live-or-ended grant of the signed-in person."""
    return grant is not None and bool(grant.username) and \
        grant.username == user.get("username") and grant.sub == user.get("sub")


async def _signed_in(request: web.Request) -> dict[str, Any]:
    user = await current_user(request)
    if user is None:
        raise web.HTTPSeeOther("/oauth/login?next=" + quote(ACCOUNT_PATH, safe="/"))
    return user


async def account_page(request: web.Request) -> web.StreamResponse:
    """The list of the person's apps and devices, and what they just ended, if anything."""
    user = await _signed_in(request)
    server = server_of(request)
    now = time.time()
    rows = []
    for grant in await server.store.list_grants(username=user["username"]):
        if not _own(grant, user) or grant.revoked:
            continue
        client = await server.store.get_client(grant.client_id)
        if client is None or not grant.alive(client.policy, now):
            continue
        rows.append({"grant_id": grant.grant_id, "client_name": client.name,
                     "device": grant.label, "granted": moment(grant.created_at, now),
                     "last_used": moment(grant.last_used_at, now),
                     "scopes": scope_lines(grant.scope)})
    rows.reverse()  # the newest first
    ended = None
    revoked_id = request.query.get("revoked", "")[:64]
    if revoked_id:
        gone = await server.store.get_grant(revoked_id)
        if gone is not None and _own(gone, user) and gone.revoked:
            client = await server.store.get_client(gone.client_id)
            ended = {"client_name": client.name if client else "The app",
                     "device": gone.label}
    return render(request, "account.html", {
        "username": user["username"], "grants": rows, "ended": ended})


async def revoke(request: web.Request) -> web.StreamResponse:
    """End one grant of the signed-in person, then back to the page (which says so)."""
    form = await posted_form(request)
    if form is None:
        return forbidden_csrf(request)
    user = await _signed_in(request)
    server = server_of(request)
    grant_id = str(form.get("grant_id", ""))[:64]
    grant = await server.store.get_grant(grant_id) if grant_id else None
    if grant is None or not _own(grant, user):
        return render(request, "account_not_found.html", status=404)
    if not grant.revoked:
        await server.issuer.revoke_grant(grant.grant_id, reason=REASON,
                                         actor=user["username"])
    raise web.HTTPSeeOther(ACCOUNT_PATH + "?revoked=" + quote(grant.grant_id, safe=""))


async def old_account(request: web.Request) -> web.StreamResponse:
    """``/oauth/account`` (and ``/account``) moved to ``/account/``."""
    raise web.HTTPMovedPermanently(ACCOUNT_PATH)


def add_routes(app: web.Application) -> None:
    app.router.add_get(ACCOUNT_PATH, account_page)
    app.router.add_post(REVOKE_PATH, revoke)
    app.router.add_get("/account", old_account)
    app.router.add_get("/oauth/account", old_account)
