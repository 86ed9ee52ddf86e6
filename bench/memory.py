"""RSS growth of the in-process token layer holding 100,000 tokens.

    python -m bench.memory [--tokens 100000]

Run in a fresh process (so nothing else in it grows meanwhile): fills a
:class:`~gateway.authn.cache.LocalCache` the way a Redis hit does (the cached JSON parsed by
:meth:`TokenInfo.from_json`, keyed by the token's keyed digest), with 300 clients and
two scopes per token, and prints one JSON object: tokens, RSS before and after, growth
in bytes and per token.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

from bench.processes import rss_bytes
from gateway.authn.cache import LocalCache
from gateway.authn.validators.base import TokenInfo
from gateway.protocol.tokens import TokenDigester


def measure(tokens: int, clients: int = 300) -> dict[str, float]:
    digester = TokenDigester(b"bench-digest-key-0123456789abcdef")
    exp = int(time.time()) + 3600
    gc.collect()
    before = rss_bytes(os.getpid())
    cache = LocalCache(tokens)
    expires = time.monotonic() + 3600
    for n in range(tokens):
        cached = json.dumps({"active": True, "client_id": f"client{n % clients}",
                             "scope": "anaplan:read anaplan:write", "exp": exp,
                             "sub": f"user{n}", "username": None}, separators=(",", ":"))
        cache.put(digester.digest(f"t{n}.bench0123456789abcdefghijklmnop"),
                  TokenInfo.from_json(cached), expires)
    gc.collect()
    after = rss_bytes(os.getpid())
    assert len(cache) == tokens
    return {"tokens": tokens, "rss_before": before, "rss_after": after,
            "growth": after - before, "per_token": (after - before) / tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--tokens", type=int, default=100_000)
    print(json.dumps(measure(parser.parse_args(argv).tokens)))


if __name__ == "__main__":
    main()
