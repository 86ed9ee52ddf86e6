"""How the gateway authenticates as an OAuth client to someone else's server."""

from __future__ import annotations

from urllib.parse import quote_plus

import aiohttp


def client_secret_basic(client_id: str, client_secret: str) -> str:
    """The ``Authorization`` value of RFC 6749 section 2.3.1 ``client_secret_basic``: id and
    secret each form-urlencoded (appendix B) before they are joined and base64-encoded,
    so a ``:`` or a non-ASCII character in either survives."""
    return aiohttp.encode_basic_auth(quote_plus(client_id), quote_plus(client_secret))
