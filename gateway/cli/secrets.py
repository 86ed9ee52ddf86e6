"""``oauth-gateway secret-keys reseal``: the middle step of rotating ``GATEWAY_SECRET_KEYS``.

With the new key listed first (``NEW,OLD``) everywhere, this seals every value the fleet
keeps in Redis (service identities' tokens, people's Anaplan sign-ins) again under the
new key. Afterwards nothing needs the old key, and it can be retired at once; without
it, a person who has not used the gateway since would lose their Anaplan sign-in.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from redis.asyncio import Redis

from gateway.cli.backend import needs_redis
from gateway.cli.terminal import EXIT_FAIL, EXIT_OK, EXIT_USAGE, actor, err, out, with_redis
from gateway.config.settings import Settings
from gateway.state.events import append_audit, audit_entry
from gateway.state.keys import Keys
from gateway.state.sealing import Sealer, parse_secret_keys, reseal


def cmd_reseal(args: argparse.Namespace, settings: Settings) -> int:
    refused = needs_redis(args, "secret-keys reseal")
    if refused is not None:
        return refused
    try:
        sealer = Sealer(parse_secret_keys(settings.secret_keys))
    except ValueError as exc:
        err(f"{exc} (set GATEWAY_SECRET_KEYS as the gateways have it, the new key first)")
        return EXIT_USAGE
    keys = Keys(settings.key_prefix)

    async def action(redis: Redis) -> int:
        found = await reseal(redis, keys, sealer)
        counts: dict[str, Any] = asdict(found)
        await append_audit(redis, keys, audit_entry(
            "secret_keys.resealed", actor=actor(args),
            **{k: str(v) for k, v in counts.items()}))
        human = (f"{found.resealed} sealed again under the first key, {found.current} "
                 f"already under it, {found.unreadable} that no listed key opens")
        if found.unreadable:
            human += ("\nThe unreadable values were sealed with a key not listed now: "
                      "add it back after the first key and run this again, or leave them "
                      "(service tokens are signed in again; people sign in with Anaplan again).")
        out(args, human, counts)
        return EXIT_FAIL if found.unreadable else EXIT_OK

    return with_redis(settings, action, writes=True)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``secret-keys reseal``."""
    group = sub.add_parser("secret-keys", help="GATEWAY_SECRET_KEYS rotation")
    gsub = group.add_subparsers(dest="secret_keys_cmd", required=True)
    p = gsub.add_parser("reseal", parents=[common],
                        help="seal every sealed value in Redis again under the first key")
    p.add_argument("--actor", help="who (default: user@host)")
    p.set_defaults(func=cmd_reseal)
