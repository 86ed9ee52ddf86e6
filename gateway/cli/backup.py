"""``oauth-gateway export [FILE|-]`` and ``oauth-gateway import FILE|- [--replace]``: a
consistent backup of the durable data in Redis, and its restore
(:mod:`gateway.state.backup` has the format and what it holds).

Both write an audit entry (``backup.exported``, ``backup.imported``) with the actor, the
file and the key count. A file is written with mode 0600, complete or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from gateway.cli.backend import needs_redis
from gateway.cli.terminal import EXIT_FAIL, EXIT_OK, EXIT_USAGE, actor, err, out, with_redis
from gateway.config.settings import Settings
from gateway.state import backup, events
from gateway.state import connection as store
from gateway.state.keys import Keys
from gateway.state.sealing import parse_secret_keys


def _secret_keys(settings: Settings) -> list[bytes]:
    return parse_secret_keys(settings.secret_keys) if settings.secret_keys.strip() else []


async def _configured_digest_key(redis: Redis, settings: Settings) -> bytes | None:
    if not settings.token_digest_key:
        return None
    return await store.digest_key(redis, settings.key_prefix, settings.token_digest_key)


def _write_file(path: str, lines: list[str]) -> None:
    """Write ``lines`` to ``path`` whole (a temporary file renamed), readable by its owner
    only: the backup holds hashes and sealed values, still not for everyone's eyes."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    refused = needs_redis(args, "export")
    if refused is not None:
        return refused
    try:
        secret_keys = _secret_keys(settings)
    except ValueError as exc:
        err(str(exc))
        return EXIT_USAGE
    to_stdout = args.file == "-"

    async def action(redis: Redis) -> int:
        keys = Keys(settings.key_prefix)
        try:
            header, lines = await backup.export(
                redis, keys, secret_keys=secret_keys,
                configured_digest_key=await _configured_digest_key(redis, settings))
        except backup.BackupError as exc:
            err(str(exc))
            return EXIT_FAIL
        try:
            if to_stdout:
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
            else:
                _write_file(args.file, lines)
        except OSError as exc:
            err(f"cannot write {args.file}: {exc}")
            return EXIT_FAIL
        await events.append_audit(redis, keys, events.audit_entry(
            "backup.exported", actor=actor(args), file=args.file, keys=str(header["keys"]),
            digest_key=str(header.get("digest_key"))))
        summary: dict[str, Any] = {"file": args.file, "keys": header["keys"],
                                   "time": header["time"], "version": header["version"],
                                   "schema": header["schema"],
                                   "digest_key": header.get("digest_key")}
        if to_stdout:  # standard output is the backup: the summary goes to stderr
            print(f"exported {header['keys']} keys", file=sys.stderr)
        else:
            out(args, f"exported {header['keys']} keys to {args.file} (format version "
                      f"{header['version']}, schema {header['schema']}, digest key "
                      f"{header.get('digest_key')})", summary)
        return EXIT_OK

    return with_redis(settings, action)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    refused = needs_redis(args, "import")
    if refused is not None:
        return refused
    try:
        secret_keys = _secret_keys(settings)
    except ValueError as exc:
        err(str(exc))
        return EXIT_USAGE
    try:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        err(f"cannot read {args.file}: {exc}")
        return EXIT_FAIL

    async def action(redis: Redis) -> int:
        keys = Keys(settings.key_prefix)
        try:
            done = await backup.restore(
                redis, keys, lines, replace=args.replace, secret_keys=secret_keys,
                configured_digest_key=await _configured_digest_key(redis, settings))
        except backup.BackupError as exc:
            err(f"nothing imported: {exc}")
            return EXIT_FAIL
        await store.claim_schema(redis, keys)  # after: a refused file writes nothing
        await events.append_audit(redis, keys, events.audit_entry(
            "backup.imported", actor=actor(args), file=args.file, keys=str(done.written),
            expired=str(done.expired), replaced=str(done.replaced)))
        out(args, f"imported {done.written} keys from {args.file} ({done.expired} expired "
                  f"since the export left out, {done.replaced} existing replaced); restart "
                  "running gateways if the token-digest key was replaced",
            {"file": args.file, "keys": done.written, "expired": done.expired,
             "replaced": done.replaced})
        return EXIT_OK

    return with_redis(settings, action)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``export`` and ``import`` on the top-level subcommands."""
    p = sub.add_parser(
        "export", parents=[common], help="back up the durable data in Redis (JSON lines)",
        description="Write a consistent copy of the built-in server's clients, users, "
        "grants, live token records and signing keys, and the client and person records "
        "(no caches, no counters). Secrets stay hashed or sealed; the token-digest key is "
        "sealed under GATEWAY_SECRET_KEYS.")
    p.add_argument("file", nargs="?", default="-", help="where (default -: standard output)")
    p.add_argument("--actor", help="who (default: user@host)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "import", parents=[common], help="restore a backup made by export",
        description="Restore a backup into Redis, all keys or none, each TTL shortened by "
        "the time since the export. Refuses a newer format or schema, and keys that exist "
        "already unless --replace.")
    p.add_argument("file", help="the backup, or - for standard input")
    p.add_argument("--replace", action="store_true", help="overwrite keys that exist")
    p.add_argument("--actor", help="who (default: user@host)")
    p.set_defaults(func=cmd_import)
