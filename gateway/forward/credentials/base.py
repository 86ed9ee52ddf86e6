"""The interface every upstream credential mode implements.

A mode is a mutator of the upstream request (in the manner of Oathkeeper's): the
forwarder drops the client's ``Authorization`` and every header in :attr:`drop`, then
appends what the mode gives. Modes are built once per upstream, so per-request work is
only :meth:`CredentialMode.apply` (or :meth:`obtain`, for modes that must wait).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from gateway.protocol.tokens import PresentedToken

#: headers appended to the upstream request, in order
Credentials = Sequence[tuple[str, str]]


class CredentialMode:
    """How one upstream receives credentials.

    Synchronous modes (``awaits`` false) implement :meth:`apply`, the hot path: the
    forwarder calls it directly. Modes that may wait (a token to fetch) set ``awaits``
    and implement :meth:`obtain`. A mode whose credentials the upstream may refuse
    (401) and that can get new ones sets ``renews`` and implements :meth:`refused`.
    """

    #: the ``credentials:`` value in a policy file
    name: ClassVar[str]
    #: the forwarder awaits :meth:`obtain` rather than calling :meth:`apply`
    awaits: ClassVar[bool] = False
    #: a 401 from the upstream is about our credentials, not the client's
    renews: ClassVar[bool] = False
    #: request header names (lower case) never copied from the client, beyond ``Authorization``
    drop: frozenset[str] = frozenset()

    def apply(self, token: PresentedToken) -> Credentials:
        """The credential headers for a request the client made with ``token``."""
        raise NotImplementedError

    async def obtain(self, token: PresentedToken, subject: str | None = None) -> Credentials:
        """As :meth:`apply`, for modes that may wait; ``subject``: whom the token speaks
        for (the ``user`` mode sends that person's credentials)."""
        return self.apply(token)

    async def refused(self, sent: Credentials, subject: str | None = None) -> bool:
        """The upstream answered 401 to ``sent``: renew them. True when new credentials
        are worth a retry."""
        return False
