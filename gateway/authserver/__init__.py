"""The built-in OAuth 2.0 authorization server (enabled by ``GATEWAY_ISSUER``).

The rest of the gateway uses it through the names below only: the runtime plugs it in
with :class:`BuiltinServer` (routes, lifetime, a validator like any other), and the
operator commands act on its Redis records through :class:`AuthAdmin` (which the JSON
admin API uses too).
"""

from gateway.authserver.admin import AdminError, AuthAdmin, policy_view
from gateway.authserver.metrics import AuthServerMetrics
from gateway.authserver.plugin import BuiltinServer
from gateway.authserver.server import DeviceFlowTiming

__all__ = ["AdminError", "AuthAdmin", "AuthServerMetrics", "BuiltinServer", "DeviceFlowTiming",
           "policy_view"]
