"""Request-path hygiene: refuse what could make the gateway and the upstream disagree.

The gateway matches routes on the decoded path and forwards the raw one. That is
only safe when both mean the same thing to every upstream, so anything a server
might interpret differently is refused with 400 before matching: dot-segments
(RFC 3986 section 5.2.4), encoded slashes and backslashes, backslashes, NUL and
other control characters, and double encoding of any of these.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from gateway.protocol.errors import InvalidRequest

# %2F (slash), %5C (backslash), %00 (NUL), %25 followed by hex (double encoding)
_ENCODED_DANGER = re.compile(r"%(?:2f|5c|00|25[0-9a-f]{2})", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def safe_path(raw_path: str) -> str:
    """Return the decoded path of ``raw_path`` (query removed), or raise 400.

    ``raw_path`` is the request target as sent (``/a/b%20c?x=1``).
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise InvalidRequest("The request path must be absolute.")
    if _ENCODED_DANGER.search(path):
        raise InvalidRequest(
            "The request path contains an encoded slash, backslash, NUL or a double encoding.")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("The request path is not UTF-8 once decoded.") from None
    if _CONTROL.search(decoded):
        raise InvalidRequest("The request path contains a backslash or a control character.")
    for segment in decoded.split("/"):
        # `..;x` is `..` to servlet containers, which drop `;params` from a segment
        if segment.split(";", 1)[0] in {".", ".."}:
            raise InvalidRequest("The request path contains a dot-segment.")
    return decoded
