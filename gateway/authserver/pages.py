"""Server-rendered pages: rendering, CSRF, sessions, and the login page.

Plain HTML forms, for automation and assistive tools (docs/COMPATIBILITY.md keeps the field
names: ``username`` and ``password`` on the login form, ``user_code`` on the device
form, submit buttons ``approve`` and ``deny`` on the consent form).

- Pages are Jinja2 templates (``templates/``: a layout and one file per page), rendered
  with autoescaping on, so whatever a page shows reaches the browser as text.
- Every page names the service and its tenant: the tenant settings' ``display_name``
  and ``logo_url`` (read before the page's handler runs, cached a second); the CSP lets
  images come from the logo's origin only when one is set.
- Framing is refused (``frame-ancestors 'none'``, ``X-Frame-Options: DENY``) against
  clickjacking of the consent screen.
- CSRF: double-submit token. A random ``gw_csrf`` cookie (``SameSite=Strict``) must
  equal the form's ``csrf_token`` field, compared in constant time.
- Sessions: an opaque ``gw_session`` cookie (``HttpOnly``, ``SameSite=Lax``, ``Secure``
  when the issuer is https); Redis holds only its digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from gateway.authserver.hashing import normalize_user_code, verify_secret_evenly
from gateway.authserver.server import AuthorizationServer, server_of
from gateway.authserver.tenant import Tenant, origin, resolve
from gateway.authserver.throttle import LoginThrottle

SESSION_COOKIE = "gw_session"
CSRF_COOKIE = "gw_csrf"
SESSION_TTL = 8 * 3600
#: a CSRF token made for this response, to be set as a cookie on it
NEW_CSRF = web.RequestKey("gw_new_csrf", str)
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:{logo}; "
       "frame-ancestors 'none'; base-uri 'none'")
#: the tenant settings in force for this request's page (:func:`brand_middleware`)
TENANT = web.RequestKey("gw_page_tenant", Tenant)
#: the paths whose pages show the service's name
PAGE_PATHS = ("/oauth/", "/account", "/console")

#: the pages' Jinja2 environment, one per app (:func:`setup_templates`)
PAGES_ENV = web.AppKey("gw_pages_env", jinja2.Environment)
_SECURITY_HEADERS = {"X-Frame-Options": "DENY",
                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                     "Cache-Control": "no-store"}


def setup_templates(app: web.Application) -> None:
    """The Jinja2 environment of the pages (``templates/``), autoescaping every template:
    whatever a page shows (client names, usernames, codes, messages) is escaped."""
    aiohttp_jinja2.setup(
        app, app_key=PAGES_ENV, default_helpers=False,
        loader=jinja2.PackageLoader("gateway.authserver", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True)
    app.middlewares.append(brand_middleware)


@web.middleware
async def brand_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the tenant settings (name, logo) before a page's handler, which renders
    synchronously; the environment's when Redis cannot say."""
    if request.path.startswith(PAGE_PATHS):
        server = server_of(request)
        tenant = server.issuer.tenant
        if tenant is not None:
            with contextlib.suppress(RedisError):  # the page says what it can
                # the console reads them fresh: an admin sees a change at once
                request[TENANT] = await tenant.get(fresh=request.path.startswith("/console/"))
    return await handler(request)


def tenant_of(request: web.Request) -> Tenant:
    """The tenant settings of this request's page."""
    found = request.get(TENANT)
    return found if found is not None else resolve({}, server_of(request).settings)


def page_headers(tenant: Tenant) -> dict[str, str]:
    """The security headers of a page, its CSP allowing the logo's origin if any."""
    logo = origin(tenant.logo_url)
    return {**_SECURITY_HEADERS,
            "Content-Security-Policy": CSP.format(logo=f" {logo}" if logo else "")}


def render(request: web.Request, template: str, context: Mapping[str, Any] | None = None,
           *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A whole page with the security headers every page carries.

    A form on the page calls ``csrf_token()``; the CSRF cookie is set when that made a
    new token."""
    tenant = tenant_of(request)
    response = aiohttp_jinja2.render_template(
        template, request, {"service_name": tenant.display_name, "logo_url": tenant.logo_url,
                            **(context or {}), "csrf_token": lambda: csrf_token(request)},
        app_key=PAGES_ENV, status=status)
    response.headers.update({**page_headers(tenant), **(headers or {})})
    _set_csrf_cookie(request, response)
    return response


def _secure(server: AuthorizationServer) -> bool:
    return server.issuer_url.startswith("https://")


def csrf_token(request: web.Request) -> str:
    """The CSRF token for forms on this page (the cookie's value, made when absent)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if len(token) < 20:
        token = request.get(NEW_CSRF) or secrets.token_urlsafe(24)
        request[NEW_CSRF] = token
    return token


def _set_csrf_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """Set the CSRF cookie if :func:`csrf_token` had to make one for this response."""
    token = request.get(NEW_CSRF)
    if token:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict",
                            secure=_secure(server_of(request)), path="/")


def check_csrf(request: web.Request, form: Mapping[str, Any]) -> bool:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = str(form.get("csrf_token", ""))
    return len(cookie) >= 20 and hmac.compare_digest(cookie.encode(), sent.encode())


def forbidden_csrf(request: web.Request) -> web.Response:
    return render(request, "csrf_refused.html", status=403)


async def posted_form(request: web.Request
                      ) -> Mapping[str, Any] | None:
    """The form a page posted, or None when its CSRF token does not match the cookie's
    (answer that with :func:`forbidden_csrf`)."""
    form = await request.post()
    return form if check_csrf(request, form) else None


# -- sessions ------------------------------------------------------------------

async def current_user(request: web.Request) -> dict[str, Any] | None:
    """The signed-in user (``username``, ``sub``, ``auth_time``, ``method``), if any."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    server = server_of(request)
    raw = await server.store.redis.get(
        server.store.keys.as_session(server.store.digest(token)))
    return json.loads(raw) if raw else None


async def start_session(request: web.Request, response: web.StreamResponse, *, username: str,
                        sub: str, method: str) -> None:
    server = server_of(request)
    if await server.store.person_disabled(sub):
        # every way of signing in ends here: a person disabled by people governance
        # gets no session, whatever their password or identity provider says
        server.metrics.logins.labels(method, "user_disabled").inc()
        await server.store.audit("login.failed", user=username, method=method,
                                 reason="user_disabled", remote=server.source(request))
        page = render(request, "sso_failed.html", {
            "message": "This account is disabled. Ask an administrator to enable it."},
            status=403)
        raise web.HTTPForbidden(text=page.text, content_type="text/html", headers={
            k: v for k, v in page.headers.items() if k.lower() != "content-type"})
    token = secrets.token_urlsafe(32)
    data = {"username": username, "sub": sub, "auth_time": int(time.time()), "method": method}
    await server.store.redis.set(server.store.keys.as_session(server.store.digest(token)),
                                 json.dumps(data), ex=SESSION_TTL)
    user_key = server.store.keys.as_user(username)
    if await server.store.redis.hexists(user_key, "sub"):  # the console's "last signed in"
        await server.store.redis.hset(user_key, "last_seen", str(data["auth_time"]))
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Lax",
                        secure=_secure(server), path="/", max_age=SESSION_TTL)


def safe_next(value: str | None) -> str:
    """Only this server's own pages may be a post-login destination (no open redirect);
    the person's account page when none is named."""
    if value and value.startswith(("/oauth/", "/account/", "/console/")) and "//" not in value \
            and "\\" not in value:
        return value
    return "/account/"


def login_redirect(request: web.Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther("/oauth/login?next=" + quote(request.path_qs, safe=""))


# -- the login page ------------------------------------------------------------

async def signing_in_for(request: web.Request, next_url: str) -> str:
    """What the sign-in is for, in words, when the page after it says: the application
    of an authorization or device request, the console; else empty."""
    parts = urlsplit(next_url)
    query = parse_qs(parts.query)
    store = server_of(request).store
    client_id = ""
    if parts.path == "/oauth/authorize":
        client_id = (query.get("client_id") or [""])[0][:200]
    elif parts.path == "/oauth/device" and query.get("user_code"):
        digest = await store.device_for_user_code(
            normalize_user_code(query["user_code"][0][:64]))
        record, _ = await store.get_device(digest) if digest else (None, 0)
        client_id = str((record or {}).get("client_id", ""))
    elif parts.path.startswith("/console/"):
        return "the administrators' console"
    client = await store.get_client(client_id) if client_id else None
    return client.name if client is not None and not client.disabled else ""


async def _login_form(request: web.Request, next_url: str, error: str = "",
                      username: str = "", *, status: int | None = None,
                      headers: Mapping[str, str] | None = None) -> web.Response:
    settings = server_of(request).settings
    return render(request, "login.html", {
        "next_url": next_url, "error": error, "username": username,
        "signing_in_for": await signing_in_for(request, next_url),
        "local_login": settings.as_local_login, "sso": bool(settings.sso_issuer),
        "anaplan": bool(settings.anaplan_client_id and settings.anaplan_client_secret)},
        status=status or (401 if error else 200), headers=headers)


async def login_get(request: web.Request) -> web.Response:
    return await _login_form(request, safe_next(request.query.get("next")))


async def login_post(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    form = await posted_form(request)
    if form is None:
        return forbidden_csrf(request)
    next_url = safe_next(str(form.get("next", "")))
    if not server.settings.as_local_login:
        return await _login_form(request, next_url, "Local sign-in is turned off.")
    username = str(form.get("username", ""))[:128]
    password = str(form.get("password", ""))[:1024]
    peer = server.source(request)
    session = await current_user(request)
    throttle = LoginThrottle(server, request, username, session=request.cookies.get(
        SESSION_COOKIE, "") if session and session.get("username") == username else "")
    refusal = await throttle.check()
    if refusal is not None:
        server.metrics.logins.labels("local", "rate_limited").inc()
        minutes = max(1, -(-refusal.retry_after // 60))
        return await _login_form(
            request, next_url, "Too many failed sign-ins from here. Try again in "
            f"{minutes} minute{'s' if minutes > 1 else ''}.", username, status=429,
            headers={"Retry-After": str(refusal.retry_after)})
    user = await server.store.get_user(username) if username else {}
    # an unknown user, or one without a password (signed up through SSO), costs the same
    # scrypt work as a wrong password: the answer's timing names no one
    ok = await asyncio.to_thread(verify_secret_evenly, password,
                                 user.get("password_hash")) and bool(user)
    if not ok:
        await throttle.failed()
        server.metrics.logins.labels("local", "failure").inc()
        await server.store.audit("login.failed", user=username, method="local", remote=peer)
        return await _login_form(request, next_url, "Wrong username or password.", username)
    server.metrics.logins.labels("local", "success").inc()
    response = web.HTTPSeeOther(next_url)
    await start_session(request, response, username=username, sub=user["sub"], method="local")
    await throttle.succeeded(response)
    await server.store.audit("login", user=username, method="local", remote=peer)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    if await posted_form(request) is None:
        return forbidden_csrf(request)
    server = server_of(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await server.store.redis.delete(
            server.store.keys.as_session(server.store.digest(token)))
    response = render(request, "signed_out.html")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/oauth/login", login_get)
    app.router.add_post("/oauth/login", login_post)
    app.router.add_post("/oauth/logout", logout)
