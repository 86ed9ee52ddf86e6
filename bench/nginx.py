"""NGINX's own OAuth 2.0 token-introspection design, as a reference to set the gateway by.

The design is the one NGINX publishes ("Validating OAuth 2.0 access tokens with NGINX"):
every request goes through ``auth_request`` to an njs handler, which introspects the
bearer token with a subrequest to a ``proxy_pass`` location whose answers are kept by
``proxy_cache`` (keyed by the token, ``proxy_cache_lock`` so that concurrent requests
for one token share one call, 200s kept for :data:`CACHE_SECONDS`). The handler answers
204 (let through), 401 (no token, or inactive) or 403 (active, but without the scope
the route needs); ``auth_request`` then forwards over a keep-alive upstream pool.

The routes and scopes are the benchmark's policy (:data:`bench.harness.POLICY`): ``GET``
and ``HEAD`` under ``/2/0/`` need ``anaplan:read``, other methods ``anaplan:write``,
anything else is refused (403). The introspection call carries HTTP Basic client
credentials, as the gateway's does.

:class:`NginxProcess` writes the configuration and the njs module into a directory of
its own (pid file, error log, cache and every temp path there, nothing under
``/var/lib/nginx``) and runs ``nginx -p DIR -c nginx.conf -g 'daemon off;'``.
:func:`unavailable` says what to install when nginx or its njs module is missing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
from pathlib import Path

import aiohttp

from bench.harness import CLIENTS, POLICY, SMALL, Bench, Report, Row
from bench.load import LoadResult, TokenPlan, Workload, run_fixed_rate
from bench.processes import Managed, process_tree, set_affinity, wait_http
from bench.services import SMALL_JSON
from gateway.state.embedded import free_port

#: Debian's ``libnginx-mod-http-js``
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
#: how long an introspection answer of 200 is kept (``proxy_cache_valid``)
CACHE_SECONDS = 10
INSTALL = "apt-get install nginx-light libnginx-mod-http-js"

OAUTH2_JS = """\
// NGINX's token-introspection handler (njs): auth_request calls it for every request.
async function introspectAccessToken(r) {
    if (!r.variables.access_token) {
        r.return(401);
        return;
    }
    let reply;
    try {
        reply = await r.subrequest('/_oauth2_send_introspection_request');
    } catch (e) {
        r.error('introspection subrequest failed: ' + e);
        r.return(500);
        return;
    }
    if (reply.status != 200) {
        r.error('introspection answered ' + reply.status);
        r.return(500);
        return;
    }
    let info;
    try {
        info = JSON.parse(reply.responseText);
    } catch (e) {
        r.error('introspection answer is not JSON');
        r.return(500);
        return;
    }
    if (info.active !== true) {
        r.return(401);
        return;
    }
    const need = r.variables.required_scope;
    const scopes = typeof info.scope == 'string' ? info.scope.split(' ') : [];
    if (!need || scopes.indexOf(need) < 0) {
        r.return(403);
        return;
    }
    r.return(204);
}

function version(r) {
    r.return(200, njs.version);
}

export default {introspectAccessToken, version};
"""

CONF = """\
load_module {module};
{user}
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    js_path {dir};
    js_import oauth2 from oauth2.js;

    # where nothing is meant to go, but nginx insists on a directory: never /var/lib/nginx
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    # one line per request, as the gateway's access log (which the benchmark sends to
    # /dev/null); buffered, as an operator would
    access_log /dev/null combined buffer=64k;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;

    proxy_cache_path {dir}/cache levels=1 keys_zone=token_responses:1m max_size=64m;

    map $http_authorization $access_token {{
        "~*^bearer (.+)$" $1;
        default "";
    }}
    # the benchmark's policy: reads need anaplan:read, writes anaplan:write
    map $request_method $required_scope {{
        GET anaplan:read;
        HEAD anaplan:read;
        POST anaplan:write;
        PUT anaplan:write;
        PATCH anaplan:write;
        DELETE anaplan:write;
        default "";
    }}

    upstream api {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream introspection {{
        server {introspection};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port} reuseport backlog=1024;

        location /2/0/ {{
            auth_request /_oauth2_token_introspection;
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
        }}

        location / {{
            return 403;
        }}

        # for the benchmark's report only
        location = /_njs_version {{
            js_content oauth2.version;
        }}

        location = /_oauth2_token_introspection {{
            internal;
            js_content oauth2.introspectAccessToken;
        }}

        location /_oauth2_send_introspection_request {{
            internal;
            proxy_method POST;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Basic {basic}";
            proxy_set_header Content-Type application/x-www-form-urlencoded;
            proxy_set_body "token=$access_token&token_type_hint=access_token";
            proxy_pass_request_headers off;
            proxy_cache token_responses;
            proxy_cache_key $access_token;
            proxy_cache_lock on;
            proxy_cache_valid 200 {cache_seconds}s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_pass http://introspection/introspect;
        }}
    }}
}}
"""


STATIC_CONF = """\
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def binary() -> str | None:
    """nginx on PATH, or in /usr/sbin where Debian puts it (not on a user's PATH)."""
    return shutil.which("nginx", path=os.pathsep.join(
        (os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin")))


def unavailable() -> str | None:
    """Why the nginx reference cannot run here (what to install), or None."""
    if binary() is None:
        return f"nginx is not on PATH ({INSTALL})"
    if not NJS_MODULE.exists():
        return f"nginx's njs module {NJS_MODULE} is missing ({INSTALL})"
    return None


def _hostport(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


class NginxProcess(Managed):
    """nginx with ``workers`` worker processes in NGINX's introspection design, in front
    of ``upstream`` and the RFC 7662 endpoint at ``introspection`` (base URLs), which it
    calls with ``credentials`` (client id and secret, HTTP Basic)."""

    def __init__(self, workdir: Path, *, upstream: str, introspection: str, workers: int = 1,
                 credentials: tuple[str, str], name: str | None = None,
                 cpus: set[int] | None = None) -> None:
        name = name or f"nginx-{workers}"
        super().__init__(name, workdir, cpus)
        self.dir = workdir / name
        self.port = free_port()
        self.workers = workers
        basic = base64.b64encode(":".join(credentials).encode()).decode()
        self.config = CONF.format(
            module=NJS_MODULE, user="user root;" if os.geteuid() == 0 else "",
            workers=workers, dir=self.dir, upstream=_hostport(upstream),
            introspection=_hostport(introspection), port=self.port, basic=basic,
            cache_seconds=CACHE_SECONDS)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The master and its workers (and cache manager/loader), for their CPU time."""
        return process_tree(self.pid)

    async def start(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "nginx.conf").write_text(self.config)
        (self.dir / "oauth2.js").write_text(OAUTH2_JS)
        nginx = binary()
        assert nginx is not None
        # -e: the error log before the configuration is read, which is otherwise
        # /var/log/nginx/error.log
        self.spawn([nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                    "-e", str(self.dir / "error.log"), "-g", "daemon off;"])
        await wait_http(self.url + "/", self, want=403)
        if self.cpus:  # the workers were forked after spawn() pinned the master: make sure
            for pid in self.pids():
                set_affinity(pid, self.cpus)

    def failure(self) -> str:
        text = super().failure()
        try:
            log = (self.dir / "error.log").read_text(errors="replace")[-2000:]
        except OSError:
            return text
        return f"{text}\nerror.log: {log.strip()}"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGQUIT (graceful: workers finish and exit), then the usual escalation."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        super().stop(timeout)


class StaticUpstream(NginxProcess):
    """nginx answering every request with the stand-in upstream's small JSON body: the
    upstream of the ``nginx`` scenario, for both proxies. The aiohttp stand-in spends
    ~100 µs of CPU a request on the CPU it shares with the load generator, which then
    bounds both proxies' rate (and the open-loop generator's timing) more than they do."""

    def __init__(self, workdir: Path) -> None:
        Managed.__init__(self, "nginx-upstream", workdir, None)
        self.dir = workdir / "nginx-upstream"
        self.port = free_port()
        self.workers = 1
        self.config = STATIC_CONF.format(
            user="user root;" if os.geteuid() == 0 else "", dir=self.dir, port=self.port,
            body=SMALL_JSON.decode())

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "nginx.conf").write_text(self.config)
        nginx = binary()
        assert nginx is not None
        self.spawn([nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                    "-e", str(self.dir / "error.log"), "-g", "daemon off;"])
        await wait_http(self.url + "/2/0/workspaces", self, want=200)


# -- the scenario ----------------------------------------------------------------------

async def versions(url: str) -> str:
    """``nginx 1.22.1, njs 0.7.9``: what answered at ``url`` (njs's from njs itself)."""
    proc = await asyncio.create_subprocess_exec(
        binary() or "nginx", "-v", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()  # "nginx version: nginx/1.22.1" on stderr
    njs = "?"
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        async with aiohttp.ClientSession() as session, session.get(
                url + "/_njs_version", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            njs = (await resp.text()).strip()
    return f"nginx {err.decode().strip().rpartition('/')[2] or '?'}, njs {njs}"


async def scenario(bench: Bench, report: Report) -> None:
    """``--scenarios nginx``: NGINX's introspection design against the gateway with as
    many workers, 1 (pinned as the proxy under test) and 2 (every CPU), closed loop;
    then both open loop at half the gateway's saturation."""
    reason = unavailable()
    if reason is not None:
        report.notes.append(f"nginx: skipped, {reason}")
        return
    workload = Workload(SMALL, TokenPlan("cycle", count=CLIENTS))
    rows: list[Row] = []
    latency = made = ""
    upstream = StaticUpstream(bench.workdir)
    await upstream.start()
    policy = bench.workdir / "policy-nginx-upstream.yaml"
    policy.write_text(POLICY.format(upstream=upstream.url))
    try:
        for workers in (1, 2):
            made, latency = await _pair(bench, rows, workload, workers, upstream, policy,
                                        made, latency)
    finally:
        upstream.stop()
    report.rows.extend(rows)
    ratios = ", ".join(f"{n} worker{'s' if n > 1 else ''} **{r.ratio:.2f}** (CPU/req "
                       f"{r.cpu_ratio:.2f})" for n, r in zip((1, 2), rows, strict=True))
    report.notes.append(
        f"nginx ({made}): the rows \"nginx design, N workers\" hold NGINX's token-"
        "introspection design (auth_request, njs, proxy_cache of introspection answers "
        f"for {CACHE_SECONDS} s) in the *bare* columns, against the gateway with "
        f"GATEWAY_WORKERS=N: gateway/nginx req/s {ratios}; 1 worker pinned as the proxy "
        "under test, 2 on every CPU; both in front of the same nginx upstream answering "
        "the small JSON body")
    report.notes.append(latency)


async def _pair(bench: Bench, rows: list[Row], workload: Workload, workers: int,
                upstream: StaticUpstream, policy: Path, made: str, latency: str
                ) -> tuple[str, str]:
    """One row: nginx's design and the gateway with ``workers`` each."""
    label = f"nginx design, {workers} worker{'s' if workers > 1 else ''}"
    with bench.unpinned() if workers > 1 else contextlib.nullcontext():
        settings = bench.gateway_settings()
        ng = NginxProcess(bench.workdir, upstream=upstream.url,
                          introspection=bench.introspection.url, workers=workers,
                          credentials=(settings["introspection_client_id"],
                                       settings["introspection_client_secret"]),
                          cpus=bench.proxy_cpus)
        try:
            await ng.start()
            async with bench.gateway(workers=str(workers), policies=str(policy)) as gw:
                rows.append(await bench.pair(label, gw, workload, bare=[ng]))
                if workers == 1:
                    made = await versions(ng.url)
                    latency = await _latency(bench, ng, gw.url, workload)
        finally:
            ng.stop()
    return made, latency


async def _latency(bench: Bench, ng: NginxProcess, gw_url: str, workload: Workload) -> str:
    """Both open loop at half the gateway's saturation (best of three 1-second closed-loop
    runs), alternating: the latency scenario's method, with nginx as the reference."""
    saturation = max([(await bench.load(gw_url, bench._next(gw_url, workload), 1.0)).rps
                      for _ in range(3)])
    rate = max(100.0, saturation / 2)
    seconds = max(2.0, bench.options.duration / 2)
    runs: dict[str, list[LoadResult]] = {"nginx": [], "gateway": []}
    for _ in range(2):
        for name, url in (("nginx", ng.url), ("gateway", gw_url)):
            runs[name].append(await run_fixed_rate(
                url, bench._next(url, workload), rate=rate, seconds=seconds / 2))
    p50 = {k: statistics.median(r.p50_ms for r in v) for k, v in runs.items()}
    p99 = {k: statistics.median(r.p99_ms for r in v) for k, v in runs.items()}
    errors = sum(r.errors for v in runs.values() for r in v)
    return (f"nginx latency at half the gateway's saturation ({rate:,.0f} req/s of "
            f"{saturation:,.0f}, open loop, 1 worker each): nginx p50 {p50['nginx']:.2f} / "
            f"p99 {p99['nginx']:.2f} ms, gateway p50 {p50['gateway']:.2f} / p99 "
            f"{p99['gateway']:.2f} ms: **p99 above nginx {p99['gateway'] - p99['nginx']:+.2f} "
            "ms**" + (f"; {errors} errors" if errors else ""))
