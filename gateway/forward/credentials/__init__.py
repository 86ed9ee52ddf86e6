"""Upstream credential modes: one module per ``credentials:`` value of a policy.

:func:`mode_for` builds the mode of an upstream whose mode needs nothing but its policy;
modes that need services (``service``: Redis, a token service) are built by the runtime
and handed to the forwarder.
"""

from __future__ import annotations

from gateway.config.policy import Upstream
from gateway.forward.credentials.base import CredentialMode, Credentials
from gateway.forward.credentials.forward import ForwardMode
from gateway.forward.credentials.replace import ReplaceMode
from gateway.forward.credentials.strip import StripMode

__all__ = ["MACHINE_MODES", "CredentialMode", "Credentials", "ForwardMode", "ReplaceMode",
           "StripMode", "mode_for"]

#: The modes a machine client's token (no person behind it) may reach: those where the
#: gateway presents credentials of its own choosing, never the client's token nor none.
#: Anything not named here refuses machines, so a new mode does until it is added; the
#: planned ``user`` mode (a person's own Anaplan sign-in) must stay out: a machine has
#: no person to sign in as.
MACHINE_MODES = frozenset({"service"})


def mode_for(upstream: Upstream) -> CredentialMode:
    """The credential mode of ``upstream``, for the modes built from policy alone."""
    if upstream.credentials == "forward":
        return ForwardMode(upstream)
    if upstream.credentials == "strip":
        return StripMode()
    if upstream.credentials == "replace":
        return ReplaceMode(upstream)
    raise ValueError(f"upstream {upstream.name!r}: credentials {upstream.credentials!r} "
                     "needs the runtime's services")
