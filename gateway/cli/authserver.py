"""CLI commands of the built-in authorization server (wired into ``gateway.cli``), on
Redis or, with ``--server URL``, on that server's admin API (:mod:`gateway.cli.backend`).

    oauth-gateway clients create --name N
                                 --grant authorization_code|device_code|client_credentials
                                 [--redirect-uri URI ...] [--scope "S1 S2"] [--introspect]
                                 [--json]
    oauth-gateway clients update ID [...] [--rate-limit N/PERIOD|none]
    oauth-gateway clients rotate-secret ID [--grace S] | delete ID
    oauth-gateway grants list [--client ID] [--user NAME] [--json] | revoke GRANT_ID
    oauth-gateway users list
    oauth-gateway users add USERNAME [--admin|--no-admin]   (password on standard input)
    oauth-gateway users update USERNAME --admin|--no-admin
    oauth-gateway users disable SUBJECT_OR_USERNAME [--reason TEXT] | enable SUBJECT_OR_USERNAME
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from gateway.cli.backend import Backend, with_backend
from gateway.cli.terminal import EXIT_OK, actor, out, shown, when
from gateway.config.rates import optional_rate
from gateway.config.settings import Settings

Printer = Callable[[argparse.Namespace, str, Any], None]


def _policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token policy (defaults: the tenant's GATEWAY_AS_* settings)")
    g.add_argument("--access-token-ttl", type=int, help="seconds (default 2100 = 35 min)")
    g.add_argument("--refresh-mode", choices=["rotatable", "non_rotatable"])
    g.add_argument("--refresh-token-ttl", type=int, help="seconds (default 43200, max 1 year)")
    g.add_argument("--idle-timeout", type=int, help="seconds without use that end a grant")
    g.add_argument("--grant-max-lifetime", type=int, help="absolute cap on a grant, seconds")


def _policy_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in (
        "access_token_ttl", "refresh_mode", "refresh_token_ttl", "idle_timeout",
        "grant_max_lifetime")}


def add_client_commands(csub: Any, common: argparse.ArgumentParser) -> None:
    p = csub.add_parser(
        "create", parents=[common], help="create an OAuth client (built-in AS)",
        description="Create an OAuth client of the built-in authorization server. Its "
        "secret, if it has one, is printed once: only a hash is kept.",
        epilog="grants: authorization_code (a web app acting for signed-in people; "
        "confidential, needs --redirect-uri); device_code (a command-line tool or device "
        "acting for a person; public); client_credentials (a machine with no person "
        "behind it; confidential; its tokens reach only upstreams with credentials: "
        "service).")
    p.add_argument("--name", required=True)
    p.add_argument("--grant", required=True,
                   choices=["authorization_code", "device_code", "client_credentials"],
                   help="the one flow this client may use (see below)")
    p.add_argument("--redirect-uri", action="append", default=[], dest="redirect_uris",
                   help="exact-match redirect URI (repeat, up to 60)")
    p.add_argument("--scope", action="append", default=[], dest="scopes",
                   help='allowed scopes, e.g. "anaplan:read anaplan:write"')
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--public", action="store_true",
                      help="no secret (PKCE only; the default for device_code)")
    kind.add_argument("--confidential", action="store_true",
                      help="a secret (the default for authorization_code and "
                      "client_credentials)")
    p.add_argument("--introspect", action="store_true",
                   help="a resource server: may introspect any token (confidential "
                   "clients only; others learn only about their own tokens)")
    p.add_argument("--actor", help="who (default: user@host)")
    _policy_args(p)
    p.set_defaults(func=run, as_cmd="create")

    p = csub.add_parser("update", parents=[common], help="change a client (built-in AS), or "
                        "any client's rate limit")
    p.add_argument("client_id")
    p.add_argument("--rate-limit", type=_rate_arg, metavar="N/PERIOD",
                   help="the client's limit across the fleet, e.g. 600/60s (PERIOD in s, m "
                   "or h); `none` or empty clears it (GATEWAY_DEFAULT_RATE_LIMIT applies). "
                   "Any client, the built-in server's or not")
    p.add_argument("--name")
    p.add_argument("--redirect-uri", action="append", dest="redirect_uris",
                   help="replaces the list (repeat)")
    p.add_argument("--scope", action="append", dest="scopes", help="replaces the scopes")
    p.add_argument("--introspect", action=argparse.BooleanOptionalAction, default=None,
                   help="may (or, with --no-introspect, may no longer) introspect any token")
    p.add_argument("--actor")
    _policy_args(p)
    p.set_defaults(func=run, as_cmd="update")

    p = csub.add_parser("rotate-secret", parents=[common], help="issue a new client secret")
    p.add_argument("client_id")
    p.add_argument("--grace", type=int, default=0,
                   help="seconds the old secret keeps working (default 0)")
    p.add_argument("--actor")
    p.set_defaults(func=run, as_cmd="rotate-secret")

    p = csub.add_parser("delete", parents=[common], help="delete a client and end its grants")
    p.add_argument("client_id")
    p.add_argument("--reason")
    p.add_argument("--actor")
    p.set_defaults(func=run, as_cmd="delete")


def _rate_arg(text: str) -> str:
    """``--rate-limit``: the normalized limit, or ``""`` to clear it."""
    try:
        rate = optional_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(rate) if rate is not None else ""


def _as_changes(args: argparse.Namespace) -> bool:
    """Whether ``clients update`` changes anything of a built-in server's client."""
    return any(v is not None for v in (args.name, args.redirect_uris, args.scopes,
                                       args.introspect, *_policy_of(args).values()))


async def _update(args: argparse.Namespace, backend: Backend, out: Printer, actor: str
                  ) -> None:
    """``clients update``: the built-in server's settings, then the rate limit (any client)."""
    changes = None
    if _as_changes(args) or args.rate_limit is None:
        changes = {"name": args.name, "redirect_uris": args.redirect_uris,
                   "scopes": args.scopes, "policy": _policy_of(args),
                   "introspect": args.introspect}
    view = await backend.update_client(args.client_id, changes=changes,
                                       rate_limit=args.rate_limit, actor=actor)
    message = f"client {args.client_id} updated"
    if args.rate_limit is not None:
        rate = optional_rate(args.rate_limit)
        message += (f"; rate limit {rate} across the fleet" if rate else
                    "; rate limit cleared (GATEWAY_DEFAULT_RATE_LIMIT applies)") + \
            "; every gateway replica applies it within 100 ms"
    out(args, message, view)


def add_groups(sub: Any, common: argparse.ArgumentParser) -> None:
    grants = sub.add_parser("grants", help="grants (one per user, client and device)")
    gsub = grants.add_subparsers(dest="grants_cmd", required=True)
    p = gsub.add_parser("list", parents=[common], help="list grants")
    p.add_argument("--client", dest="client_id")
    p.add_argument("--user", dest="username")
    p.set_defaults(func=run, as_cmd="grants-list")
    p = gsub.add_parser("revoke", parents=[common], help="end one grant (one device)")
    p.add_argument("grant_id")
    p.add_argument("--reason")
    p.add_argument("--actor")
    p.set_defaults(func=run, as_cmd="grants-revoke")

    users = sub.add_parser("users", help="local users of the built-in server")
    usub = users.add_subparsers(dest="users_cmd", required=True)
    p = usub.add_parser("list", parents=[common], help="every user (local and SSO)")
    p.set_defaults(func=run, as_cmd="users-list")
    p = usub.add_parser("add", parents=[common],
                        help="add a user or set a password (read from standard input)")
    p.add_argument("username")
    p.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                   help="give (or, with --no-admin, take away) the admin role: may approve "
                   "gateway:admin and use the admin API (default: unchanged; none for a "
                   "new user)")
    p.add_argument("--actor")
    p.set_defaults(func=run, as_cmd="users-add")
    p = usub.add_parser("update", parents=[common],
                        help="give or take away a user's admin role (no password asked)")
    p.add_argument("username")
    p.add_argument("--admin", action=argparse.BooleanOptionalAction, required=True,
                   help="--admin gives the role, --no-admin takes it away at the user's "
                   "next request")
    p.add_argument("--actor")
    p.set_defaults(func=run, as_cmd="users-update")
    for name, what in (("disable", "refuse every token of a person"),
                       ("enable", "accept the person's tokens again")):
        p = usub.add_parser(name, parents=[common], help=what)
        p.add_argument("person", metavar="SUBJECT_OR_USERNAME",
                       help="the tokens' subject, or a built-in server's username")
        p.add_argument("--reason", help="why (kept in the record and the audit stream)")
        p.add_argument("--actor", help="who (default: user@host)")
        p.set_defaults(func=run, as_cmd=f"users-{name}")


async def _dispatch(args: argparse.Namespace, backend: Backend, out: Printer, actor: str
                    ) -> int:
    cmd = args.as_cmd
    if cmd == "create":
        view, secret = await backend.create_client(
            name=args.name, grant=args.grant, redirect_uris=args.redirect_uris,
            scopes=args.scopes, actor=actor,
            confidential=True if args.confidential else False if args.public else None,
            policy=_policy_of(args), introspect=args.introspect)
        if secret:
            view["client_secret"] = secret
        lines = [f"client created: {shown(view['name'])}",
                 f"client_id:     {view['client_id']}"]
        if secret:
            lines += [f"client_secret: {secret}",
                      "               (shown once: store it now; only a hash is kept)"]
        lines += [f"flow:          {view['flow']}",
                  f"scopes:        {' '.join(view['scopes']) or '(none)'}",
                  f"introspect:    {'any token' if view['introspect'] else 'own tokens only'}"]
        out(args, "\n".join(lines), view)
    elif cmd == "update":
        await _update(args, backend, out, actor)
    elif cmd == "rotate-secret":
        secret = await backend.rotate_secret(args.client_id, actor=actor, grace=args.grace)
        grace = f"; the old secret works for {args.grace}s more" if args.grace else \
            "; the old secret no longer works"
        out(args, f"client_secret: {secret}\n(shown once{grace})",
            {"client_id": args.client_id, "client_secret": secret, "grace": args.grace})
    elif cmd == "delete":
        ended = await backend.delete_client(args.client_id, actor=actor,
                                            reason=args.reason or "")
        out(args, f"client {args.client_id} deleted; {ended} grants ended",
            {"client_id": args.client_id, "grants_ended": ended})
    elif cmd == "grants-list":
        rows = await backend.grants(client_id=args.client_id, username=args.username)
        lines = [f"{'GRANT':<20} {'CLIENT':<34} {'USER':<16} {'STATUS':<8} {'GRANTED':<28} "
                 f"{'LAST USED':<28} DEVICE"]
        for r in rows:
            user = shown(r["user"]) or "(machine)"  # a client_credentials grant has no user
            lines.append(f"{shown(r['grant_id']):<20} {shown(r['client_id']):<34} {user:<16} "
                         f"{'revoked' if r['revoked'] else 'active':<8} "
                         f"{when(r['created_at']):<28} {when(r['last_used_at']):<28} "
                         f"{shown(r['label'])}")
        out(args, "\n".join(lines) if rows else "no grants", rows)
    elif cmd == "grants-revoke":
        await backend.revoke_grant(args.grant_id, actor=actor, reason=args.reason or "")
        out(args, f"grant {args.grant_id} revoked; its tokens are refused at once",
            {"grant_id": args.grant_id, "revoked": True})
    elif cmd == "users-add":
        password = sys.stdin.readline().rstrip("\n")
        await backend.add_user(args.username, password, actor=actor, admin=args.admin)
        role = "" if args.admin is None else "; admin role " + (
            "given" if args.admin else "taken away")
        out(args, f"user {shown(args.username)} saved{role}", {
            "username": args.username, **({} if args.admin is None else {"admin": args.admin})})
    elif cmd == "users-update":
        view = await backend.set_admin(args.username, args.admin, actor=actor)
        out(args, f"user {shown(args.username)}: admin role "
            f"{'given' if args.admin else 'taken away'}", view)
    elif cmd in ("users-disable", "users-enable"):
        disabled = cmd == "users-disable"
        view = await backend.set_person_disabled(args.person, disabled, actor=actor,
                                                 reason=args.reason or "")
        subject, username = view["subject"], view["username"]
        who = f"user {shown(username)} (subject {shown(subject)})" if username \
            else f"subject {shown(subject)}"
        out(args, f"{who} {'disabled' if disabled else 'enabled'}; every gateway replica "
            "enforces it within 100 ms", view)
    elif cmd == "users-list":
        users = await backend.users()
        lines = [f"{'USER':<24} {'KIND':<6} {'ADMIN':<6} {'STATUS':<9} {'SUBJECT':<38} "
                 "CREATED"]
        lines += [f"{shown(u['username'])[:24]:<24} {shown(u['kind']):<6} "
                  f"{'yes' if u['admin'] else '-':<6} "
                  f"{'disabled' if u['disabled'] else 'enabled':<9} "
                  f"{shown(u['subject']):<38} {when(u['created_at'])}" for u in users]
        out(args, "\n".join(lines) if users else "no users", users)
    return EXIT_OK


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point for every command above (``args.as_cmd`` says which)."""
    async def action(backend: Backend) -> int:
        return await _dispatch(args, backend, out, actor(args))

    # every command but the lists writes
    return with_backend(args, settings, action,
                        writes=args.as_cmd not in ("grants-list", "users-list"))
