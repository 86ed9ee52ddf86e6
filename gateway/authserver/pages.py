"""Server-rendered pages: layout, CSRF, sessions, and the login page.

Plain HTML forms, for automation and assistive tools (CONTRACT.md fixes the field
names: ``username`` and ``password`` on the login form, ``user_code`` on the device
form, submit buttons ``approve`` and ``deny`` on the consent form).

- Framing is refused (``frame-ancestors 'none'``, ``X-Frame-Options: DENY``) against
  clickjacking of the consent screen.
- CSRF: double-submit token. A random ``gw_csrf`` cookie (``SameSite=Strict``) must
  equal the form's ``csrf_token`` field, compared in constant time.
- Sessions: an opaque ``gw_session`` cookie (``HttpOnly``, ``SameSite=Lax``, ``Secure``
  when the issuer is https); Redis holds only its digest.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.authserver.hashing import verify_secret
from gateway.authserver.server import AuthorizationServer, server_of

SESSION_COOKIE = "gw_session"
CSRF_COOKIE = "gw_csrf"
SESSION_TTL = 8 * 3600
#: a CSRF token made for this response, to be set as a cookie on it
NEW_CSRF = web.RequestKey("gw_new_csrf", str)
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
       "frame-ancestors 'none'; base-uri 'none'")

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:#f4f6fa;
color:#1d2433;margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}
main{background:#fff;border-radius:10px;box-shadow:0 2px 14px #0002;padding:2rem 2.2rem;
width:min(26rem,92vw)}
h1{font-size:1.35rem;margin:0 0 1rem}label{display:block;margin:.8rem 0 .3rem;font-weight:600}
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.6rem;
border:1px solid #b8c0cc;border-radius:6px;font-size:1rem}
button,.button{margin-top:1.2rem;padding:.6rem 1.1rem;border:0;border-radius:6px;
font-size:1rem;cursor:pointer;background:#1857d4;color:#fff;text-decoration:none;
display:inline-block}
button.secondary{background:#e6e9ef;color:#1d2433}.error{color:#b00020;font-weight:600}
ul{padding-left:1.2rem}code{font-size:1.1rem;letter-spacing:.08em}.muted{color:#5b6475}
"""


def e(value: object) -> str:
    """HTML-escape anything shown on a page."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, *, status: int = 200,
         headers: Mapping[str, str] | None = None) -> web.Response:
    """A whole page with the security headers every page carries."""
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width,initial-scale=1">'
           f"<title>{e(title)}</title><style>{_STYLE}</style></head>"
           f"<body><main>{body}</main></body></html>")
    return web.Response(
        status=status, text=doc, content_type="text/html", charset="utf-8",
        headers={"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                 "Cache-Control": "no-store", **(headers or {})})


def _secure(server: AuthorizationServer) -> bool:
    return server.issuer_url.startswith("https://")


def csrf_token(request: web.Request) -> str:
    """The CSRF token for forms on this page (the cookie's value, made when absent)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if len(token) < 20:
        token = request.get(NEW_CSRF) or secrets.token_urlsafe(24)
        request[NEW_CSRF] = token
    return token


def with_csrf_cookie(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Set the CSRF cookie if :func:`csrf_token` had to make one for this response."""
    token = request.get(NEW_CSRF)
    if token:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict",
                            secure=_secure(server_of(request)), path="/")
    return response


def csrf_field(request: web.Request) -> str:
    return f'<input type="hidden" name="csrf_token" value="{e(csrf_token(request))}">'


def check_csrf(request: web.Request, form: Mapping[str, Any]) -> bool:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = str(form.get("csrf_token", ""))
    return len(cookie) >= 20 and hmac.compare_digest(cookie.encode(), sent.encode())


def forbidden_csrf() -> web.Response:
    return page("Request refused", "<h1>Request refused</h1><p class=error>This form expired "
                "or did not come from this site. Go back, reload the page and try again.</p>",
                status=403)


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
    token = secrets.token_urlsafe(32)
    data = {"username": username, "sub": sub, "auth_time": int(time.time()), "method": method}
    await server.store.redis.set(server.store.keys.as_session(server.store.digest(token)),
                                 json.dumps(data), ex=SESSION_TTL)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Lax",
                        secure=_secure(server), path="/", max_age=SESSION_TTL)


def safe_next(value: str | None) -> str:
    """Only this server's own pages may be a post-login destination (no open redirect)."""
    if value and value.startswith("/oauth/") and "//" not in value and "\\" not in value:
        return value
    return "/oauth/account"


def login_redirect(request: web.Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther("/oauth/login?next=" + quote(request.path_qs, safe=""))


# -- the login page ------------------------------------------------------------

def _login_form(request: web.Request, next_url: str, error: str = "",
                username: str = "") -> web.Response:
    server = server_of(request)
    parts = ["<h1>Sign in</h1>"]
    if error:
        parts.append(f'<p class="error" role="alert">{e(error)}</p>')
    if server.settings.as_local_login:
        parts.append(
            f'<form method="post" action="/oauth/login">{csrf_field(request)}'
            f'<input type="hidden" name="next" value="{e(next_url)}">'
            f'<label for="username">Username</label>'
            f'<input type="text" id="username" name="username" autocomplete="username" '
            f'value="{e(username)}" required autofocus>'
            f'<label for="password">Password</label>'
            f'<input type="password" id="password" name="password" '
            f'autocomplete="current-password" required>'
            f'<button type="submit" name="login" value="1">Sign in</button></form>')
    if server.settings.sso_issuer:
        parts.append(f'<p><a class="button" href="/oauth/sso/start?next={quote(next_url)}">'
                     "Sign in with your company account</a></p>")
    resp = page("Sign in", "".join(parts), status=401 if error else 200)
    with_csrf_cookie(request, resp)
    return resp


async def login_get(request: web.Request) -> web.Response:
    return _login_form(request, safe_next(request.query.get("next")))


async def login_post(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    form = await request.post()
    next_url = safe_next(str(form.get("next", "")))
    if not check_csrf(request, form):
        return forbidden_csrf()
    if not server.settings.as_local_login:
        return _login_form(request, next_url, "Local sign-in is turned off.")
    username = str(form.get("username", ""))[:128]
    password = str(form.get("password", ""))[:1024]
    peer = request.remote or "?"
    if await server.store.hit(f"login:{peer}", 300) > 30 or \
            await server.store.hit(f"login-user:{username}", 300) > 10:
        server.metrics.logins.labels("local", "rate_limited").inc()
        return _login_form(request, next_url, "Too many attempts. Wait a few minutes.",
                           username)
    user = await server.store.get_user(username) if username else {}
    ok = bool(user) and await asyncio.to_thread(verify_secret, password,
                                                user.get("password_hash", ""))
    if not ok:
        server.metrics.logins.labels("local", "failure").inc()
        await server.store.audit("login.failed", user=username, method="local", remote=peer)
        return _login_form(request, next_url, "Wrong username or password.", username)
    server.metrics.logins.labels("local", "success").inc()
    response = web.HTTPSeeOther(next_url)
    await start_session(request, response, username=username, sub=user["sub"], method="local")
    await server.store.audit("login", user=username, method="local", remote=peer)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    if not check_csrf(request, form):
        return forbidden_csrf()
    server = server_of(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await server.store.redis.delete(
            server.store.keys.as_session(server.store.digest(token)))
    response = page("Signed out", "<h1>Signed out</h1><p>You can close this window.</p>")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def account(request: web.Request) -> web.StreamResponse:
    user = await current_user(request)
    if user is None:
        raise login_redirect(request)
    resp = page("Signed in", f"<h1>Signed in</h1><p>You are signed in as "
                f"<strong>{e(user['username'])}</strong>.</p>"
                f'<form method="post" action="/oauth/logout">{csrf_field(request)}'
                '<button type="submit" class="secondary">Sign out</button></form>')
    with_csrf_cookie(request, resp)
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/oauth/login", login_get)
    app.router.add_post("/oauth/login", login_post)
    app.router.add_post("/oauth/logout", logout)
    app.router.add_get("/oauth/account", account)
