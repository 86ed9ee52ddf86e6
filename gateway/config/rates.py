"""Rate limits as operators write them: ``N/PERIOD``, e.g. ``600/60s``.

``N`` is a positive integer (requests, or route weight units); ``PERIOD`` is a positive
integer followed by ``s``, ``m`` or ``h`` (``60s``, ``1m``, ``1h``), or the unit alone
(``10/s`` = ``10/1s``). The same text is accepted in ``GATEWAY_DEFAULT_RATE_LIMIT``, a
client record's ``rate_limit`` field and ``oauth-gateway clients update --rate-limit``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: the form, as a regular expression (also the Helm schema's pattern, with the empty value)
RATE_PATTERN = r"^[1-9][0-9]{0,9}/([1-9][0-9]{0,6})?[smh]$"
_RATE = re.compile(RATE_PATTERN)
_UNIT = {"s": 1, "m": 60, "h": 3600}
#: the values that mean "no limit" where a limit may be cleared
NO_LIMIT = ("", "none")


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` units per fixed window of ``period`` seconds."""

    limit: int
    period: int

    def __str__(self) -> str:
        return f"{self.limit}/{self.period}s"


def parse_rate(text: str) -> Rate:
    """The :class:`Rate` ``text`` states; ``ValueError`` naming the expected form if none."""
    value = text.strip()
    if not _RATE.fullmatch(value):
        raise ValueError(f"expected N/PERIOD such as 600/60s (PERIOD in s, m or h), "
                         f"got {text!r}")
    count, _, period = value.partition("/")
    seconds = int(period[:-1] or "1") * _UNIT[period[-1]]
    return Rate(int(count), seconds)


def optional_rate(text: str) -> Rate | None:
    """``parse_rate``, except that ``""`` and ``none`` (any case) mean no limit."""
    if text.strip().lower() in NO_LIMIT:
        return None
    return parse_rate(text)
