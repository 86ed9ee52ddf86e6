"""(being written)"""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register this module's endpoints."""


async def enable_jwt_access_tokens(server: object) -> None:
    """Sign access tokens as RFC 9068 JWTs (being written)."""
    raise NotImplementedError("JWT access tokens are not available yet")
