"""One structured line per request, written off the request path.

The request path only appends the line's values to a list; a background task formats
the lines and writes them in one batch every 100 ms: a synchronous write, or a
``json.dumps``, per request costs a measurable share of throughput (docs/PERFORMANCE.md).
The line never holds a token nor the Authorization header: only
what :meth:`AccessLog.record` is given.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import time
from typing import Any, TextIO

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


def _json_string(value: str) -> str:
    return f'"{value}"' if _PLAIN.fullmatch(value) else _encode_json(value)


# The part of a JSON line that recurs (method, route, client, status, decision), and
# remote addresses, each quoted and joined once: most lines differ only in their id,
# their timings and their time. Bounded: the values come from outside (client ids).
@functools.lru_cache(maxsize=10_000)
def _middle(method: str, route: str, client_id: str, status: int, decision: str) -> str:
    q = _json_string
    return (f'"method":{q(method)},"route":{q(route)},"client_id":{q(client_id)},'
            f'"status":{status:d},"decision":{q(decision)}')


@functools.lru_cache(maxsize=10_000)
def _remote(remote: str | None) -> str:
    return "null" if remote is None else _json_string(remote)


class AccessLog:
    """Buffered access log in ``json`` or ``text`` format."""

    def __init__(self, *, fmt: str = "json", stream: TextIO | None = None,
                 interval: float = 0.1, enabled: bool = True) -> None:
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout
        self.interval = interval
        self.enabled = enabled
        self._buffer: list[tuple[Any, ...]] = []

    def record(self, request_id: str, method: str, route: str, client_id: str, status: int,
               decision: str, seconds: float, upstream_seconds: float, remote: str | None
               ) -> None:
        """Hot path: keep the values, format them later."""
        if self.enabled:
            self._buffer.append((request_id, method, route, client_id, status, decision,
                                 seconds, upstream_seconds, remote, time.time()))

    def format(self, values: tuple[Any, ...]) -> str:
        """One line from the values :meth:`record` kept."""
        (request_id, method, route, client_id, status, decision, seconds, upstream, remote,
         ts) = values
        if self.fmt == "json":
            middle = _middle(method, route, client_id, status, decision)
            quoted_remote = _remote(remote)
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
