"""``oauth-gateway login`` and ``oauth-gateway token``: the device flow from a terminal.

Like ``gh auth login``: RFC 8628 against the authorization server's metadata (RFC
8414), the verification URL and user code printed for the user, polling that honours
``interval`` and ``slow_down``. Tokens are kept in the user's config directory
(``$XDG_CONFIG_HOME/oauth-gateway/tokens.json``, else ``~/.config/...``), file mode
0600, keyed by issuer and client. ``token`` prints a current access token, refreshing
it when it is about to expire.

``login --admin`` signs in through the built-in public client ``oauth-gateway-cli`` asking
``gateway:admin``; that login is kept apart (one per issuer), for the commands that talk to
a server's admin API (:mod:`gateway.cli.remote`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.cli.terminal import shown

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: the built-in server's public device client, created at its start
CLI_CLIENT = "oauth-gateway-cli"
#: the scope of the admin API
ADMIN_SCOPE = "gateway:admin"


class LoginError(RuntimeError):
    """The login cannot complete; the message says why."""


def token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "oauth-gateway" / "tokens.json"


def _load() -> dict[str, Any]:
    path = token_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(data: dict[str, Any]) -> Path:
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path


def _key(issuer: str, client_id: str, admin: bool = False) -> str:
    """Where a login is kept: per issuer and client; an admin login apart from others."""
    return f"{issuer.rstrip('/')}|{client_id}" + ("|admin" if admin else "")


async def _metadata(session: aiohttp.ClientSession, issuer: str) -> dict[str, Any]:
    url = issuer.rstrip("/") + "/.well-known/oauth-authorization-server"
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise LoginError(f"{url} answered {resp.status}")
            meta: dict[str, Any] = await resp.json()
    except aiohttp.ClientError as exc:
        raise LoginError(f"cannot reach the authorization server at {issuer}: {exc}") from None
    return meta


async def device_login(issuer: str, client_id: str, scope: str | None = None, *,
                       out: Any = None, max_wait: float = 900.0, admin: bool = False
                       ) -> dict[str, Any]:
    """Run the device flow; return the token response (also saved to :func:`token_file`;
    with ``admin``, as the issuer's admin login)."""
    out = out or sys.stderr
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        meta = await _metadata(session, issuer)
        form = {"client_id": client_id, **({"scope": scope} if scope else {})}
        async with session.post(meta["device_authorization_endpoint"], data=form) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise LoginError(f"device authorization refused: {body.get('error')}: "
                                 f"{body.get('error_description', '')}")
        complete = body.get("verification_uri_complete") or body["verification_uri"]
        # the server's words, shown so that none of them drives the terminal
        print(f"\nOpen {shown(complete)}\nand confirm the code {shown(body['user_code'])}\n",
              file=out,
              flush=True)
        interval = float(body.get("interval", 5))
        deadline = time.monotonic() + min(float(body.get("expires_in", 600)), max_wait)
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            async with session.post(meta["token_endpoint"], data={
                    "grant_type": DEVICE_GRANT, "device_code": body["device_code"],
                    "client_id": client_id}) as resp:
                answer: dict[str, Any] = await resp.json()
            if resp.status == 200:
                answer["obtained_at"] = int(time.time())
                answer["token_endpoint"] = meta["token_endpoint"]
                data = _load()
                data[_key(issuer, client_id, admin)] = answer
                path = _save(data)
                print(f"Logged in; token saved to {path}", file=out, flush=True)
                return answer
            error = answer.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5
                continue
            raise LoginError(f"login failed: {error}: {answer.get('error_description', '')}")
        raise LoginError("login timed out: the code was not confirmed in time")


async def current_token(issuer: str, client_id: str, *, admin: bool = False,
                        refresh: bool = False) -> str:
    """A valid access token from the store, refreshed when it expires within 60 s (or
    at once with ``refresh``: the server refused the one kept). A rotated refresh token
    replaces the one kept."""
    data = _load()
    key = _key(issuer, client_id, admin)
    entry = data.get(key)
    if not entry:
        raise LoginError("not logged in: run `oauth-gateway login` first")
    expires = int(entry.get("obtained_at", 0)) + int(entry.get("expires_in", 0))
    if expires - time.time() > 60 and not refresh:
        return str(entry["access_token"])
    if not entry.get("refresh_token"):
        raise LoginError("the token expired and there is no refresh token: log in again")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session, \
            session.post(entry["token_endpoint"], data={
                "grant_type": "refresh_token", "refresh_token": entry["refresh_token"],
                "client_id": client_id}) as resp:
        answer = await resp.json()
    if resp.status != 200:
        raise LoginError(f"refresh refused ({answer.get('error')}): log in again")
    answer.setdefault("refresh_token", entry["refresh_token"])
    answer["obtained_at"] = int(time.time())
    answer["token_endpoint"] = entry["token_endpoint"]
    data = _load()  # what another command may have saved meanwhile, then ours
    data[key] = answer
    _save(data)
    return str(answer["access_token"])
