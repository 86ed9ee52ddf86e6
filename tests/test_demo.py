"""`oauth-gateway demo` as a new user meets it: no Redis running, the printed
walk-through done step by step (the gateway in `service` mode: what reaches the Anaplan
stand-in is the token service's token, never the client's), and Ctrl-C leaving nothing
behind."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
from pytest_aiohttp import AiohttpClient

from gateway.demo import anaplan
from gateway.demo.tokenservice import TokenServiceStandIn, make_ca
from tests.forms import submit
from tests.redis_server import free_port

CLI = str(Path(sys.executable).with_name("oauth-gateway"))


def _port_open(url: str) -> bool:
    host, port = re.sub(r"^\w+://", "", url).split("/")[0].rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


async def _read_panel(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, "demo exited before printing its panel:\n" + "".join(lines)
            lines.append(line)
            if "Ctrl-C stops everything." in line:
                lines.append((await proc.stdout.readline()).decode())
                return "".join(lines)


def _value(panel: str, pattern: str) -> str:
    match = re.search(pattern, panel)
    assert match, f"{pattern!r} not in the panel:\n{panel}"
    return match.group(1)


async def test_demo_walkthrough_and_clean_stop(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing there
                "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
                "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
                "XDG_CONFIG_HOME": str(tmp_path / "config"), "GATEWAY_ACCESS_LOG": "false"})
    demo = await asyncio.create_subprocess_exec(
        CLI, "demo", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        panel = await _read_panel(demo)
        issuer = _value(panel, r"export GATEWAY_ISSUER=(\S+)")
        client = _value(panel, r"CLIENT=(\S+)")
        redis_url = _value(panel, r"export GATEWAY_REDIS_URL=(\S+)")
        prefix = _value(panel, r"GATEWAY_KEY_PREFIX=(\S+)")
        password = _value(panel, r"Demo user\s+demo / (\S+)")
        admin = _value(panel, r"Metrics / health\s+(\S+)/metrics")
        upstream = _value(panel, r"Anaplan API stand-in\s+(\S+)")
        auth_url = _value(panel, r"Anaplan token service\s+(\S+)")
        workdir = Path(_value(panel, r"in (\S+)\s+\(removed on exit\)"))
        assert "embedded" in panel
        assert (workdir / "gateway-cert.pem").is_file()
        assert stat.S_IMODE((workdir / "gateway-key.pem").stat().st_mode) == 0o600
        walk = {**env, "GATEWAY_ISSUER": issuer, "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_KEY_PREFIX": prefix}

        # 1. device login from the terminal; a "browser" confirms the code
        login = await asyncio.create_subprocess_exec(
            CLI, "login", "--client-id", client, env=walk,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert login.stderr is not None
        shown = ""
        async with asyncio.timeout(30):
            while "confirm the code" not in shown:
                shown += (await login.stderr.readline()).decode()
        url = _value(shown, r"Open (\S+)")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            resp = await browser.get(url)
            page = await resp.text()
            if 'name="password"' in page:
                resp = await submit(browser, str(resp.url), page,
                                    values={"username": "demo", "password": password})
                page = await resp.text()
            if 'name="user_code"' in page and "approve" not in page:
                resp = await submit(browser, str(resp.url), page, field_name="user_code")
                page = await resp.text()
            resp = await submit(browser, str(resp.url), page, button="approve")
            assert resp.status == 200, await resp.text()
        async with asyncio.timeout(30):
            assert await login.wait() == 0
        token_file = tmp_path / "config" / "oauth-gateway" / "tokens.json"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

        # 2. an API call through the gateway with `oauth-gateway token`
        token = subprocess.run([CLI, "token", "--client-id", client], env=walk,
                               capture_output=True, text=True, check=True).stdout.strip()
        models = _value(panel, r"(\$GATEWAY_ISSUER/2/0/workspaces/\S+/models)\n").replace(
            "$GATEWAY_ISSUER", issuer)
        task = _value(panel, r"(\$GATEWAY_ISSUER\S+/tasks)").replace("$GATEWAY_ISSUER", issuer)
        mine = hashlib.sha256(token.encode()).hexdigest()[:8]  # as the panel computes it
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:
            async with session.get(models, headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.json())["models"][0]["name"]
                # what reached Anaplan: the token service's token, from one sign-in
                received = resp.headers["X-Standin-Received"]
            assert received.startswith("AnaplanAuthToken sha256:"), received
            assert "token-service token #1 of gateway-demo@example.com" in received
            assert "(sign-ins so far: 1)" in received
            assert mine not in received
            # the stand-in, like Anaplan, refuses any token its token service did not issue
            async with session.get(f"{upstream}/2/0/workspaces",
                                   headers={"Authorization": "AnaplanAuthToken made-up"}) as resp:
                assert resp.status == 401
            # 3. a write the client's scopes do not allow
            async with session.post(task, headers=headers) as resp:
                assert resp.status == 403
                assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
            # 4. disable the client; the next call is refused
            subprocess.run([CLI, "clients", "disable", client, "--reason", "demo"], env=walk,
                           check=True, capture_output=True)
            await asyncio.sleep(0.2)
            async with session.get(models, headers=headers) as resp:
                assert resp.status == 401
            # 5. metrics
            async with session.get(admin + "/metrics") as resp:
                text = await resp.text()
            assert f'gateway_auth_decisions_total{{client_id="{client}",decision="allowed"}}' \
                in text
            assert 'decision="client_disabled"' in text
            assert ('gateway_upstream_credential_refreshes_total{identity="integration",'
                    'mode="service",outcome="signed_in"} 1.0') in text
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            code = await demo.wait()
    assert code == 0
    assert demo.stdout is not None
    log = (await demo.stdout.read()).decode()
    assert "demo stopped; nothing left running" in log
    # the stand-ins' log: one sign-in with the certificate, and the one API call the
    # gateway let through, made with its token; the client's token never appears
    assert "token service: authenticate #1 with CACertificate: issued token #1" in log
    assert "authenticate #2" not in log
    calls = [line for line in log.splitlines() if "-> 200: received" in line]
    assert len(calls) == 1 and "AnaplanAuthToken sha256:" in calls[0], log
    assert mine not in log and token not in log
    for url in (issuer, admin, redis_url, upstream, auth_url):
        assert not _port_open(url), f"{url} still answers after Ctrl-C"
    assert not workdir.exists(), "the demo's certificate directory is left behind"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f":{redis_url.rsplit(':', 1)[1].split('/')[0]}" not in ps
    assert str(workdir) not in ps


async def test_api_stand_in_takes_only_tokens_its_token_service_issued(
        aiohttp_client: AiohttpClient) -> None:
    ca, _ = make_ca()
    tokens = TokenServiceStandIn(ca, users={"svc@example.com": "pw"})
    lines: list[str] = []
    service = await aiohttp_client(anaplan.token_service_app(tokens, lines.append))
    api = await aiohttp_client(anaplan.create_app(tokens, lines.append))
    basic = base64.b64encode(b"svc@example.com:pw").decode()
    resp = await service.post("/token/authenticate", headers={"Authorization": f"Basic {basic}"})
    issued = (await resp.json())["tokenInfo"]["tokenValue"]
    assert lines == ["token service: authenticate #1 with Basic: issued token #1 to "
                     "svc@example.com"]
    for refused in (f"Bearer {issued}", "AnaplanAuthToken made-up", ""):
        assert (await api.get("/2/0/users/me", headers={"Authorization": refused})).status == 401
    resp = await api.get("/2/0/users/me", headers={"Authorization": f"AnaplanAuthToken {issued}"})
    assert resp.status == 200
    assert (await resp.json())["user"]["email"] == "svc@example.com"
    assert resp.headers["X-Standin-Received"] == (
        f"AnaplanAuthToken sha256:{anaplan.fingerprint(issued)} = token-service token #1 of "
        "svc@example.com (sign-ins so far: 1)")
    assert issued not in "\n".join(lines)
    tokens.stale()  # as after a logout: refused from then on
    resp = await api.get("/2/0/users/me", headers={"Authorization": f"AnaplanAuthToken {issued}"})
    assert resp.status == 401
