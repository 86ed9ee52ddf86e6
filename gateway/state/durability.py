"""Whether Redis keeps what it is given: its eviction policy and its persistence.

The built-in authorization server keeps its clients, users, grants, token records and
signing keys in Redis and nowhere else. A Redis whose ``maxmemory-policy`` evicts keys
drops them silently under memory pressure: ``allkeys-*`` evicts any key, ``volatile-*``
the keys with a TTL (refresh and access token records: a person's refresh token stops
working). Only ``noeviction`` keeps them; Redis then refuses writes when full, which the
server reports, instead of forgetting. A Redis that keeps nothing on disk (``save ""``
and ``appendonly no``) loses all of it on restart.

:func:`inspect` reads the three settings (``CONFIG GET``; managed services often forbid
it, which is said, not fatal); :meth:`Durability.assess` turns them into warning lines and,
for the built-in server, a refusal unless ``GATEWAY_REDIS_ALLOW_EVICTION`` accepts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from gateway.state.connection import is_cluster

SAFE_POLICY = "noeviction"

_BUILTIN_DATA = "the built-in authorization server's clients, users, grants and tokens"
_GATEWAY_DATA = "client and person records (gw:client:*, gw:user:*)"


@dataclass(frozen=True, slots=True)
class Durability:
    """What Redis said about keeping keys: ``policy`` is its ``maxmemory-policy`` (the
    worst of a cluster's primaries), ``persistence`` ``"aof"``, ``"rdb"``, ``"aof+rdb"`` or
    ``"none"``; both None when ``CONFIG GET`` was refused (``refused`` says how)."""

    policy: str | None
    persistence: str | None
    maxmemory: int | None = None
    refused: str = ""

    @property
    def can_evict(self) -> bool:
        """Whether the eviction policy can remove keys (unknown counts as no)."""
        return self.policy is not None and self.policy != SAFE_POLICY

    def assess(self, *, builtin: bool, allow_eviction: bool) -> tuple[list[str], str | None]:
        """``(warnings, refusal)``: lines to log, and why the process must not start
        (None: it may). Only the built-in server (``builtin``) is refused, and only for
        an evicting policy that ``allow_eviction`` does not accept."""
        data = _BUILTIN_DATA if builtin else _GATEWAY_DATA
        warnings: list[str] = []
        refusal: str | None = None
        if self.refused:
            warnings.append(
                f"cannot read Redis's maxmemory-policy and persistence ({self.refused}); "
                f"managed services often forbid CONFIG GET: make sure the policy is "
                f"{SAFE_POLICY} and persistence is on, or Redis may lose {data}")
            return warnings, None
        if self.can_evict:
            limit = "no maxmemory yet" if not self.maxmemory else f"maxmemory {self.maxmemory}"
            what = ("any key" if str(self.policy).startswith("allkeys")
                    else "the keys with a TTL (refresh and access token records)"
                    if str(self.policy).startswith("volatile") else "keys")
            line = (f"Redis's maxmemory-policy is {self.policy} ({limit}): under memory "
                    f"pressure it evicts {what}, and {data} vanish silently; set "
                    f"maxmemory-policy {SAFE_POLICY}")
            if builtin and not allow_eviction:
                refusal = (f"{line} (helm/oauth-gateway/README.md, Redis persistence), or "
                           "GATEWAY_REDIS_ALLOW_EVICTION=true to accept the risk")
            elif builtin:
                warnings.append(f"{line}; started anyway: GATEWAY_REDIS_ALLOW_EVICTION=true")
            else:
                warnings.append(line)
        if self.persistence == "none":
            warnings.append(
                f"Redis keeps nothing on disk (save \"\", appendonly no): a restart of Redis "
                f"loses {data}; turn on appendonly yes (or RDB snapshots)")
        return warnings, refusal


async def _config(redis: Redis, node: Any = None) -> dict[str, str]:
    names = ("maxmemory-policy", "maxmemory", "save", "appendonly")
    found: dict[str, str] = {}
    for name in names:  # one name a call: CONFIG GET of several needs Redis 7
        if node is None:
            answer = await redis.config_get(name)
        else:  # a cluster client takes the node to ask
            answer = await cast(Any, redis).config_get(name, target_nodes=node)
        found.update({str(k): str(v) for k, v in dict(answer).items()})
    return found


def _persistence(config: dict[str, str]) -> str:
    aof = config.get("appendonly", "no") == "yes"
    rdb = bool(config.get("save", "").strip())
    return "aof+rdb" if aof and rdb else "aof" if aof else "rdb" if rdb else "none"


async def inspect(redis: Redis) -> Durability:
    """Ask Redis (every primary of a cluster) how it evicts and persists. A refused
    ``CONFIG GET`` is reported in :attr:`Durability.refused`; other Redis errors raise."""
    try:
        if is_cluster(redis):
            nodes = cast(Any, redis).get_primaries()
            configs = [await _config(redis, node) for node in nodes]
        else:
            configs = [await _config(redis)]
    except ResponseError as exc:  # forbidden or renamed (NOPERM, unknown command)
        return Durability(None, None, refused=str(exc))
    if not configs or any("maxmemory-policy" not in c for c in configs):
        return Durability(None, None, refused="CONFIG GET answered nothing")
    evicting = [c for c in configs if c["maxmemory-policy"] != SAFE_POLICY]
    worst = evicting[0] if evicting else configs[0]
    kinds = {_persistence(c) for c in configs}
    persistence = "none" if "none" in kinds else sorted(kinds)[0]
    maxmemory = int(worst["maxmemory"]) if worst.get("maxmemory", "").isdigit() else None
    return Durability(worst["maxmemory-policy"], persistence, maxmemory)
