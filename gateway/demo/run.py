"""``oauth-gateway demo``: Redis, the authorization server, Anaplan stand-ins, the gateway.

Everything on loopback, in one process (plus an embedded Valkey/Redis when none
answers at ``GATEWAY_REDIS_URL``). The gateway runs as it would against Anaplan: its
API upstream has ``credentials: service``, so it signs in to the token-service
stand-in with a certificate of its own (made at start by a throwaway test CA, in a
temporary directory) and sends the API stand-in that AnaplanAuthToken, which is the
only kind of token the API stand-in takes. Prints the URLs, credentials and commands
to try; Ctrl-C stops everything and leaves nothing running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web
from cryptography import x509
from redis.exceptions import RedisError

from gateway.config.settings import Settings, load_settings, parse_hostport
from gateway.demo import anaplan
from gateway.demo.tokenservice import TokenServiceStandIn, make_ca, make_client_certificate
from gateway.runtime.app import create_apps
from gateway.state.connection import connect
from gateway.state.embedded import EmbeddedRedis, free_port

DEMO_USER = "demo"
IDENTITY = "integration"  # the policy's name of the gateway's own Anaplan identity
CERT_USER = "gateway-demo@example.com"  # whom the demo certificate names
READ_SCOPES = "anaplan:read anaplan:bulk"
ALL_SCOPES = "anaplan:read anaplan:write anaplan:bulk anaplan:bulk:write"

POLICY = """\
# The demo's policy: the shipped Anaplan vocabulary, pointed at the local stand-ins.
identities:
  {identity}:                  # the gateway's own Anaplan sign-in
    kind: anaplan-certificate
    auth_url: {auth_url}
    certificate_file: {cert}
    private_key_file: {key}
upstreams:
  anaplan:
    url: {upstream}
    credentials: service          # send the identity's AnaplanAuthToken, never the client's
    identity: {identity}
routes:
  - name: bulk-imports-read
    upstream: anaplan
    methods: [GET, HEAD]
    path: /2/0/workspaces/*/models/*/imports/**
    scopes: [anaplan:bulk]
  - name: bulk-imports-write
    upstream: anaplan
    methods: [POST, PUT, PATCH, DELETE]
    path: /2/0/workspaces/*/models/*/imports/**
    scopes: [anaplan:bulk:write]
  - name: bulk-files-read
    upstream: anaplan
    methods: [GET, HEAD]
    path: /2/0/workspaces/*/models/*/files/**
    scopes: [anaplan:bulk]
  - name: bulk-files-write
    upstream: anaplan
    methods: [POST, PUT, PATCH, DELETE]
    path: /2/0/workspaces/*/models/*/files/**
    scopes: [anaplan:bulk:write]
  - name: integration-read
    upstream: anaplan
    methods: [GET, HEAD]
    path: /2/0/**
    scopes: [anaplan:read]
  - name: integration-write
    upstream: anaplan
    methods: [POST, PUT, PATCH, DELETE]
    path: /2/0/**
    scopes: [anaplan:write]
"""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _listen(value: str, default_port: int) -> str:
    host, port = parse_hostport(value)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 (loopback only)
    if port == default_port and not _port_free(host, port):
        port = free_port()
    return f"{host}:{port}"


async def _redis_answers(url: str) -> bool:
    try:
        client = connect(url)  # any URL the gateway takes: Sentinel, Cluster too
    except ValueError:
        return False
    try:
        await asyncio.wait_for(client.ping(), timeout=1.0)
        return True
    except (RedisError, OSError, TimeoutError):
        return False
    finally:
        await client.aclose()


STOP_TIMEOUT = 10.0  # seconds each listener gets to close on Ctrl-C


class Demo:
    """The running demo; :meth:`start` then :meth:`stop`."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.embedded: EmbeddedRedis | None = None
        self.runners: list[web.AppRunner] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="oauth-gateway-demo-"))
        self.info: dict[str, Any] = {}

    async def start(self) -> None:
        env = dict(os.environ)
        redis_url = env.get("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0")
        prefix = env.get("GATEWAY_KEY_PREFIX", "")
        if await _redis_answers(redis_url):
            redis_note = "the Redis at GATEWAY_REDIS_URL"
            prefix = prefix or "gwdemo:"  # keep clear of a real deployment's keys
        else:
            self.embedded = EmbeddedRedis()
            await asyncio.to_thread(self.embedded.start)
            redis_url, prefix = self.embedded.url, prefix or "gw:"
            redis_note = "embedded Valkey/Redis, stopped on exit"
        tokens = TokenServiceStandIn(await asyncio.to_thread(self._make_certificate))
        auth_url = await self._serve(anaplan.token_service_app(tokens, self.log))
        upstream = await self._serve(anaplan.create_app(tokens, self.log))
        policy = self.workdir / "demo-policy.yaml"
        policy.write_text(POLICY.format(
            upstream=upstream, auth_url=auth_url, identity=IDENTITY,
            cert=self.workdir / "gateway-cert.pem", key=self.workdir / "gateway-key.pem"))
        listen = _listen(env.get("GATEWAY_LISTEN", "127.0.0.1:8080"), 8080)
        admin_listen = _listen(env.get("GATEWAY_ADMIN_LISTEN", "127.0.0.1:9090"), 9090)
        issuer = f"http://{listen}"
        settings = load_settings(
            environ={}, redis_url=redis_url, key_prefix=prefix, policies=str(policy),
            issuer=issuer, listen=listen, admin_listen=admin_listen, log_format="text",
            access_log=env.get("GATEWAY_ACCESS_LOG", "true").lower() != "false",
            # the demo's own key for the Anaplan token it keeps in Redis
            secret_keys=base64.b64encode(secrets.token_bytes(32)).decode())
        await self._start_gateway(settings)
        await self._seed(settings)
        self.info.update(issuer=issuer, admin=f"http://{admin_listen}", upstream=upstream,
                         auth_url=auth_url, redis_url=redis_url, redis_note=redis_note,
                         prefix=prefix)
        self.print_panel()

    def log(self, line: str) -> None:
        """A line of the Anaplan stand-ins' log, on the demo's terminal."""
        print(f"[anaplan stand-in] {line}", file=self.out, flush=True)

    def _make_certificate(self) -> x509.Certificate:
        """A test CA; the gateway's certificate and key it issued, written to the workdir.
        The CA's key is dropped: nothing else is ever signed with it."""
        ca, ca_key = make_ca("oauth-gateway demo CA")
        pem, key_pem = make_client_certificate(ca, ca_key, user=CERT_USER)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "gateway-cert.pem").write_bytes(pem)
        key_file = self.workdir / "gateway-key.pem"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        return ca

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def _start_gateway(self, settings: Settings) -> None:
        proxy, admin = create_apps(settings)
        for app, listen in ((proxy, settings.listen), (admin, settings.admin_listen)):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            host, port = parse_hostport(listen)
            await web.TCPSite(runner, host, port).start()
            self.runners.append(runner)

    async def _seed(self, settings: Settings) -> None:
        from gateway.authserver import AuthAdmin
        from gateway.protocol.tokens import TokenDigester
        from gateway.state.connection import digest_key

        redis = connect(settings.redis_url)
        try:
            key = await digest_key(redis, settings.key_prefix, settings.token_digest_key)
            admin = AuthAdmin(redis, settings, TokenDigester(key))
            password = secrets.token_urlsafe(9)
            await admin.add_user(DEMO_USER, password, actor="demo")
            device, _ = await admin.create_client(
                name="Demo CLI (device flow)", grant="device_code", redirect_uris=[],
                scopes=[READ_SCOPES], actor="demo")
            web_client, secret = await admin.create_client(
                name="Demo web app (code flow)", grant="authorization_code",
                redirect_uris=["http://127.0.0.1:8765/callback"], scopes=[ALL_SCOPES],
                actor="demo")
        finally:
            await redis.aclose()
        self.info.update(password=password, device_client=device.client_id,
                         web_client=web_client.client_id, web_secret=secret)

    def print_panel(self) -> None:
        i = self.info
        models = f"$GATEWAY_ISSUER/2/0/workspaces/{anaplan.WORKSPACE}/models"
        task = (f"{models}/{anaplan.MODELS[0]['id']}/imports/112000000001/tasks")
        bearer = '-H "Authorization: Bearer $(oauth-gateway token --client-id $CLIENT)"'
        lines = [
            "oauth-gateway demo is running",
            "",
            f"  API base URL (the gateway)  {i['issuer']}",
            f"  Authorization server        {i['issuer']}/.well-known/oauth-authorization-server",
            f"  Metrics / health            {i['admin']}/metrics  /healthz  /readyz",
            f"  Anaplan API stand-in        {i['upstream']}  (reached only through the gateway)",
            f"  Anaplan token service       {i['auth_url']}  (stand-in, trusts the demo CA)",
            f"  Gateway's Anaplan identity  certificate of {CERT_USER}, signed by a test CA,",
            f"                              in {self.workdir}  (removed on exit)",
            f"  Redis                       {i['redis_url']}  ({i['redis_note']})",
            "",
            f"  Demo user                   {DEMO_USER} / {i['password']}",
            f"  Device-flow client          {i['device_client']}  (scopes: {READ_SCOPES})",
            f"  Code-flow client            {i['web_client']}",
            f"    its secret (shown once)   {i['web_secret']}",
            "",
            "The API upstream has credentials: service: at its first call the gateway signs in to",
            "the token service with its certificate and sends Anaplan its own AnaplanAuthToken;",
            "your Bearer token never leaves the gateway (the API stand-in takes no other token).",
            "",
            "Try it, in another terminal:",
            "",
            f"  export GATEWAY_ISSUER={i['issuer']} CLIENT={i['device_client']}",
            f"  export GATEWAY_REDIS_URL={i['redis_url']} GATEWAY_KEY_PREFIX={i['prefix']}",
            "",
            "  1. Log in with the device flow (open the URL it prints, sign in, approve):",
            "     oauth-gateway login --client-id $CLIENT",
            "  2. Call the API through the gateway:",
            f"     curl -i {bearer} \\",
            f"          {models}",
            "     X-Standin-Received shows what reached Anaplan: the token service's token (by its",
            "     SHA-256 prefix), not yours; this terminal logs every call the stand-ins receive.",
            "     Your token's SHA-256 prefix, to compare:",
            "     printf %s \"$(oauth-gateway token --client-id $CLIENT)\" | sha256sum | cut -c1-8",
            "  3. A write this client's scopes do not allow (403 insufficient_scope):",
            f"     curl -X POST {bearer} \\",
            f"          {task}",
            "  4. Disable the client, then repeat step 2 (401 invalid_token):",
            "     oauth-gateway clients disable $CLIENT --reason demo",
            "  5. Metrics (gateway_upstream_credential_refreshes_total: the gateway's own sign-ins",
            "     and refreshes at the token service):",
            f"     curl -s {i['admin']}/metrics | grep -E \\",
            "          'gateway_auth_decisions_total|gateway_upstream_credential_refreshes_total'",
            "",
            "Ctrl-C stops everything.",
        ]
        rule = "=" * min(100, max(len(line) for line in lines))
        print("\n".join([rule, *lines, rule]), file=self.out, flush=True)

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            # bounded: a listener that will not close must not keep the demo (and its
            # Redis) running after Ctrl-C
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), timeout=STOP_TIMEOUT)
        self.runners.clear()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None
        shutil.rmtree(self.workdir, ignore_errors=True)


async def _main(out: TextIO) -> None:
    demo = Demo(out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await demo.start()
        await stop.wait()
        print("\nstopping the demo... (Ctrl-C again to stop at once)", file=out, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stop_at_once, demo, out)
        await demo.stop()
    print("demo stopped; nothing left running", file=out, flush=True)


def _stop_at_once(demo: Demo, out: TextIO) -> None:
    """A second Ctrl-C: stop the embedded Redis (a process of its own) and exit now."""
    print("stopping at once", file=out, flush=True)
    if demo.embedded is not None:
        with contextlib.suppress(Exception):
            demo.embedded.stop()
    shutil.rmtree(demo.workdir, ignore_errors=True)
    os._exit(130)


def run() -> int:
    """Entry point of ``oauth-gateway demo``."""
    try:
        asyncio.run(_main(sys.stdout))
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"oauth-gateway demo: error: {exc}", file=sys.stderr)
        return 1
    return 0
