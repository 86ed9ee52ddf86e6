"""``credentials: strip``: the upstream receives no credential at all."""

from __future__ import annotations

from gateway.forward.credentials.base import CredentialMode, Credentials
from gateway.protocol.tokens import PresentedToken


class StripMode(CredentialMode):
    """Sends nothing: the client's ``Authorization`` is dropped like every request's."""

    name = "strip"

    def apply(self, token: PresentedToken) -> Credentials:
        return ()
