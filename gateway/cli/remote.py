"""The administrative commands over a server's JSON admin API (``--server URL`` or
``GATEWAY_SERVER``), with the login saved by ``oauth-gateway login --admin --issuer URL``.

:class:`ApiBackend` answers in the shapes :class:`~gateway.cli.backend.RedisBackend` does,
so a command prints the same whichever path it took. The access token is refreshed when it
is about to expire, or once when the server refuses it (a rotated refresh token is saved).
A refusal of the API becomes one line on standard error and :data:`EXIT_FAIL`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from gateway.cli.login import CLI_CLIENT, LoginError, current_token
from gateway.cli.terminal import EXIT_FAIL, err

if TYPE_CHECKING:
    from gateway.cli.backend import Backend

API = "/admin/api/v1"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
PAGE = 1000


class ApiError(RuntimeError):
    """The admin API refused (``status``), or could not be reached (``status`` 0); the
    message says why and what to do."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


class AdminApi:
    """An HTTP client of ``{server}/admin/api/v1`` carrying the saved admin login."""

    def __init__(self, server: str, http: aiohttp.ClientSession) -> None:
        self.server, self.http = server, http
        self.login_hint = f"run oauth-gateway login --admin --issuer {server}"

    async def _token(self, refresh: bool = False) -> str:
        try:
            return await current_token(self.server, CLI_CLIENT, admin=True, refresh=refresh)
        except LoginError as exc:
            if "not logged in" in str(exc):
                raise ApiError(f"not logged in to {self.server}: {self.login_hint}") from None
            raise ApiError(f"the login to {self.server} has ended ({exc}): "
                           f"{self.login_hint}") from None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise ApiError(f"cannot refresh the login at {self.server}: "
                           f"{exc or type(exc).__name__}") from None

    async def call(self, method: str, path: str, body: Any = None, *,
                   params: dict[str, str] | None = None) -> Any:
        """The JSON answer of one request; a refusal raises :class:`ApiError`."""
        token = await self._token()
        for attempt in (1, 2):
            try:
                async with self.http.request(
                        method, self.server + API + path, params=params,
                        headers={"Authorization": f"Bearer {token}"},
                        **({"json": body} if body is not None else {})) as resp:
                    status = resp.status
                    try:
                        answer = json.loads(await resp.text())
                    except ValueError:
                        answer = None
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise ApiError(f"cannot reach the admin API at {self.server}: "
                               f"{exc or type(exc).__name__}") from None
            if status == 401 and attempt == 1:  # revoked or expired early: refresh once
                token = await self._token(refresh=True)
                continue
            if 200 <= status < 300 and isinstance(answer, dict):
                return answer
            raise ApiError(self._refusal(status, answer), status)
        raise AssertionError("unreachable")

    def _refusal(self, status: int, answer: Any) -> str:
        said = ""
        if isinstance(answer, dict):
            said = str(answer.get("error_description") or answer.get("error") or "")
        if status == 401:
            return f"the server {self.server} does not accept the saved login ({said}): " \
                f"{self.login_hint}"
        if status == 403:
            return f"forbidden: {said or 'not an admin'} (the admin API needs a user " \
                "holding the admin role: an admin gives it with `oauth-gateway users " \
                "update USERNAME --admin`)"
        if status == 404:
            if not said:
                return f"{self.server} has no admin API at {API} (is it the built-in " \
                    "authorization server's issuer URL?)"
            return f"not found: {said}"
        if status == 409:
            return f"conflict: {said}"
        if status == 400:
            return f"refused: {said}"
        return f"the admin API at {self.server} answered {status}" + (f": {said}" if said
                                                                         else "")

    async def pages(self, path: str, name: str, params: dict[str, str] | None = None,
                    limit: int | None = None) -> list[dict[str, Any]]:
        """Every item of a paged list (or the first ``limit``)."""
        items: list[dict[str, Any]] = []
        query = dict(params or {})
        while True:
            want = PAGE if limit is None else min(PAGE, limit - len(items))
            page = await self.call("GET", path, params={**query, "limit": str(want)})
            items += page.get(name, [])
            token = page.get("next_page_token")
            if not token or (limit is not None and len(items) >= limit):
                return items
            query["page_token"] = token


def record_of(view: dict[str, Any]) -> dict[str, Any]:
    """The admin API's client as ``clients list`` and ``clients show`` print a record
    read from Redis (the record's text fields, its booleans, its token policy)."""
    grant = view.get("grant_type", "")
    record: dict[str, Any] = {"client_id": view["client_id"],
                              "disabled": bool(view.get("disabled"))}
    record.update({
        "name": view.get("name", ""),
        "grant_type": DEVICE_GRANT if grant == "device_code" else grant,
        "redirect_uris": json.dumps(list(view.get("redirect_uris") or [])),
        "scopes": " ".join(view.get("scopes") or []),
        "confidential": "1" if view.get("confidential") else "0",
        "old_secret_expires_at": str(view.get("secret_rotation_grace_until") or 0),
        "created_at": str(view.get("created_at") or 0),
        "created_by": view.get("created_by") or "",
        **{k: str(v) for k, v in (view.get("policy") or {}).items()}})
    for name in ("updated_at", "updated_by", "reason", "rate_limit"):
        if view.get(name) is not None:
            record[name] = str(view[name])
    record["introspect"] = bool(view.get("introspect"))
    record["policy"] = view.get("policy")
    return record


def public_of(view: dict[str, Any]) -> dict[str, Any]:
    """The admin API's client as ``clients create`` and ``update`` print one."""
    grant = view.get("grant_type", "")
    return {**{k: v for k, v in view.items()
               if k not in ("rate_limit", "updated_at", "updated_by", "reason")},
            "grant_type": DEVICE_GRANT if grant == "device_code" else grant}


class ApiBackend:
    """The commands over ``{server}/admin/api/v1`` (no Redis on this machine)."""

    def __init__(self, api: AdminApi) -> None:
        self.api = api

    async def clients(self) -> list[dict[str, Any]]:
        return [record_of(c) for c in await self.api.pages("/clients", "clients")]

    async def client(self, client_id: str) -> dict[str, Any] | None:
        try:
            return record_of(await self.api.call("GET", _path("clients", client_id)))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def set_client_disabled(self, client_id: str, disabled: bool, *, actor: str,
                                  reason: str) -> dict[str, Any]:
        answer = await self.api.call(
            "POST", _path("clients", client_id, "disable" if disabled else "enable"),
            {"reason": reason} if reason else {})
        # what Redis mode prints: the fields the change wrote
        return {"client_id": client_id, "disabled": bool(answer.get("disabled")),
                "updated_at": str(answer.get("updated_at", "")),
                "updated_by": answer.get("updated_by", ""), "reason": answer.get("reason", "")}

    async def create_client(self, *, name: str, grant: str, redirect_uris: list[str],
                            scopes: list[str], confidential: bool | None,
                            policy: dict[str, Any], introspect: bool, actor: str
                            ) -> tuple[dict[str, Any], str | None]:
        body: dict[str, Any] = {
            "name": name, "grant_type": grant, "redirect_uris": redirect_uris,
            "scopes": " ".join(scopes).split(), "introspect": introspect,
            "policy": {k: v for k, v in policy.items() if v is not None}}
        if confidential is not None:
            body["confidential"] = confidential
        view = await self.api.call("POST", "/clients", body)
        secret = view.pop("client_secret", None)
        return public_of(view), secret

    async def update_client(self, client_id: str, *, changes: dict[str, Any] | None,
                            rate_limit: str | None, actor: str) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for name, value in (changes or {}).items():
            if name == "policy":
                value = {k: v for k, v in value.items() if v is not None} or None
            elif name == "scopes" and value is not None:
                value = " ".join(value).split()
            if value is not None:
                body[name] = value
        if rate_limit is not None:
            body["rate_limit"] = rate_limit
        view = await self.api.call("PATCH", _path("clients", client_id), body)
        if changes is None:
            return {"client_id": client_id, "rate_limit": view.get("rate_limit") or ""}
        shown = public_of(view)
        if rate_limit is not None:
            shown["rate_limit"] = view.get("rate_limit") or ""
        return shown

    async def rotate_secret(self, client_id: str, *, grace: int, actor: str) -> str:
        answer = await self.api.call("POST", _path("clients", client_id, "rotate-secret"),
                                     {"grace_seconds": grace})
        return str(answer["client_secret"])

    async def delete_client(self, client_id: str, *, reason: str, actor: str) -> int:
        answer = await self.api.call("DELETE", _path("clients", client_id),
                                     params={"reason": reason} if reason else None)
        return int(answer.get("grants_ended", 0))

    async def grants(self, *, client_id: str | None, username: str | None
                     ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("client_id", client_id), ("subject", username)) if v}
        return [{"grant_id": g["grant_id"], "client_id": g["client_id"],
                 "user": g.get("username") or "", "label": g.get("label") or "",
                 "scope": " ".join(g.get("scopes") or []),
                 "created_at": g.get("created_at") or 0,
                 "last_used_at": g.get("last_used_at") or 0,
                 "expires_at": g.get("expires_at") or 0, "revoked": bool(g.get("revoked")),
                 "revoked_reason": g.get("revoked_reason") or ""}
                for g in await self.api.pages("/grants", "grants", params)]

    async def revoke_grant(self, grant_id: str, *, reason: str, actor: str) -> None:
        await self.api.call("DELETE", _path("grants", grant_id),
                            params={"reason": reason} if reason else None)

    async def users(self) -> list[dict[str, Any]]:
        return await self.api.pages("/users", "users")

    async def add_user(self, username: str, password: str, *, admin: bool | None,
                       actor: str) -> None:
        body: dict[str, Any] = {"username": username, "password": password}
        if admin is not None:
            body["admin"] = admin
        await self.api.call("POST", "/users", body)

    async def set_admin(self, username: str, admin: bool, *, actor: str) -> dict[str, Any]:
        return dict(await self.api.call("PATCH", _path("users", username), {"admin": admin}))

    async def set_person_disabled(self, person: str, disabled: bool, *, reason: str,
                                  actor: str) -> dict[str, Any]:
        answer = dict(await self.api.call(
            "POST", _path("users", person, "disable" if disabled else "enable"),
            {"reason": reason} if reason else {}))
        answer["updated_at"] = str(answer.get("updated_at", ""))
        return answer

    async def audit(self, count: int) -> list[dict[str, str]]:
        if count <= 0:
            return []
        newest_first = await self.api.pages("/audit", "entries", limit=count)
        return [{k: str(v) for k, v in e.items()} for e in reversed(newest_first[:count])]


def run_remote(server: str, action: Callable[[Backend], Awaitable[int]]) -> int:
    """Run ``action`` on ``server``'s admin API; its exit code."""
    async def main() -> int:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            return await action(ApiBackend(AdminApi(server, http)))

    try:
        return asyncio.run(main())
    except ApiError as exc:
        err(str(exc))
        return EXIT_FAIL
