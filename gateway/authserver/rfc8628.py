"""The device authorization grant (RFC 8628), for command-line tools and devices that
cannot show a browser.

- ``POST /oauth/device_authorization`` (sections 3.1, 3.2) gives the device a
  ``device_code`` to poll with and a short ``user_code`` for its user.
- ``GET|POST /oauth/device`` (section 3.3) is where the signed-in user types the code,
  checks it against the one on the device, and approves or denies.
- The ``urn:ietf:params:oauth:grant-type:device_code`` handler of the token endpoint
  (sections 3.4, 3.5) answers ``authorization_pending``, ``slow_down``,
  ``access_denied`` or ``expired_token`` until it issues tokens, once.

Section 5.1: user codes are guessable by design, so their entry is rate-limited per
source address and per code. Section 5.4: the consent page names the client and the
scopes and shows the code, so the user can compare it with the one on the device.

Redis, besides the ``as:device:`` / ``as:user_code:`` keys of :class:`~.storage.AuthStore`
(the record lives ``expires_in + EXPIRED_GRACE`` so a late poll still hears
``expired_token``):

| key | type | what |
|---|---|---|
| ``as:device_poll:{digest}`` | hash | ``last`` poll time, current ``interval``, ``expired`` |
| ``as:device_decision:{digest}`` | string | set once (NX) when the user approves or denies |

Polling never rewrites the device record, so a poll cannot undo the user's decision, and
the record is taken with GETDEL on issuance, so two polls cannot both get tokens.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, cast

from aiohttp import web
from multidict import MultiDictProxy
from redis.exceptions import RedisError

from gateway.authserver.authorize import scope_lines
from gateway.authserver.errors import (
    AccessDenied,
    AuthorizationPending,
    ExpiredToken,
    InvalidGrant,
    InvalidRequest,
    OAuthError,
    ServerError,
    SlowDown,
    UnauthorizedClient,
)
from gateway.authserver.hashing import (
    USER_CODE_ALPHABET,
    new_token,
    new_user_code,
    normalize_user_code,
)
from gateway.authserver.models import ADMIN_SCOPE, GRANT_DEVICE, OAuthClient, narrow_scope
from gateway.authserver.pages import (
    current_user,
    forbidden_csrf,
    login_redirect,
    posted_form,
    render,
)
from gateway.authserver.rfc6749 import token_response
from gateway.authserver.roles import NOT_ADMIN, is_admin
from gateway.authserver.server import AuthorizationServer, server_of
from gateway.authserver.storage import AuthStore

log = logging.getLogger(__name__)

SLOW_DOWN_STEP = 5        # section 3.5: "the interval MUST be increased by 5 seconds"
EXPIRED_GRACE = 600       # how long an expired code still answers ``expired_token``
ENTRY_WINDOW = 300        # user-code entry rate limits (section 5.1), per window:
ENTRY_LIMIT_SOURCE = 10   # entries from one source address
ENTRY_LIMIT_CODE = 5      # entries of one user code
USER_CODE_LENGTH = 8

# KEYS[1] the poll-state hash; ARGV[1] now, ARGV[2] first interval, ARGV[3] step,
# ARGV[4] TTL. Records this poll; returns {1 if it came sooner than the interval allows
# (which then grows by the step, section 3.5) else 0, the interval now in force}.
_POLL_SCRIPT = """
local interval = tonumber(redis.call('HGET', KEYS[1], 'interval') or ARGV[2])
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
local now = tonumber(ARGV[1])
local fast = 0
if last > 0 and now - last < interval then
  interval = interval + tonumber(ARGV[3])
  fast = 1
end
redis.call('HSET', KEYS[1], 'last', ARGV[1], 'interval', interval)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {fast, interval}
"""


class DeviceAuthorizations:
    """Pending device authorizations: the record (via :class:`AuthStore`), its poll
    state and its one-time decision."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store

    async def user_code_free(self, code: str) -> bool:
        return await self.store.device_for_user_code(code) is None

    async def note_poll(self, digest: str, interval: int, now: float, ttl: int
                        ) -> tuple[bool, int]:
        """Record a poll; (too soon, the interval in force)."""
        script = self.store.redis.register_script(_POLL_SCRIPT)
        fast, current = await script(keys=[self.store.keys.as_device_poll(digest)],
                                     args=[repr(now), interval, SLOW_DOWN_STEP, max(1, ttl)])
        return bool(fast), int(current)

    async def first_expiry(self, digest: str, ttl: int) -> bool:
        """True the first time an expired code is polled (counted once)."""
        key = self.store.keys.as_device_poll(digest)
        first = bool(await self.store.redis.hsetnx(key, "expired", "1"))
        await self.store.redis.expire(key, max(1, ttl))
        return first

    async def decide(self, digest: str, record: dict[str, Any], ttl: int) -> bool:
        """Store the user's decision; False when one was already made."""
        if not await self.store.redis.set(self.store.keys.as_device_decision(digest), "1",
                                          nx=True, ex=max(1, ttl)):
            return False
        await self.store.save_device(digest, record, ttl)
        return True

    async def take(self, digest: str) -> dict[str, Any] | None:
        """Remove the record and return it: single use (section 3.5, tokens once)."""
        raw = await self.store.redis.getdel(self.store.keys.as_device(digest))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    async def forget(self, digest: str, record: dict[str, Any]) -> None:
        await self.store.delete_device(digest, record.get("user_code_key"))
        await self.store.redis.delete(self.store.keys.as_device_poll(digest),
                                      self.store.keys.as_device_decision(digest))


# -- section 3.1, 3.2: the device authorization endpoint ------------------------------

async def device_authorization_endpoint(request: web.Request) -> web.Response:
    """Section 3.1: a public client identifies itself with ``client_id`` and may name a
    ``scope``; section 3.2: the answer, JSON."""
    server = server_of(request)
    try:
        form = await server.read_form(request, json_body=True)
        client = await server.authenticate_client(request, form)
        if client.grant_type != GRANT_DEVICE:
            raise UnauthorizedClient(f"This client may use the {client.flow} flow only.")
        scope = narrow_scope(form.get("scope"), client.scopes)
        return token_response(await start(server, client, scope))
    except OAuthError as exc:
        return exc.response()
    except RedisError:  # the gateway answers 503 with Retry-After (runtime.health)
        raise
    except Exception:
        log.exception("device authorization endpoint failed")
        return ServerError("The authorization server failed.").response()


async def start(server: AuthorizationServer, client: OAuthClient, scope: str
                ) -> dict[str, Any]:
    """Make and store a device authorization; the section 3.2 response."""
    devices = DeviceAuthorizations(server.store)
    expires_in = server.device.expires_in
    interval = server.device.interval
    user_code = new_user_code()
    for _ in range(5):  # 20^8 codes: a clash with a live one is next to impossible
        if await devices.user_code_free(normalize_user_code(user_code)):
            break
        user_code = new_user_code()
    device_code = new_token("gwdc_")
    now = time.time()
    code_key = normalize_user_code(user_code)
    record = {"status": "pending", "client_id": client.client_id, "scope": scope,
              "user_code": user_code, "user_code_key": code_key,
              "interval": interval, "created": int(now), "expires_at": now + expires_in}
    await server.store.save_device(server.store.digest(device_code), record,
                                   expires_in + EXPIRED_GRACE,
                                   user_code=code_key)
    server.metrics.device_flow.labels("started").inc()
    verification_uri = server.url("/oauth/device")
    return {"device_code": device_code, "user_code": user_code,
            "verification_uri": verification_uri,
            "verification_uri_complete": f"{verification_uri}?user_code={user_code}",
            "expires_in": expires_in, "interval": interval}


# -- section 3.4, 3.5: polling the token endpoint --------------------------------------

async def device_code_grant(server: AuthorizationServer, request: web.Request,
                            client: OAuthClient, form: MultiDictProxy[str]) -> dict[str, Any]:
    """Section 3.4: ``device_code`` (the client is authenticated by the token endpoint);
    section 3.5: the answers while the user has not yet decided."""
    device_code = form.get("device_code")
    if not device_code:
        raise InvalidRequest("device_code is required.")
    devices = DeviceAuthorizations(server.store)
    digest = server.store.digest(device_code)
    record, ttl = await server.store.get_device(digest)
    if record is None:
        raise InvalidGrant("The device code is invalid or was already used.")
    if record["client_id"] != client.client_id:
        raise InvalidGrant("The device code was not issued to this client.")
    now = time.time()
    if now >= float(record["expires_at"]):
        if await devices.first_expiry(digest, ttl):
            server.metrics.device_flow.labels("expired").inc()
        raise ExpiredToken("The device code expired; start the sign-in again.")
    if record["status"] == "denied":
        await devices.forget(digest, record)
        raise AccessDenied("The user denied the request.")
    if record["status"] == "approved":
        return await _issue(server, devices, client, digest)
    too_soon, interval = await devices.note_poll(digest, int(record["interval"]), now, ttl)
    if too_soon:
        server.metrics.device_flow.labels("slow_down").inc()
        raise SlowDown(f"Polling too fast: wait {interval} seconds between requests.")
    server.metrics.device_flow.labels("pending").inc()
    raise AuthorizationPending("The user has not approved the request yet.")


async def _issue(server: AuthorizationServer, devices: DeviceAuthorizations,
                 client: OAuthClient, digest: str) -> dict[str, Any]:
    record = await devices.take(digest)
    if record is None or record.get("status") != "approved":
        raise InvalidGrant("The device code is invalid or was already used.")
    await devices.forget(digest, record)
    # the client's allowed scopes may have shrunk since the user approved
    scope = " ".join(s for s in str(record["scope"]).split() if s in client.scopes)
    grant = await server.issuer.new_grant(
        client, username=record["username"], sub=record["sub"], scope=scope,
        grant_type=GRANT_DEVICE, label=record.get("label", ""))
    body = await server.issuer.issue(client, grant, scope=scope, grant_type=GRANT_DEVICE)
    server.metrics.device_flow.labels("issued").inc()
    return body


# -- section 3.3: the verification page ------------------------------------------------

def _entry_page(request: web.Request, *, user_code: str = "", error: str = "",
                status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return render(request, "device_entry.html", {"user_code": user_code, "error": error},
                  status=status, headers=headers)


def _invalid_code(request: web.Request) -> web.Response:
    # one answer for unknown, expired and used codes: nothing to learn by guessing
    server_of(request).metrics.device_flow.labels("invalid_user_code").inc()
    return _entry_page(request, status=400, error="That code is not valid. Check the code "
                       "on your device and try again; codes expire after a few minutes.")


def _consent_ref(store: AuthStore, digest: str) -> str:
    """Ties the consent form to the record it was shown for."""
    return store.digest("device-consent:" + digest)


def _consent_page(request: web.Request, client: OAuthClient, record: dict[str, Any],
                  username: str, ref: str) -> web.Response:
    """Section 3.3.1 and 5.4: who asks, for what, and the code to compare."""
    return render(request, "device_consent.html", {
        "client_name": client.name, "client_id": client.client_id, "username": username,
        "user_code": record["user_code"], "scopes": scope_lines(str(record["scope"])),
        "device_ref": ref})


async def _lookup(request: web.Request, server: AuthorizationServer, raw: str
                  ) -> web.Response | tuple[str, dict[str, Any], int, OAuthClient]:
    """Rate-limited look-up of a pending authorization by user code (section 5.1)."""
    code = normalize_user_code(raw[:64])
    well_formed = len(code) == USER_CODE_LENGTH and all(c in USER_CODE_ALPHABET for c in code)
    peer = server.source(request)
    if await server.store.hit(f"device-entry:{peer}", ENTRY_WINDOW) > ENTRY_LIMIT_SOURCE or (
            well_formed and await server.store.hit(f"device-code:{code}", ENTRY_WINDOW)
            > ENTRY_LIMIT_CODE):
        server.metrics.device_flow.labels("rate_limited").inc()
        await server.store.audit("device.code_entry_limited", remote=peer)
        return _entry_page(request, status=429, error="Too many attempts. Wait a few "
                           "minutes, then try again.",
                           headers={"Retry-After": str(ENTRY_WINDOW)})
    digest = await server.store.device_for_user_code(code) if well_formed else None
    record, ttl = await server.store.get_device(digest) if digest else (None, 0)
    if digest is None or record is None or record.get("status") != "pending" \
            or time.time() >= float(record["expires_at"]):
        return _invalid_code(request)
    client = await server.store.get_client(str(record["client_id"]))
    if client is None or client.disabled:
        return _invalid_code(request)
    return digest, record, ttl, client


async def device_get(request: web.Request) -> web.StreamResponse:
    """The verification URI (section 3.3); ``?user_code=`` prefills the form
    (``verification_uri_complete``, section 3.3.1)."""
    if await current_user(request) is None:
        raise login_redirect(request)  # keeps ?user_code= for after the sign-in
    code = normalize_user_code(request.query.get("user_code", "")[:64])
    if len(code) == USER_CODE_LENGTH:
        code = f"{code[:4]}-{code[4:]}"
    return _entry_page(request, user_code=code)


async def device_post(request: web.Request) -> web.StreamResponse:
    """The code entered (shows the consent page), or the user's decision on it."""
    server = server_of(request)
    form = await posted_form(request)
    if form is None:
        return forbidden_csrf(request)
    user = await current_user(request)
    if user is None:
        raise login_redirect(request)
    found = await _lookup(request, server, str(form.get("user_code", "")))
    if isinstance(found, web.Response):
        return found
    digest, record, ttl, client = found
    ref = _consent_ref(server.store, digest)
    if ADMIN_SCOPE in str(record["scope"]).split() and not await is_admin(
            server.store, user["username"]):
        # refused outright, and the device told so (access_denied) at its next poll
        record.update(status="denied", username=user["username"], decided_at=int(time.time()))
        await DeviceAuthorizations(server.store).decide(digest, record, ttl)
        server.metrics.device_flow.labels("denied").inc()
        await server.store.audit("device.denied", client_id=client.client_id,
                                 user=user["username"], reason="not_admin",
                                 remote=server.source(request))
        return _entry_page(request, status=403, error=NOT_ADMIN)
    if "approve" not in form and "deny" not in form:
        return _consent_page(request, client, record, user["username"], ref)
    if not hmac.compare_digest(ref, str(form.get("device_ref", ""))):
        return _invalid_code(request)
    approved = "approve" in form and "deny" not in form
    peer = server.source(request)
    if approved:
        agent = request.headers.get("User-Agent", "")[:120]
        label = " ".join(str(form.get("device_name", "")).split())[:100] or (
            f"{client.name} ({agent})" if agent else client.name)
        record.update(status="approved", username=user["username"], sub=user["sub"],
                      label=label, decided_at=int(time.time()))
    else:
        label = ""
        record.update(status="denied", username=user["username"],
                      decided_at=int(time.time()))
    if not await DeviceAuthorizations(server.store).decide(digest, record, ttl):
        return _invalid_code(request)
    outcome = "approved" if approved else "denied"
    server.metrics.device_flow.labels(outcome).inc()
    await server.store.audit(f"device.{outcome}", client_id=client.client_id,
                             user=user["username"], label=label, remote=peer)
    return render(request, "device_done.html",
                  {"approved": approved, "client_name": client.name})


def add_routes(app: web.Application) -> None:
    """Register this module's endpoints."""
    app.router.add_post("/oauth/device_authorization", device_authorization_endpoint)
    # the same endpoint where Anaplan's own service has it
    app.router.add_post("/oauth/device/code", device_authorization_endpoint)
    app.router.add_get("/oauth/device", device_get)
    app.router.add_post("/oauth/device", device_post)
