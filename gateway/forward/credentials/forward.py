"""``credentials: forward`` (the default): the client's token, in the upstream's scheme."""

from __future__ import annotations

from gateway.config.policy import Upstream
from gateway.forward.credentials.base import CredentialMode, Credentials
from gateway.protocol.tokens import PresentedToken


class ForwardMode(CredentialMode):
    """Sends the client's own token as ``Authorization: <scheme> <token>``."""

    name = "forward"

    def __init__(self, upstream: Upstream) -> None:
        self._prefix = f"{upstream.scheme} "  # formatted once, not per request

    def apply(self, token: PresentedToken) -> Credentials:
        return (("Authorization", self._prefix + token.value),)
