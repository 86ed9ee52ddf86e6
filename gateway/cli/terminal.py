"""What every command shares: exit codes, printing for people or machines, the actor, Redis.

Both command modules (:mod:`gateway.cli.commands` and :mod:`gateway.cli.authserver`) use
these; neither imports the other's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config.settings import Settings
from gateway.state import connection as store
from gateway.state.keys import Keys

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

#: what a terminal would act on rather than show: C0 controls, DEL, C1 controls, and the
#: Unicode marks that reorder text (bidi embeddings, overrides, isolates, marks)
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_VISIBLE = str.maketrans({
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))},
    **{ord(c): f"\\u{ord(c):04x}" for c in _BIDI}})


def shown(text: object) -> str:
    """``text`` as a terminal may print it: control characters, line breaks and bidi
    marks written visibly (ESC as ``\\x1b``, U+202E as ``\\u202e``), so stored text
    (a user name typed at a login page, a device's name) cannot move the cursor, recolour,
    clear the screen, hide or reorder what follows. What is stored stays as typed, and
    ``--json`` output carries the true values (JSON escapes them itself)."""
    return str(text).translate(_VISIBLE)


def age(seconds: float) -> str:
    """A duration as people say it: ``45 s``, ``3 min``, ``2 h``, ``5 d`` (rounded down)."""
    seconds = int(abs(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def when(epoch: float | int | str | None, *, now: float | None = None) -> str:
    """A moment for people to read: local time to the minute and how long ago
    (``2026-12-05 15:45, 3 min ago``; ahead: ``2026-12-05 16:00, in 12 min``).

    Every time the CLI shows a person goes through here; ``--json`` keeps epoch seconds.
    No time (``0``, empty, not a number) is ``-``."""
    try:
        at = float(epoch or 0)
    except ValueError:
        return "-"
    if at <= 0:
        return "-"
    delta = (time.time() if now is None else now) - at
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(at))
    if abs(delta) < 1:
        return f"{stamp}, just now"
    return f"{stamp}, {age(delta)} ago" if delta > 0 else f"{stamp}, in {age(delta)}"


def out(args: argparse.Namespace, human: str, machine: Any) -> None:
    """Print ``machine`` as JSON under ``--json``, else the ``human`` text, each of its
    lines through :func:`shown`."""
    if getattr(args, "json", False):
        print(json.dumps(machine, indent=2, sort_keys=True))
    else:
        print("\n".join(shown(line) for line in human.split("\n")))


def err(message: str) -> None:
    """One error line on standard error, named for the command (through :func:`shown`)."""
    print(f"oauth-gateway: error: {shown(message)}", file=sys.stderr)


def actor(args: argparse.Namespace) -> str:
    """Who acts, for the audit stream: ``--actor``, else ``user@host``."""
    if getattr(args, "actor", None):
        return str(args.actor)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def redis_failed(settings: Settings, exc: RedisError) -> int:
    """Report a Redis failure without the URL's credentials; the exit code."""
    err(f"Redis at {settings.redis_url.split('@')[-1]} failed: {exc}")
    return EXIT_FAIL


def with_redis(settings: Settings, action: Callable[[Redis], Awaitable[int]], *,
               writes: bool = False) -> int:
    """Run ``action`` with a connected client for ``GATEWAY_REDIS_URL``; its exit code.
    A command that ``writes`` first records the schema version
    (:func:`gateway.state.connection.claim_schema`)."""
    async def main() -> int:
        redis = store.connect(settings.redis_url)
        try:
            await redis.ping()
            if writes:
                await store.claim_schema(redis, Keys(settings.key_prefix))
            return await action(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except RedisError as exc:
        return redis_failed(settings, exc)
