"""``credentials: replace``: a fixed credential of the gateway's, from the environment."""

from __future__ import annotations

from gateway.config.policy import Upstream, replacement_credential
from gateway.forward.credentials.base import CredentialMode, Credentials
from gateway.protocol.tokens import PresentedToken


class ReplaceMode(CredentialMode):
    """Sends ``replace_header: $replace_value_env``; the client's own value of that
    header never passes."""

    name = "replace"

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.drop = frozenset({upstream.replace_header.lower()})

    def apply(self, token: PresentedToken) -> Credentials:
        # read per request, as before: the variable is the deployment's to rotate
        return ((self.upstream.replace_header, replacement_credential(self.upstream)),)
