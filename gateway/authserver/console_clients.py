"""The console's client pages: the list, creating one, a client's own page (token
policy, secret rotation, disable/enable, delete with a confirmation step, its grants).

Every change is a call of :class:`~gateway.authserver.admin.AuthAdmin` (see
:mod:`.console`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.authserver.admin import AdminError, NotFound
from gateway.authserver.console import (
    FLOW_BY_NAME,
    FLOW_LABELS,
    PREFIX,
    Console,
    console_page,
    dangerous,
    done,
    known_scopes,
    when,
)
from gateway.authserver.models import GRANT_CODE, NON_ROTATABLE, ROTATABLE, OAuthClient
from gateway.authserver.pages import posted_form
from gateway.authserver.tenant import POLICY_FIELDS
from gateway.observe import usage

UNITS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
DURATIONS = ("access_token_ttl", "refresh_token_ttl", "idle_timeout", "grant_max_lifetime")
GRACE = {"0": "None: the old secret stops working now", "3600": "1 hour",
         "86400": "1 day", "604800": "7 days"}


def duration(seconds: int) -> dict[str, str]:
    """A duration as the form shows it: the largest unit that divides it evenly."""
    for unit in ("days", "hours", "minutes"):
        if seconds and seconds % UNITS[unit] == 0:
            return {"value": str(seconds // UNITS[unit]), "unit": unit}
    return {"value": str(seconds), "unit": "seconds"}


def policy_form(policy: Any) -> dict[str, Any]:
    """A token policy's values for the policy fields of a form."""
    return {**{n: duration(getattr(policy, n)) for n in DURATIONS},
            "refresh_mode": policy.refresh_mode}


def read_policy(form: Mapping[str, Any]) -> dict[str, Any]:
    """The policy fields posted (``{name}_value`` and ``{name}_unit``)."""
    out: dict[str, Any] = {}
    for name in DURATIONS:
        raw = str(form.get(f"{name}_value", "")).strip()
        unit = UNITS.get(str(form.get(f"{name}_unit", "seconds")))
        if not raw:
            continue
        if not raw.isdigit() or unit is None:
            raise AdminError(f"{name.replace('_', ' ')}: a whole number of seconds, "
                             "minutes, hours or days")
        out[name] = int(raw) * unit
    mode = str(form.get("refresh_mode", ""))
    if mode:
        if mode not in (ROTATABLE, NON_ROTATABLE):
            raise AdminError("refresh tokens: rotatable or non-rotatable")
        out["refresh_mode"] = mode
    assert set(out) <= set(POLICY_FIELDS)
    return out


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


async def _rows(c: Console, clients: list[OAuthClient]) -> list[dict[str, Any]]:
    redis, keys = c.server.store.redis, c.server.store.keys
    ids = [cl.client_id for cl in clients]
    daily = await usage.daily_requests(redis, keys, ids)
    last = await usage.last_use(redis, keys, ids)
    return [{"client_id": cl.client_id, "name": cl.name, "disabled": cl.disabled,
             "flow": FLOW_LABELS.get(cl.grant_type, cl.grant_type),
             "scopes": list(cl.scopes), "last_used": when(last.get(cl.client_id, 0)),
             "daily": str(daily.get(cl.client_id, 0))} for cl in clients]


@console_page
async def client_list(c: Console) -> web.StreamResponse:
    q = c.request.query
    status, flow, text = q.get("status", ""), q.get("flow", ""), q.get("q", "").strip()
    everyone = sorted(await c.admin.list_clients(), key=lambda cl: cl.name.lower())
    shown = [cl for cl in everyone
             if (status != "active" or not cl.disabled) and (status != "disabled" or cl.disabled)
             and (not flow or FLOW_BY_NAME.get(flow) == cl.grant_type)
             and (not text or text.lower() in f"{cl.name} {cl.client_id} "
                  f"{' '.join(cl.scopes)}".lower())]
    return c.page("console_clients.html", "clients", {
        "clients": await _rows(c, shown), "total": str(len(everyone)),
        "filtered": bool(status or flow or text), "any": bool(everyone),
        "filter": {"status": status, "flow": flow, "q": text},
        "flows": [{"name": n, "label": FLOW_LABELS[g]} for n, g in FLOW_BY_NAME.items()]})


async def _new_form(c: Console, values: Mapping[str, Any] | None = None, error: str = ""
                    ) -> web.Response:
    tenant = await c.admin.tenant_settings()
    values = values or {}
    chosen = values.get("scopes") or []
    policy = policy_form(tenant.policy)
    if values:
        for name in DURATIONS:
            policy[name] = {"value": str(values.get(f"{name}_value", "")),
                            "unit": str(values.get(f"{name}_unit", "seconds"))}
        policy["refresh_mode"] = str(values.get("refresh_mode", tenant.policy.refresh_mode))
    return c.page("console_client_new.html", "clients", {
        "error": error, "name": str(values.get("name", "")),
        "flow": str(values.get("flow", "")),
        "redirect_uris": str(values.get("redirect_uris", "")),
        "flows": [{"name": n, "label": FLOW_LABELS[FLOW_BY_NAME[n]]} for n in tenant.flows],
        "scopes": [{"name": s, "checked": s in chosen} for s in known_scopes(c.server)],
        "policy": policy}, status=400 if error else 200)


@console_page
async def new_client_page(c: Console) -> web.StreamResponse:
    return await _new_form(c)


@console_page
async def create_client(c: Console) -> web.StreamResponse:
    form = await posted_form(c.request)
    assert form is not None
    values = {**form, "scopes": form.getall("scopes", [])}  # type: ignore[attr-defined]
    try:
        flow = str(form.get("flow", ""))
        if flow not in FLOW_BY_NAME:
            raise AdminError("choose a flow")
        name = str(form.get("name", "")).strip()
        if not name:
            raise AdminError("give the client a name people will recognise")
        client, secret = await c.admin.create_client(
            name=name[:200], grant=flow, actor=c.actor,
            redirect_uris=_lines(str(form.get("redirect_uris", ""))),
            scopes=[str(s) for s in values["scopes"]], policy=read_policy(form))
    except AdminError as exc:
        return await _new_form(c, values, str(exc))
    if secret is None:
        raise done(f"{PREFIX}/clients/{client.client_id}", "created")
    return c.page("console_secret.html", "clients", {
        "client_id": client.client_id, "name": client.name, "secret": secret,
        "created": True, "grace": ""})


async def _client(c: Console) -> OAuthClient:
    try:
        return await c.admin.get(c.request.match_info["client_id"])
    except NotFound:
        raise web.HTTPNotFound(text="No such client.") from None


@console_page
async def client_page(c: Console) -> web.StreamResponse:
    return await _client_page(c)


async def _client_page(c: Console, *, error: str = "", status: int = 200) -> web.Response:
    client = await _client(c)
    view = await c.admin.client_view(client)
    [row] = await _rows(c, [client])
    now = time.time()
    grants = []
    for g in reversed(await c.admin.list_grants(client_id=client.client_id)):
        if g.revoked or not g.alive(client.policy, now):
            continue
        grants.append({"grant_id": g.grant_id, "person": g.username or g.sub or "—",
                       "device": g.label, "granted": when(g.created_at, now),
                       "last_used": when(g.last_used_at, now)})
    return c.page("console_client.html", "clients", {
        "error": error, "client": {**row, "confidential": client.confidential,
                                   "redirect_uris": list(client.redirect_uris),
                                   "code_flow": client.grant_type == GRANT_CODE,
                                   "created": when(client.created_at, now),
                                   "created_by": client.created_by,
                                   "updated": when(view["updated_at"] or 0, now),
                                   "updated_by": view["updated_by"] or "",
                                   "reason": view["reason"] or "",
                                   "grace_until": when(client.old_secret_expires_at, now)
                                   if client.old_secret_expires_at > now else None},
        "policy": policy_form(client.policy),
        "scopes": [{"name": s, "checked": s in client.scopes}
                   for s in sorted({*known_scopes(c.server), *client.scopes})],
        "grace": [{"value": k, "label": v} for k, v in GRACE.items()],
        "grants": grants}, status=status)


def _action(change: str) -> Any:
    async def handler(c: Console) -> web.StreamResponse:
        client = await _client(c)
        form = await posted_form(c.request)
        assert form is not None
        here = f"{PREFIX}/clients/{client.client_id}"
        try:
            if change == "policy":
                await c.admin.update_client(client.client_id, actor=c.actor,
                                            policy=read_policy(form))
            elif change == "details":
                await c.admin.update_client(
                    client.client_id, actor=c.actor,
                    name=str(form.get("name", "")).strip()[:200] or client.name,
                    redirect_uris=_lines(str(form.get("redirect_uris", ""))),
                    scopes=[str(s) for s in form.getall("scopes", [])])  # type: ignore[attr-defined]
            elif change in ("disabled", "enabled"):
                await c.admin.set_disabled(client.client_id, change == "disabled",
                                           actor=c.actor,
                                           reason=str(form.get("reason", "")).strip()[:500])
            elif change == "rotate":
                grace = str(form.get("grace", "0"))
                secret = await c.admin.rotate_secret(
                    client.client_id, actor=c.actor,
                    grace=int(grace) if grace in GRACE else 0)
                return c.page("console_secret.html", "clients", {
                    "client_id": client.client_id, "name": client.name, "secret": secret,
                    "created": False, "grace": GRACE.get(grace, "") if grace != "0" else ""})
        except AdminError as exc:
            return await _client_page(c, error=str(exc), status=400)
        raise done(here, change)
    if change == "rotate":  # a new secret: a recent sign-in
        return dangerous(lambda r: r.path.removesuffix("/rotate-secret"))(handler)
    return console_page(handler)


@console_page
async def delete_page(c: Console) -> web.StreamResponse:
    client = await _client(c)
    live = [g for g in await c.admin.list_grants(client_id=client.client_id) if not g.revoked]
    return c.page("console_delete.html", "clients", {
        "client": {"client_id": client.client_id, "name": client.name},
        "grant_count": str(len(live))})


@dangerous(lambda r: r.path)
async def delete_client(c: Console) -> web.StreamResponse:
    client = await _client(c)
    form = await posted_form(c.request)
    assert form is not None
    if form.get("confirm") != client.client_id:
        raise web.HTTPSeeOther(f"{PREFIX}/clients/{client.client_id}/delete")
    await c.admin.delete_client(client.client_id, actor=c.actor,
                                reason=str(form.get("reason", "")).strip()[:500])
    raise done(f"{PREFIX}/clients", "deleted")


def add_routes(app: web.Application) -> None:
    r = app.router
    base = f"{PREFIX}/clients"
    r.add_get(base, client_list)
    r.add_get(f"{base}/new", new_client_page)
    r.add_post(f"{base}/new", create_client)
    r.add_get(f"{base}/{{client_id}}", client_page)
    for change, path in (("policy", "policy"), ("details", "details"),
                         ("disabled", "disable"), ("enabled", "enable"),
                         ("rotate", "rotate-secret")):
        r.add_post(f"{base}/{{client_id}}/{path}", _action(change))
    r.add_get(f"{base}/{{client_id}}/delete", delete_page)
    r.add_post(f"{base}/{{client_id}}/delete", delete_client)
