"""The console's other pages: grants, people, the audit trail (with its JSON-lines
export) and the tenant settings. Every change is a call of
:class:`~gateway.authserver.admin.AuthAdmin` (see :mod:`.console`)."""

from __future__ import annotations

import json
import time
from typing import Any, cast
from urllib.parse import urlencode

from aiohttp import web

from gateway.authserver.admin import AdminError, NotFound
from gateway.authserver.console import (
    FLOW_BY_NAME,
    FLOW_LABELS,
    PREFIX,
    Console,
    back_to,
    console_page,
    dangerous,
    done,
    when,
)
from gateway.authserver.console_clients import DURATIONS, policy_form, read_policy
from gateway.authserver.pages import posted_form
from gateway.authserver.roles import admin_groups
from gateway.authserver.tenant import FLOWS, POLICY_FIELDS

AUDIT_FILTERS = ("actor", "client_id", "subject", "action")
AUDIT_PAGE, EXPORT_MAX = 200, 100_000


# -- grants ------------------------------------------------------------------------------

@console_page
async def grants_page(c: Console) -> web.StreamResponse:
    client_id = c.request.query.get("client_id", "")
    person = c.request.query.get("person", "").strip()
    clients = {cl.client_id: cl for cl in await c.admin.list_clients()}
    grants = await c.admin.list_grants(client_id=client_id or None)
    now = time.time()
    rows = []
    for g in reversed(grants):
        client = clients.get(g.client_id)
        if g.revoked or client is None or not g.alive(client.policy, now):
            continue
        if person and person not in (g.username, g.sub):
            continue
        rows.append({"grant_id": g.grant_id, "client_id": g.client_id,
                     "client_name": client.name, "person": g.username or g.sub or "",
                     "device": g.label, "scopes": g.scope.split(),
                     "granted": when(g.created_at, now), "last_used": when(g.last_used_at, now)})
    return c.page("console_grants.html", "grants", {
        "grants": rows, "filter": {"client_id": client_id, "person": person},
        "filtered": bool(client_id or person),
        "clients": [{"client_id": k, "name": v.name} for k, v in
                    sorted(clients.items(), key=lambda kv: kv[1].name.lower())]})


@console_page
async def revoke_grant(c: Console) -> web.StreamResponse:
    form = await posted_form(c.request)
    assert form is not None
    back = back_to(form, f"{PREFIX}/grants")
    try:
        await c.admin.revoke_grant(c.request.match_info["grant_id"], actor=c.actor,
                                   reason="revoked_by_admin")
    except NotFound:
        raise web.HTTPNotFound(text="No such grant.") from None
    raise done(back, "revoked")


# -- people ------------------------------------------------------------------------------

async def _others(c: Console, known: set[str]) -> list[dict[str, Any]]:
    """People the gateway has a record of (``user:{subject}``) who are not users of
    this server: Anaplan users seen through pass-through or Sign in with Anaplan."""
    redis, keys = c.server.store.redis, c.server.store.keys
    out = []
    async for key in redis.scan_iter(match=keys.user_pattern, count=500):
        subject = keys.user_subject_of(key)
        if subject in known:
            continue
        fields = cast(dict[str, str], await redis.hgetall(key))
        out.append({"subject": subject, "username": fields.get("username", ""),
                    "disabled": fields.get("disabled", "0").strip() == "1",
                    "updated": when(int(fields.get("updated_at") or 0)),
                    "updated_by": fields.get("updated_by", "")})
    return sorted(out, key=lambda p: str(p["subject"]))


async def _people(c: Console, error: str = "", status: int = 200) -> web.Response:
    users = await c.admin.list_users()
    now = time.time()
    rows = []
    for u in users:
        fields = await c.admin.store.get_user(u["username"])
        rows.append({**u, "created": when(u["created_at"], now),
                     "last_seen": when(int(fields.get("last_seen") or 0), now),
                     "me": u["username"] == c.username})
    return c.page("console_people.html", "people", {
        "error": error, "local": [r for r in rows if r["kind"] == "local"],
        "sso": [r for r in rows if r["kind"] == "sso"],
        "others": await _others(c, {u["subject"] for u in users})}, status=status)


@console_page
async def people_page(c: Console) -> web.StreamResponse:
    return await _people(c)


def _person_action(change: str) -> Any:
    @console_page
    async def handler(c: Console) -> web.StreamResponse:
        form = await posted_form(c.request)
        assert form is not None
        name = str(form.get("name", "")).strip()[:200]
        try:
            if change == "user_added":
                await c.admin.add_user(name, str(form.get("password", "")), actor=c.actor,
                                       admin=form.get("admin") == "1", create_only=True)
            elif change == "password":
                if not (await c.admin.store.get_user(name)).get("password_hash"):
                    raise AdminError(f"{name!r} is not a local user with a password")
                await c.admin.add_user(name, str(form.get("password", "")), actor=c.actor)
            elif change in ("user_disabled", "user_enabled"):
                if change == "user_disabled" and name == c.username:
                    raise AdminError("you cannot disable yourself here")
                await c.admin.set_user_disabled(name, change == "user_disabled",
                                                actor=c.actor,
                                                reason=str(form.get("reason", ""))[:500])
            elif change == "role":
                if name == c.username and form.get("admin") != "1":
                    raise AdminError("you cannot take away your own admin role here")
                await c.admin.set_admin(name, form.get("admin") == "1", actor=c.actor)
        except AdminError as exc:
            return await _people(c, str(exc), 400)
        raise done(f"{PREFIX}/people", change)
    return handler


# -- audit -------------------------------------------------------------------------------

def _match(c: Console) -> dict[str, str]:
    return {k: c.request.query.get(k, "").strip()[:200] for k in AUDIT_FILTERS}


@console_page
async def audit_page(c: Console) -> web.StreamResponse:
    match = _match(c)
    before = c.request.query.get("before") or None
    entries, last = await c.admin.audit_entries(limit=AUDIT_PAGE, before=before, match=match)
    now = time.time()
    rows = []
    for e in entries:
        details = {k: v for k, v in e.items()
                   if k not in ("id", "ts", "action", "actor", "client_id", "user", "subject")}
        rows.append({"id": e["id"], "action": e.get("action", ""), "actor": e.get("actor", ""),
                     "client_id": e.get("client_id", ""),
                     "person": e.get("user") or e.get("subject") or "",
                     "at": when(int(e["id"].split("-")[0]) / 1000, now),
                     "details": [{"name": k, "value": v} for k, v in sorted(details.items())]})
    query = urlencode({k: v for k, v in match.items() if v})
    return c.page("console_audit.html", "audit", {
        "entries": rows, "filter": match, "filtered": any(match.values()),
        "more": "?" + urlencode({**{k: v for k, v in match.items() if v}, "before": last})
        if last else "",
        "export": f"{PREFIX}/audit/export" + (f"?{query}" if query else "")})


@console_page
async def audit_export(c: Console) -> web.StreamResponse:
    entries, _ = await c.admin.audit_entries(limit=EXPORT_MAX, match=_match(c))
    body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return web.Response(text=body, content_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="gateway-audit-{stamp}.jsonl"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# -- tenant settings -------------------------------------------------------------------

async def _settings(c: Console, error: str = "", status: int = 200) -> web.Response:
    tenant = await c.admin.tenant_settings()
    return c.page("console_settings.html", "settings", {
        "error": error, "self_service": tenant.self_service,
        "flows": [{"name": n, "label": FLOW_LABELS[FLOW_BY_NAME[n]], "checked": n in tenant.flows}
                  for n in FLOWS],
        "policy": policy_form(tenant.policy), "admin_groups": tenant.admin_groups,
        "display_name": tenant.display_name, "logo": tenant.logo_url,
        "sources": tenant.sources}, status=status)


@console_page
async def settings_page(c: Console) -> web.StreamResponse:
    return await _settings(c)


@dangerous(lambda r: r.path)
async def save_settings(c: Console) -> web.StreamResponse:
    form = await posted_form(c.request)
    assert form is not None
    changes: dict[str, Any] = {}
    try:
        for name in ("self_service", "flows", "policy", "admin_groups", "display_name",
                     "logo_url"):
            if form.get(f"reset_{name}"):  # back to the environment's value
                names = [*DURATIONS, "refresh_mode"] if name == "policy" else [name]
                changes.update(dict.fromkeys(names))
                await c.admin.update_settings(changes, actor=c.actor)
                raise done(f"{PREFIX}/settings", "settings")
        tenant = await c.admin.tenant_settings()
        flows = [str(f) for f in form.getall("flows", [])]  # type: ignore[attr-defined]
        groups = ",".join(sorted(admin_groups(str(form.get("admin_groups", "")))))
        wanted: dict[str, Any] = {
            "self_service": form.get("self_service") == "1", "flows": flows,
            **read_policy(form), "admin_groups": groups,
            "display_name": " ".join(str(form.get("display_name", "")).split()),
            "logo_url": str(form.get("logo_url", "")).strip()}
        current: dict[str, Any] = {
            "self_service": tenant.self_service, "flows": list(tenant.flows),
            **{n: getattr(tenant.policy, n) for n in POLICY_FIELDS},
            "admin_groups": ",".join(sorted(tenant.groups)),
            "display_name": tenant.display_name, "logo_url": tenant.logo_url}
        # only what changed becomes the console's: the rest keeps its source
        changes = {k: v for k, v in wanted.items() if v != current[k]}
        await c.admin.update_settings(changes, actor=c.actor)
    except AdminError as exc:
        return await _settings(c, str(exc), 400)
    raise done(f"{PREFIX}/settings", "settings")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(f"{PREFIX}/grants", grants_page)
    r.add_post(f"{PREFIX}/grants/{{grant_id}}/revoke", revoke_grant)
    r.add_get(f"{PREFIX}/people", people_page)
    for change, path in (("user_added", "add"), ("password", "password"),
                         ("user_disabled", "disable"), ("user_enabled", "enable"),
                         ("role", "role")):
        r.add_post(f"{PREFIX}/people/{path}", _person_action(change))
    r.add_get(f"{PREFIX}/audit", audit_page)
    r.add_get(f"{PREFIX}/audit/export", audit_export)
    r.add_get(f"{PREFIX}/settings", settings_page)
    r.add_post(f"{PREFIX}/settings", save_settings)
