"""The administrators' web console at ``{GATEWAY_ISSUER}/console/``: shared parts and
the overview page.

- A signed-out visitor is sent to the login page and back; a signed-in person without
  the admin role (read again at every request, as the admin API does) gets 403 on every
  page and every form, and nothing changes.
- Every form posts with the pages' double-submit CSRF token, and works without script.
- Every change goes through :class:`~gateway.authserver.admin.AuthAdmin`, the service
  layer of the CLI and the admin API: the same rules, the same audit entries (actor
  ``console:<username>``), the same propagation to every gateway replica.

The pages themselves live in :mod:`.console_clients` (clients) and :mod:`.console_more`
(grants, people, audit, tenant settings).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.authserver import reauth
from gateway.authserver.account import moment
from gateway.authserver.admin import AuthAdmin
from gateway.authserver.models import (
    ADMIN_SCOPE,
    GRANT_CLIENT_CREDENTIALS,
    GRANT_CODE,
    GRANT_DEVICE,
)
from gateway.authserver.pages import current_user, forbidden_csrf, posted_form, render
from gateway.authserver.roles import is_admin
from gateway.authserver.server import AuthorizationServer, server_of
from gateway.observe import usage

PREFIX = "/console"
FLOW_LABELS = {GRANT_CODE: "Authorization code (web apps)",
               GRANT_DEVICE: "Device (command lines, devices)",
               GRANT_CLIENT_CREDENTIALS: "Client credentials (machines)"}
FLOW_BY_NAME = {"authorization_code": GRANT_CODE,
                "device_code": GRANT_DEVICE,
                "client_credentials": GRANT_CLIENT_CREDENTIALS}
#: the refusal decisions of ``gateway_auth_decisions_total``, in words
DECISIONS = {"invalid_token": "Invalid, expired or revoked token",
             "missing_token": "No token sent", "client_disabled": "Client disabled",
             "user_disabled": "Person disabled", "unknown_client": "Unknown client",
             "insufficient_scope": "Missing scope",
             "machine_token_refused": "Machine token on a person's route",
             "invalid_request": "Malformed request",
             "introspection_unavailable": "Token check unavailable",
             "no_route": "No route for the path", "rate_limited": "Rate limited",
             "error": "Gateway error"}
#: fixed notices a change's redirect names (``?done=``): no text from the query is shown
NOTICES = {
    "created": "Client created.", "policy": "Token policy saved. New tokens follow it.",
    "disabled": "Client disabled: every gateway refuses its tokens from now on.",
    "enabled": "Client enabled: its tokens are accepted again.",
    "deleted": "Client deleted, and every grant it held ended.",
    "revoked": "Grant revoked: its tokens are refused from now on.",
    "details": "Client details saved.",
    "user_added": "Person added.", "password": "Password changed.",
    "user_disabled": "Person disabled: their tokens are refused and they cannot sign in.",
    "user_enabled": "Person enabled.", "role": "Admin role changed.",
    "settings": "Settings saved. Every gateway uses them within a second."}


@dataclass(frozen=True)
class Console:
    """One console request: the signed-in admin and the service layer acting for them."""

    request: web.Request
    server: AuthorizationServer
    admin: AuthAdmin
    username: str

    @property
    def actor(self) -> str:
        return f"console:{self.username}"

    def page(self, template: str, section: str, context: Mapping[str, Any] | None = None,
             *, status: int = 200) -> web.Response:
        notice = NOTICES.get(self.request.query.get("done", ""), "")
        return render(self.request, template, {
            "section": section, "admin_name": self.username, "notice": notice,
            "error": "", **(context or {})}, status=status)


Handler = Callable[[Console], Awaitable[web.StreamResponse]]


def console_page(handler: Handler, *, recent: Callable[[web.Request], str] | None = None
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Sign-in, the admin role (now), and on POST the CSRF token, before ``handler``.

    ``recent``: the change is a dangerous one, made only in a session signed in within
    the last minutes (:mod:`.reauth`); the function names the page to go back to."""
    async def run(request: web.Request) -> web.StreamResponse:
        user = await current_user(request)
        if user is None:
            target = request.path_qs if request.method == "GET" else PREFIX + "/"
            raise web.HTTPSeeOther("/oauth/login?next=" + quote(target, safe="/"))
        server = server_of(request)
        if not await is_admin(server.store, user["username"]) or \
                await server.store.person_disabled(user["sub"]):
            return render(request, "console_forbidden.html",
                          {"username": user["username"]}, status=403)
        if request.method == "POST" and await posted_form(request) is None:
            return forbidden_csrf(request)
        throttle = None
        if recent is not None and request.method == "POST" and not reauth.is_recent(user):
            page, throttle = await reauth.confirm(request, user, await request.post(),
                                                  recent(request))
            if page is not None:
                return page
        admin = AuthAdmin(server.store.redis, server.settings, server.store.digester,
                          server.metrics, remote=server.source(request))
        c = Console(request, server, admin, user["username"])
        if throttle is None:
            return await handler(c)
        await admin.store.audit("console.reauthenticated", user=c.username, actor=c.actor,
                                method="local", path=request.path)
        try:
            response = await handler(c)
        except web.HTTPException as exc:  # a redirect after the change
            await throttle.succeeded(exc)
            raise
        await throttle.succeeded(response)
        return response
    return run


def dangerous(back: Callable[[web.Request], str]
              ) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """A console change that needs a recent sign-in; ``back``: the page it is made
    from (where a person signing in again through SSO returns)."""
    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        return console_page(handler, recent=back)
    return wrap


def done(path: str, notice: str) -> web.HTTPSeeOther:
    """Back to a console page after a change, naming the notice it shows."""
    return web.HTTPSeeOther(f"{path}{'&' if '?' in path else '?'}done={notice}")


def back_to(form: Mapping[str, Any], default: str) -> str:
    """A console page a form names to return to (only the console's own pages)."""
    value = str(form.get("back", ""))
    ok = value.startswith(PREFIX + "/") and "//" not in value and "\\" not in value
    return value if ok else default


def when(epoch: float, now: float | None = None) -> dict[str, str]:
    return moment(int(epoch), now)


def known_scopes(server: AuthorizationServer) -> list[str]:
    return sorted({*server.scopes_supported, ADMIN_SCOPE})


def sparkline(counts: list[int], width: int = 120, height: int = 28) -> dict[str, str]:
    """An inline SVG polyline's points for ``counts`` (drawn on the server), and the
    peak, for the accessible label."""
    peak = max(counts, default=0)
    if len(counts) < 2:
        counts = [*counts, *counts, 0, 0][:2]
    step = width / (len(counts) - 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (c / peak * (height - 4) if peak else 0):.1f}"
                      for i, c in enumerate(counts))
    return {"points": points, "peak": str(peak), "total": str(sum(counts)),
            "width": str(width), "height": str(height)}


@console_page
async def overview(c: Console) -> web.StreamResponse:
    now = time.time()
    clients = await c.admin.list_clients()
    grants = await c.admin.list_grants()
    by_id = {cl.client_id: cl for cl in clients}
    active = [g for g in grants if not g.revoked and g.client_id in by_id
              and g.alive(by_id[g.client_id].policy, now)]
    people = await c.admin.list_users()
    redis, keys = c.server.store.redis, c.server.store.keys
    decisions = await usage.recent_decisions(redis, keys, 60, now)
    refusals = sorted(((DECISIONS.get(k, k), n) for k, n in decisions.items()
                       if k != "allowed" and n), key=lambda r: -r[1])
    daily = await usage.daily_requests(redis, keys, [cl.client_id for cl in clients], now)
    busiest = sorted((cid for cid, n in daily.items() if n), key=lambda cid: -daily[cid])[:5]
    busy_rows = []
    for cid in busiest:
        series = await usage.minute_requests(redis, keys, cid, 60, now)
        busy_rows.append({"client_id": cid, "name": by_id[cid].name,
                          "daily": str(daily[cid]), "spark": sparkline(series)})
    return c.page("console_overview.html", "overview", {
        "counts": {"clients": str(len(clients)),
                   "disabled": str(sum(1 for cl in clients if cl.disabled)),
                   "grants": str(len(active)), "people": str(len(people)),
                   "admins": str(sum(1 for p in people if p["admin"]))},
        "refusals": [{"reason": r, "count": str(n)} for r, n in refusals],
        "allowed": str(decisions.get("allowed", 0)), "busy": busy_rows})


async def console_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(PREFIX + "/")


def add_routes(app: web.Application) -> None:
    """The overview (the other pages: :mod:`.console_clients`, :mod:`.console_more`)."""
    app.router.add_get(PREFIX, console_root)
    app.router.add_get(PREFIX + "/", overview)
