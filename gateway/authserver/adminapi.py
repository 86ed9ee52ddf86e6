"""The JSON admin API at ``{GATEWAY_ISSUER}/admin/api/v1/``: clients, grants, users, audit.

``/settings`` reads and changes the tenant settings (:mod:`gateway.authserver.tenant`).
A thin HTTP face of :class:`~gateway.authserver.admin.AuthAdmin`, the service layer the
CLI uses too: the same rules, audit entries (actor ``api:<username>``) and propagation
bounds. Described by the OpenAPI document of :mod:`gateway.authserver.openapi`, served at
``/admin/api/v1/openapi.json``.

Authorization: a bearer token of this server carrying ``gateway:admin``, of a person who
holds the admin role *now* (read at every request). Cookies count for nothing here: a
browser's session alone is refused like no credentials, so no cross-site request can
act with it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from gateway.authserver.admin import AdminError, AuthAdmin, Conflict, NotFound
from gateway.authserver.models import ADMIN_SCOPE, Grant
from gateway.authserver.openapi import document
from gateway.authserver.roles import is_admin
from gateway.authserver.server import AuthorizationServer, server_of
from gateway.authserver.validator import BuiltinValidator
from gateway.protocol.errors import (
    ClientDisabled,
    GatewayError,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    UserDisabled,
    error_response,
)

PREFIX = "/admin/api/v1"
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
POLICY_FIELDS = ("access_token_ttl", "refresh_mode", "refresh_token_ttl", "idle_timeout",
                 "grant_max_lifetime")

T = TypeVar("T")
Handler = Callable[[web.Request, AuthAdmin, str], Awaitable[web.Response]]


class ApiNotFound(GatewayError):
    """The client, grant or user named in the path does not exist."""

    status = 404
    error = "not_found"


class ApiConflict(GatewayError):
    """The change clashes with what exists."""

    status = 409
    error = "conflict"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


async def _caller(request: web.Request, server: AuthorizationServer) -> str:
    """The admin's username, or the refusal (RFC 6750 section 3.1)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingToken("A bearer token of this server with the scope gateway:admin is "
                           "required (a session cookie is not accepted here).")
    info = await BuiltinValidator(server.store).validate(token.strip())
    if not info.active:
        raise InvalidToken("The token is invalid, expired or revoked.")
    client = await server.store.get_client(str(info.client_id))
    if client is None or client.disabled:
        raise ClientDisabled("The token's client is disabled or deleted.")
    if await server.store.person_disabled(info.sub):
        raise UserDisabled("The person this token speaks for is disabled.")
    if ADMIN_SCOPE not in info.scopes:
        raise InsufficientScope("The token lacks the scope gateway:admin.",
                                required=[ADMIN_SCOPE])
    if not await is_admin(server.store, info.username):
        raise InsufficientScope("The token's user does not hold the admin role.",
                                required=[ADMIN_SCOPE])
    return str(info.username)


def endpoint(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Authorize, then run ``handler`` with the service layer and the audit actor;
    the service layer's refusals become 400, 404 or 409."""
    async def run(request: web.Request) -> web.Response:
        server = server_of(request)
        try:
            username = await _caller(request, server)
            admin = AuthAdmin(server.store.redis, server.settings, server.store.digester,
                              server.metrics, remote=server.source(request))
            return await handler(request, admin, f"api:{username}")
        except NotFound as exc:
            return error_response(ApiNotFound(str(exc)))
        except Conflict as exc:
            return error_response(ApiConflict(str(exc)))
        except AdminError as exc:
            return error_response(InvalidRequest(str(exc)))
        except GatewayError as exc:
            return error_response(exc)
    return run


# -- request parsing ----------------------------------------------------------------

async def _body(request: web.Request, allowed: Sequence[str], *, optional: bool = False
                ) -> dict[str, Any]:
    """The JSON object sent, naming only ``allowed`` members."""
    if optional and not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        raise InvalidRequest("Send a JSON object (Content-Type: application/json).")
    try:
        body = await request.json(loads=json.loads)
    except ValueError:
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(f"Unknown field {unknown[0]!r}; known: {', '.join(allowed)}.")
    return body


def _field(body: dict[str, Any], name: str, kind: type[T], *, required: bool = False
           ) -> T | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{name} is required.")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{name} must be {_KINDS.get(kind, kind.__name__)}.")
    return value


_KINDS: dict[type, str] = {str: "a string", bool: "true or false", int: "an integer",
                           list: "a list of strings", dict: "an object"}


def _strings(body: dict[str, Any], name: str) -> list[str] | None:
    value = _field(body, name, list)
    if value is not None and not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidRequest(f"{name} must be a list of non-empty strings.")
    return value


def _policy(body: dict[str, Any]) -> dict[str, Any] | None:
    policy = _field(body, "policy", dict)
    if policy is None:
        return None
    unknown = sorted(set(policy) - set(POLICY_FIELDS))
    if unknown:
        raise InvalidRequest(f"Unknown field policy.{unknown[0]}; known: "
                             f"{', '.join(POLICY_FIELDS)}.")
    for name in POLICY_FIELDS:
        _field(policy, name, str if name == "refresh_mode" else int)
    return policy


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.")
    return int(raw)


def _after(request: web.Request) -> str | None:
    """The key a page starts after (``page_token`` is an opaque wrapping of it)."""
    token = request.query.get("page_token")
    if not token:
        return None
    try:
        return base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_",
                                validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("page_token is not one this API gave.") from None


def _token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _page(request: web.Request, name: str, items: list[T], key: Callable[[T], str],
          view: Callable[[T], Any]) -> web.Response:
    """One page of ``items`` (sorted by ``key``), and the token of the next."""
    limit, after = _limit(request), _after(request)
    items = sorted(items, key=key)
    if after is not None:
        items = [i for i in items if key(i) > after]
    body: dict[str, Any] = {name: [view(i) for i in items[:limit]]}
    if len(items) > limit:
        body["next_page_token"] = _token(key(items[limit - 1]))
    return _json(body)


# -- clients --------------------------------------------------------------------------

CLIENT_FIELDS = ("name", "grant_type", "redirect_uris", "scopes", "policy", "confidential",
                 "introspect")


@endpoint
async def list_clients(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    clients = [await admin.client_view(c) for c in await admin.list_clients()]
    return _page(request, "clients", clients, lambda c: str(c["client_id"]), lambda c: c)


@endpoint
async def create_client(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    body = await _body(request, CLIENT_FIELDS)
    client, secret = await admin.create_client(
        name=_field(body, "name", str, required=True) or "",
        grant=_field(body, "grant_type", str, required=True) or "",
        redirect_uris=_strings(body, "redirect_uris") or [],
        scopes=_strings(body, "scopes") or [], actor=actor,
        confidential=_field(body, "confidential", bool), policy=_policy(body),
        introspect=bool(_field(body, "introspect", bool)))
    view = await admin.client_view(client)
    if secret:
        view["client_secret"] = secret
    response = _json(view, status=201)
    response.headers["Location"] = f"{PREFIX}/clients/{client.client_id}"
    return response


@endpoint
async def get_client(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    return _json(await admin.client_view(await admin.get(request.match_info["client_id"])))


@endpoint
async def patch_client(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    client_id = request.match_info["client_id"]
    body = await _body(request, ("name", "redirect_uris", "scopes", "policy", "introspect",
                                 "rate_limit"))
    client = await admin.get(client_id)
    rate = _field(body, "rate_limit", str)
    if set(body) - {"rate_limit"}:
        client = await admin.update_client(
            client_id, actor=actor, name=_field(body, "name", str),
            redirect_uris=_strings(body, "redirect_uris"), scopes=_strings(body, "scopes"),
            policy=_policy(body), introspect=_field(body, "introspect", bool))
    if "rate_limit" in body:
        await admin.set_rate_limit(client_id, rate, actor=actor)
    return _json(await admin.client_view(client))


@endpoint
async def delete_client(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    client_id = request.match_info["client_id"]
    ended = await admin.delete_client(client_id, actor=actor,
                                      reason=request.query.get("reason", "")[:500])
    return _json({"client_id": client_id, "grants_ended": ended})


def _status_handler(disabled: bool) -> Handler:
    async def handler(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
        client_id = request.match_info["client_id"]
        body = await _body(request, ("reason",), optional=True)
        if not await admin.has_record(client_id):
            raise NotFound(f"no client {client_id!r}")
        await admin.set_disabled(client_id, disabled, actor=actor,
                                 reason=(_field(body, "reason", str) or "")[:500])
        fields = await admin.governance.show(client_id)
        return _json({"client_id": client_id, "disabled": disabled,
                      "reason": fields.get("reason", ""),
                      "updated_at": int(fields.get("updated_at") or 0),
                      "updated_by": fields.get("updated_by", "")})
    return handler


@endpoint
async def rotate_secret(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    client_id = request.match_info["client_id"]
    body = await _body(request, ("grace_seconds",), optional=True)
    grace = _field(body, "grace_seconds", int) or 0
    if grace < 0:
        raise InvalidRequest("grace_seconds must be 0 or more.")
    secret = await admin.rotate_secret(client_id, actor=actor, grace=grace)
    return _json({"client_id": client_id, "client_secret": secret, "grace_seconds": grace})


# -- grants, users, audit -------------------------------------------------------------

def _grant_view(g: Grant) -> dict[str, Any]:
    return {"grant_id": g.grant_id, "client_id": g.client_id, "username": g.username or None,
            "subject": g.sub or None, "scopes": g.scope.split(), "label": g.label,
            "created_at": g.created_at, "last_used_at": g.last_used_at,
            "expires_at": g.expires_at or None, "revoked": g.revoked,
            "revoked_reason": g.revoked_reason or None}


@endpoint
async def list_grants(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    client_id = request.query.get("client_id") or None
    named = request.query.get("subject")
    if named:
        subject, username = await admin.resolve_subject(named)
        grants = await admin.list_grants(client_id=client_id, username=username)
        grants = [g for g in grants if g.sub == subject]
    else:
        grants = await admin.list_grants(client_id=client_id)
    return _page(request, "grants", grants, lambda g: g.grant_id, _grant_view)


@endpoint
async def revoke_grant(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    grant_id = request.match_info["grant_id"]
    await admin.revoke_grant(grant_id, actor=actor, reason=request.query.get("reason", ""))
    return _json({"grant_id": grant_id, "revoked": True})


@endpoint
async def list_users(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    return _page(request, "users", await admin.list_users(), lambda u: str(u["username"]),
                 lambda u: u)


@endpoint
async def create_user(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    body = await _body(request, ("username", "password", "admin"))
    username = _field(body, "username", str, required=True) or ""
    await admin.add_user(username, _field(body, "password", str, required=True) or "",
                         actor=actor, admin=bool(_field(body, "admin", bool)),
                         create_only=True)
    return _json(await admin.user_view(username), status=201)


@endpoint
async def patch_user(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    body = await _body(request, ("admin", "password"))
    username = request.match_info["username"]
    role, password = _field(body, "admin", bool), _field(body, "password", str)
    if role is None and password is None:
        raise InvalidRequest("Send admin, password or both.")
    if password is not None:
        if not (await admin.store.get_user(username)).get("password_hash"):
            raise NotFound(f"no local user {username!r} on this authorization server")
        await admin.add_user(username, password, actor=actor)
    if role is not None:
        await admin.set_admin(username, role, actor=actor)
    return _json(await admin.user_view(username))


@endpoint
async def get_settings(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    return _json((await admin.tenant_settings()).view())


@endpoint
async def patch_settings(request: web.Request, admin: AuthAdmin, actor: str
                         ) -> web.Response:
    body = await _body(request, ("self_service", "flows", "default_policy", "admin_groups",
                                 "display_name", "logo_url"))
    changes: dict[str, Any] = {}
    for name, kind in (("self_service", bool), ("flows", list), ("admin_groups", str),
                       ("display_name", str), ("logo_url", str)):
        if name in body:
            changes[name] = _field(body, name, kind)
    if "flows" in body and changes["flows"] is not None:
        changes["flows"] = _strings(body, "flows")
    policy = body.get("default_policy")
    if policy is not None:
        if not isinstance(policy, dict):
            raise InvalidRequest("default_policy must be an object.")
        unknown = sorted(set(policy) - set(POLICY_FIELDS))
        if unknown:
            raise InvalidRequest(f"Unknown field default_policy.{unknown[0]}.")
        for name in POLICY_FIELDS:
            if name in policy:
                changes[name] = _field(policy, name, str if name == "refresh_mode" else int)
    return _json((await admin.update_settings(changes, actor=actor)).view())


def _person_handler(disabled: bool) -> Handler:
    async def handler(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
        body = await _body(request, ("reason",), optional=True)
        subject, username, fields = await admin.set_user_disabled(
            request.match_info["subject"], disabled, actor=actor,
            reason=(_field(body, "reason", str) or "")[:500])
        return _json({"subject": subject, "username": username, "disabled": disabled,
                      "reason": fields["reason"], "updated_at": int(fields["updated_at"]),
                      "updated_by": fields["updated_by"]})
    return handler


@endpoint
async def audit(request: web.Request, admin: AuthAdmin, actor: str) -> web.Response:
    entries, last = await admin.audit_entries(
        limit=_limit(request), before=_after(request),
        match={k: request.query.get(k, "") for k in ("actor", "client_id", "subject",
                                                     "action")})
    body: dict[str, Any] = {"entries": entries}
    if last is not None:
        body["next_page_token"] = _token(last)
    return _json(body)


async def openapi(request: web.Request) -> web.Response:
    """The API's OpenAPI 3.1 document (public: it describes, it grants nothing)."""
    return _json(document(server_of(request).issuer_url))


def add_routes(app: web.Application) -> None:
    """Register the API (on the built-in server's routes, so that its paths are reserved
    from policy routes)."""
    r = app.router
    r.add_get(f"{PREFIX}/openapi.json", openapi)
    r.add_get(f"{PREFIX}/clients", list_clients)
    r.add_post(f"{PREFIX}/clients", create_client)
    r.add_get(f"{PREFIX}/clients/{{client_id}}", get_client)
    r.add_patch(f"{PREFIX}/clients/{{client_id}}", patch_client)
    r.add_delete(f"{PREFIX}/clients/{{client_id}}", delete_client)
    r.add_post(f"{PREFIX}/clients/{{client_id}}/disable", endpoint(_status_handler(True)))
    r.add_post(f"{PREFIX}/clients/{{client_id}}/enable", endpoint(_status_handler(False)))
    r.add_post(f"{PREFIX}/clients/{{client_id}}/rotate-secret", rotate_secret)
    r.add_get(f"{PREFIX}/grants", list_grants)
    r.add_delete(f"{PREFIX}/grants/{{grant_id}}", revoke_grant)
    r.add_get(f"{PREFIX}/users", list_users)
    r.add_post(f"{PREFIX}/users", create_user)
    r.add_patch(f"{PREFIX}/users/{{username}}", patch_user)
    r.add_post(f"{PREFIX}/users/{{subject}}/disable", endpoint(_person_handler(True)))
    r.add_post(f"{PREFIX}/users/{{subject}}/enable", endpoint(_person_handler(False)))
    r.add_get(f"{PREFIX}/audit", audit)
    r.add_get(f"{PREFIX}/settings", get_settings)
    r.add_patch(f"{PREFIX}/settings", patch_settings)
