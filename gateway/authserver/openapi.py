"""The admin API's OpenAPI 3.1 document, built as data (served at
``/admin/api/v1/openapi.json``; tests validate every answer of the API against it)."""

from __future__ import annotations

from typing import Any

_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_STRS = {"type": "array", "items": _STR}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], properties: dict[str, Any], *,
         extra: bool = False) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties,
            "additionalProperties": extra}


_GRANT_TYPE = {"type": "string",
               "enum": ["authorization_code", "device_code", "client_credentials"]}
_POLICY_PROPS: dict[str, Any] = {
    "access_token_ttl": {"type": "integer", "minimum": 60, "maximum": 86400},
                 "refresh_mode": {"type": "string", "enum": ["rotatable", "non_rotatable"]},
                 "refresh_token_ttl": {"type": "integer", "minimum": 60},
                 "idle_timeout": {"type": "integer", "minimum": 0},
                 "grant_max_lifetime": {"type": "integer", "minimum": 60}}
_CLIENT_PROPS: dict[str, Any] = {
    "client_id": _STR, "name": _STR, "grant_type": _GRANT_TYPE, "flow": _GRANT_TYPE,
    "redirect_uris": _STRS, "scopes": _STRS, "confidential": _BOOL, "disabled": _BOOL,
    "introspect": _BOOL, "policy": _ref("Policy"),
    "secret_rotation_grace_until": _nullable(_INT), "created_at": _INT, "created_by": _STR,
    "rate_limit": _nullable({"type": "string", "description": "N/PERIOD, e.g. 600/60s"}),
    "updated_at": _nullable(_INT), "updated_by": _nullable(_STR), "reason": _nullable(_STR)}
_USER_PROPS = {"username": _STR, "subject": _STR,
               "kind": {"type": "string", "enum": ["local", "sso"]}, "admin": _BOOL,
               "disabled": _BOOL, "created_at": _INT}

SCHEMAS: dict[str, Any] = {
    "Error": _obj(["error"], {"error": _STR, "error_description": _STR}),
    "Policy": _obj(list(_POLICY_PROPS), _POLICY_PROPS),
    "PolicyChange": _obj([], _POLICY_PROPS),
    "Client": _obj(["client_id", "name", "grant_type", "scopes", "disabled", "policy"],
                   _CLIENT_PROPS),
    "ClientCreated": _obj(["client_id", "name", "grant_type", "scopes", "disabled", "policy"],
                          {**_CLIENT_PROPS, "client_secret": _STR}),
    "ClientList": _obj(["clients"], {"clients": {"type": "array", "items": _ref("Client")},
                                     "next_page_token": _STR}),
    "NewClient": _obj(["name", "grant_type"], {
        "name": _STR, "grant_type": _GRANT_TYPE, "redirect_uris": _STRS, "scopes": _STRS,
        "policy": _ref("PolicyChange"), "confidential": _BOOL, "introspect": _BOOL}),
    "ClientChange": _obj([], {
        "name": _STR, "redirect_uris": _STRS, "scopes": _STRS, "policy": _ref("PolicyChange"),
        "introspect": _BOOL, "rate_limit": _nullable(_STR)}),
    "ClientStatus": _obj(["client_id", "disabled", "reason", "updated_at", "updated_by"], {
        "client_id": _STR, "disabled": _BOOL, "reason": _STR, "updated_at": _INT,
        "updated_by": _STR}),
    "ClientDeleted": _obj(["client_id", "grants_ended"],
                          {"client_id": _STR, "grants_ended": _INT}),
    "Reason": _obj([], {"reason": _STR}),
    "Rotate": _obj([], {"grace_seconds": {"type": "integer", "minimum": 0}}),
    "Secret": _obj(["client_id", "client_secret", "grace_seconds"], {
        "client_id": _STR, "client_secret": _STR, "grace_seconds": _INT}),
    "Grant": _obj(["grant_id", "client_id", "scopes", "revoked"], {
        "grant_id": _STR, "client_id": _STR, "username": _nullable(_STR),
        "subject": _nullable(_STR), "scopes": _STRS, "label": _STR, "created_at": _INT,
        "last_used_at": _INT, "expires_at": _nullable(_INT), "revoked": _BOOL,
        "revoked_reason": _nullable(_STR)}),
    "GrantList": _obj(["grants"], {"grants": {"type": "array", "items": _ref("Grant")},
                                   "next_page_token": _STR}),
    "GrantRevoked": _obj(["grant_id", "revoked"], {"grant_id": _STR, "revoked": _BOOL}),
    "User": _obj(list(_USER_PROPS), _USER_PROPS),
    "UserList": _obj(["users"], {"users": {"type": "array", "items": _ref("User")},
                                 "next_page_token": _STR}),
    "NewUser": _obj(["username", "password"], {
        "username": _STR, "password": {"type": "string", "minLength": 8}, "admin": _BOOL}),
    "UserChange": _obj([], {"admin": _BOOL, "password": {"type": "string", "minLength": 8}}),
    "Settings": _obj(["self_service", "flows", "default_policy", "admin_groups",
                      "display_name", "logo_url", "sources"], {
        "self_service": _BOOL, "flows": {"type": "array", "items": _GRANT_TYPE},
        "default_policy": _ref("Policy"), "admin_groups": _STR,
        "display_name": {"type": "string", "minLength": 1, "maxLength": 80,
                         "description": "the service's name on every page"},
        "logo_url": {"type": "string", "description": "https URL of the pages' logo; "
                     "empty: none"},
        "sources": {"type": "object", "description": "where each value comes from: "
                    "console, environment or default",
                    "additionalProperties": _STR}}),
    "SettingsChange": _obj([], {
        "self_service": _nullable(_BOOL),
        "flows": _nullable({"type": "array", "items": _GRANT_TYPE}),
        "default_policy": {"type": "object", "additionalProperties": False, "properties": {
            k: _nullable(v) for k, v in _POLICY_PROPS.items()}},
        "admin_groups": _nullable(_STR),
        "display_name": _nullable({"type": "string", "minLength": 1, "maxLength": 80}),
        "logo_url": _nullable(_STR)}),
    "PersonStatus": _obj(["subject", "username", "disabled", "reason", "updated_at",
                          "updated_by"], {
        "subject": _STR, "username": _nullable(_STR), "disabled": _BOOL, "reason": _STR,
        "updated_at": _INT, "updated_by": _STR}),
    "AuditEntry": _obj(["id", "action", "at"], {"id": _STR, "action": _STR, "at": _STR},
                       extra=True),
    "AuditList": _obj(["entries"], {"entries": {"type": "array", "items": _ref("AuditEntry")},
                                    "next_page_token": _STR}),
}


def _param(name: str, where: str, description: str, schema: dict[str, Any] | None = None,
           *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema or _STR}


_PAGE = [_param("limit", "query", "items per page (1 to 1000, default 100)",
                {"type": "integer", "minimum": 1, "maximum": 1000}),
         _param("page_token", "query", "the previous page's next_page_token")]
_ERRORS = {
    "400": "invalid_request: a field is missing or wrong (named in error_description)",
    "401": "no token, or an invalid one (WWW-Authenticate says which)",
    "403": "insufficient_scope: no gateway:admin, or the user lacks the admin role",
    "404": "not_found", "409": "conflict"}


def _op(summary: str, status: str, schema: str, *, body: str | None = None,
        params: list[dict[str, Any]] | None = None, errors: tuple[str, ...] = ("400",)
        ) -> dict[str, Any]:
    responses: dict[str, Any] = {status: {"description": summary, "content": {
        "application/json": {"schema": _ref(schema)}}}}
    for code in ("401", "403", *errors):
        responses[code] = {"description": _ERRORS[code], "content": {
            "application/json": {"schema": _ref("Error")}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses,
                          "parameters": params or []}
    if body:
        op["requestBody"] = {"required": body not in ("Reason", "Rotate"), "content": {
            "application/json": {"schema": _ref(body)}}}
    return op


_CLIENT = _param("client_id", "path", "the client's id")
_SUBJECT = _param("subject", "path", "a subject, or a username of this server")


def document(issuer: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API served under ``issuer``."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "oauth-gateway admin API", "version": "1",
                 "description": "Clients, grants, users and the audit stream of the built-in "
                 "authorization server. Bearer tokens of this server with the scope "
                 "gateway:admin, of a user holding the admin role."},
        "servers": [{"url": issuer.rstrip("/") + "/admin/api/v1"}],
        "security": [{"bearer": ["gateway:admin"]}],
        "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer"}}},
        "paths": {
            "/clients": {
                "get": _op("the built-in server's clients", "200", "ClientList",
                           params=_PAGE),
                "post": _op("create a client (its secret shown this once)", "201",
                            "ClientCreated", body="NewClient")},
            "/clients/{client_id}": {
                "parameters": [_CLIENT],
                "get": _op("one client", "200", "Client", errors=("404",)),
                "patch": _op("change a client (token policy, rate limit too)", "200",
                             "Client", body="ClientChange", errors=("400", "404")),
                "delete": _op("delete a client and end its grants", "200", "ClientDeleted",
                              errors=("404",),
                              params=[_param("reason", "query", "why (audited)")])},
            "/clients/{client_id}/disable": {
                "parameters": [_CLIENT],
                "post": _op("refuse every token of the client", "200", "ClientStatus",
                            body="Reason", errors=("400", "404"))},
            "/clients/{client_id}/enable": {
                "parameters": [_CLIENT],
                "post": _op("accept the client's tokens again", "200", "ClientStatus",
                            body="Reason", errors=("400", "404"))},
            "/clients/{client_id}/rotate-secret": {
                "parameters": [_CLIENT],
                "post": _op("a new secret (shown this once)", "200", "Secret", body="Rotate",
                            errors=("400", "404"))},
            "/grants": {
                "get": _op("grants (one per user, client and device)", "200", "GrantList",
                           params=[*_PAGE, _param("client_id", "query", "one client's"),
                                   _param("subject", "query",
                                          "one person's (subject or username)")])},
            "/grants/{grant_id}": {
                "parameters": [_param("grant_id", "path", "the grant's id")],
                "delete": _op("end a grant (one device) and its tokens", "200",
                              "GrantRevoked", errors=("404",))},
            "/users": {
                "get": _op("the users of this server, local and SSO", "200", "UserList",
                           params=_PAGE),
                "post": _op("create a local user", "201", "User", body="NewUser",
                            errors=("400", "409"))},
            "/users/{username}": {
                "parameters": [_param("username", "path", "a username of this server")],
                "patch": _op("give or take away the admin role, or set the password",
                             "200", "User",
                             body="UserChange", errors=("400", "404"))},
            "/users/{subject}/disable": {
                "parameters": [_SUBJECT],
                "post": _op("refuse every token of a person", "200", "PersonStatus",
                            body="Reason")},
            "/users/{subject}/enable": {
                "parameters": [_SUBJECT],
                "post": _op("accept the person's tokens again", "200", "PersonStatus",
                            body="Reason")},
            "/settings": {
                "get": _op("the tenant settings, and where each value comes from", "200",
                           "Settings", errors=()),
                "patch": _op("change tenant settings (null: back to the environment's "
                             "value)", "200", "Settings", body="SettingsChange")},
            "/audit": {
                "get": _op("the newest governance events first", "200", "AuditList",
                           params=[*_PAGE, *(_param(k, "query", f"only entries of this {k}")
                                             for k in ("actor", "client_id", "subject",
                                                       "action"))])},
        },
    }
