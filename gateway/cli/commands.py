"""``oauth-gateway``: run the gateway and govern it.

    oauth-gateway serve [--config FILE]
    oauth-gateway policy check [PATH]
    oauth-gateway policy explain METHOD PATH [--policies PATH]
    oauth-gateway clients list | show ID | disable ID [--reason TEXT] | enable ID
    oauth-gateway tokens revoke TOKEN|-
    oauth-gateway audit tail [-n N]
    oauth-gateway export [FILE|-] | import FILE|- [--replace]

Every command reads the same settings as ``serve`` (``--config``, then ``GATEWAY_*``),
prints human-readable output, ``--json`` for machines, and exits non-zero on failure.
``clients``, ``grants``, ``users`` and ``audit`` act on Redis, or, given ``--server URL``
(or ``GATEWAY_SERVER``), on that server's admin API with the login of
``oauth-gateway login --admin --issuer URL`` (:mod:`gateway.cli.backend`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from redis.asyncio import Redis

from gateway import __version__
from gateway.cli import authserver as authserver_commands
from gateway.cli import backup as backup_commands
from gateway.cli import secrets as secrets_commands
from gateway.cli.backend import Backend, needs_redis, server_of, with_backend
from gateway.cli.terminal import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    actor,
    err,
    out,
    shown,
    when,
    with_redis,
)
from gateway.config.policy import PolicyError, load_policy
from gateway.config.settings import Settings, SettingsError, load_settings
from gateway.pipeline.paths import ReservedPaths, safe_path
from gateway.protocol.errors import GatewayError

# -- serve -----------------------------------------------------------------

def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.runtime.server import run

    try:
        load_policy(settings.policies)
    except PolicyError as exc:
        err(str(exc))
        return EXIT_USAGE
    return run(settings)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.demo.run import run as run_demo

    return run_demo()


def cmd_login(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.cli.login import ADMIN_SCOPE, CLI_CLIENT, LoginError, device_login

    issuer = args.issuer or settings.issuer or (server_of(args) if args.admin else None)
    if not issuer:
        err("give --issuer (or GATEWAY_ISSUER" + (", or GATEWAY_SERVER)" if args.admin else ")"))
        return EXIT_USAGE
    client_id, scope = args.client_id, args.scope
    if args.admin:  # the admin API's login: the built-in CLI client, asking gateway:admin
        if client_id not in (None, CLI_CLIENT):
            err(f"--admin signs in through the built-in client {CLI_CLIENT}: drop --client-id")
            return EXIT_USAGE
        scope = " ".join(dict.fromkeys([ADMIN_SCOPE, *(scope or "").split()]))
    try:
        asyncio.run(device_login(issuer, client_id or CLI_CLIENT, scope, admin=args.admin))
    except LoginError as exc:
        err(str(exc))
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    return EXIT_OK


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.cli.login import LoginError, current_token

    issuer = args.issuer or settings.issuer
    if not issuer:
        err("give --issuer (or GATEWAY_ISSUER)")
        return EXIT_USAGE
    try:
        print(shown(asyncio.run(current_token(issuer, args.client_id, admin=args.admin))))
    except LoginError as exc:
        err(str(exc))
        return EXIT_FAIL
    return EXIT_OK


# -- policy ----------------------------------------------------------------

def cmd_policy_check(args: argparse.Namespace, settings: Settings) -> int:
    location = args.path or settings.policies
    try:
        policy = load_policy(location)
    except PolicyError as exc:
        err(str(exc))
        return EXIT_FAIL
    out(args, f"OK: {len(policy.routes)} routes, {len(policy.upstreams)} upstreams in "
         f"{', '.join(policy.sources)}",
         {"ok": True, "routes": len(policy.routes), "upstreams": sorted(policy.upstreams),
          "files": policy.sources})
    return EXIT_OK


def cmd_policy_explain(args: argparse.Namespace, settings: Settings) -> int:
    try:
        policy = load_policy(args.policies or settings.policies)
    except PolicyError as exc:
        err(str(exc))
        return EXIT_FAIL
    method = args.method.upper()
    try:
        path = safe_path(args.path)
    except GatewayError as exc:
        out(args, f"refused before matching: 400 {exc.error}: {exc.description}",
             {"status": 400, "error": exc.error, "error_description": exc.description})
        return EXIT_FAIL
    if settings.issuer:
        try:
            ReservedPaths.builtin().check(method, path)
        except GatewayError as exc:
            out(args, f"the built-in authorization server's path (GATEWAY_ISSUER is set): "
                      f"no policy route is tried; outside its endpoints the gateway answers "
                      f"{exc.status} {exc.error}",
                 {"status": exc.status, "error": exc.error, "builtin": True, "path": path})
            return EXIT_FAIL
    match = policy.match(method, path)
    route = match.route
    if route is None:
        status, error = (405, "method_not_allowed") if match.method_mismatch else (404, "no_route")
        out(args, f"no route matches {method} {path}: the gateway answers {status} {error}",
             {"status": status, "error": error, "method": method, "path": path})
        return EXIT_FAIL
    target = route.upstream.url + args.path.split("#")[0]
    human = "\n".join([
        f"route:     {route.name} ({route.source})",
        f"matches:   {' '.join(sorted(route.methods))} {route.path}",
        f"scopes:    {' '.join(route.scopes) or '(none: any valid token)'}",
        f"upstream:  {route.upstream.name} -> {target}",
        f"token:     {route.upstream.credentials}"
        + (f" as {route.upstream.scheme}" if route.upstream.credentials == "forward" else ""),
    ])
    out(args, human, {"route": route.name, "source": route.source, "scopes": list(route.scopes),
                       "upstream": route.upstream.name, "url": target,
                       "methods": sorted(route.methods), "credentials": route.upstream.credentials,
                       "scheme": route.upstream.scheme})
    return EXIT_OK


# -- clients ---------------------------------------------------------------

def _shown_field(name: str, value: object) -> str:
    """One field of a record for people: a moment (``*_at``, epoch seconds) through
    :func:`when`, anything else through :func:`shown`."""
    if name.endswith("_at") and str(value).isdigit():
        return when(str(value))
    return shown(value)


def cmd_clients(args: argparse.Namespace, settings: Settings) -> int:
    async def action(backend: Backend) -> int:
        if args.clients_cmd == "list":
            rows = await backend.clients()
            lines = [f"{'CLIENT':<34} {'NAME':<24} {'FLOW':<18} {'STATUS':<9} "
                     f"{'INTROSPECT':<10} {'SCOPES':<30} UPDATED"]
            for r in rows:
                updated = when(r["updated_at"]) + f" by {shown(r.get('updated_by', '?'))}" \
                    if r.get("updated_at", "").isdigit() else "-"
                flow = "device_code" if r.get("grant_type", "").endswith("device_code") \
                    else r.get("grant_type", "-")
                lines.append(f"{shown(r['client_id']):<34} {shown(r.get('name', '-'))[:24]:<24} "
                             f"{shown(flow):<18} "
                             f"{'disabled' if r['disabled'] else 'enabled':<9} "
                             f"{'any' if r.get('introspect') else '-':<10} "
                             f"{shown(r.get('scopes', '(token)')):<30} {updated}")
            out(args, "\n".join(lines) if rows else "no client records", rows)
            return EXIT_OK
        if args.clients_cmd == "show":
            view = await backend.client(args.client_id)
            if not view:
                err(f"no record for client {args.client_id!r} (its tokens are governed by "
                     "the tokens alone)")
                return EXIT_FAIL
            out(args, "\n".join(f"{k:<22} {_shown_field(k, v)}" for k, v in view.items()),
                view)
            return EXIT_OK
        disabled = args.clients_cmd == "disable"
        view = await backend.set_client_disabled(args.client_id, disabled, actor=actor(args),
                                                 reason=args.reason or "")
        out(args, f"client {args.client_id} {'disabled' if disabled else 'enabled'}; every "
             "gateway replica enforces it within 100 ms", view)
        return EXIT_OK

    return with_backend(args, settings, action,
                        writes=args.clients_cmd in ("disable", "enable"))


# -- tokens ----------------------------------------------------------------

def cmd_tokens_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.cli.revocation import revoke_token

    refused = needs_redis(args, "tokens revoke")
    if refused is not None:
        return refused

    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    if not token:
        err("no token given")
        return EXIT_USAGE

    async def action(redis: Redis) -> int:
        result = await revoke_token(redis, settings, token)
        out(args, f"token {result.digest[:12]}… revoked: authorization server: "
             f"{result.authorization_server}; caches purged on every replica; refused for "
             f"the next {result.pinned_seconds}s at least",
             {"digest_prefix": result.digest[:12],
              "authorization_server": result.authorization_server,
              "pinned_seconds": result.pinned_seconds})
        failed = result.authorization_server.startswith(("failed", "unreachable"))
        return EXIT_FAIL if failed else EXIT_OK

    return with_redis(settings, action, writes=True)


# -- audit -----------------------------------------------------------------

def cmd_audit_tail(args: argparse.Namespace, settings: Settings) -> int:
    async def action(backend: Backend) -> int:
        rows = await backend.audit(args.n)
        lines = []
        for row in rows:
            at = row.get("at", "")
            stamp = when(at) if at.isdigit() else "?"
            rest = " ".join(f"{shown(k)}={_shown_field(k, v)}" for k, v in row.items()
                            if k not in ("id", "at", "action"))
            lines.append(f"{stamp} {shown(row.get('action', '?')):<18} {rest}")
        out(args, "\n".join(lines) or "the audit stream is empty", rows)
        return EXIT_OK

    return with_backend(args, settings, action)


# -- parser ----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oauth-gateway", description="OAuth token gateway for the Anaplan REST APIs.")
    parser.add_argument("--version", action="version", version=f"oauth-gateway {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML settings file")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    # the administrative commands: Redis directly, or a server's admin API
    admin = argparse.ArgumentParser(add_help=False, parents=[common])
    admin.add_argument("--server", metavar="URL",
                       help="talk to this server's admin API (its issuer URL) with the login "
                       "of `oauth-gateway login --admin`, not to Redis (default: "
                       "GATEWAY_SERVER)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the gateway")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the whole system on this machine (Ctrl-C stops it)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("login", parents=[common],
                       help="log in with the device flow; the token is kept in ~/.config")
    p.add_argument("--issuer", help="authorization server (default: GATEWAY_ISSUER)")
    p.add_argument("--client-id", help="the device client (default: oauth-gateway-cli, the "
                   "built-in server's)")
    p.add_argument("--scope", help="scopes to ask for (default: all of the client's)")
    p.add_argument("--admin", action="store_true",
                   help="sign in for the admin API (client oauth-gateway-cli, scope "
                   "gateway:admin); later commands use it with --server URL or GATEWAY_SERVER")
    p.set_defaults(func=cmd_login)
    p = sub.add_parser("token", parents=[common],
                       help="print a current access token from `login` (refreshed if needed)")
    p.add_argument("--issuer", help="authorization server (default: GATEWAY_ISSUER)")
    p.add_argument("--client-id", default="oauth-gateway-cli",
                   help="the device client (default: oauth-gateway-cli)")
    p.add_argument("--admin", action="store_true", help="the admin login's token")
    p.set_defaults(func=cmd_token)

    policy = sub.add_parser("policy", help="check and explain route policies")
    psub = policy.add_subparsers(dest="policy_cmd", required=True)
    p = psub.add_parser("check", parents=[common], help="validate policy files")
    p.add_argument("path", nargs="?", help="file or folder (default: GATEWAY_POLICIES)")
    p.set_defaults(func=cmd_policy_check)
    p = psub.add_parser("explain", parents=[common], help="which route a request matches")
    p.add_argument("method")
    p.add_argument("path")
    p.add_argument("--policies", help="file or folder (default: GATEWAY_POLICIES)")
    p.set_defaults(func=cmd_policy_explain)

    clients = sub.add_parser("clients", help="client records (Redis, or --server)")
    csub = clients.add_subparsers(dest="clients_cmd", required=True)
    p = csub.add_parser("list", parents=[admin], help="every client record")
    p.set_defaults(func=cmd_clients)
    p = csub.add_parser("show", parents=[admin], help="one client record")
    p.add_argument("client_id")
    p.set_defaults(func=cmd_clients)
    for name, what in (("disable", "refuse every token of a client"),
                       ("enable", "accept the client's tokens again")):
        p = csub.add_parser(name, parents=[admin], help=what)
        p.add_argument("client_id")
        p.add_argument("--reason", help="why (kept in the record and the audit stream)")
        p.add_argument("--actor", help="who (default: user@host)")
        p.set_defaults(func=cmd_clients)
    authserver_commands.add_client_commands(csub, admin)
    authserver_commands.add_groups(sub, admin)

    tokens = sub.add_parser("tokens", help="individual tokens")
    tsub = tokens.add_subparsers(dest="tokens_cmd", required=True)
    p = tsub.add_parser("revoke", parents=[admin],
                        help="revoke at the authorization server and purge every cache")
    p.add_argument("token", help="the token, or - to read it from standard input")
    p.set_defaults(func=cmd_tokens_revoke)

    audit = sub.add_parser("audit", help="the audit stream")
    asub = audit.add_subparsers(dest="audit_cmd", required=True)
    p = asub.add_parser("tail", parents=[admin], help="the latest audit entries")
    p.add_argument("-n", type=int, default=20, help="how many (default 20)")
    p.set_defaults(func=cmd_audit_tail)
    secrets_commands.add_commands(sub, admin)
    backup_commands.add_commands(sub, admin)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(getattr(args, "config", None))
    except SettingsError as exc:
        err(str(exc))
        return EXIT_USAGE
    code: int = args.func(args, settings)
    return code


if __name__ == "__main__":
    sys.exit(main())
