"""One structured line per request, written off the request path.

Lines are formatted cheaply on the request path, appended to a list, and written in
batches by a background task every 100 ms (a synchronous write per request costs
~10% of throughput, see PERF_NOTES.md). The line never holds a token nor the
Authorization header: only what :meth:`AccessLog.record` is given.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO


def _text_value(value: Any) -> str:
    # values such as client ids come from outside: quote anything that could forge a
    # field or a line
    text = str(value)
    if not text or any(c in text for c in ' ="\\') or not text.isprintable():
        return json.dumps(text)
    return text


class AccessLog:
    """Buffered access log in ``json`` or ``text`` format."""

    def __init__(self, *, fmt: str = "json", stream: TextIO | None = None,
                 interval: float = 0.1, enabled: bool = True) -> None:
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout
        self.interval = interval
        self.enabled = enabled
        self._buffer: list[str] = []

    def record(self, **fields: Any) -> None:
        if not self.enabled:
            return
        fields["ts"] = round(time.time(), 3)
        if self.fmt == "json":
            self._buffer.append(json.dumps(fields, separators=(",", ":")))
        else:
            self._buffer.append(" ".join(f"{k}={_text_value(v)}" for k, v in fields.items()))

    def flush(self) -> None:
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        try:
            self.stream.write("\n".join(lines) + "\n")
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
