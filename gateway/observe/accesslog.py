"""One structured line per request, written off the request path.

The request path only appends the line's values to a list; a background task formats
the lines and writes them in one batch every 100 ms (a synchronous write per request
costs ~10% of throughput, and ``json.dumps`` per request another ~4%, see
docs/PERFORMANCE.md). The line never holds a token nor the Authorization header: only
what :meth:`AccessLog.record` is given.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any, TextIO, TypeVar

FIELDS = ("request_id", "method", "route", "client_id", "status", "decision", "duration_ms",
          "upstream_ms", "remote", "ts")
#: values made of these characters need no quoting in either format
_PLAIN = re.compile(r"[A-Za-z0-9._:/@+-]*")
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def _text_value(value: Any) -> str:
    # values such as client ids come from outside: quote anything that could forge a
    # field or a line
    text = str(value)
    if not text or any(c in text for c in ' ="\\') or not text.isprintable():
        return json.dumps(text)
    return text


_K = TypeVar("_K")


def _remember(cache: dict[_K, str], key: _K, value: str) -> str:
    """Keep ``value`` under ``key``; values come from outside (client ids), so the cache
    is emptied when full rather than left to grow."""
    if len(cache) >= 10_000:
        cache.clear()
    cache[key] = value
    return value


class AccessLog:
    """Buffered access log in ``json`` or ``text`` format."""

    def __init__(self, *, fmt: str = "json", stream: TextIO | None = None,
                 interval: float = 0.1, enabled: bool = True) -> None:
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout
        self.interval = interval
        self.enabled = enabled
        self._buffer: list[tuple[Any, ...]] = []
        # the part of a JSON line that recurs (method, route, client, status, decision),
        # and remote addresses, each quoted and joined once: most lines differ only in
        # their id, their timings and their time
        self._middles: dict[tuple[str, str, str, int, str], str] = {}
        self._remotes: dict[str | None, str] = {}

    def record(self, request_id: str, method: str, route: str, client_id: str, status: int,
               decision: str, seconds: float, upstream_seconds: float, remote: str | None
               ) -> None:
        """Hot path: keep the values, format them later."""
        if self.enabled:
            self._buffer.append((request_id, method, route, client_id, status, decision,
                                 seconds, upstream_seconds, remote, time.time()))

    @staticmethod
    def _json_string(value: str) -> str:
        return f'"{value}"' if _PLAIN.fullmatch(value) else _encode_json(value)

    def _middle(self, key: tuple[str, str, str, int, str]) -> str:
        method, route, client_id, status, decision = key
        q = self._json_string
        return _remember(self._middles, key, (
            f'"method":{q(method)},"route":{q(route)},"client_id":{q(client_id)},'
            f'"status":{status:d},"decision":{q(decision)}'))

    def _remote(self, remote: str | None) -> str:
        return _remember(self._remotes, remote,
                         "null" if remote is None else self._json_string(remote))

    def format(self, values: tuple[Any, ...]) -> str:
        """One line from the values :meth:`record` kept."""
        (request_id, method, route, client_id, status, decision, seconds, upstream, remote,
         ts) = values
        if self.fmt == "json":
            key = (method, route, client_id, status, decision)
            middle = self._middles.get(key) or self._middle(key)
            quoted_remote = self._remotes.get(remote) or self._remote(remote)
            rid = f'"{request_id}"' if _PLAIN.fullmatch(request_id) else _encode_json(request_id)
            return (f'{{"request_id":{rid},{middle},"duration_ms":{seconds * 1000:.3f},'
                    f'"upstream_ms":{upstream * 1000:.3f},"remote":{quoted_remote},'
                    f'"ts":{ts:.3f}}}')
        shown = (request_id, method, route, client_id, status, decision,
                 f"{seconds * 1000:.3f}", f"{upstream * 1000:.3f}", remote, f"{ts:.3f}")
        return " ".join(f"{k}={_text_value(v)}" for k, v in zip(FIELDS, shown, strict=True))

    def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            self.stream.write("\n".join(map(self.format, batch)) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full stdout must not stop the gateway
            pass

    async def run(self) -> None:
        """Background task: flush every ``interval``; flush once more when cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()
