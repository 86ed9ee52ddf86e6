"""Bounded retries for calls to a token authority (introspection, Anaplan validate).

Connection errors, timeouts and 5xx answers are retried up to ``retries`` extra times,
with exponential backoff and full jitter (so a fleet of replicas does not retry in
lockstep). Any other answer is returned as it is, for the validator to judge; when
every attempt failed, :class:`ValidatorUnavailable` says why the last one did.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import aiohttp

from gateway.authn.validators.base import ValidatorUnavailable

Send = Callable[[], AbstractAsyncContextManager[aiohttp.ClientResponse]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many extra attempts, and the base of the backoff between them (seconds)."""

    retries: int = 2
    backoff: float = 0.1

    async def fetch(self, send: Send, *, what: str) -> tuple[int, bytes]:
        """``(status, body)`` of the first answer that is not a 5xx."""
        last = "no attempt made"
        for attempt in range(max(0, self.retries) + 1):
            if attempt:
                await asyncio.sleep(random.uniform(0, self.backoff * 2 ** (attempt - 1)))
            try:
                async with send() as resp:
                    if resp.status >= 500:
                        last = f"{what} answered {resp.status}"
                        continue
                    return resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{what} unreachable ({type(exc).__name__})"
        raise ValidatorUnavailable(last)
