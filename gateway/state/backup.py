"""A consistent copy of the durable data in Redis, and its restore
(``oauth-gateway export`` / ``import``).

**What**: the keys :attr:`Keys.durable_patterns <gateway.state.keys.Keys.durable_patterns>`
names (client and person records, the built-in server's clients, users, signing keys,
grants and live token records), and the fleet's token-digest key. Not caches, sessions,
flows in progress, rate-limit or usage counters, nor the audit stream.

**Format**: JSON lines. The first is the header::

    {"format": "oauth-gateway-backup", "version": 1, "schema": 1, "at": 1767000000000,
     "time": "2026-...Z", "prefix": "gw:", "keys": 42, "digest_key": "sealed", ...}

then one line per key, in key order: ``{"key": "client:abc", "type": "hash", "pttl": -1,
"value": {...}}`` (``key`` without the prefix; ``pttl`` the milliseconds it had left at
``at``, -1 for none; ``value`` a string, a field map, a sorted member list, or
``[member, score]`` pairs).

**Secrets**: nothing is in clear that is not in clear in Redis, and Redis holds no
secret in clear: client secrets and passwords are hashes, tokens appear only as keyed
digests, signing keys and Anaplan sign-ins are sealed. The one exception is the digest
key itself (it keys those digests and the signing keys' cipher): the backup carries it
sealed with AES-256-GCM under ``GATEWAY_SECRET_KEYS`` (``"sealed"``), or not at all when
``GATEWAY_TOKEN_DIGEST_KEY`` holds it outside Redis (``"configured"``: the header keeps a
fingerprint, and the restore checks the same key is configured).

**Consistency**: the key names are listed (SCAN), WATCHed, listed again (a key created
in between means a retry), and every value with its TTL read in one MULTI/EXEC; a write
to any of them after the WATCH aborts the read, which is retried. A new grant or token
also adds to an index set that is watched, so the copy is one moment's state. When
writes keep overtaking the reads (a busy server), the copy is read by one Lua script
instead, atomic too; Redis serves nothing else while it runs. Redis Cluster is refused:
a transaction cannot span its slots.

**Restore** checks everything before it writes: the format and schema versions (a newer
one is refused), the prefix (the same: sealed values are bound to their keys), the key
count, every key name (only durable keys: a file cannot plant a cache entry), the digest
key. Existing keys are refused unless ``replace``. The writes go in one MULTI/EXEC; each
TTL is what was left at export time minus the time since, so a token expires when it
would have (already expired ones are left out).
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from gateway.state import connection
from gateway.state.events import ClientChanged, UserChanged, execute_and_publish
from gateway.state.keys import SCHEMA_VERSION, Keys
from gateway.state.sealing import Sealer

FORMAT = "oauth-gateway-backup"
VERSION = 1
"""The version of this file format; a restore refuses a newer one."""

_ATTEMPTS = 5  # WATCHed reads tried before the copy is read in one script
_TYPES = ("string", "hash", "set", "zset", "list")

# One atomic read of every key matching the patterns in ARGV: Redis runs nothing else
# meanwhile. Used when the WATCHed reads keep being overtaken by writes (a busy server).
_SNAPSHOT_LUA = """
local out = {redis.call('TIME')}
local seen = {}
for i = 1, #ARGV do
  local cursor = '0'
  repeat
    local page = redis.call('SCAN', cursor, 'MATCH', ARGV[i], 'COUNT', 1000)
    cursor = page[1]
    for _, name in ipairs(page[2]) do
      if not seen[name] then
        seen[name] = true
        local kind = redis.call('TYPE', name)['ok']
        local value = false
        if kind == 'string' then value = redis.call('GET', name)
        elseif kind == 'hash' then value = redis.call('HGETALL', name)
        elseif kind == 'set' then value = redis.call('SMEMBERS', name)
        elseif kind == 'zset' then value = redis.call('ZRANGE', name, 0, -1, 'WITHSCORES')
        elseif kind == 'list' then value = redis.call('LRANGE', name, 0, -1)
        elseif kind ~= 'none' then value = kind
        end
        if value then
          out[#out + 1] = {name, kind, redis.call('PTTL', name), value}
        end
      end
    end
  until cursor == '0'
end
return out
"""


class BackupError(Exception):
    """The copy or the restore cannot be made; the message says why."""


@dataclass(frozen=True, slots=True)
class Exported:
    """What :func:`export` wrote: the header and how many keys."""

    header: dict[str, Any]
    keys: int


@dataclass(slots=True)
class Imported:
    """What :func:`restore` did."""

    written: int = 0
    expired: int = 0
    replaced: int = 0
    clients: list[str] = field(default_factory=list)


def _fingerprint(digest_key: bytes) -> str:
    """Names the digest key without revealing it (a hash of a random 32-byte key)."""
    return hashlib.sha256(b"oauth-gateway backup digest key\0" + digest_key).hexdigest()[:16]


def _seal_aad(keys: Keys) -> bytes:
    return f"{FORMAT}\0{keys.relative(keys.digest_key)}".encode()


async def _names(redis: Redis, keys: Keys) -> list[str]:
    found: set[str] = set()
    for pattern in keys.durable_patterns:
        async for name in redis.scan_iter(match=pattern, count=1000):
            found.add(str(name))
    return sorted(found)


def _read(pipe: Any, kind: str, name: str) -> None:
    if kind == "string":
        pipe.get(name)
    elif kind == "hash":
        pipe.hgetall(name)
    elif kind == "set":
        pipe.smembers(name)
    elif kind == "zset":
        pipe.zrange(name, 0, -1, withscores=True)
    else:
        pipe.lrange(name, 0, -1)


def _value(kind: str, raw: Any) -> Any:
    if kind == "set":
        return sorted(raw)
    if kind == "zset":
        return [[member, score] for member, score in raw]
    return raw


async def _snapshot(redis: Redis, keys: Keys) -> tuple[int, list[dict[str, Any]]]:
    """``(at_ms, records)``: every durable key's type, TTL and value at one moment."""
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(_ATTEMPTS):
            try:
                names = await _names(redis, keys)
                if names:
                    await pipe.watch(*names)
                # listed again once watched: a key created between the listing and the
                # WATCH (a grant and its index entry) would otherwise be half in the copy
                if await _names(redis, keys) != names:
                    await pipe.reset()  # type: ignore[no-untyped-call]
                    continue
                kinds_pipe = redis.pipeline(transaction=False)
                for name in names:
                    kinds_pipe.type(name)
                kinds = [str(k) for k in await kinds_pipe.execute()]
                unknown = {k for k in kinds if k not in _TYPES and k != "none"}
                if unknown:
                    raise BackupError(f"unexpected Redis types among the durable keys: "
                                      f"{', '.join(sorted(unknown))}")
                live = [(n, k) for n, k in zip(names, kinds, strict=True) if k != "none"]
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.time()
                for name, kind in live:
                    pipe.pttl(name)
                    _read(pipe, kind, name)
                answers = await pipe.execute()
            except WatchError:
                continue
            seconds, micros = answers[0]
            at = int(seconds) * 1000 + int(micros) // 1000
            records = []
            for i, (name, kind) in enumerate(live):
                pttl, raw = int(answers[1 + 2 * i]), answers[2 + 2 * i]
                if pttl == -2 or raw is None:  # expired between the listing and the read
                    continue
                records.append({"key": keys.relative(name), "type": kind,
                                "pttl": pttl, "value": _value(kind, raw)})
            return at, records
    return await _scripted_snapshot(redis, keys)


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


async def _scripted_snapshot(redis: Redis, keys: Keys) -> tuple[int, list[dict[str, Any]]]:
    """The copy read by one Lua script: atomic however busy Redis is, which waits for it
    (about a second per hundred thousand keys)."""
    answer: Any = await redis.eval(_SNAPSHOT_LUA, 0, *keys.durable_patterns)
    seconds, micros = answer[0]
    records = []
    for name, kind, pttl, raw in sorted(answer[1:]):
        if kind not in _TYPES:
            raise BackupError(f"unexpected Redis type among the durable keys: {kind}")
        value = dict(_pairs(raw)) if kind == "hash" else [
            [member, float(score)] for member, score in _pairs(raw)] if kind == "zset" \
            else sorted(raw) if kind == "set" else raw
        records.append({"key": keys.relative(str(name)), "type": kind, "pttl": int(pttl),
                        "value": value})
    return int(seconds) * 1000 + int(micros) // 1000, records


async def export(redis: Redis, keys: Keys, *, secret_keys: list[bytes],
                 configured_digest_key: bytes | None) -> tuple[dict[str, Any], list[str]]:
    """``(header, lines)``: the backup, header line first, every line JSON."""
    if connection.is_cluster(redis):
        raise BackupError("Redis Cluster: a consistent copy needs one transaction, which "
                          "cannot span the cluster's slots; back up each node's RDB/AOF")
    at, records = await _snapshot(redis, keys)
    header: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "schema": SCHEMA_VERSION, "at": at,
        "time": datetime.datetime.fromtimestamp(at / 1000, datetime.UTC).isoformat(
            timespec="seconds").replace("+00:00", "Z"),
        "prefix": keys.prefix}
    if configured_digest_key is not None:
        header["digest_key"] = "configured"
        header["digest_key_id"] = _fingerprint(configured_digest_key)
    else:
        stored = await redis.get(keys.digest_key)
        if stored is None:
            header["digest_key"] = "absent"
        elif not secret_keys:
            raise BackupError(
                "the token-digest key is kept in Redis and a backup carries it sealed under "
                "GATEWAY_SECRET_KEYS, which is not set: set it (or GATEWAY_TOKEN_DIGEST_KEY)")
        else:
            plain = bytes.fromhex(str(stored))
            header["digest_key"] = "sealed"
            header["digest_key_id"] = _fingerprint(plain)
            records.append({"key": keys.relative(keys.digest_key), "type": "string",
                            "pttl": -1, "sealed": Sealer(secret_keys).seal(
                                str(stored).encode(), _seal_aad(keys))})
    records.sort(key=lambda r: str(r["key"]))
    header["keys"] = len(records)
    lines = [json.dumps(header, sort_keys=True)]
    lines.extend(json.dumps(r, sort_keys=True, separators=(",", ":")) for r in records)
    return header, lines


# -- restore -------------------------------------------------------------------

def _parse(lines: Iterable[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    it: Iterator[str] = (line for line in lines if line.strip())
    try:
        header = json.loads(next(it))
    except StopIteration:
        raise BackupError("the file is empty") from None
    except ValueError:
        raise BackupError("the first line is not a backup header (JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BackupError(f"not an {FORMAT} file")
    version, schema = header.get("version"), header.get("schema")
    if not isinstance(version, int) or not isinstance(schema, int) \
            or not isinstance(header.get("at"), int) or not isinstance(header.get("keys"), int):
        raise BackupError("the header lacks its version, schema, time or key count")
    if version > VERSION:
        raise BackupError(f"the file is format version {version}; this release reads "
                          f"version {VERSION} and older: restore it with a newer release")
    if schema > SCHEMA_VERSION:
        raise BackupError(f"the file holds Redis schema version {schema}; this release knows "
                          f"version {SCHEMA_VERSION}: restore it with a newer release")
    records = []
    for number, line in enumerate(it, start=2):
        try:
            record = json.loads(line)
        except ValueError:
            raise BackupError(f"line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str) \
                or record.get("type") not in _TYPES or not isinstance(record.get("pttl"), int):
            raise BackupError(f"line {number} is not a key record")
        records.append(record)
    if len(records) != header["keys"]:
        raise BackupError(f"the header counts {header['keys']} keys, the file holds "
                          f"{len(records)}: it is truncated or edited")
    return header, records


def _check_name(keys: Keys, record: dict[str, Any]) -> str:
    """The absolute key of a record, refused unless it is a durable one."""
    name = keys.absolute(record["key"])
    if name == keys.digest_key:
        if not isinstance(record.get("sealed"), str):
            raise BackupError("the digest key's record is not sealed")
        return name
    if not any(fnmatch.fnmatchcase(name, p) for p in keys.durable_patterns):
        raise BackupError(f"{record['key']!r} is not a key a backup holds; refused")
    value, kind = record.get("value"), record["type"]
    valid = (isinstance(value, str) if kind == "string"
             else isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
             if kind == "hash" else isinstance(value, list))
    if not valid:
        raise BackupError(f"{record['key']!r}: its value is not a {kind}")
    return name


def _write(pipe: Any, name: str, kind: str, value: Any) -> None:
    if kind == "string":
        pipe.set(name, value)
    elif kind == "hash":
        if value:
            pipe.hset(name, mapping=value)
    elif kind == "set":
        if value:
            pipe.sadd(name, *value)
    elif kind == "zset":
        if value:
            pipe.zadd(name, {str(m): float(s) for m, s in value})
    elif value:
        pipe.rpush(name, *value)


async def restore(redis: Redis, keys: Keys, lines: Iterable[str], *, replace: bool,
                  secret_keys: list[bytes], configured_digest_key: bytes | None) -> Imported:
    """Write a backup's keys into Redis (all or none); raise :class:`BackupError`."""
    if connection.is_cluster(redis):
        raise BackupError("Redis Cluster: a restore is one transaction, which cannot span "
                          "the cluster's slots")
    header, records = _parse(lines)
    if header.get("prefix") != keys.prefix:  # sealed values are bound to their full key
        raise BackupError(f"the backup's keys are under {header.get('prefix')!r}, this "
                          f"Redis's under {keys.prefix!r}: set GATEWAY_KEY_PREFIX to the "
                          "backup's (sealed values are bound to their keys)")
    plan: list[tuple[str, str, Any, int]] = []  # name, type, value, pttl (-1: none)
    elapsed = max(0, int(time.time() * 1000) - int(header["at"]))
    result = Imported()
    for record in records:
        name = _check_name(keys, record)
        value = record.get("value")
        if name == keys.digest_key:
            if not secret_keys:
                raise BackupError("the backup's digest key is sealed under GATEWAY_SECRET_KEYS,"
                                  " which is not set")
            opened = Sealer(secret_keys).open(record["sealed"], _seal_aad(keys))
            if opened is None:
                raise BackupError("GATEWAY_SECRET_KEYS does not open the backup's digest key "
                                  "(another key sealed it, or the file was altered)")
            value = opened.decode()
        pttl = int(record["pttl"])
        if pttl >= 0:
            pttl -= elapsed
            if pttl <= 0:
                result.expired += 1
                continue
        plan.append((name, record["type"], value, pttl))
    same_key = configured_digest_key is not None and \
        _fingerprint(configured_digest_key) == header.get("digest_key_id")
    if header.get("digest_key") == "configured" and not same_key:
        raise BackupError("the backup was made with GATEWAY_TOKEN_DIGEST_KEY set; set the "
                          "same key here, or its token records and signing keys are lost")
    existing_pipe = redis.pipeline(transaction=False)
    for name, *_ in plan:
        existing_pipe.exists(name)
    existing = [name for (name, _, value, _), n in zip(
        plan, await existing_pipe.execute(), strict=True)
        if n and not (name == keys.digest_key and await redis.get(name) == value)]
    if existing and not replace:
        raise BackupError(f"{len(existing)} of the backup's keys exist already (first: "
                          f"{keys.relative(existing[0])}); --replace overwrites them")
    pipe = connection.pipeline(redis)
    for name, kind, value, pttl in plan:
        pipe.delete(name)
        _write(pipe, name, kind, value)
        if pttl > 0:
            pipe.pexpire(name, pttl)
    changed: list[ClientChanged | UserChanged] = []
    for name, *_ in plan:
        if fnmatch.fnmatchcase(name, keys.client_pattern):
            changed.append(ClientChanged(keys.client_id_of(name)))
            result.clients.append(keys.client_id_of(name))
        elif fnmatch.fnmatchcase(name, keys.user_pattern):
            changed.append(UserChanged(keys.user_subject_of(name)))
    await execute_and_publish(redis, pipe, keys, changed)  # replicas re-read the records
    result.written, result.replaced = len(plan), len(existing)
    return result
