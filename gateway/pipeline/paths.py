"""Request-path hygiene: refuse what could make the gateway and the upstream disagree.

The gateway matches routes on the decoded path and forwards the raw one. That is
only safe when both mean the same thing to every upstream, so anything a server
might interpret differently is refused with 400 before matching: dot-segments
(RFC 3986 section 5.2.4), encoded slashes and backslashes, backslashes, NUL and
other control characters, and double encoding of any of these; empty segments
(``//``, which servers merge or keep), a ``;`` anywhere in the path (servlet
containers drop ``;params`` from a segment before routing) and a ``#`` anywhere
in the request target (never sent by a browser, and what follows it would escape
the check while still reaching the upstream).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote

from aiohttp import web

from gateway.protocol.errors import InvalidRequest, MethodNotAllowed, NoRoute

# %2F (slash), %5C (backslash), %00 (NUL), %25 followed by hex (double encoding)
_ENCODED_DANGER = re.compile(r"%(?:2f|5c|00|25[0-9a-f]{2})", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def safe_path(raw_path: str) -> str:
    """Return the decoded path of ``raw_path`` (query removed), or raise 400.

    ``raw_path`` is the request target as sent (``/a/b%20c?x=1``).
    """
    if "#" in raw_path:
        raise InvalidRequest("The request target contains a `#`.")
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        raise InvalidRequest("The request path must be absolute.")
    if "//" in path:
        raise InvalidRequest("The request path contains an empty segment (`//`).")
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
    if ";" in decoded:  # `/models;x=1/M` is `/models/M` to a servlet container
        raise InvalidRequest("The request path contains a `;` (path parameters).")
    return decoded


#: where the built-in authorization server answers (``GATEWAY_ISSUER`` set): requests
#: under these prefixes never reach a policy route, whatever the policy says
BUILTIN_PREFIXES = ("/oauth/", "/.well-known/", "/token/", "/console/", "/admin/api/",
                    "/account/")


class ReservedPaths:
    """Path prefixes the proxy keeps from policy routes: the built-in server's.

    Its own endpoints are answered before the proxy is asked; what reaches the proxy
    under these prefixes (another method, an unknown path, the same path in another
    letter case) is refused rather than matched, so that a policy route such as
    ``/**`` can never send the built-in server's traffic to an upstream.
    ``endpoints`` maps each endpoint's path to its methods, for a 405 that names them.
    """

    def __init__(self, prefixes: tuple[str, ...] = (),
                 endpoints: Mapping[str, frozenset[str]] | None = None) -> None:
        self.prefixes = tuple(p.lower() for p in prefixes)
        self.bare = frozenset(p.rstrip("/") for p in self.prefixes)  # `/oauth` itself
        self.endpoints = dict(endpoints or {})

    @classmethod
    def builtin(cls) -> ReservedPaths:
        """The built-in server's prefixes, endpoints unknown (no app at hand)."""
        return cls(BUILTIN_PREFIXES)

    @classmethod
    def of_router(cls, router: web.UrlDispatcher,
                  prefixes: tuple[str, ...] = BUILTIN_PREFIXES) -> ReservedPaths:
        """The built-in server's prefixes, and the endpoints ``router`` has under them."""
        endpoints: dict[str, frozenset[str]] = {}
        for resource in router.resources():
            path = resource.canonical
            if path.lower().startswith(prefixes) and "{" not in path:
                endpoints[path] = frozenset(route.method for route in resource)
        return cls(prefixes, endpoints)

    def check(self, method: str, path: str) -> None:
        """Raise 404 or 405 when ``path`` (decoded, checked) is the built-in server's."""
        if not self.prefixes:
            return
        folded = path.lower()
        if not folded.startswith(self.prefixes) and folded not in self.bare:
            return
        methods = self.endpoints.get(path)
        if methods is not None and method not in methods:
            raise MethodNotAllowed(
                f"The built-in authorization server does not answer {method} on this path.")
        raise NoRoute("This path belongs to the built-in authorization server, which has no "
                      "such endpoint; policy routes never see it.")
