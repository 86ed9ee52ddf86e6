"""What the proxy's stages read of a client's request, whichever server parsed it.

Two servers hand requests to the pipeline: aiohttp's (``web.Request``, for connections
that also reach the built-in server's pages and endpoints) and the proxy listener's own
lean HTTP/1.1 protocol (:mod:`gateway.runtime.fastpath`). Both have these attributes, with
aiohttp's meaning, so route matching, token extraction and the forwarder are written once.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from multidict import CIMultiDictProxy, MultiMapping


class BodyReader(Protocol):
    """A request body as it arrives."""

    async def readany(self) -> bytes:
        """What has arrived of the body (waiting for something); ``b""`` at its end."""
        ...


class ClientRequest(Protocol):
    """A client's request: the parts the proxy reads (``aiohttp.web.Request`` has them)."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str:
        """The request target as sent: path and query, still percent-encoded."""
        ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def query(self) -> MultiMapping[str]: ...

    @property
    def remote(self) -> str | None:
        """The peer's address (the TCP peer: trusted proxies are the caller's business)."""
        ...

    @property
    def scheme(self) -> str: ...

    @property
    def host(self) -> str:
        """The ``Host`` header, or the listener's own address without one."""
        ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body_exists(self) -> bool: ...

    @property
    def content(self) -> BodyReader: ...

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's connection; ``None`` once the client has left."""
        ...
