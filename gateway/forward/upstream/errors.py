"""How an exchange with an upstream fails: one hierarchy under :class:`UpstreamError`.

The messages are what the gateway logs and may show a client, so they say what went
wrong without naming anything secret (no header values, no bodies).
"""

from __future__ import annotations


class UpstreamError(Exception):
    """The exchange with the upstream failed; the message says how (no secrets in it)."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made within the connect timeout."""


class UpstreamTimeout(UpstreamError):
    """The upstream was silent for the read timeout."""


class UpstreamBroken(UpstreamError):
    """The upstream closed the connection early or sent something that is not HTTP."""


class UpstreamDisconnected(UpstreamBroken):
    """The connection closed before any byte of the answer: the request may be sent again
    when that cannot do harm (a pooled connection the upstream had just closed)."""


class BodyFailed(UpstreamError):
    """Reading the client's body failed; ``__cause__`` says why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("The request body could not be read.")
        self.__cause__ = cause
